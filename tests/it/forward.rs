//! `medpipe forward`: the parity harness as a user runs it.

use std::path::PathBuf;
use std::process::Command;

/// Same bar as the library tests: torch-on-CPU lands within 2e-6 of the reference.
const LOGITS_ATOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel)
}

fn f32s(st: &safetensors::SafeTensors<'_>, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn forward_subcommand_writes_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let inputs = fixture("qwen2_5_vl_tiny/reference.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["forward", "--model"])
        .arg(fixture("qwen2_5_vl_tiny"))
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got = std::fs::read(&out).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = std::fs::read(&inputs).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want).unwrap();
    let (g, w) = (f32s(&got, "logits"), f32s(&want, "logits"));
    assert_eq!(g.len(), w.len());
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= LOGITS_ATOL, "max |diff| {worst}");
}

#[test]
fn forward_subcommand_on_a_directory_without_config_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["forward", "--model"])
        .arg(dir.path())
        .arg("--inputs")
        .arg(fixture("qwen2_5_vl_tiny/reference.safetensors"))
        .arg("--out")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert!(!dir.path().join("o.safetensors").exists());
}

#[test]
fn forward_subcommand_on_an_nf4_checkpoint_writes_the_bitsandbytes_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    // Same inputs as the dense reference; the NF4 reference holds only the logits.
    let inputs = fixture("qwen2_5_vl_tiny/reference.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["forward", "--model"])
        .arg(fixture("qwen2_5_vl_tiny/nf4"))
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got = std::fs::read(&out).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = std::fs::read(fixture("qwen2_5_vl_tiny/nf4/reference.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want).unwrap();
    let (g, w) = (f32s(&got, "logits"), f32s(&want, "logits"));
    assert_eq!(g.len(), w.len());
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= LOGITS_ATOL, "max |diff| {worst}");
}

#[test]
fn forward_subcommand_with_an_adapter_writes_peft_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["forward", "--model"])
        .arg(fixture("qwen2_5_vl_tiny"))
        .arg("--adapter")
        .arg(fixture("qwen2_5_vl_tiny/lora"))
        .arg("--inputs")
        .arg(fixture("qwen2_5_vl_tiny/reference.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let got = std::fs::read(&out).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let want = std::fs::read(fixture("qwen2_5_vl_tiny/lora/reference.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want).unwrap();
    let (g, w) = (f32s(&got, "logits"), f32s(&want, "logits"));
    assert_eq!(g.len(), w.len());
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= LOGITS_ATOL, "max |diff| {worst}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn forward_and_generate_on_cuda_in_a_cpu_build_exit_2_naming_the_rebuild_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let forward = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["forward", "--device", "cuda:0", "--model"])
        .arg(fixture("qwen2_5_vl_tiny"))
        .arg("--inputs")
        .arg(fixture("qwen2_5_vl_tiny/reference.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let generate = Command::new(env!("CARGO_BIN_EXE_medpipe"))
        .args(["generate", "--device", "cuda", "--prompt", "x", "--model"])
        .arg(fixture("qwen2_5_vl_tiny"))
        .output()
        .unwrap();
    for (what, o) in [("forward", forward), ("generate", generate)] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("--device cuda") && err.contains("--features cuda"),
            "{what}: {err}"
        );
    }
    assert!(!out.exists(), "nothing is written");
}
