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

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Instant, SystemTime};

use indicatif::MultiProgress;
use serde::Serialize;
use serde_json::{json, Value};

use super::artifact::{Artifact, ArtifactError, ErrorRecord, OutputFile, Status, SCHEMA_VERSION};
use super::buildlog;
use super::settings::{ConfigError, Settings};
use super::stage::{AnyStage, StageCtx, StageOutput, UpstreamState};
use super::workspace::{Workspace, WorkspaceError};
use crate::build_info::{git_commit, rfc3339, MEDPIPE_VERSION};
use crate::fs::{self, FsError};
use crate::json::canonical;

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

/// How `medpipe status` judges outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusOptions {
    /// Re-hash every output instead of trusting a file whose size and modification time are
    /// as recorded (the fast path misses an edit that keeps both).
    pub verify: bool,
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

/// Where a stage stands, as `medpipe status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StageState {
    pub stage: String,
    /// `completed`, `failed`, `missing` or `stale`.
    pub state: &'static str,
    /// Why it would run now (empty when up to date).
    pub reason: String,
    pub finished_at: Option<String>,
    pub duration_s: Option<f64>,
    pub artifact: PathBuf,
    pub summary: Vec<(String, String)>,
}

/// An ordered set of stages.
pub struct Pipeline {
    stages: Vec<Box<dyn AnyStage>>,
}

/// A stage's freshness, computed before it would run.
struct Assessment {
    input_hash: String,
    upstream: BTreeMap<String, String>,
    config: Value,
    /// `None` when up to date; else why it must run.
    stale: Option<String>,
    previous: Option<Artifact>,
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

