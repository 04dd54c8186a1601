//! Whether a stage's artifact is current: its input hash (computed *before* it would run),
//! and why it is stale when it is not. `medpipe status` is this, for every stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::artifact::{Artifact, ErrorRecord, OutputFile, Status};
use super::runner::{all_upstream, Pipeline, RunError};
use super::settings::Settings;
use super::stage::AnyStage;
use super::workspace::Workspace;
use crate::build_info::MEDPIPE_VERSION;
use crate::fs;
use crate::json::canonical;

/// How `medpipe status` judges outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusOptions {
    /// Re-hash every output instead of trusting a file whose size and modification time are
    /// as recorded (the fast path misses an edit that keeps both).
    pub verify: bool,
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

/// A stage's freshness, computed before it would run.
pub(super) struct Assessment {
    pub(super) input_hash: String,
    pub(super) upstream: BTreeMap<String, String>,
    pub(super) config: Value,
    /// `None` when up to date; else why it must run.
    pub(super) stale: Option<String>,
    pub(super) previous: Option<Artifact>,
}

impl Pipeline {
    /// Computes a stage's input hash and whether its artifact is current.
    pub(super) fn assess(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_lists_dotted_paths() {
        let a = json!({"prepare": {"seed": 1, "split": {"train": 0.8}}});
        let b = json!({"prepare": {"seed": 2, "split": {"train": 0.8}, "new": true}});
        assert_eq!(
            changed_keys(&a, &b, ""),
            vec!["prepare.new".to_string(), "prepare.seed".to_string()]
        );
    }
}
