//! Runner semantics (DVC-like skips, failure records, resume, kill -9, locking), specified
//! with test-double stages through the library, and a child process where a real process
//! must die or hold the lock.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medpipe::pipeline::{Artifact, RunOptions, Status, Workspace};
use medpipe::Config;

use crate::common::*;

fn read(ws: &Path, rel: &str) -> String {
    std::fs::read_to_string(ws.join(rel)).unwrap_or_default()
}

#[test]
fn second_run_with_nothing_changed_runs_no_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    let first = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&first),
        pairs(&[("alpha", "ran"), ("beta", "ran"), ("gamma", "ran")]),
        "{:?}",
        first.stages[0].error
    );
    let second = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&second),
        pairs(&[
            ("alpha", "skipped"),
            ("beta", "skipped"),
            ("gamma", "skipped")
        ])
    );
    assert!(second.stages.iter().all(|s| s.reason == "up to date"));
}

#[test]
fn changing_one_stages_config_reruns_it_and_its_downstream_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    run_chain(&p, dir.path(), &[], RunOptions::default());
    let r = run_chain(
        &p,
        dir.path(),
        &["model.source=/elsewhere"],
        RunOptions::default(),
    );
    assert_eq!(
        actions(&r),
        pairs(&[("alpha", "skipped"), ("beta", "ran"), ("gamma", "ran")])
    );
    assert_eq!(r.stages[1].reason, "config changed: model.source");
    assert_eq!(r.stages[2].reason, "upstream `beta` ran");
    assert!(read(dir.path(), "data/gamma.txt").contains("/elsewhere"));
}

#[test]
fn a_failing_stage_records_the_error_and_the_next_run_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    std::fs::write(dir.path().join("fail_beta"), b"").unwrap();
    let r = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(actions(&r), pairs(&[("alpha", "ran"), ("beta", "failed")]));
    assert!(r.failed());
    let art = Artifact::read(&dir.path().join("reports/beta.json"))
        .unwrap()
        .unwrap();
    assert_eq!(art.status, Status::Failed);
    assert_eq!(art.error.unwrap().message, "beta was told to fail");
    assert!(read(dir.path(), "BUILD_LOG.md").contains("beta was told to fail"));

    std::fs::remove_file(dir.path().join("fail_beta")).unwrap();
    let r = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&r),
        pairs(&[("alpha", "skipped"), ("beta", "ran"), ("gamma", "ran")])
    );
    assert!(r.stages[1]
        .reason
        .starts_with("last run failed: beta was told to fail"));
}

#[test]
fn a_corrupted_or_deleted_output_makes_its_stage_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    run_chain(&p, dir.path(), &[], RunOptions::default());
    std::fs::write(dir.path().join("data/beta.txt"), b"tampered").unwrap();
    let r = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&r),
        pairs(&[("alpha", "skipped"), ("beta", "ran"), ("gamma", "ran")])
    );
    assert_eq!(r.stages[1].reason, "output data/beta.txt changed on disk");
    assert!(
        read(dir.path(), "data/beta.txt").starts_with("beta\n"),
        "output restored"
    );

    std::fs::remove_file(dir.path().join("data/gamma.txt")).unwrap();
    let r = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(r.stages[2].reason, "output data/gamma.txt is missing");
    assert_eq!(r.stages[2].action, "ran");
}

#[test]
fn from_forces_that_stage_and_later_and_to_stops_after_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    let r = run_chain(
        &p,
        dir.path(),
        &[],
        RunOptions {
            to: Some("beta".into()),
            ..Default::default()
        },
    );
    assert_eq!(actions(&r), pairs(&[("alpha", "ran"), ("beta", "ran")]));
    assert!(!dir.path().join("data/gamma.txt").exists());
    run_chain(&p, dir.path(), &[], RunOptions::default());
    let r = run_chain(
        &p,
        dir.path(),
        &[],
        RunOptions {
            from: Some("beta".into()),
            ..Default::default()
        },
    );
    assert_eq!(actions(&r), pairs(&[("beta", "ran"), ("gamma", "ran")]));
    assert_eq!(r.stages[0].reason, "forced (--from)");
    let r = run_chain(
        &p,
        dir.path(),
        &[],
        RunOptions {
            only: Some("alpha".into()),
            ..Default::default()
        },
    );
    assert_eq!(actions(&r), pairs(&[("alpha", "ran")]));
}

#[test]
fn a_forced_stage_that_rewrites_identical_bytes_leaves_its_downstream_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    run_chain(&p, dir.path(), &[], RunOptions::default());
    let before = Artifact::read(&dir.path().join("reports/beta.json"))
        .unwrap()
        .unwrap();
    let alpha_before = Artifact::read(&dir.path().join("reports/alpha.json"))
        .unwrap()
        .unwrap();
    let only = RunOptions {
        only: Some("alpha".into()),
        ..Default::default()
    };
    assert_eq!(
        actions(&run_chain(&p, dir.path(), &[], only)),
        pairs(&[("alpha", "ran")])
    );
    let alpha_after = Artifact::read(&dir.path().join("reports/alpha.json"))
        .unwrap()
        .unwrap();
    assert_eq!(
        alpha_after.outputs[0].sha256, alpha_before.outputs[0].sha256,
        "alpha reproduced the same bytes"
    );
    assert_ne!(
        alpha_after.outputs[0].stat, alpha_before.outputs[0].stat,
        "alpha rewrote its output (new mtime)"
    );
    let r = run_chain(&p, dir.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&r),
        pairs(&[
            ("alpha", "skipped"),
            ("beta", "skipped"),
            ("gamma", "skipped")
        ]),
        "{:?}",
        r.stages.iter().map(|s| &s.reason).collect::<Vec<_>>()
    );
    let after = Artifact::read(&dir.path().join("reports/beta.json"))
        .unwrap()
        .unwrap();
    assert_eq!(after, before, "beta's artifact untouched");
}