    fn index(&self, name: &str, flag: &'static str) -> Result<usize, RunError> {
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

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        stage: &dyn AnyStage,
        ws: &Workspace,
        settings: &Settings,
        a: Assessment,
        reason: &str,
        progress: &MultiProgress,
        opts: &RunOptions,
    ) -> Result<StageReport, RunError> {
        let path = ws.reports().join(stage.artifact_file());
        // The old artifact goes first: from here until the new one is written, nothing on
        // disk claims this stage completed (kill -9 safe).
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| FsError {
                action: "removing old artifact",
                path: path.clone(),
                source,
            })?;
        }
        let mut upstream = Vec::new();
        let mut states = Vec::new();
        for u in all_upstream(stage) {
            let ui = self.index(u, "upstream")?;
            let file = self.stages[ui].artifact_file();
            let p = ws.reports().join(file);
            let read = Artifact::read(&p);
            match &read {
                Ok(Some(art)) if art.status == Status::Completed => upstream.push((u, art.clone())),
                _ if stage.upstream().contains(&u) => {
                    read?;
                    return Err(RunError::UpstreamMissing {
                        stage: stage.name().into(),
                        upstream: u.to_string(),
                        path: ws.relative(&p),
                    });
                }
                _ => {}
            }
            states.push(UpstreamState {
                stage: u,
                artifact_file: file,
                artifact: read.map_err(|e| format!("{:#}", anyhow::Error::from(e))),
            });
        }

        let started = SystemTime::now();
        let clock = Instant::now();
        let mut ctx = StageCtx {
            workspace: ws,
            settings,
            upstream,
            states,
            progress,
            quiet: opts.quiet,
        };
        let span = tracing::info_span!("stage", name = stage.name());
        let result = span
            .in_scope(|| run_catching_panics(stage, &mut ctx))
            .and_then(|out| hash_outputs(ws, out));
        let duration_s = clock.elapsed().as_secs_f64();

        let mut artifact = Artifact {
            schema_version: SCHEMA_VERSION,
            stage: stage.name().into(),
            status: Status::Completed,
            started_at: rfc3339(started),
            finished_at: rfc3339(SystemTime::now()),
            duration_s,
            input_hash: a.input_hash,
            code_version: stage.code_version(),
            config: a.config,
            upstream: a.upstream,
            outputs: Vec::new(),
            metrics: Value::Null,
            summary: Vec::new(),
            warnings: Vec::new(),
            error: None,
            medpipe_version: MEDPIPE_VERSION.into(),
            git_commit: git_commit(),
            workspace: Some(ws.root().to_path_buf()),
        };
        match result {
            Ok((out, files)) => {
                artifact.outputs = files;
                artifact.metrics = out.metrics;
                artifact.summary = out.summary;
                artifact.warnings = out.warnings;
            }
            Err(e) => {
                artifact.status = Status::Failed;
                artifact.error = Some(ErrorRecord::from_anyhow(&e));
            }
        }
        // A full disk can refuse the artifact itself. Nothing then claims the stage completed
        // (the old artifact is gone), so it is reported failed with both errors, and the next
        // run redoes it; the run still ends with its summary and exit code 1.
        if let Err(e) = fs::write_json_atomic(&path, &artifact) {
            let write_error = format!("{:#}", anyhow::Error::from(e));
            let record = match artifact.error.take() {
                Some(mut r) => {
                    r.causes.push(format!(
                        "and the failure could not be recorded: {write_error}"
                    ));
                    r
                }
                None => ErrorRecord {
                    message: "the stage finished but its artifact could not be written".into(),
                    causes: vec![write_error],
                },
            };
            artifact.status = Status::Failed;
            artifact.error = Some(record);
        }
        if let Err(e) = buildlog::append_stage(ws, &artifact, stage.artifact_file(), reason) {
            tracing::warn!(
                stage = stage.name(),
                "BUILD_LOG.md not updated: {:#}",
                anyhow::Error::from(e)
            );
        }
        Ok(StageReport {
            stage: stage.name().into(),
            action: if artifact.status == Status::Completed {
                "ran"
            } else {
                "failed"
            },
            reason: reason.into(),
            duration_s,
            summary: artifact.summary.clone(),
            error: artifact.error.as_ref().map(ErrorRecord::full),
        })
    }

    /// Computes a stage's input hash and whether its artifact is current.
    fn assess(
        &self,
        stage: &dyn AnyStage,
        ws: &Workspace,
        settings: &Settings,
        verify: bool,
    ) -> Result<Assessment, RunError> {
        let config_json = stage.config_json(settings, ws)?;
        let mut upstream = BTreeMap::new();
        let mut upstream_outputs = BTreeMap::new();
        let mut stale_upstream = None;
        for up in all_upstream(stage) {
            let ui = self.index(up, "upstream")?;
            let p = ws.reports().join(self.stages[ui].artifact_file());
            match Artifact::read(&p)? {
                Some(art) if art.status == Status::Completed => {
                    upstream.insert(up.to_string(), art.input_hash.clone());
                    // Content only: the stat fingerprint (mtimes) changes when a forced
                    // upstream rewrites identical bytes, which must not make this stage stale.
                    let content: Vec<OutputFile> = art
                        .outputs
                        .iter()
                        .map(|o| OutputFile {
                            stat: None,
                            ..o.clone()
                        })
                        .collect();
                    upstream_outputs.insert(up.to_string(), content);
                }
                _ if stage.upstream().contains(&up) => {
                    stale_upstream = Some(format!("upstream `{up}` has no completed artifact"))
                }
                _ => {}
            }
        }
        let input_hash = fs::sha256_hex(
            serde_json::to_string(&canonical(json!({
                "stage": stage.name(),
                "code_version": stage.code_version(),
                "config": config_json,
                "upstream": upstream,
                "upstream_outputs": upstream_outputs,
                "medpipe_version": MEDPIPE_VERSION,
            })))
            .expect("plain JSON serializes")
            .as_bytes(),
        );
        let path = ws.reports().join(stage.artifact_file());
        let previous = Artifact::read(&path)?;
        let stale = match &previous {
            None => Some("no artifact yet".to_string()),
            Some(p) => stale_upstream.or_else(|| {
                why_stale(
                    p,
                    stage,
                    &config_json,
                    &upstream,
                    &input_hash,
                    ws.root(),
                    verify,
                )
            }),
        };
        Ok(Assessment {
            input_hash,
            upstream,
            config: config_json,
            stale,
            previous,
        })
    }

    /// Every stage's state, as `medpipe status` shows it. Reads only; takes no lock.
    ///
    /// # Errors
    /// Unreadable artifacts.
    pub fn status(&self, ws: &Workspace, settings: &Settings) -> Result<Vec<StageState>, RunError> {
        self.status_with(ws, settings, StatusOptions::default())
    }

    /// [`Pipeline::status`] with options (`--verify` re-hashes every output).
    ///
    /// # Errors
    /// Unreadable artifacts.
    pub fn status_with(
        &self,
        ws: &Workspace,
        settings: &Settings,
        opts: StatusOptions,
    ) -> Result<Vec<StageState>, RunError> {
        let mut out = Vec::new();
        let mut upstream_stale: Vec<&str> = Vec::new();
        for stage in &self.stages {
            let a = self.assess(stage.as_ref(), ws, settings, opts.verify)?;
            let artifact = ws.relative(&ws.reports().join(stage.artifact_file()));
            let inherited = all_upstream(stage.as_ref())
                .find(|u| upstream_stale.contains(u))
                .map(|u| format!("upstream `{u}` will re-run"));
            let (state, reason) = match (&a.previous, a.stale.or(inherited)) {
                (None, _) => ("missing", "no artifact yet".to_string()),
                (Some(p), _) if p.status == Status::Failed => (
                    "failed",
                    p.error.as_ref().map(ErrorRecord::full).unwrap_or_default(),
                ),
                (Some(_), Some(r)) => ("stale", r),
                (Some(_), None) => ("completed", String::new()),
            };
            if state != "completed" {
                upstream_stale.push(stage.name());
            }
            out.push(StageState {
                stage: stage.name().into(),
                state,
                reason,
                finished_at: a.previous.as_ref().map(|p| p.finished_at.clone()),
                duration_s: a.previous.as_ref().map(|p| p.duration_s),
                artifact,
                summary: a.previous.map(|p| p.summary).unwrap_or_default(),
            });
        }
        Ok(out)
    }
}

