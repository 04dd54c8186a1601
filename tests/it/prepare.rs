//! prepare stage through the binary: a kill -9 in the middle of rendering, then `run`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SETS: [&str; 4] = [
    "--set",
    "prepare.sources=[{kind=\"synthetic\",count=400}]",
    "--set",
    "prepare.shard_size=32",
];

fn medpipe(ws: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medpipe"));
    c.args(args)
        .arg("--quiet")
        .arg("--workspace")
        .arg(ws)
        .args(SETS)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn third_shard_done(ws: &Path) -> bool {
    let Ok(keys) = std::fs::read_dir(ws.join("data/.prepare")) else {
        return false;
    };
    keys.flatten()
        .any(|k| k.path().join("synthetic/shard-00002.json").is_file())
}

#[test]
fn issue_5_kill_9_mid_render_then_run_reproduces_an_uninterrupted_run() {
    let clean = tempfile::tempdir().unwrap();
    let killed = tempfile::tempdir().unwrap();
    for ws in [clean.path(), killed.path()] {
        assert!(medpipe(ws, &["run", "--to", "probe"])
            .status()
            .unwrap()
            .success());
    }
    assert!(medpipe(clean.path(), &["run", "--only", "prepare"])
        .status()
        .unwrap()
        .success());

    let mut child = medpipe(killed.path(), &["run", "--only", "prepare"])
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !third_shard_done(killed.path()) && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let artifact = killed.path().join("reports/dataset.json");
    assert!(
        !artifact.exists(),
        "a killed prepare must not leave an artifact claiming completion"
    );

    assert!(medpipe(killed.path(), &["run", "--only", "prepare"])
        .status()
        .unwrap()
        .success());
    for dir in ["data/splits", "data/images", "data/eval"] {
        let (a, b) = (clean.path().join(dir), killed.path().join(dir));
        assert_eq!(files(&a), files(&b), "{dir}: file lists differ");
        for f in files(&a) {
            assert!(
                std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
                "{dir}/{} differs after resume",
                f.display()
            );
        }
    }
}
