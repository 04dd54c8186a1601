//! The stage runner: DVC-like skip/re-run decisions, artifacts, failure records, resume.
//!
//! For each stage in pipeline order the runner computes the input hash *before* running:
//! sha256 of (stage name, code version, its config sections, upstream input hashes and output
//! hashes, medpipe version). A stage is skipped only when its artifact is `completed`, carries
//! that hash, every output still hashes as recorded, and no upstream stage ran in this
//! invocation. Otherwise it runs, and so does everything downstream. A failure is recorded
//! as an artifact with `status: failed`; the next plain `run` finds it stale and starts there.
//! A stage that panics (a GPU out-of-memory, a kernel assert) fails the same way, with the
//! panic message. When even the failure cannot be written (a full disk), the stage is still
//! reported as failed, with both errors, and the run stops there.

use std::path::PathBuf;

use indicatif::MultiProgress;
use serde::Serialize;

use super::artifact::{Artifact, ArtifactError, Status};
use super::buildlog;
use super::execute::adopt;
use super::settings::{ConfigError, Settings};
use super::stage::AnyStage;
use super::workspace::{Workspace, WorkspaceError};
use crate::fs::FsError;

/// Errors that stop a run before or between stages (not a stage's own failure).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("unknown stage `{name}` in {flag} (stages: {valid})")]
    UnknownStage {
        name: String,
        flag: &'static str,
        valid: String,
    },
    #[error("--from {from} comes after --to {to} (pipeline order: {order})")]
    FromAfterTo {
        from: String,
        to: String,
        order: String,
    },
    #[error("--only cannot be combined with --from or --to")]
    OnlyWithRange,
    #[error("stage `{stage}` needs the completed artifact of `{upstream}` ({path}); run `medpipe run --to {upstream}` first")]
    UpstreamMissing {
        stage: String,
        upstream: String,
        path: PathBuf,
    },
    #[error("--only {stage}: upstream `{upstream}` is stale ({reason}); run `medpipe run --to {stage}` to bring it up to date, or add --force to run `{stage}` on it anyway")]
    UpstreamStale {
        stage: String,
        upstream: String,
        reason: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Which stages to consider and whether to force them.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Force this stage and every later one (up to `to`).
    pub from: Option<String>,
    /// Stop after this stage.
    pub to: Option<String>,
    /// Run just this stage (forced); its upstream artifacts must exist.
    pub only: Option<String>,
    /// Force every stage in the range.
    pub force: bool,
    /// Hide progress bars.
    pub quiet: bool,
}

/// What happened to one stage in a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: String,
    /// `ran`, `skipped` or `failed`.
    pub action: &'static str,
    /// Why it ran or was skipped.
    pub reason: String,
    pub duration_s: f64,
    pub summary: Vec<(String, String)>,
    pub error: Option<String>,
}

/// The outcome of a run, stage by stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub stages: Vec<StageReport>,
}

impl RunReport {
    /// True when a stage failed (the CLI exits 1).
    pub fn failed(&self) -> bool {
        self.stages.iter().any(|s| s.action == "failed")
    }
}

/// Notifications while running, for the CLI to print (the library never prints).
#[derive(Debug)]
pub enum Event<'a> {
    Starting { stage: &'a str, reason: &'a str },
    Finished(&'a StageReport),
}

/// An ordered set of stages.
pub struct Pipeline {
    pub(super) stages: Vec<Box<dyn AnyStage>>,
}

impl Pipeline {
    /// Builds a pipeline from stages in execution order.
    ///
    /// # Panics
    /// When a stage names an upstream that is not earlier in `stages`, or two stages share a
    /// name: both are programming errors in the registry, not user input.
    pub fn new(stages: Vec<Box<dyn AnyStage>>) -> Self {
        for (i, s) in stages.iter().enumerate() {
            assert!(
                stages[..i].iter().all(|o| o.name() != s.name()),
                "stage `{}` registered twice",
                s.name()
            );
            for up in all_upstream(s.as_ref()) {
                assert!(
                    stages[..i].iter().any(|o| o.name() == up),
                    "stage `{}` lists upstream `{up}` that does not come before it",
                    s.name()
                );
            }
        }
        Self { stages }
    }

