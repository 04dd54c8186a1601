//! Shared test helpers: the medpipe binary, temp workspaces, and test-double stages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::bail;
use medpipe::pipeline::{
    Event, NoConfig, Pipeline, RunOptions, RunReport, Stage, StageCtx, StageOutput, Workspace,
};
use medpipe::Config;

/// A `medpipe` command (the binary under test) with quiet logging.
pub fn medpipe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medpipe"));
    c.env_remove("RUST_LOG");
    c
}

/// Runs the binary in `ws` with `args`, returning the output.
pub fn run_in(ws: &Path, args: &[&str]) -> Output {
    medpipe()
        .args(args)
        .arg("--workspace")
        .arg(ws)
        .output()
        .expect("the medpipe binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `cp -a from to` (`to` must not exist), as a user would copy a workspace: sizes and mtimes
/// kept, so only the changed root tells the runner to re-verify what the copy inherited.
pub fn cp_a(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

/// The fixtures directory: `$MEDPIPE_FIXTURES` when set, else `../shared/fixtures` beside the
/// crate root. Panics naming the path tried and the variable when it does not exist.
#[track_caller]
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("MEDPIPE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixtures directory {} not found: set MEDPIPE_FIXTURES to the directory that holds \
         qwen2_5_vl_tiny/ (default: ../shared/fixtures beside the crate)",
        dir.display()
    );
    dir
}

/// Path of `rel` under the fixtures directory ([`fixtures_dir`]).
#[track_caller]
pub fn fixture(rel: &str) -> PathBuf {
    fixtures_dir().join(rel)
}

/// A test-double stage: writes `data/<name>.txt` from its config sections and its upstream
/// outputs, so its output changes exactly when its inputs do. Behaviour switches are files in
/// the workspace: `fail_<name>` makes it fail; `slow_<name>` makes it write half its output,
/// create `started_<name>` and sleep (for kill -9 tests).
pub struct Double {
    pub name: &'static str,
    pub upstream: &'static [&'static str],
    pub sections: &'static [&'static str],
}

impl Stage for Double {
    const NAME: &'static str = "double";
    type Config = NoConfig;
    type Metrics = serde_json::Value;

    fn name(&self) -> &'static str {
        self.name
    }
    fn description(&self) -> &'static str {
        "test double"
    }
    fn artifact_file(&self) -> &'static str {
        // Leaked once per double: test-only, a handful of strings.
        Box::leak(format!("{}.json", self.name).into_boxed_str())
    }
    fn upstream(&self) -> &[&'static str] {
        self.upstream
    }
    fn shared_sections(&self) -> &[&'static str] {
        self.sections
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn run(&self, _: &NoConfig, ctx: &mut StageCtx<'_>) -> anyhow::Result<StageOutput> {
        let root = ctx.workspace().root().to_path_buf();
        if root.join(format!("fail_{}", self.name)).exists() {
            bail!("{} was told to fail", self.name);
        }
        let mut content = format!("{}\n", self.name);
        for s in self.sections {
            content += &format!("{s}={}\n", ctx.settings().raw_json(s));
        }
        for up in self.upstream {
            let text = std::fs::read_to_string(root.join(format!("data/{up}.txt")))?;
            content += &text;
        }
        let out = root.join(format!("data/{}.txt", self.name));
        if root.join(format!("slow_{}", self.name)).exists() {
            medpipe::fs::write_atomic(&root.join(format!("data/{}.part", self.name)), b"half")?;
            std::fs::write(root.join(format!("started_{}", self.name)), b"")?;
            std::thread::sleep(Duration::from_secs(30));
        }
        medpipe::fs::write_atomic(&out, content.as_bytes())?;
        Ok(StageOutput {
            metrics: serde_json::json!({ "bytes": content.len() }),
            outputs: vec![PathBuf::from(format!("data/{}.txt", self.name))],
            summary: vec![("bytes".into(), content.len().to_string())],
            warnings: vec![],
        })
    }
}

/// alpha (reads [probe]) → beta (reads [model]) → gamma (no config), a chain.
pub fn chain() -> Pipeline {
    Pipeline::new(vec![
        Box::new(Double {
            name: "alpha",
            upstream: &[],
            sections: &["probe"],
        }),
        Box::new(Double {
            name: "beta",
            upstream: &["alpha"],
            sections: &["model"],
        }),
        Box::new(Double {
            name: "gamma",
            upstream: &["beta"],
            sections: &[],
        }),
    ])
}

/// Runs `p` in `ws` with the given overrides and options.
pub fn run_chain(p: &Pipeline, ws: &Path, sets: &[&str], opts: RunOptions) -> RunReport {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::load(None, &sets).expect("default config parses");
    let ws = Workspace::open(ws).expect("workspace opens");
    p.run(&ws, &cfg, &opts, &mut |_: Event<'_>| {})
        .expect("run starts")
}

/// (stage, action) pairs of a report.
pub fn actions(r: &RunReport) -> Vec<(String, &'static str)> {
    r.stages
        .iter()
        .map(|s| (s.stage.clone(), s.action))
        .collect()
}

pub fn pairs(v: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
    v.iter().map(|(s, a)| (s.to_string(), *a)).collect()
}