#[test]
fn a_stage_whose_upstream_artifact_is_missing_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    let cfg = Config::load(None, &[]).unwrap();
    let ws = Workspace::open(dir.path()).unwrap();
    let opts = RunOptions {
        from: Some("gamma".into()),
        ..Default::default()
    };
    let err = p
        .run(&ws, &cfg, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "stage `gamma` needs the completed artifact of `beta` (reports/beta.json); run `medpipe run --to beta` first"
    );
}

#[test]
fn bad_ranges_and_unknown_stages_are_rejected_before_anything_runs() {
    let p = chain();
    let cfg = Config::load(None, &[]).unwrap();
    let e = p.plan(
        &cfg,
        &RunOptions {
            from: Some("gamma".into()),
            to: Some("alpha".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        e.unwrap_err().to_string(),
        "--from gamma comes after --to alpha (pipeline order: alpha → beta → gamma)"
    );
    let e = p.plan(
        &cfg,
        &RunOptions {
            from: Some("delta".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        e.unwrap_err().to_string(),
        "unknown stage `delta` in --from (stages: alpha, beta, gamma)"
    );
}

#[test]
fn status_reports_why_a_stage_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain();
    run_chain(&p, dir.path(), &[], RunOptions::default());
    let cfg = Config::load(None, &["model.source=/x".into()]).unwrap();
    let ws = Workspace::open(dir.path()).unwrap();
    let st = p.status(&ws, &cfg).unwrap();
    let view: Vec<(&str, &str, &str)> = st
        .iter()
        .map(|s| (s.stage.as_str(), s.state, s.reason.as_str()))
        .collect();
    assert_eq!(
        view,
        vec![
            ("alpha", "completed", ""),
            ("beta", "stale", "config changed: model.source"),
            ("gamma", "stale", "upstream `beta` will re-run"),
        ]
    );
}

// ---- child-process tests ------------------------------------------------------------------

const CHILD_ENV: &str = "MEDPIPE_IT_CHILD_WORKSPACE";

/// Runs the double chain in the workspace named by `MEDPIPE_IT_CHILD_WORKSPACE` when this
/// test binary is re-executed as a child (kill -9 and lock tests); as a normal test it checks
/// the chain's outputs are deterministic across two fresh workspaces.
#[test]
fn child_runner_entry_point_and_chain_outputs_are_deterministic() {
    if let Ok(ws) = std::env::var(CHILD_ENV) {
        run_chain(&chain(), Path::new(&ws), &[], RunOptions::default());
        return;
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_chain(&chain(), a.path(), &[], RunOptions::default());
    run_chain(&chain(), b.path(), &[], RunOptions::default());
    assert_eq!(
        read(a.path(), "data/gamma.txt"),
        read(b.path(), "data/gamma.txt")
    );
    assert!(!read(a.path(), "data/gamma.txt").is_empty());
}

/// Starts a child running the chain in `ws`; returns once `started_<stage>` appears.
fn spawn_slow_child(ws: &Path, stage: &str) -> std::process::Child {
    std::fs::write(ws.join(format!("slow_{stage}")), b"").unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "runner::child_runner_entry_point_and_chain_outputs_are_deterministic",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_ENV, ws)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = ws.join(format!("started_{stage}"));
    let t = Instant::now();
    while !marker.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "child never reached {stage}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn a_run_killed_mid_stage_then_rerun_completes_with_the_same_outputs() {
    let killed = tempfile::tempdir().unwrap();
    let mut child = spawn_slow_child(killed.path(), "beta");
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();

    // Nothing claims beta completed.
    assert!(Artifact::read(&killed.path().join("reports/beta.json"))
        .unwrap()
        .is_none());
    std::fs::remove_file(killed.path().join("slow_beta")).unwrap();
    let r = run_chain(&chain(), killed.path(), &[], RunOptions::default());
    assert_eq!(
        actions(&r),
        pairs(&[("alpha", "skipped"), ("beta", "ran"), ("gamma", "ran")])
    );

    let clean = tempfile::tempdir().unwrap();
    run_chain(&chain(), clean.path(), &[], RunOptions::default());
    for f in ["data/alpha.txt", "data/beta.txt", "data/gamma.txt"] {
        assert_eq!(read(killed.path(), f), read(clean.path(), f), "{f}");
    }
}

#[test]
fn a_concurrent_run_on_the_same_workspace_exits_2_naming_the_lock_holder() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_slow_child(dir.path(), "alpha");
    let out = run_in(dir.path(), &["run", "--quiet"]);
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("locked by pid {pid}")),
        "{}",
        stderr(&out)
    );
}