    /// The stages, in order.
    pub fn stages(&self) -> impl Iterator<Item = &dyn AnyStage> {
        self.stages.iter().map(|s| s.as_ref())
    }

    fn order(&self) -> String {
        self.stages
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(" → ")
    }

    pub(super) fn index(&self, name: &str, flag: &'static str) -> Result<usize, RunError> {
        self.stages
            .iter()
            .position(|s| s.name() == name)
            .ok_or_else(|| RunError::UnknownStage {
                name: name.to_string(),
                flag,
                valid: self
                    .stages
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every section some stage reads (its own or a shared one), in pipeline order.
    pub fn config_sections(&self) -> Vec<&'static str> {
        let mut known: Vec<&'static str> = Vec::new();
        for s in self.stages.iter().flat_map(|s| s.config_sections()) {
            if !known.contains(&s) {
                known.push(s);
            }
        }
        known
    }

    /// Checks every stage's own section before anything runs (typed and in range),
    /// whichever stages a run would reach. Sections no stage of this pipeline reads are
    /// left alone (a test pipeline runs on the full default config); the app refuses them
    /// with [`Settings::check_sections`] against the whole registry.
    ///
    /// # Errors
    /// The first wrong type, unknown key or value out of range.
    pub fn check_config(&self, settings: &Settings) -> Result<(), ConfigError> {
        self.stages
            .iter()
            .try_for_each(|s| s.check_config(settings))
    }

    /// Checks the config and the options against this pipeline: (first, last, first forced
    /// index).
    ///
    /// # Errors
    /// A config [`Pipeline::check_config`] refuses, unknown stage names, `--from` after
    /// `--to`, `--only` with a range.
    pub fn plan(
        &self,
        settings: &Settings,
        opts: &RunOptions,
    ) -> Result<(usize, usize, Option<usize>), RunError> {
        self.check_config(settings)?;
        if let Some(only) = &opts.only {
            if opts.from.is_some() || opts.to.is_some() {
                return Err(RunError::OnlyWithRange);
            }
            let i = self.index(only, "--only")?;
            return Ok((i, i, Some(i)));
        }
        let from = opts
            .from
            .as_deref()
            .map(|n| self.index(n, "--from"))
            .transpose()?;
        let last = match &opts.to {
            Some(n) => self.index(n, "--to")?,
            None => self.stages.len().saturating_sub(1),
        };
        if let Some(f) = from {
            if f > last {
                return Err(RunError::FromAfterTo {
                    from: opts.from.clone().unwrap_or_default(),
                    to: opts.to.clone().unwrap_or_default(),
                    order: self.order(),
                });
            }
        }
        let forced = if opts.force { Some(0) } else { from };
        Ok((from.unwrap_or(0), last, forced))
    }

    /// Runs the pipeline in `ws` under its lock.
    ///
    /// A stage failure is not an `Err`: it is recorded and reported in the [`RunReport`].
    ///
    /// # Errors
    /// Bad options, a held lock, a missing upstream artifact, or I/O on artifacts.
    pub fn run(
        &self,
        ws: &Workspace,
        settings: &Settings,
        opts: &RunOptions,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<RunReport, RunError> {
        let (first, last, forced) = self.plan(settings, opts)?;
        let _lock = ws.lock()?;
        let progress = MultiProgress::new();
        let mut report = RunReport::default();
        let mut ran: Vec<&str> = Vec::new();
        let mut log_header_written = false;

        // Upstream artifacts that come from outside the requested range must exist.
        for stage in &self.stages[first..=last] {
            for up in stage.upstream() {
                let ui = self.index(up, "upstream")?;
                if ui < first {
                    let path = ws.reports().join(self.stages[ui].artifact_file());
                    match Artifact::read(&path)? {
                        Some(a) if a.status == Status::Completed => {}
                        _ => {
                            return Err(RunError::UpstreamMissing {
                                stage: stage.name().into(),
                                upstream: up.to_string(),
                                path: ws.relative(&path),
                            })
                        }
                    }
                }
            }
        }

        // `--only` runs one stage on its upstream as it is on disk: refuse when that is stale
        // (it would be re-run by a plain `run`), unless forced.
        if let (Some(only), false) = (&opts.only, opts.force) {
            let states = self.status(ws, settings)?;
            let stale = all_upstream(self.stages[first].as_ref())
                .filter_map(|u| states.iter().find(|s| s.stage == u))
                .find(|s| s.state == "stale");
            if let Some(s) = stale {
                return Err(RunError::UpstreamStale {
                    stage: only.clone(),
                    upstream: s.stage.clone(),
                    reason: s.reason.clone(),
                });
            }
        }

        for (i, stage) in self.stages.iter().enumerate().take(last + 1).skip(first) {
            let a = self.assess(stage.as_ref(), ws, settings, false)?;
            let upstream_ran = all_upstream(stage.as_ref()).find(|u| ran.contains(u));
            let reason = if forced.is_some_and(|f| i >= f) {
                Some(if opts.only.is_some() {
                    "forced (--only)".to_string()
                } else if opts.force {
                    "forced (--force)".to_string()
                } else {
                    "forced (--from)".to_string()
                })
            } else if let Some(u) = upstream_ran {
                Some(format!("upstream `{u}` ran"))
            } else {
                a.stale.clone()
            };
            let Some(reason) = reason else {
                let prev = a.previous.as_ref();
                let rep = StageReport {
                    stage: stage.name().into(),
                    action: "skipped",
                    reason: "up to date".into(),
                    duration_s: 0.0,
                    summary: prev.map(|p| p.summary.clone()).unwrap_or_default(),
                    error: None,
                };
                if let Some(p) = prev.filter(|p| p.workspace.as_deref() != Some(ws.root())) {
                    adopt(ws, stage.artifact_file(), p)?;
                }
                tracing::info!(stage = stage.name(), "skipping: up to date");
                on_event(Event::Finished(&rep));
                report.stages.push(rep);
                continue;
            };

            if !log_header_written {
                // A log that cannot be written (a full disk) must not hide the stage's own
                // outcome: warn, and let the stage fail or pass on its merits.
                if let Err(e) = buildlog::append_run_header(ws, settings.origin()) {
                    tracing::warn!("BUILD_LOG.md not updated: {:#}", anyhow::Error::from(e));
                }
                log_header_written = true;
            }
            on_event(Event::Starting {
                stage: stage.name(),
                reason: &reason,
            });
            tracing::info!(stage = stage.name(), %reason, "running");
            let rep = self.execute(stage.as_ref(), ws, settings, a, &reason, &progress, opts)?;
            on_event(Event::Finished(&rep));
            let failed = rep.action == "failed";
            report.stages.push(rep);
            if failed {
                break;
            }
            ran.push(stage.name());
        }
        Ok(report)
    }
}

/// Required and optional upstream stages.
pub(super) fn all_upstream(stage: &dyn AnyStage) -> impl Iterator<Item = &'static str> + '_ {
    stage
        .upstream()
        .iter()
        .chain(stage.optional_upstream())
        .copied()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::Value;

    use super::*;
    use crate::pipeline::{Stage, StageCtx, StageOutput};

    /// A test stage: `boom` panics with a GPU-like message, `odd` blocks its own artifact path
    /// with a directory (as a full disk would refuse the file), `after` does nothing.
    struct Probe(&'static str, &'static [&'static str]);

    impl Stage for Probe {
        const NAME: &'static str = "runner-test";
        type Config = crate::pipeline::NoConfig;
        type Metrics = Value;

        fn name(&self) -> &'static str {
            self.0
        }
        fn description(&self) -> &'static str {
            "runner test stage"
        }
        fn artifact_file(&self) -> &'static str {
            match self.0 {
                "boom" => "boom.json",
                "odd" => "odd.json",
                _ => "after.json",
            }
        }
        fn upstream(&self) -> &[&'static str] {
            self.1
        }
        fn code_version(&self) -> u32 {
            1
        }
        fn run(
            &self,
            _: &crate::pipeline::NoConfig,
            ctx: &mut StageCtx<'_>,
        ) -> anyhow::Result<StageOutput> {
            match self.0 {
                "boom" => panic!("CUDA out of memory: tried to allocate 12.00 GiB"),
                "odd" => {
                    std::fs::create_dir_all(ctx.workspace().reports().join("odd.json/blocker"))?;
                    Ok(StageOutput::default())
                }
                _ => Ok(StageOutput::default()),
            }
        }
    }

    fn run_quietly(p: &Pipeline, root: &Path) -> RunReport {
        let ws = Workspace::open(root).unwrap();
        let cfg = Settings::from_toml("", Path::new("test.toml"), "", &[]).unwrap();
        let opts = RunOptions {
            quiet: true,
            ..Default::default()
        };
        p.run(&ws, &cfg, &opts, &mut |_| {}).unwrap()
    }

    #[test]
    fn a_panicking_stage_is_recorded_as_failed_with_its_message_and_the_run_stops_there() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pipeline::new(vec![
            Box::new(Probe("boom", &[])),
            Box::new(Probe("after", &["boom"])),
        ]);
        let report = run_quietly(&p, dir.path());

        assert!(
            report.failed(),
            "a panic is a failed stage (the CLI exits 1)"
        );
        let acts: Vec<_> = report
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.action))
            .collect();
        assert_eq!(acts, vec![("boom", "failed")], "nothing runs after it");
        let said = report.stages[0].error.clone().unwrap();
        assert!(
            said.starts_with("the stage panicked: CUDA out of memory: tried to allocate 12.00 GiB (at src/pipeline/runner.rs:"),
            "{said}"
        );

