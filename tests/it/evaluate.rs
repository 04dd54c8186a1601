//! The evaluate stage end to end on builtin:tiny: on a copy of the workspace `medpipe run --to
//! evaluate` built (shared by the tests), `--to report` picking up evaluation.json.

use serde_json::Value;

use crate::small::{self, read_json, Upstream, EVAL_DOCS, TEST_DOCS};

#[test]
fn evaluate_scores_base_nf4_and_adapter_variants_feeds_the_report_and_fails_on_a_failed_variant() {
    let (_dir, ws) = small::copy_of(Upstream::Evaluate);
    let ws = ws.as_path();

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

    // each variant's own memory (issue 15): the NF4 weights it holds are smaller than the
    // base's, and its peak covers at least those weights
    let mem = |i: usize, k: &str| {
        variants[i]["performance"][k].as_u64().unwrap_or_else(|| {
            panic!(
                "{k} of {}: {}",
                variants[i]["name"], variants[i]["performance"]
            )
        })
    };
    for (i, v) in variants.iter().enumerate() {
        eprintln!(
            "{}: weights resident {} B, RSS growth {} B, peak {} B",
            v["name"],
            mem(i, "weights_resident_bytes"),
            mem(i, "rss_delta_bytes"),
            mem(i, "peak_memory_bytes")
        );
        assert!(mem(i, "peak_memory_bytes") >= mem(i, "weights_resident_bytes"));
    }
    assert!(mem(1, "weights_resident_bytes") < mem(0, "weights_resident_bytes"));
    // the adapter's LoRA pairs are weights too
    assert!(mem(2, "weights_resident_bytes") > mem(1, "weights_resident_bytes"));
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

    let out = small::command(ws, "run", &["--to", "report"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    // the run table names every variant's score, nf4+adapter included (issue 15)
    let table = crate::common::stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("evaluate"))
        .unwrap_or_else(|| panic!("no evaluate row in {table}"));
    for v in ["base 0.", "nf4 0.", "nf4+adapter 0."] {
        assert!(row.contains(v), "`{v}` missing from {row}");
    }
    let report = read_json(&ws.join("reports/FINAL_REPORT.json"));
    let row = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "base")
        .unwrap_or_else(|| panic!("no base row: {}", report["variants"]));
    assert_eq!(row["combined"], overall["combined"]);

    a_failed_variant_fails_evaluate_unless_partial_results_are_allowed(ws);
}

/// Issue 15: on the workspace `--to evaluate` built, a truncated adapter makes `nf4+adapter`
/// fail; `run --only evaluate` then fails the stage (exit 1) naming the variant, unless
/// `evaluate.allow_partial` is set, when the stage completes listing the failure, and
/// `status` shows every variant (scores and the failure).
fn a_failed_variant_fails_evaluate_unless_partial_results_are_allowed(ws: &std::path::Path) {
    // a truncated adapter: nf4+adapter cannot load
    let adapter = ws.join("checkpoints/adapter/adapter_model.safetensors");
    let bytes = std::fs::read(&adapter).unwrap();
    std::fs::write(&adapter, &bytes[..bytes.len() / 2]).unwrap();
    // The truncated adapter makes train stale: `--only` refuses a stale upstream unless forced.
    let out = small::command(ws, "run", &["--only", "evaluate", "--force"])
        .output()
        .unwrap();
    let err = crate::common::stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let a = read_json(&ws.join("reports/evaluation.json"));
    assert_eq!(a["status"], "failed", "{a}");
    let msg = a["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("variant `nf4+adapter` failed") && msg.contains("evaluate.allow_partial"),
        "{msg}"
    );

    // allowed partial results: completed, the failure listed and shown beside the scores
    let out = small::command(
        ws,
        "run",
        &[
            "--only",
            "evaluate",
            "--force",
            "--set",
            "evaluate.allow_partial=true",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let a = read_json(&ws.join("reports/evaluation.json"));
    assert_eq!(a["status"], "completed");
    let not_run = a["metrics"]["not_run"].as_array().unwrap();
    assert_eq!(not_run.len(), 1, "{not_run:?}");
    assert_eq!(not_run[0]["name"], "nf4+adapter");
    assert_eq!(not_run[0]["status"], "failed");
    assert!(a["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains("nf4+adapter")));
    // with the adapter restored, everything is up to date and `status` shows the figures
    std::fs::write(&adapter, &bytes).unwrap();
    let status = small::command(ws, "status", &["--set", "evaluate.allow_partial=true"])
        .output()
        .unwrap();
    let text = crate::common::stdout(&status);
    let row = text
        .lines()
        .find(|l| l.starts_with("evaluate"))
        .unwrap_or_else(|| panic!("no evaluate row in {text}"));
    assert!(
        row.contains("base 0.") && row.contains("nf4 0.") && row.contains("nf4+adapter failed"),
        "{row}"
    );
}
