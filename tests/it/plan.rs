//! `medpipe plan` and the memory check every model stage runs before it loads: predictions
//! from config.json alone, held to measured peaks, and refusals that name what to change.

use std::path::{Path, PathBuf};

use medpipe::builtin::{self, spec::TinySpec};
use serde_json::Value;

use crate::common::{medpipe, stderr, stdout};
use crate::small::{self, Upstream};

/// A model of chosen size with builtin:tiny's tokenizer: text width 512 (8 heads, 2
/// key/value heads), 4 layers; vision width 256, 4 blocks. ~20 M parameters, 80 MB in f32:
/// large enough that the process's fixed costs do not swamp the measure.
fn scaled_model(dir: &Path) -> PathBuf {
    let corpus = builtin::tokenizer_corpus(0, 300);
    builtin::materialize_with(dir, 0, &corpus, |vocab| {
        let mut s = TinySpec::tiny(vocab);
        s.hidden_size = 512;
        s.intermediate_size = 1408;
        s.num_hidden_layers = 4;
        s.num_attention_heads = 8;
        s.num_key_value_heads = 2;
        s.vision_config.hidden_size = 256;
        s.vision_config.intermediate_size = 704;
        s.vision_config.out_hidden_size = 512;
        s
    })
    .unwrap()
    .dir
}

/// A copy of the checkpoint in `src` with every f32 tensor stored as bf16, and its config
/// saying so (as the hub's releases are).
fn bf16_copy(src: &Path, dst: &Path) -> PathBuf {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| match v.dtype() {
                    Dtype::F32 => {
                        let b = v
                            .data()
                            .chunks_exact(4)
                            .flat_map(|c| {
                                let x = f32::from_le_bytes(c.try_into().unwrap());
                                half::bf16::from_f32(x).to_le_bytes()
                            })
                            .collect();
                        (k, Dtype::BF16, v.shape().to_vec(), b)
                    }
                    d => (k, d, v.shape().to_vec(), v.data().to_vec()),
                })
                .collect();
            let views: Vec<_> = tensors
                .iter()
                .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
                .collect();
            safetensors::serialize_to_file(views, None, &dst.join(name)).unwrap();
        } else if name == "config.json" {
            let mut cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            cfg["torch_dtype"] = "bfloat16".into();
            std::fs::write(dst.join(name), cfg.to_string()).unwrap();
        } else if path.is_file() {
            std::fs::copy(&path, dst.join(name)).unwrap();
        }
    }
    dst.to_path_buf()
}

fn plan_json(args: &[&str]) -> (Value, std::process::Output) {
    let out = medpipe()
        .arg("plan")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    (v, out)
}

