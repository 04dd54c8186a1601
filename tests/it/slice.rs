//! Issue #10 end to end on builtin:tiny: after a full run, `medpipe run --from quantize --to
//! evaluate` re-runs exactly that slice. `--from` *forces* its stage and every later one up
//! to `--to` (`RunOptions::from`, `Pipeline::plan`); stages before it are not considered at
//! all and the stages after `--to` are not run, so the report is left stale.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::common::{stderr, stdout};
use crate::small::{self, artifact_of, artifacts, read_json, Upstream};

/// The stages `--from quantize --to evaluate` covers, in order.
const SLICE: [&str; 4] = ["quantize", "prepare", "train", "evaluate"];
/// The stages outside it.
const OUTSIDE: [&str; 4] = ["probe", "download", "baseline", "report"];
/// Files the slice reproduces byte for byte on CPU (seeded data, NF4 quantization and
/// training are deterministic).
const REPRODUCED: [&str; 5] = [
    "checkpoints/adapter/adapter_model.safetensors",
    "checkpoints/adapter/adapter_config.json",
    "data/splits/train.jsonl",
    "data/splits/val.jsonl",
    "data/splits/test.jsonl",
];
/// Fields of a prediction line that are wall-clock measurements, not model output.
const TIMING_FIELDS: [&str; 2] = ["latency_ms", "first_token_ms"];

/// `(path, bytes, sha256)` of an artifact's outputs: their content, without the stat
/// fingerprint (which changes whenever a file is rewritten).
fn output_content(a: &Value) -> Vec<(Value, Value, Value)> {
    a["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["path"].clone(), o["bytes"].clone(), o["sha256"].clone()))
        .collect()
}

/// The lines of a predictions file (JSON Lines) with their timing fields removed.
fn predictions_without_timing(jsonl: &[u8]) -> Vec<Value> {
    std::str::from_utf8(jsonl)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for f in TIMING_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        })
        .collect()
}

#[test]
fn run_from_quantize_to_evaluate_forces_exactly_that_slice_reproduces_its_outputs_and_leaves_only_the_report_stale(
) {
    let (_dir, ws) = small::copy_of(Upstream::Evaluate);
    let ws = ws.as_path();
    let reports = ws.join("reports");
    small::run(ws, &["--to", "report"]);
    let before = small::snapshot(&reports);
    let base_before = small::snapshot(&ws.join("checkpoints/base"));
    let old: BTreeMap<&str, Value> = artifacts()
        .iter()
        .map(|(s, f)| (*s, read_json(&reports.join(f))))
        .collect();
    let reproduced_before: Vec<Vec<u8>> = REPRODUCED
        .iter()
        .map(|p| std::fs::read(ws.join(p)).unwrap())
        .collect();

    let log = small::run(ws, &["--from", "quantize", "--to", "evaluate"]);

    // Exactly the slice ran, each forced; nothing outside it was even considered.
    for s in SLICE {
        assert!(
            log.contains(&format!("▶ {s}: running (forced (--from))")),
            "{s}: {log}"
        );
    }
    for s in OUTSIDE {
        assert!(
            !log.contains(&format!(" {s}: ")),
            "{s} was considered: {log}"
        );
    }

    // Outside the slice, every file under reports/ is untouched (same bytes, same mtime);
    // inside it, only the slice's artifacts and the evaluate predictions were rewritten.
    let after = small::snapshot(&reports);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same files under reports/"
    );
    assert!(
        small::snapshot(&ws.join("checkpoints/base")) == base_before,
        "download's checkpoints/base was rewritten"
    );
    let slice_files: Vec<&str> = SLICE.iter().map(|s| artifact_of(s)).collect();
    for (p, old_file) in &before {
        let rewritten =
            slice_files.iter().any(|f| p == Path::new(f)) || p.starts_with("predictions");
        if !rewritten {
            assert!(old_file == &after[p], "{} was rewritten", p.display());
        }
    }

    // Each slice stage ran again in this invocation, from the same inputs: its input hash
    // (content-addressed) is unchanged, and what it produced is byte-identical.
    let report_finished = old["report"]["finished_at"].as_str().unwrap();
    let new: BTreeMap<&str, Value> = SLICE
        .iter()
        .map(|s| (*s, read_json(&reports.join(artifact_of(s)))))
        .collect();
    for s in SLICE {
        let (o, n) = (&old[s], &new[s]);
        assert_eq!(n["status"], "completed", "{s}");
        let (os, ns) = (
            o["started_at"].as_str().unwrap(),
            n["started_at"].as_str().unwrap(),
        );
        assert!(
            ns > os && ns >= report_finished,
            "{s} did not run again: started {ns}, first run {os}, report finished {report_finished}"
        );
        assert_eq!(n["input_hash"], o["input_hash"], "{s}");
    }
    for s in ["quantize", "prepare", "train"] {
        assert_eq!(
            output_content(&new[s]),
            output_content(&old[s]),
            "{s} reproduced its outputs"
        );
    }
    for (p, was) in REPRODUCED.iter().zip(&reproduced_before) {
        assert!(&std::fs::read(ws.join(p)).unwrap() == was, "{p} changed");
    }
    for key in ["steps", "val"] {
        assert_eq!(
            new["train"]["metrics"][key], old["train"]["metrics"][key],
            "training {key}: losses, learning rates and gradient norms"
        );
    }
    let variants = |a: &Value| a["metrics"]["variants"].as_array().unwrap().clone();
    let (old_v, new_v) = (variants(&old["evaluate"]), variants(&new["evaluate"]));
    assert_eq!(old_v.len(), 3);
    for (o, n) in old_v.iter().zip(&new_v) {
        assert_eq!(n["name"], o["name"]);
        assert_eq!(n["scores"], o["scores"], "{} scores", o["name"]);
        let p = n["predictions_path"].as_str().unwrap();
        let rel = Path::new(p).strip_prefix("reports").unwrap();
        assert_eq!(
            predictions_without_timing(&after[rel].0),
            predictions_without_timing(&before[rel].0),
            "{p}: greedy answers and their scores"
        );
    }

    // The report was not re-run, and status says it is stale: evaluate's predictions carry
    // new latencies. Everything else is up to date.
    let out = small::command(ws, "status", &["--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let states: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let view: Vec<(String, String, String)> = states
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let f = |k: &str| s[k].as_str().unwrap().to_string();
            (f("stage"), f("state"), f("reason"))
        })
        .collect();
    let mut expected: Vec<(String, String, String)> = artifacts()[..7]
        .iter()
        .map(|(s, _)| (s.to_string(), "completed".into(), String::new()))
        .collect();
    expected.push((
        "report".into(),
        "stale".into(),
        "inputs changed (upstream outputs or medpipe version)".into(),
    ));
    assert_eq!(view, expected);

    // And a plain run to the end re-runs the report alone.
    let log = small::run(ws, &["--to", "report"]);
    for (s, _) in &artifacts()[..7] {
        assert!(
            log.contains(&format!("· {s}: skipped (up to date)")),
            "{s}: {log}"
        );
    }
    assert!(log.contains("▶ report: running (inputs changed"), "{log}");
}