/// Records that a copied or moved workspace's artifact was re-verified here: the current root
/// and fresh stat fingerprints, so the next run trusts them again. Nothing else changes.
fn adopt(ws: &Workspace, file: &str, prev: &Artifact) -> Result<(), RunError> {
    let mut a = prev.clone();
    tracing::info!(
        stage = %a.stage,
        from = ?a.workspace,
        to = %ws.root().display(),
        "artifact re-verified in a moved workspace"
    );
    a.workspace = Some(ws.root().to_path_buf());
    for o in &mut a.outputs {
        o.stat = fs::stat_fingerprint(&ws.root().join(&o.path)).ok();
    }
    fs::write_json_atomic(&ws.reports().join(file), &a)?;
    Ok(())
}

thread_local! {
    /// Where the last panic on this thread happened, for the failed artifact.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Chains a panic hook (once per process) that remembers each panic's location on its
/// thread; the previous hook (by default, the message on stderr) still runs.
fn record_panic_locations() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info.location().map(|l| l.to_string());
            PANIC_LOCATION.with(|p| *p.borrow_mut() = at);
            previous(info);
        }));
    });
}

/// Runs a stage, turning a panic inside it into an error: `the stage panicked: <message>
/// (at <file:line:col>)`. Without this a GPU out-of-memory or a kernel assert would unwind
/// through the runner, leave no record and exit 101.
fn run_catching_panics(
    stage: &dyn AnyStage,
    ctx: &mut StageCtx<'_>,
) -> anyhow::Result<StageOutput> {
    record_panic_locations();
    PANIC_LOCATION.with(|p| p.borrow_mut().take());
    match std::panic::catch_unwind(AssertUnwindSafe(|| stage.run(ctx))) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            // A panic on a worker thread (rayon) is re-raised here with its payload, but its
            // location was recorded on that thread: then there is only the message.
            let at = PANIC_LOCATION
                .with(|p| p.borrow_mut().take())
                .map(|l| format!(" (at {l})"))
                .unwrap_or_default();
            Err(anyhow::anyhow!("{message}{at}").context("the stage panicked"))
        }
    }
}

