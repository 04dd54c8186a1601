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
    let _: medpipe::report::inputs::QuantizeMetrics = serde_json::from_value(m.clone()).unwrap();
}
