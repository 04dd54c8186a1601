//! Stage artifacts: `reports/<artifact>.json`, one per stage, with a versioned schema.
//!
//! Schema (version 1):
//! ```text
//! schema_version  1
//! stage           "prepare"
//! status          "completed" | "failed"
//! started_at      RFC 3339 UTC
//! finished_at     RFC 3339 UTC
//! duration_s      seconds
//! input_hash      sha256 of (stage, code version, config sections, upstream fingerprints, medpipe version)
//! code_version    the stage's code version
//! config          the config sections as used
//! upstream        { stage: input_hash } of the upstream artifacts used
//! outputs         [ { path, bytes, sha256 } ]
//! metrics         stage-specific figures (units in key names)
//! summary         [ [label, value] ] key figures for tables and BUILD_LOG.md
//! warnings        [ text ]
//! error           { message, causes[] } when failed, else null
//! medpipe_version, git_commit
//! workspace       the workspace root it was written in (absent in older artifacts)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Current artifact schema version. Bump on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Errors reading artifacts.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("reading artifact {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {path} is not valid (delete it to re-run its stage)")]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Did the stage finish?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    Failed,
}

/// One file (or directory) a stage produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Workspace-relative when inside the workspace, else absolute.
    pub path: PathBuf,
    /// Size in bytes (sum of files for a directory).
    pub bytes: u64,
    /// sha256, hex.
    pub sha256: String,
    /// Metadata fingerprint (paths, sizes, mtimes) taken when hashed; when it still matches,
    /// the content hash is trusted without re-reading (see `fs::stat_fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<String>,
}

/// The error of a failed stage: its message and the chain of causes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub message: String,
    pub causes: Vec<String>,
}

impl ErrorRecord {
    /// Flattens an anyhow error chain.
    pub fn from_anyhow(e: &anyhow::Error) -> Self {
        let mut chain = e.chain().map(|c| c.to_string());
        Self {
            message: chain.next().unwrap_or_default(),
            causes: chain.collect(),
        }
    }
    /// `message: cause: cause`, as printed to users.
    pub fn full(&self) -> String {
        std::iter::once(self.message.as_str())
            .chain(self.causes.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(": ")
    }
}

/// A stage artifact (see the module doc for the schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub schema_version: u32,
    pub stage: String,
    pub status: Status,
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    pub input_hash: String,
    /// The stage's code version when it ran (a bump makes old artifacts stale).
    #[serde(default)]
    pub code_version: u32,
    pub config: Value,
    pub upstream: BTreeMap<String, String>,
    pub outputs: Vec<OutputFile>,
    pub metrics: Value,
    #[serde(default)]
    pub summary: Vec<(String, String)>,
    #[serde(default)]
    pub warnings: Vec<String>,
    pub error: Option<ErrorRecord>,
    pub medpipe_version: String,
    pub git_commit: Option<String>,
    /// The absolute workspace root the stage ran in. Read from another root, the workspace
    /// was copied or moved: its outputs are re-verified by content, not trusted by their
    /// stat fingerprints (issue 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<PathBuf>,
}

impl Artifact {
    /// Reads an artifact; `Ok(None)` when the file does not exist.
    ///
    /// # Errors
    /// Unreadable or invalid JSON, naming the file.
    pub fn read(path: &Path) -> Result<Option<Self>, ArtifactError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ArtifactError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| ArtifactError::Invalid {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A metric by JSON pointer (`/tokens_per_s`), for reports.
    pub fn metric(&self, pointer: &str) -> Option<&Value> {
        self.metrics.pointer(pointer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_record_keeps_the_whole_chain() {
        let e = anyhow::anyhow!("disk full").context("writing data/x.png");
        let r = ErrorRecord::from_anyhow(&e);
        assert_eq!(r.message, "writing data/x.png");
        assert_eq!(r.causes, vec!["disk full".to_string()]);
        assert_eq!(r.full(), "writing data/x.png: disk full");
    }

    #[test]
    fn missing_artifact_reads_as_none_and_garbage_as_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Artifact::read(&dir.path().join("nope.json"))
            .unwrap()
            .is_none());
        std::fs::write(dir.path().join("bad.json"), b"{ not json").unwrap();
        let err = Artifact::read(&dir.path().join("bad.json")).unwrap_err();
        assert!(err.to_string().contains("bad.json"));
    }
}