/// Required and optional upstream stages.
fn all_upstream(stage: &dyn AnyStage) -> impl Iterator<Item = &'static str> + '_ {
    stage
        .upstream()
        .iter()
        .chain(stage.optional_upstream())
        .copied()
}

/// Explains why a previous artifact no longer stands, or `None` when it does.
fn why_stale(
    prev: &Artifact,
    stage: &dyn AnyStage,
    config: &Value,
    upstream: &BTreeMap<String, String>,
    input_hash: &str,
    root: &Path,
    verify: bool,
) -> Option<String> {
    if prev.status == Status::Failed {
        let msg = prev
            .error
            .as_ref()
            .map(ErrorRecord::full)
            .unwrap_or_default();
        return Some(format!("last run failed: {msg}"));
    }
    if prev.code_version != stage.code_version() {
        return Some(format!(
            "stage code changed (version {} → {})",
            prev.code_version,
            stage.code_version()
        ));
    }
    if &prev.config != config {
        let changed = changed_keys(&prev.config, config, "");
        return Some(format!("config changed: {}", changed.join(", ")));
    }
    for (up, hash) in upstream {
        if prev.upstream.get(up) != Some(hash) {
            return Some(format!("upstream `{up}` changed"));
        }
    }
    if prev.input_hash != input_hash {
        return Some("inputs changed (upstream outputs or medpipe version)".into());
    }
    // A workspace copied or moved from elsewhere (`cp -a` keeps sizes and mtimes): its
    // stat fingerprints prove nothing about these files, so every output is re-hashed.
    let moved = prev.workspace.as_deref() != Some(root);
    for out in &prev.outputs {
        let p = root.join(&out.path);
        let stat = fs::stat_fingerprint(&p).ok();
        if !moved && !verify && stat.is_some() && stat == out.stat {
            continue; // untouched since hashed: skip re-reading it
        }
        match fs::hash_path(&p) {
            Err(_) => return Some(format!("output {} is missing", out.path.display())),
            Ok((sha, bytes)) if sha != out.sha256 || bytes != out.bytes => {
                return Some(format!("output {} changed on disk", out.path.display()))
            }
            Ok(_) => {}
        }
    }
    None
}

/// Dotted paths of the keys whose values differ between two JSON objects.
fn changed_keys(old: &Value, new: &Value, prefix: &str) -> Vec<String> {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    changed_keys(
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        &p,
                    )
                })
                .collect()
        }
        (a, b) if a == b => Vec::new(),
        _ => vec![prefix.to_string()],
    }
}

fn hash_outputs(
    ws: &Workspace,
    out: StageOutput,
) -> anyhow::Result<(StageOutput, Vec<OutputFile>)> {
    let mut files = Vec::new();
    for p in &out.outputs {
        let abs = ws.root().join(p);
        let stat = Some(fs::stat_fingerprint(&abs)?);
        let (sha256, bytes) = fs::hash_path(&abs)?;
        files.push(OutputFile {
            path: ws.relative(&abs),
            bytes,
            sha256,
            stat,
        });
    }
    Ok((out, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Stage;

    #[test]
    fn changed_keys_lists_dotted_paths() {
        let a = json!({"prepare": {"seed": 1, "split": {"train": 0.8}}});
        let b = json!({"prepare": {"seed": 2, "split": {"train": 0.8}, "new": true}});
        assert_eq!(
            changed_keys(&a, &b, ""),
            vec!["prepare.new".to_string(), "prepare.seed".to_string()]
        );
    }

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
