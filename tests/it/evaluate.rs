//! The evaluate stage end to end on builtin:tiny: `medpipe run --to evaluate`, then
//! `--to report` picking up evaluation.json.

use serde_json::Value;

use crate::small::{self, read_json, EVAL_DOCS, TEST_DOCS};

#[test]
fn evaluate_scores_base_nf4_and_adapter_variants_and_feeds_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path();
    small::run(ws, &["--to", "evaluate"]);

    let a = read_json(&ws.join("reports/evaluation.json"));
    assert_eq!(a["status"], "completed");
    let m = &a["metrics"];
    let n = TEST_DOCS + EVAL_DOCS;
    assert_eq!(m["test_documents"], n);
    assert_eq!(m["test_split_documents"], TEST_DOCS);
    assert_eq!(m["eval_documents"], EVAL_DOCS);
    assert_eq!(m["generation"]["sampling"], "greedy");
    assert_eq!(m["generation"]["max_new_tokens"], 8);

    let variants = m["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "nf4", "nf4+adapter"], "{m}");
    assert_eq!(m["not_run"].as_array().map(Vec::len), Some(0), "{m}");
    let base = &variants[0];
    assert_eq!(base["name"], "base");
    let overall = &base["scores"]["overall"];
    assert_eq!(overall["documents"], n);
    for key in [
        "term_accuracy",
        "value_accuracy",
        "combined",
        "precision",
        "recall",
        "f1",
    ] {
        for part in ["value", "ci95_low", "ci95_high"] {
            assert!(overall[key][part].is_f64(), "{key}.{part}: {overall}");
        }
    }
    assert!(overall["unparseable_answers"].is_u64());
    let by_source = base["scores"]["by_source"].as_object().unwrap();
    assert!(by_source.contains_key("synthetic") && by_source.contains_key("eval"));
    assert!(!base["scores"]["by_doc_type"]
        .as_object()
        .unwrap()
        .is_empty());
    let perf = &base["performance"];
    assert_eq!(perf["latency_ms"]["n"], n);
    assert_eq!(perf["first_token_ms"]["n"], n);
    assert!(perf["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(perf["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert!(perf["load_time_s"].is_f64());
    assert!(base["rss_after_load_bytes"].as_u64().unwrap() > 0);

    for v in &variants[1..] {
        assert_eq!(v["scores"]["overall"]["documents"], n, "{v}");
        let p = ws.join(v["predictions_path"].as_str().unwrap());
        let lines = std::fs::read_to_string(&p).unwrap().lines().count();
        assert_eq!(lines, n, "{}", p.display());
    }

    let preds = ws.join(base["predictions_path"].as_str().unwrap());
    assert_eq!(preds, ws.join("reports/predictions/base.jsonl"));
    let lines: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n);
    assert_eq!(
        lines.iter().filter(|l| l["set"] == "eval").count(),
        EVAL_DOCS
    );
    let unparseable = lines
        .iter()
        .filter(|l| l["score"]["parse"] == "unparseable")
        .count();
    assert_eq!(overall["unparseable_answers"], unparseable);
    assert!(a["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["path"].as_str().unwrap_or("").ends_with("base.jsonl")));

    small::run(ws, &["--to", "report"]);
    let report = read_json(&ws.join("reports/FINAL_REPORT.json"));
    let row = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "base")
        .unwrap_or_else(|| panic!("no base row: {}", report["variants"]));
    assert_eq!(row["combined"], overall["combined"]);
}