        let art = Artifact::read(&dir.path().join("reports/boom.json"))
            .unwrap()
            .expect("the panic left an artifact");
        assert_eq!(art.status, Status::Failed);
        let err = art.error.unwrap();
        assert_eq!(err.message, "the stage panicked");
        assert!(err.causes[0].starts_with("CUDA out of memory: tried to allocate 12.00 GiB"));

        let log = std::fs::read_to_string(dir.path().join("BUILD_LOG.md")).unwrap();
        assert!(log.contains("### boom — FAILED"), "{log}");
        assert!(
            log.contains("**Error:** the stage panicked: CUDA out of memory"),
            "{log}"
        );

        // The next run finds the failure and starts there again.
        let again = run_quietly(&p, dir.path());
        assert_eq!(
            again.stages[0].reason.split(':').next(),
            Some("last run failed")
        );
    }

    #[test]
    fn a_stage_whose_artifact_cannot_be_written_is_reported_failed_with_the_write_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = Pipeline::new(vec![
            Box::new(Probe("odd", &[])),
            Box::new(Probe("after", &["odd"])),
        ]);
        let report = run_quietly(&p, dir.path());

        assert!(report.failed());
        assert_eq!(
            report.stages.len(),
            1,
            "the run stops at the unrecorded stage"
        );
        let said = report.stages[0].error.clone().unwrap();
        assert!(
            said.starts_with("the stage finished but its artifact could not be written: writing "),
            "{said}"
        );
        assert!(said.contains("reports/odd.json"), "{said}");
        assert!(
            !dir.path().join("reports/after.json").exists(),
            "downstream did not run"
        );
        let log = std::fs::read_to_string(dir.path().join("BUILD_LOG.md")).unwrap();
        assert!(log.contains("### odd — FAILED"), "{log}");
        assert!(
            log.contains("**Error:** the stage finished but its artifact could not be written"),
            "{log}"
        );
    }
}
