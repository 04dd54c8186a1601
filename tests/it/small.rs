//! The small builtin:tiny pipeline shared by the end-to-end tests on the real stages
//! (evaluate, slice, resume): its config, how to start `medpipe` on it, how to read what it
//! wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::Value;

use crate::common::{medpipe, stderr};

/// A small pipeline: 40 synthetic documents (12 in the test split), no contact sheet, a
/// one-pass baseline, two QLoRA steps on four samples.
pub const SMALL: &str = "[probe]\ndevice = \"cpu\"\n[baseline]\nwarmup_runs = 0\nruns = 1\nbatch_sizes = [1]\nmax_new_tokens = 2\n[quantize]\nlatency_prompts = 1\nmax_new_tokens = 2\nwarmup_runs = 0\n[train]\nr = 4\nlora_alpha = 8.0\nepochs = 1\nbatch_size = 2\ngrad_accum = 1\nmax_samples = 4\n[prepare]\nshard_size = 64\ncontact_sheet_pages = 0\n[prepare.split]\ntrain = 0.6\nval = 0.1\ntest = 0.3\n[[prepare.sources]]\nkind = \"synthetic\"\ncount = 40\n";
/// Test-split documents scored (`evaluate.max_documents`).
pub const TEST_DOCS: usize = 3;
/// The fixed evaluation documents prepare renders.
pub const EVAL_DOCS: usize = 5;

/// The stages in pipeline order with their artifact files under `reports/`.
pub const ARTIFACTS: [(&str, &str); 8] = [
    ("probe", "environment.json"),
    ("download", "download.json"),
    ("baseline", "baseline.json"),
    ("quantize", "quantize.json"),
    ("prepare", "dataset.json"),
    ("train", "training_metrics.json"),
    ("evaluate", "evaluation.json"),
    ("report", "report.json"),
];

/// The artifact file of `stage`.
pub fn artifact_of(stage: &str) -> &'static str {
    ARTIFACTS
        .iter()
        .find(|(s, _)| *s == stage)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no stage `{stage}`"))
}

pub fn read_json(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// `medpipe <sub> <args>` on the small config in `ws` (not started). `sub` is `run` or
/// `status`; both take the same config and overrides, so status judges the same inputs.
pub fn command(ws: &Path, sub: &str, args: &[&str]) -> Command {
    let cfg = ws.join("small.toml");
    std::fs::write(&cfg, SMALL).unwrap();
    let mut c = medpipe();
    c.arg(sub)
        .arg("--config")
        .arg(&cfg)
        .args([
            "--set",
            &format!("evaluate.max_documents={TEST_DOCS}"),
            "--set",
            "evaluate.max_new_tokens=8",
            "--set",
            "evaluate.bootstrap_resamples=100",
        ])
        .args(args)
        .arg("--workspace")
        .arg(ws);
    c
}

/// Runs `medpipe run <args>` on the small config to success; returns its stderr (one
/// `▶ stage: running (reason)` / `· stage: skipped (reason)` line per stage considered).
pub fn run(ws: &Path, args: &[&str]) -> String {
    let out = command(ws, "run", args)
        .output()
        .expect("the medpipe binary runs");
    assert!(out.status.success(), "{}", stderr(&out));
    stderr(&out)
}

/// Every file under `dir` (recursively, workspace-relative to `dir`) with its bytes and mtime.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, (std::fs::read(&p).unwrap(), mtime));
            }
        }
    }
    out
}
