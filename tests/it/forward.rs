//! `medpipe forward`: the parity harness as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Same bar as the library tests: torch-on-CPU lands within 2e-6 of the reference.
const LOGITS_ATOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel)
}

/// The `logits` tensor of a safetensors file, as f32.
fn logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Runs `medpipe forward --model MODEL [--adapter A] --inputs INPUTS --out OUT`.
fn forward(model: &Path, adapter: Option<&Path>, inputs: &Path, out: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_medpipe"));
    cmd.arg("forward").arg("--model").arg(model);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    cmd.arg("--inputs").arg(inputs).arg("--out").arg(out);
    cmd.output().unwrap()
}

/// `forward` on the fixture's reference inputs succeeds and its logits are within
/// [`LOGITS_ATOL`] of the reference file `want`.
fn assert_forward_matches(model: &str, adapter: Option<&str>, want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let adapter = adapter.map(fixture);
    let run = forward(
        &fixture(model),
        adapter.as_deref(),
        &fixture("qwen2_5_vl_tiny/reference.safetensors"),
        &out,
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (g, w) = (logits(&out), logits(&fixture(want)));
    assert_eq!(g.len(), w.len());
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= LOGITS_ATOL, "max |diff| {worst}");
}

#[test]
fn forward_subcommand_writes_reference_logits() {
    assert_forward_matches(
        "qwen2_5_vl_tiny",
        None,
        "qwen2_5_vl_tiny/reference.safetensors",
    );
}

#[test]
fn forward_subcommand_on_a_directory_without_config_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let run = forward(
        dir.path(),
        None,
        &fixture("qwen2_5_vl_tiny/reference.safetensors"),
        &out,
    );
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert!(!out.exists());
}

#[test]
fn forward_subcommand_on_an_nf4_checkpoint_writes_the_bitsandbytes_reference_logits() {
    // Same inputs as the dense reference; the NF4 reference holds only the logits.
    assert_forward_matches(
        "qwen2_5_vl_tiny/nf4",
        None,
        "qwen2_5_vl_tiny/nf4/reference.safetensors",
    );
}

#[test]
fn forward_subcommand_with_an_adapter_writes_peft_logits() {
    assert_forward_matches(
        "qwen2_5_vl_tiny",
        Some("qwen2_5_vl_tiny/lora"),
        "qwen2_5_vl_tiny/lora/reference.safetensors",
    );
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
