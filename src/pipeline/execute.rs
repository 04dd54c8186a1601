//! Running one stage: its upstream handed over, panics caught, outputs hashed, the
//! artifact written (or the failure recorded), the build log appended.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;
use std::time::{Instant, SystemTime};

use indicatif::MultiProgress;
use serde_json::Value;

use super::artifact::{Artifact, ErrorRecord, OutputFile, Status, SCHEMA_VERSION};
use super::buildlog;
use super::runner::{all_upstream, Pipeline, RunError, RunOptions, StageReport};
use super::settings::Settings;
use super::stage::{AnyStage, StageCtx, StageOutput, UpstreamState};
use super::status::Assessment;
use super::workspace::Workspace;
use crate::build_info::{git_commit, rfc3339, MEDPIPE_VERSION};
use crate::fs::{self, FsError};

thread_local! {
    /// Where the last panic on this thread happened, for the failed artifact.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn execute(
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
}

/// Records that a copied or moved workspace's artifact was re-verified here: the current root
/// and fresh stat fingerprints, so the next run trusts them again. Nothing else changes.
pub(super) fn adopt(ws: &Workspace, file: &str, prev: &Artifact) -> Result<(), RunError> {
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
