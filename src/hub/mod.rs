//! The Hugging Face Hub: where its cache lives, what a `hf:` / `hf-dataset:` source names,
//! and fetching a repository's files into the standard cache (see [`fetch`]).
//!
//! Environment variables follow `huggingface_hub` (src/huggingface_hub/constants.py):
//! `HF_HUB_CACHE` (else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`), `HF_ENDPOINT`, `HF_TOKEN` (else the token file
//! `HF_TOKEN_PATH` or `HF_HOME/token` that `huggingface-cli login` writes) and
//! `HF_HUB_OFFLINE`. The cache is shared with Python: files either side fetched are reused.

pub mod fetch;

use std::path::PathBuf;

pub use fetch::{fetch, Action, FetchedFile, FetchedRepo, HubError, Progress};

/// Where the hub is and how to reach it, read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// Hub base URL without a trailing slash (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache directory (holds `models--org--name/` folders).
    pub cache_dir: PathBuf,
    /// Access token for gated or private repositories.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use the cache only, never the network.
    pub offline: bool,
}

impl HubEnv {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the variables through `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        Self {
            endpoint,
            cache_dir,
            token,
            offline,
        }
    }
}

/// Model or dataset repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// `hf:` sources (`/api/models/…`, cache folder `models--…`).
    Model,
    /// `hf-dataset:` sources (`/api/datasets/…`, cache folder `datasets--…`).
    Dataset,
}

/// A repository at a revision, as a source string names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub kind: RepoKind,
    /// `org/name` (or `name`).
    pub id: String,
    /// Branch, tag or commit; `main` when the source names none.
    pub revision: String,
}

/// Errors parsing a source string.
#[derive(Debug, thiserror::Error)]
#[error("source `{source_str}`: {reason}")]
pub struct SourceError {
    pub source_str: String,
    pub reason: String,
}

impl RepoRef {
    /// Parses `hf:org/name[@revision]` (a model) or `hf-dataset:org/name[@revision]`.
    /// Returns `Ok(None)` for strings with neither prefix.
    ///
    /// # Errors
    /// A prefixed string whose repository id or revision is malformed.
    pub fn parse(s: &str) -> Result<Option<Self>, SourceError> {
        let (kind, rest) = if let Some(r) = s.strip_prefix("hf:") {
            (RepoKind::Model, r)
        } else if let Some(r) = s.strip_prefix("hf-dataset:") {
            (RepoKind::Dataset, r)
        } else {
            return Ok(None);
        };
        let bad = |reason: &str| SourceError {
            source_str: s.to_string(),
            reason: reason.to_string(),
        };
        let (id, revision) = match rest.split_once('@') {
            Some((id, rev)) => (id, rev),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = id.split('/').collect();
        let part_ok = |p: &&str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if parts.len() > 2 || !parts.iter().all(part_ok) {
            return Err(bad(
                "expected a repository id `org/name` of letters, digits, `-`, `_`, `.`",
            ));
        }
        if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
            return Err(bad("the revision after `@` is empty or not a valid ref"));
        }
        Ok(Some(Self {
            kind,
            id: id.to_string(),
            revision: revision.to_string(),
        }))
    }

    /// The cache folder name (`models--org--name`), as `huggingface_hub` names it.
    pub fn folder_name(&self) -> String {
        let prefix = match self.kind {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        };
        format!("{prefix}--{}", self.id.replace('/', "--"))
    }
}

impl std::fmt::Display for RepoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefix = match self.kind {
            RepoKind::Model => "hf",
            RepoKind::Dataset => "hf-dataset",
        };
        write!(f, "{prefix}:{}@{}", self.id, self.revision)
    }
}

/// `fnmatch`-style matching as `huggingface_hub`'s `allow_patterns`: `*` matches any run of
/// characters (`/` included), `?` any one character; everything else literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative wildcard matching with one backtrack point (the last `*`).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> HubEnv {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        assert_eq!(
            env(&[("HOME", "/h")]).cache_dir,
            PathBuf::from("/h/.cache/huggingface/hub")
        );
        assert_eq!(
            env(&[("HOME", "/h"), ("HF_HOME", "/hf")]).cache_dir,
            PathBuf::from("/hf/hub")
        );
        assert_eq!(
            env(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")]).cache_dir,
            PathBuf::from("/c")
        );
    }

    #[test]
    fn token_comes_from_hf_token_or_the_login_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();
        assert_eq!(env(&[("HF_HOME", home)]).token.as_deref(), Some("hf_file"));
        assert_eq!(
            env(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")])
                .token
                .as_deref(),
            Some("hf_env")
        );
        assert_eq!(env(&[("HF_HOME", "/nonexistent")]).token, None);
    }

    #[test]
    fn offline_and_endpoint_are_read() {
        let e = env(&[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
        ]);
        assert!(e.offline);
        assert_eq!(e.endpoint, "http://127.0.0.1:9");
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).offline);
        assert_eq!(env(&[]).endpoint, "https://huggingface.co");
    }

    #[test]
    fn sources_parse_with_and_without_revision() {
        let r = RepoRef::parse("hf:Qwen/Qwen2.5-VL-7B-Instruct")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.kind, r.id.as_str(), r.revision.as_str()),
            (RepoKind::Model, "Qwen/Qwen2.5-VL-7B-Instruct", "main")
        );
        assert_eq!(r.folder_name(), "models--Qwen--Qwen2.5-VL-7B-Instruct");
        let d = RepoRef::parse("hf-dataset:flaviagiammarino/path-vqa@refs/convert/parquet")
            .unwrap()
            .unwrap();
        assert_eq!(d.kind, RepoKind::Dataset);
        assert_eq!(d.revision, "refs/convert/parquet");
        assert_eq!(d.folder_name(), "datasets--flaviagiammarino--path-vqa");
        assert!(RepoRef::parse("builtin:tiny").unwrap().is_none());
        assert!(RepoRef::parse("hf:a/b/c").is_err());
        assert!(RepoRef::parse("hf:../x").is_err());
        assert!(RepoRef::parse("hf:a/b@").is_err());
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        assert!(glob_match(
            "*.safetensors",
            "model-00001-of-00002.safetensors"
        ));
        assert!(glob_match("data/*.parquet", "data/train-0.parquet"));
        assert!(glob_match("*", "a/b/c"));
        assert!(glob_match("config.json", "config.json"));
        assert!(!glob_match("config.json", "xconfig.json"));
        assert!(!glob_match("*.json", "model.safetensors"));
        assert!(glob_match("tokenizer?json", "tokenizer.json"));
    }
}
