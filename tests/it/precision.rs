//! `[model] dtype`: the model stages compute in half precision on a GPU (`auto`: f16 on
//! wgpu, bf16 on CUDA), in one process, and record it; QLoRA keeps its LoRA params, AdamW
//! and the loss in f32 and scales the f16 loss, so it trains as the f32 CPU run does.

use serde_json::Value;

use crate::forward::wgpu_available;
use crate::small::{self, Upstream};

fn metrics(ws: &std::path::Path, file: &str) -> Value {
    let art = small::read_json(&ws.join("reports").join(file));
    assert_eq!(art["status"], "completed", "{file}: {art}");
    art["metrics"].clone()
}

/// (loss, grad_norm) per optimizer step, and the validation losses.
fn training(m: &Value) -> (Vec<(f64, f64)>, Vec<f64>) {
    let steps = m["steps"].as_array().unwrap().iter();
    let val = m["val"].as_array().unwrap().iter();
    (
        steps
            .map(|s| {
                (
                    s["loss"].as_f64().unwrap(),
                    s["grad_norm"].as_f64().unwrap(),
                )
            })
            .collect(),
        val.map(|v| v["loss"].as_f64().unwrap()).collect(),
    )
}

#[test]
fn on_wgpu_the_whole_pipeline_computes_in_f16_and_trains_like_the_f32_cpu_run() {
    if !wgpu_available("on_wgpu_the_whole_pipeline_computes_in_f16_and_trains_like_the_f32_cpu_run")
    {
        return;
    }
    // The small pipeline, run to the end on the CPU in f32.
    let (_tmp, ws) = small::copy_of(Upstream::Evaluate);
    let (cpu_steps, cpu_val) = training(&metrics(&ws, "training_metrics.json"));
    assert!(!cpu_steps.is_empty() && !cpu_val.is_empty());

    // The same pipeline on wgpu: every stage after the probe runs again, in one process.
    small::run(&ws, &["--set", "probe.device=wgpu"]);
    let baseline = metrics(&ws, "baseline.json");
    assert_eq!(baseline["dtype"], "f16", "{baseline}");
    assert_eq!(baseline["bench"]["model"]["dtype"], "f16");
    let quantize = metrics(&ws, "quantize.json");
    assert_eq!(quantize["compute_dtype"], "f16", "{quantize}");
    assert_eq!(quantize["base"]["compute_dtype"], "f16", "{quantize}");

    let train = metrics(&ws, "training_metrics.json");
    assert_eq!(train["compute_dtype"], "f16", "{train}");
    // f16 scales the loss (2^16 to start); no step of this run overflowed.
    for s in train["steps"].as_array().unwrap() {
        assert_eq!(s["loss_scale"], 65536.0, "{s}");
        assert!(s.get("skipped").is_none(), "{s}");
    }
    let (steps, val) = training(&train);
    assert_eq!(steps.len(), cpu_steps.len());
    for ((loss, norm), (cpu_loss, cpu_norm)) in steps.iter().zip(&cpu_steps) {
        assert!(
            loss.is_finite() && (loss - cpu_loss).abs() < 0.01,
            "loss {loss} vs f32 {cpu_loss}"
        );
        assert!(
            (norm / cpu_norm - 1.0).abs() < 0.05,
            "grad norm {norm} vs f32 {cpu_norm}"
        );
    }
    for (v, cpu) in val.iter().zip(&cpu_val) {
        assert!((v - cpu).abs() < 0.01, "val loss {v} vs f32 {cpu}");
    }
    // The adapter is shipped in f32, as peft saves it.
    let adapter = std::fs::read(ws.join("checkpoints/adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&adapter).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::F32));

    let eval = metrics(&ws, "evaluation.json");
    let variants = eval["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 3, "{eval}");
    for v in variants {
        assert_eq!(v["performance"]["compute_dtype"], "f16", "{v}");
    }
    let report = std::fs::read_to_string(ws.join("reports/BENCHMARK_REPORT.md")).unwrap();
    assert!(report.contains("| nf4+adapter | f16 |"), "{report}");

    // f32 on request: the model stages' inputs changed, so they run again, in f32.
    let log = small::run(
        &ws,
        &[
            "--set",
            "probe.device=wgpu",
            "--set",
            "model.dtype=f32",
            "--to",
            "baseline",
        ],
    );
    assert!(log.contains("baseline: running"), "{log}");
    assert_eq!(metrics(&ws, "baseline.json")["dtype"], "f32");
}

#[test]
fn a_half_precision_the_cpu_cannot_compute_in_is_refused_before_the_first_stage() {
    let (_tmp, ws) = small::copy_of(Upstream::Download);
    let before = small::snapshot(&ws.join("reports"));
    let out = small::command(&ws, "run", &["--set", "model.dtype=bf16"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        crate::common::stderr(&out)
    );
    let err = crate::common::stderr(&out);
    assert!(
        err.contains("model.dtype = \"bf16\" is not allowed"),
        "{err}"
    );
    assert!(err.contains("probe.device = \"cpu\""), "{err}");
    assert_eq!(small::snapshot(&ws.join("reports")), before, "nothing ran");
}