/// `medpipe plan --measure` on `dir`: the measure beside the prediction.
fn measured(dir: &Path, batch: usize, max_pixels: u64) -> Value {
    let (v, out) = plan_json(&[
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--measure",
        "--set",
        &format!("baseline.batch_sizes=[{batch}]"),
        "--set",
        &format!("model.max_pixels={max_pixels}"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    v["measured"].clone()
}

#[test]
fn predictions_are_within_20_percent_of_measured_cpu_peaks_dense_and_nf4_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let dense = scaled_model(&tmp.path().join("dense"));
    let quantize = |from: &Path, name: &str| {
        let out = tmp.path().join(name);
        let q = medpipe()
            .args(["quantize", "--model"])
            .arg(from)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", stderr(&q));
        out
    };
    let nf4 = quantize(&dense, "nf4");
    // bf16 checkpoints: the CPU keeps their Linears in bf16, read in place.
    let bf16 = bf16_copy(&dense, &tmp.path().join("bf16"));
    let nf4_of_bf16 = quantize(&bf16, "nf4-of-bf16");
    // Activations led by a full-attention vision block (one large page), by the MLPs of a
    // batch of pages, and nearly none (a tiny page): weights and working memory alone.
    for (dir, batch, pixels) in [
        (&dense, 1, 960_400),
        (&dense, 2, 401_408),
        (&nf4, 1, 960_400),
        (&nf4, 8, 50_176),
        (&nf4, 1, 3_136),
        (&bf16, 1, 3_136),
        (&bf16, 2, 401_408),
        (&nf4_of_bf16, 1, 3_136),
    ] {
        let m = measured(dir, batch, pixels);
        let ratio = m["ratio"].as_f64().unwrap();
        let name = dir.file_name().unwrap().to_string_lossy();
        eprintln!("{name}, batch {batch}, {pixels} px: measured / predicted = {ratio:.3}");
        assert!(
            (0.8..=1.2).contains(&ratio),
            "{name}, batch {batch}, {pixels} px: measured / predicted = {ratio:.3}: {m}"
        );
        assert_eq!(m["batch"], batch);
        assert!(m["image_pixels"].as_u64().unwrap() <= pixels);
    }
}

#[test]
fn the_default_pipeline_fits_and_a_limit_below_it_exits_1_marking_the_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().to_str().unwrap();
    let (v, out) = plan_json(&["--workspace", ws, "--device", "cpu"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["baseline", "quantize", "train", "evaluate"]);
    for s in v["stages"].as_array().unwrap() {
        let part = |k: &str| s[k].as_u64().unwrap();
        let work = part("kv_cache") + part("activations") + part("optimizer");
        assert_eq!(
            part("peak_bytes"),
            part("weights") + work.max(part("loading")),
            "{s}"
        );
        assert_eq!(s["fits"], true, "{s}");
    }
    assert_eq!(v["budget"]["source"], "available RAM");

    let out = medpipe()
        .args(["plan", "--workspace", ws, "--device", "cpu"])
        .args(["--set", "model.memory_limit_mib=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.contains("DOES NOT FIT"), "{table}");
    assert!(
        table.contains("1.00 MiB (model.memory_limit_mib)"),
        "{table}"
    );
    assert!(
        stderr(&out).contains("a stage will not fit"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_stage_over_its_memory_limit_refuses_before_loading_and_harms_nothing() {
    let (_tmp, ws) = small::copy_of(Upstream::Download);
    // Settle the copy first (its first run re-verifies what it inherited).
    small::run(&ws, &["--to", "download"]);
    let before = small::snapshot(&ws.join("reports"));
    let out = small::command(
        &ws,
        "run",
        &["--to", "baseline", "--set", "model.memory_limit_mib=1"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for want in [
        "baseline will not fit in memory",
        "weights",
        "activations",
        "(model.memory_limit_mib) is available",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    let baseline = small::read_json(&ws.join("reports/baseline.json"));
    assert_eq!(baseline["status"], "failed");
    // The stages before it are untouched.
    let after = small::snapshot(&ws.join("reports"));
    for (path, state) in &before {
        if path.ends_with("download.json") || path.ends_with("environment.json") {
            assert_eq!(after.get(path), Some(state), "{}", path.display());
        }
    }
}

#[test]
fn model_max_pixels_shrinks_every_page_the_baseline_reads_and_makes_it_stale() {
    let (_tmp, ws) = small::copy_of(Upstream::Download);
    let prompt_tokens = |ws: &Path| -> Vec<u64> {
        let b = small::read_json(&ws.join("reports/baseline.json"));
        b["metrics"]["bench"]["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["prompt_tokens"].as_u64().unwrap())
            .collect()
    };
    small::run(&ws, &["--to", "baseline"]);
    let full = prompt_tokens(&ws);
    // The baseline records the planner's prediction beside its measured peak.
    let b = small::read_json(&ws.join("reports/baseline.json"));
    let plan = &b["metrics"]["memory_plan"];
    assert_eq!(plan["stage"], "baseline", "{plan}");
    assert!(plan["peak_bytes"].as_u64().unwrap() > plan["weights"].as_u64().unwrap());
    // The smallest page the processor makes (56x56): one image token each.
    small::run(&ws, &["--to", "baseline", "--set", "model.max_pixels=3136"]);
    let small_pages = prompt_tokens(&ws);
    assert_eq!(full.len(), small_pages.len());
    for (f, s) in full.iter().zip(&small_pages) {
        assert!(
            s < f,
            "{s} prompt tokens at 3136 px vs {f} at the model's bound"
        );
    }
    let text_tokens = small_pages.iter().min().unwrap();
    assert!(small_pages.iter().all(|t| t - text_tokens < 50));
    // Back to the default bound: the baseline measured at 3136 px is stale.
    let status = small::command(&ws, "status", &[]).output().unwrap();
    let table = stdout(&status);
    let line = table.lines().find(|l| l.starts_with("baseline")).unwrap();
    assert!(line.contains("stale"), "{table}");
}

#[test]
fn quantize_makes_the_nf4_checkpoint_and_skips_timing_a_base_model_that_would_not_fit() {
    let (_tmp, ws) = small::copy_of(Upstream::Download);
    small::run(&ws, &["--to", "download"]);
    let out = small::command(&ws, "plan", &["--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let quantize = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "quantize")
        .unwrap();
    let (nf4, base) = (
        quantize["peak_bytes"].as_u64().unwrap(),
        quantize["optional_peak_bytes"].as_u64().unwrap(),
    );
    assert!(
        base > nf4,
        "the base model needs more than the NF4 one: {quantize}"
    );
    // A limit that holds the NF4 model and not the base one.
    let limit_mib = ((nf4 + base) / 2) >> 20;
    assert!(
        nf4 <= limit_mib << 20 && limit_mib << 20 < base,
        "{quantize}"
    );

    let log = small::run(
        &ws,
        &[
            "--from",
            "quantize",
            "--to",
            "quantize",
            "--set",
            &format!("model.memory_limit_mib={limit_mib}"),
        ],
    );
    let art = small::read_json(&ws.join("reports/quantize.json"));
    assert_eq!(art["status"], "completed", "{art}\n{log}");
    assert!(ws.join("checkpoints/nf4/config.json").is_file());
    let m = &art["metrics"];
    assert!(
        m["latency_ms"]["mean_ms"].as_f64().unwrap() > 0.0,
        "the NF4 model is timed"
    );
    assert!(m["base"].is_null(), "the base model is not: {m}");
    let warning = art["warnings"][0].as_str().unwrap_or_default();
    for want in [
        "base model was not timed",
        "would not fit",
        "model.memory_limit_mib",
    ] {
        assert!(warning.contains(want), "{want:?} missing from {warning:?}");
    }
}

/// 8 decoder layers of width 256 (4 heads): at 384 tokens each layer keeps ~25 MB for its
/// backward, against 4 MB of weights, so the saved activations lead the peak.
fn eight_layer_model(tmp: &Path) -> PathBuf {
    let corpus = builtin::tokenizer_corpus(0, 300);
    builtin::materialize_with(&tmp.join("m"), 0, &corpus, |vocab| {
        let mut s = TinySpec::tiny(vocab);
        s.hidden_size = 256;
        s.intermediate_size = 704;
        s.num_hidden_layers = 8;
        s.num_attention_heads = 4;
        s.num_key_value_heads = 2;
        s.vision_config.out_hidden_size = 256;
        s
    })
    .unwrap()
    .dir
}

/// `medpipe bench --train` on `device` with one setting of `train.recompute`, its JSON
/// result.
fn train_bench(dir: &Path, device: &str, recompute: &str, out: &Path) -> Value {
    let run = medpipe()
        .args(["bench", "--train", "--device", device, "--model"])
        .arg(dir)
        .args(["--seq-len", "384", "--steps", "1", "--lora-r", "8"])
        .args(["--recompute", recompute, "--output"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{device} {recompute}: {}",
        stderr(&run)
    );
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

#[test]
fn layer_recomputation_cuts_the_measured_training_peak_and_the_planner_predicts_both_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = eight_layer_model(tmp.path());
    let none = train_bench(&dir, "cpu", "none", &tmp.path().join("none.json"));
    let layers = train_bench(&dir, "cpu", "layers", &tmp.path().join("layers.json"));
    for r in [&none, &layers] {
        let source = r["memory_source"].as_str().unwrap();
        assert!(source.contains("reset after loading"), "{source}");
        let ratio = r["work_bytes"].as_f64().unwrap() / r["predicted_work_bytes"].as_f64().unwrap();
        eprintln!("recompute {}: {r}", r["recompute"]);
        assert!(
            (0.7..=1.3).contains(&ratio),
            "recompute {}: measured / predicted = {ratio:.3}: {r}",
            r["recompute"]
        );
    }
    // The same samples, seed and dropout masks: the same step, in about a quarter of the
    // memory (218.8 vs 55.3 MB when written).
    same_step_in_a_third_of_the_memory(&none, &layers, 1e-5);
    assert_eq!(layers["recompute"], "layers");
}

/// `layers` gave the loss of `none` (within `rel`) and added under a third of its memory.
fn same_step_in_a_third_of_the_memory(none: &Value, layers: &Value, rel: f64) {
    let loss = |r: &Value| r["final_loss"].as_f64().unwrap();
    assert!(
        (loss(none) - loss(layers)).abs() < rel * loss(none),
        "{none} vs {layers}"
    );
    let work = |r: &Value| r["work_bytes"].as_u64().unwrap();
    assert!(
        3 * work(layers) < work(none),
        "{} vs {}",
        work(layers),
        work(none)
    );
}

/// On wgpu (lavapipe in CI) the figures are the allocator's reserved bytes, which grow in
/// whole pages: recomputation still cuts what the steps add several times over (176 vs 24
/// MiB when written), for the same loss.
#[test]
fn layer_recomputation_cuts_the_allocators_training_peak_on_wgpu() {
    if !crate::forward::wgpu_available(
        "layer_recomputation_cuts_the_allocators_training_peak_on_wgpu",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = eight_layer_model(tmp.path());
    let none = train_bench(&dir, "wgpu", "none", &tmp.path().join("none.json"));
    let layers = train_bench(&dir, "wgpu", "layers", &tmp.path().join("layers.json"));
    for r in [&none, &layers] {
        assert_eq!(r["memory_source"], "allocator bytes reserved", "{r}");
        eprintln!("wgpu, recompute {}: {r}", r["recompute"]);
    }
    same_step_in_a_third_of_the_memory(&none, &layers, 1e-4);
}
