//! The small builtin:tiny pipeline shared by the end-to-end tests on the real stages
//! (evaluate, slice, resume, trust): its config, how to start `medpipe` on it, how to read
//! what it wrote, and its upstream states built once per test binary ([`copy_of`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use serde_json::Value;

use crate::common::{cp_a, medpipe, stderr};

/// A small pipeline: 40 synthetic documents (12 in the test split), no contact sheet, a
/// one-pass baseline, two QLoRA steps on four samples.
pub const SMALL: &str = "[probe]\ndevice = \"cpu\"\n[baseline]\nwarmup_runs = 0\nruns = 1\nbatch_sizes = [1]\nmax_new_tokens = 2\n[quantize]\nlatency_prompts = 1\nmax_new_tokens = 2\nwarmup_runs = 0\n[train]\nr = 4\nlora_alpha = 8.0\nepochs = 1\nbatch_size = 2\ngrad_accum = 1\nmax_samples = 4\n[prepare]\nshard_size = 64\ncontact_sheet_pages = 0\n[prepare.split]\ntrain = 0.6\nval = 0.1\ntest = 0.3\n[[prepare.sources]]\nkind = \"synthetic\"\ncount = 40\n";
/// Test-split documents scored (`evaluate.max_documents`).
pub const TEST_DOCS: usize = 3;
/// The fixed evaluation documents prepare renders.
pub const EVAL_DOCS: usize = 5;

/// The stages in pipeline order with their artifact files under `reports/`, from the registry.
pub fn artifacts() -> Vec<(&'static str, &'static str)> {
    medpipe::stages::registry()
        .iter()
        .map(|s| (s.name(), s.artifact_file()))
        .collect()
}

/// The artifact file of `stage`.
pub fn artifact_of(stage: &str) -> &'static str {
    artifacts()
        .into_iter()
        .find(|(s, _)| *s == stage)
        .map(|(_, f)| f)
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

/// A state of the small pipeline that several tests start from: `medpipe run --to <stage>`
/// (no overrides) has completed.
#[derive(Debug, Clone, Copy)]
pub enum Upstream {
    /// probe and download.
    Download,
    /// Up to prepare: the data and both models (base, NF4).
    Prepare,
    /// Up to evaluate: the adapter trained and every variant scored.
    Evaluate,
}

impl Upstream {
    /// The last stage run.
    fn stage(self) -> &'static str {
        match self {
            Upstream::Download => "download",
            Upstream::Prepare => "prepare",
            Upstream::Evaluate => "evaluate",
        }
    }

    /// The state this one is built on (a copy of it, run further).
    fn base(self) -> Option<Upstream> {
        match self {
            Upstream::Download => None,
            Upstream::Prepare => Some(Upstream::Download),
            Upstream::Evaluate => Some(Upstream::Prepare),
        }
    }
}

/// A workspace of its own for one test, in `state`: a `cp -a` copy of the one built for this
/// test binary, at `<tmp>/ws`. Workspaces are location-independent: the first run in the copy
/// re-verifies the outputs it inherited (trust.rs specifies that). Keep the `TempDir` alive
/// for the test's duration.
pub fn copy_of(state: Upstream) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    cp_a(built(state), &ws);
    (tmp, ws)
}

/// The workspace in `state`, built on first use (a copy of its base state, run further) and
/// shared read-only by every test of this binary: tests run only in copies of it.
fn built(state: Upstream) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 3] = [const { OnceLock::new() }; 3];
    BUILT[state as usize].get_or_init(|| {
        let ws = shared_root().join(state.stage());
        match state.base() {
            Some(base) => cp_a(built(base), &ws),
            None => std::fs::create_dir(&ws).unwrap(),
        }
        run(&ws, &["--to", state.stage()]);
        ws
    })
}

/// This process's directory of shared states: a `run-*` directory under cargo's temporary
/// directory for integration tests, whose `.lock` this process holds until it exits. Statics
/// are never dropped, so the directory outlives the process; the next test binary removes
/// every `run-*` directory whose lock is free (the OS released it when its process exited).
/// `setup.lock` makes the clean-up and the creation one step across concurrent test binaries.
fn shared_root() -> &'static Path {
    static ROOT: OnceLock<(PathBuf, File)> = OnceLock::new();
    &ROOT
        .get_or_init(|| {
            let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("it-shared");
            std::fs::create_dir_all(&parent).unwrap();
            let setup = File::create(parent.join("setup.lock")).unwrap();
            setup.lock().unwrap();
            for e in std::fs::read_dir(&parent).unwrap() {
                let dir = e.unwrap().path();
                let held = File::open(dir.join(".lock")).map(|f| f.try_lock().is_err());
                if dir.is_dir() && !held.unwrap_or(true) {
                    std::fs::remove_dir_all(&dir).unwrap();
                }
            }
            let dir = tempfile::Builder::new()
                .prefix("run-")
                .tempdir_in(&parent)
                .unwrap()
                .keep();
            let lock = File::create(dir.join(".lock")).unwrap();
            lock.lock().unwrap();
            (dir, lock)
        })
        .0
}
