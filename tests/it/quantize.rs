//! `medpipe run --to quantize` on the default pipeline (builtin:tiny): the NF4 checkpoint
//! and its artifact, end to end through the binary.

use burn::backend::NdArray;
use medpipe::model::Qwen25Vl;
use serde_json::Value;

use crate::common::{run_in, stderr};

#[test]
fn run_to_quantize_writes_an_nf4_checkpoint_that_loads_and_a_complete_artifact() {
    let ws = tempfile::tempdir().unwrap();
    let out = run_in(ws.path(), &["run", "--to", "quantize", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let nf4 = ws.path().join("checkpoints/nf4");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(nf4.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let model = Qwen25Vl::<NdArray<f32>>::load(&nf4, &Default::default()).unwrap();
    assert!(model.linear_bytes() > 0);

    let art: Value = serde_json::from_str(
        &std::fs::read_to_string(ws.path().join("reports/quantize.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(art["status"], "completed", "{art}");
    let m = &art["metrics"];
    let layers = m["quantized_layers"].as_u64().unwrap();
    assert!(layers > 0);
    assert_eq!(m["per_layer"].as_array().unwrap().len() as u64, layers);
    assert_eq!(m["skip_modules"], serde_json::json!(["lm_head"]));
    assert!(m["compression_ratio"].as_f64().unwrap() > 1.0);
    assert!(m["memory_after_load_rss_bytes"].as_u64().unwrap() > 0);
    // both models timed on the same prompts
    for p in [m, &m["base"]] {
        assert_eq!(p["documents"], 3, "{p}");
        assert!(p["latency_ms"]["mean_ms"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["load_time_s"].as_f64().unwrap() > 0.0, "{p}");
    }
    // the NF4 weights on disk are smaller than the base ones
    assert!(m["weights_bytes"].as_u64().unwrap() < m["base"]["weights_bytes"].as_u64().unwrap());
    // the report's reader takes the layout
    let _: medpipe::stages::quantize::QuantizeMetrics = serde_json::from_value(m.clone()).unwrap();
}

/// Writes a sharded f32 checkpoint of `n` Linear weights `[rows, cols]`, two per shard.
fn synthetic_checkpoint(dir: &std::path::Path, n: usize, rows: usize, cols: usize) -> u64 {
    use safetensors::tensor::TensorView;
    std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float32"}"#).unwrap();
    let shards = n.div_ceil(2);
    let mut weight_map = serde_json::Map::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut total = 0u64;
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let tensors: Vec<(String, Vec<u8>)> = (2 * s..(2 * s + 2).min(n))
            .map(|i| {
                let bytes: Vec<u8> = (0..rows * cols)
                    .flat_map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                        v.to_le_bytes()
                    })
                    .collect();
                (format!("model.layers.{i}.mlp.up_proj.weight"), bytes)
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, b)| {
                total += b.len() as u64;
                weight_map.insert(k.clone(), file.clone().into());
                let v = TensorView::new(safetensors::Dtype::F32, vec![rows, cols], b).unwrap();
                (k.clone(), v)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    total
}

#[test]
fn quantizing_a_checkpoint_many_tensors_large_streams_below_its_size_in_peak_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    // 16 weights of 4 MiB in 8 shards: 64 MiB, 16x one tensor.
    let (n, rows, cols) = (16, 512, 2048);
    let input_bytes = synthetic_checkpoint(&model, n, rows, cols);
    let out = crate::common::medpipe()
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(tmp.path().join("nf4"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = crate::common::stdout(&out);
    let peak_mb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("memory: peak RSS "))
        .and_then(|l| l.trim_end_matches(" MB").parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS line in {text}"));
    let input_mb = input_bytes as f64 / 1e6;
    eprintln!("quantizing {input_mb:.1} MB in {n} tensors: peak RSS {peak_mb:.1} MB");
    // Streaming holds one mapped shard (two tensors), one tensor's f32 values and their
    // dequantization, and the NF4 output (~1/7 of the input) — not the whole input.
    assert!(
        peak_mb < input_mb,
        "peak RSS {peak_mb} MB is not below the {input_mb} MB input"
    );
}

/// A copy of the tiny fixture checkpoint in `dir`.
fn tiny_copy(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let src = crate::common::fixture("qwen2_5_vl_tiny");
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

fn quantize(model: &std::path::Path, out: &std::path::Path, skip: &[&str]) -> std::process::Output {
    let mut c = crate::common::medpipe();
    c.args(["quantize", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out);
    for s in skip {
        c.args(["--skip", s]);
    }
    c.output().unwrap()
}

#[test]
fn issue_15_quantize_skip_adds_to_lm_head_and_refuses_unknown_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_copy(&model);
    let out = tmp.path().join("nf4");
    let o = quantize(&model, &out, &["visual.merger"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["llm_int8_skip_modules"],
        serde_json::json!(["lm_head", "visual.merger"])
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for dense in ["lm_head.weight", "visual.merger.mlp.0.weight"] {
        assert_eq!(
            st.tensor(dense).unwrap().dtype(),
            safetensors::Dtype::F32,
            "{dense}"
        );
    }

    let o = quantize(&model, &tmp.path().join("typo"), &["visual.mergr"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("`visual.mergr` matches no Linear weight"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("typo").exists());
}

#[test]
fn issue_15_quantize_refuses_an_output_inside_the_model_and_an_nf4_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_copy(&model);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    for out in [model.clone(), model.join("nf4")] {
        let o = quantize(&model, &out, &[]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("would overwrite the input checkpoint"),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!model.join("nf4").exists());

    let nf4 = tmp.path().join("nf4");
    assert!(quantize(&model, &nf4, &[]).status.success());
    let o = quantize(&nf4, &tmp.path().join("nf4-again"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already quantized"), "{}", stderr(&o));
}

#[test]
fn issue_15_rust_log_output_to_a_file_has_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_copy(&model);
    let o = crate::common::medpipe()
        .env("RUST_LOG", "medpipe=debug")
        .args(["quantize", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(tmp.path().join("nf4"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("quantized"), "debug events are logged: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in a piped log: {log:?}"
    );
}
