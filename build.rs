//! Records the git commit and rustc version medpipe was built with (for artifacts).
use std::process::Command;

fn main() {
    let run = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    println!(
        "cargo:rustc-env=MEDPIPE_GIT_COMMIT={}",
        run("git", &["rev-parse", "HEAD"])
    );
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    println!(
        "cargo:rustc-env=MEDPIPE_RUSTC_VERSION={}",
        run(&rustc, &["--version"])
    );
    // Re-run when the commit moves. Ask git where its files are: in a worktree or a
    // submodule `.git` is a file, and HEAD and the branch refs live elsewhere.
    let git_dir = run("git", &["rev-parse", "--git-dir"]);
    let common_dir = run("git", &["rev-parse", "--git-common-dir"]);
    let branch = run("git", &["symbolic-ref", "-q", "HEAD"]);
    let mut watch = vec![
        format!("{git_dir}/HEAD"),
        format!("{common_dir}/packed-refs"),
    ];
    if !branch.is_empty() {
        watch.push(format!("{common_dir}/{branch}"));
    }
    for p in watch {
        if std::path::Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
