//! Fetching a repository's files into the Hugging Face cache, verified.
//!
//! The transfer itself is `hf-hub`'s sync API (`ApiRepo::download_with_progress`): its
//! metadata request (`Range: bytes=0-0` on `/resolve/`, reading `X-Repo-Commit`,
//! `X-Linked-Etag`/`ETag`, `Content-Range`), the resumable `blobs/<etag>.part` file continued
//! with a `Range: bytes=N-` request, and the cache layout (`blobs/<etag>`,
//! `snapshots/<commit>/<file>` symlinks, `refs/<revision>`), which is `huggingface_hub`'s
//! (src/huggingface_hub/file_download.py), so Python and medpipe share files.
//!
//! What hf-hub 0.4 does not do, and this file adds:
//! - **Revision info with file hashes**: `GET /api/{models|datasets}/{id}/revision/{rev}?blobs=true`
//!   (through hf-hub's `info_request`) gives the commit and every file's size and, for LFS
//!   files, sha256. Downloads are then checked to come from that commit.
//! - **sha256 verification**: hf-hub renames the finished `.part` into `blobs/` unverified. We
//!   hash the blob against the hub's `lfs.sha256`; on a mismatch the blob and its snapshot
//!   link are deleted and the error names the file and both hashes.
//! - **Reuse**: hf-hub's `download` always transfers again; a file already linked in
//!   `snapshots/<commit>/` is reused here (and re-verified).
//! - **Offline mode** (`HF_HUB_OFFLINE=1`) and clear errors for 404 / 401 / gated repositories
//!   (classified by HTTP status and the hub's `X-Error-Code` header).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use super::{glob_match, HubEnv, RepoKind, RepoRef};
use crate::fs::{self, FsError};

/// Errors fetching from the hub or reading the cache.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Not enough room in the HF cache for the files still to download (checked before any).
    #[error(transparent)]
    Space(#[from] crate::fs::space::SpaceCheckError),
    #[error("{repo}: repository not found on {endpoint} (check the name; a private repository also needs HF_TOKEN)")]
    NotFound { repo: String, endpoint: String },
    #[error("{repo}: access denied (HTTP {status}{code}): the repository is gated or private; accept its terms on the Hub page and set HF_TOKEN to a token that has access")]
    Unauthorized {
        repo: String,
        status: u16,
        /// `, GatedRepo` when the hub said so.
        code: String,
    },
    #[error("{repo}: revision `{revision}` not found")]
    RevisionNotFound { repo: String, revision: String },
    #[error("{url}: HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
    },
    #[error("connecting to {url} (no network? set HF_HUB_OFFLINE=1 to use only the cache)")]
    Network {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{url}: the revision info is not the JSON the hub sends")]
    BadInfo {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{url}: file name `{path}` would leave the repository's cache folder")]
    UnsafePath { url: String, path: String },
    #[error("{repo}@{commit} has no file matching `{pattern}`")]
    MissingFile {
        repo: String,
        commit: String,
        pattern: String,
    },
    #[error("{file} from {repo}: sha256 mismatch: the hub says {expected}, the downloaded file has {actual}; the corrupt file was deleted from the cache (run again to re-download)")]
    HashMismatch {
        repo: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file} from {repo}: size mismatch: the hub says {expected} bytes, the downloaded file has {actual}; the file was deleted from the cache")]
    SizeMismatch {
        repo: String,
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{repo}: `{revision}` moved to commit {got} while downloading (expected {expected}); run again")]
    RevisionMoved {
        repo: String,
        revision: String,
        expected: String,
        got: String,
    },
    #[error("HF_HUB_OFFLINE is set and {repo} is not in the cache {cache} (run once online, or unset HF_HUB_OFFLINE)")]
    NotCached { repo: String, cache: PathBuf },
    #[error("HF_HUB_OFFLINE is set and the cached snapshot {snapshot} has no file matching `{pattern}` (run once online to fetch it)")]
    OfflineMissing { snapshot: PathBuf, pattern: String },
    #[error("downloading {file} from {repo}")]
    Download {
        repo: String,
        file: String,
        #[source]
        source: ApiError,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// How a file came to be in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transferred now (possibly continuing an interrupted `.part`).
    Downloaded,
    /// Already in the cache (fetched earlier by medpipe or Python).
    Reused,
}

impl Action {
    /// `downloaded` or `reused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloaded => "downloaded",
            Self::Reused => "reused",
        }
    }
}

/// One file of a fetched repository.
#[derive(Debug, Clone)]
pub struct FetchedFile {
    /// Path inside the repository (`model-00001-of-00004.safetensors`).
    pub path: String,
    /// Size, bytes.
    pub size_bytes: u64,
    /// sha256 of the file as it is in the cache, hex.
    pub sha256: String,
    /// sha256 the hub advertises (LFS files), when known; equal to `sha256` when present.
    pub expected_sha256: Option<String>,
    /// `snapshots/<commit>/<path>` in the cache.
    pub cache_path: PathBuf,
    pub action: Action,
    /// Bytes already in an interrupted `.part` file that this download continued from.
    pub resumed_from_bytes: u64,
}

/// A repository fetched at one commit.
#[derive(Debug, Clone)]
pub struct FetchedRepo {
    pub repo: RepoRef,
    /// The 40-hex commit the revision resolved to.
    pub commit: String,
    /// `<cache>/<folder>/snapshots/<commit>`: the repository in HF layout.
    pub snapshot_dir: PathBuf,
    /// Files in the order of the hub's listing.
    pub files: Vec<FetchedFile>,
    /// Problems repaired on the way (a corrupt cached file fetched again).
    pub warnings: Vec<String>,
}

/// Progress of a fetch, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// Bytes that will be transferred in total (files not yet in the cache).
    Planned { total_bytes: u64 },
    /// A file starts downloading.
    File { name: &'a str },
    /// `bytes` more of the current file are on disk (including resumed bytes once).
    Advanced { bytes: u64 },
}

/// `GET /api/{kind}/{id}/revision/{rev}?blobs=true`, the fields used.
#[derive(Debug, Deserialize)]
struct RevisionInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
}

/// Fetches the files of `repo` matching any of `patterns` into the cache (or, offline, finds
/// them there). Every pattern in `required` must match at least one file.
///
/// # Errors
/// See [`HubError`]: unknown or gated repository, network failure, hash mismatch, missing
/// files, or (offline) a repository or file not in the cache.
pub fn fetch(
    env: &HubEnv,
    repo: &RepoRef,
    patterns: &[String],
    required: &[String],
    retries: usize,
    on_progress: &mut dyn FnMut(Progress<'_>),
) -> Result<FetchedRepo, HubError> {
    if env.offline {
        return fetch_offline(env, repo, patterns, required);
    }
    let repo_dir = env.cache_dir.join(repo.folder_name());
    let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(false)
        .with_retries(retries)
        .with_user_agent("medpipe", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|source| HubError::Download {
            repo: repo.to_string(),
            file: "(client setup)".into(),
            source,
        })?;
    let kind = match repo.kind {
        RepoKind::Model => RepoType::Model,
        RepoKind::Dataset => RepoType::Dataset,
    };
    let api_repo = api.repo(Repo::with_revision(
        repo.id.clone(),
        kind,
        repo.revision.clone(),
    ));

    let request = api_repo.info_request().query("blobs", "true");
    let url = request.url().to_string();
    let info: RevisionInfo = match request.call() {
        Ok(resp) => {
            let text = resp.into_string().map_err(|e| HubError::Network {
                url: url.clone(),
                source: Box::new(ureq::Error::from(e)),
            })?;
            serde_json::from_str(&text).map_err(|source| HubError::BadInfo {
                url: url.clone(),
                source,
            })?
        }
        Err(e) => return Err(classify(e, repo, &env.endpoint, &url)),
    };
    let commit = info.sha.clone();
    let snapshot_dir = repo_dir.join("snapshots").join(&commit);

    if let Some(bad) = info
        .siblings
        .iter()
        .find(|s| !is_safe_relative(&s.rfilename))
    {
        return Err(HubError::UnsafePath {
            url,
            path: bad.rfilename.clone(),
        });
    }
    let selected: Vec<&Sibling> = info
        .siblings
        .iter()
        .filter(|s| patterns.iter().any(|p| glob_match(p, &s.rfilename)))
        .collect();
    for pattern in required {
        if !selected.iter().any(|s| glob_match(pattern, &s.rfilename)) {
            return Err(HubError::MissingFile {
                repo: repo.to_string(),
                commit,
                pattern: pattern.clone(),
            });
        }
    }
    let total_bytes = selected
        .iter()
        .filter(|s| !snapshot_dir.join(&s.rfilename).exists())
        .map(|s| s.size.unwrap_or(0))
        .sum();
    crate::fs::space::ensure_free(
        &env.cache_dir,
        total_bytes,
        &format!("the files of {repo} still to download"),
    )?;
    on_progress(Progress::Planned { total_bytes });

    let mut files = Vec::new();
    let mut warnings = Vec::new();
    for s in selected {
        let pointer = snapshot_dir.join(&s.rfilename);
        let expected = s.lfs.as_ref().map(|l| l.sha256.to_ascii_lowercase());
        if pointer.exists() {
            let (sha256, size) = fs::hash_file(&pointer)?;
            let intact =
                expected.as_ref().is_none_or(|e| *e == sha256) && s.size.is_none_or(|n| n == size);
            if intact {
                files.push(FetchedFile {
                    path: s.rfilename.clone(),
                    size_bytes: size,
                    sha256,
                    expected_sha256: expected,
                    cache_path: pointer,
                    action: Action::Reused,
                    resumed_from_bytes: 0,
                });
                continue;
            }
            // A corrupt cached copy: remove it and download afresh.
            tracing::warn!(file = %s.rfilename, %sha256, size, "cached file does not match the hub's sha256 or size; re-downloading");
            warnings.push(format!(
                "{}: cached copy {} was corrupt (sha256 {sha256}, {size} bytes); downloaded again",
                s.rfilename,
                pointer.display()
            ));
            remove_cached(&pointer)?;
        }
        // hf-hub names the blob after the etag: the sha256 for LFS files, the git blob id
        // otherwise; an interrupted transfer is `<blob>.part`.
        let etag = expected.clone().or_else(|| s.blob_id.clone());
        let part = etag.map(|e| repo_dir.join("blobs").join(format!("{e}.part")));
        let mut resumed_from_bytes = part
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .unwrap_or(0);
        // hf-hub asks for `bytes=<part length>-`: a part that is already whole (killed between
        // the last byte and the rename) would get 416 forever, a longer one `InvalidResume`.
        // Start such a file over.
        if let (Some(p), Some(size)) = (&part, s.size) {
            if resumed_from_bytes >= size && size > 0 {
                tracing::warn!(part = %p.display(), "partial download is not shorter than the file; restarting it");
                std::fs::remove_file(p).map_err(|source| FsError {
                    action: "removing stale partial download",
                    path: p.clone(),
                    source,
                })?;
                resumed_from_bytes = 0;
            }
        }
        on_progress(Progress::File { name: &s.rfilename });
        let got = api_repo
            .download_with_progress(&s.rfilename, ProgressAdapter(on_progress))
            .map_err(|e| match e {
                ApiError::RequestError(inner) => {
                    classify(*inner, repo, &env.endpoint, &api_repo.url(&s.rfilename))
                }
                source => HubError::Download {
                    repo: repo.to_string(),
                    file: s.rfilename.clone(),
                    source,
                },
            })?;
        if got != pointer {
            let got_commit = got
                .strip_prefix(repo_dir.join("snapshots"))
                .ok()
                .and_then(|p| p.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_else(|| got.display().to_string());
            return Err(HubError::RevisionMoved {
                repo: repo.to_string(),
                revision: repo.revision.clone(),
                expected: commit,
                got: got_commit,
            });
        }
        let (sha256, size) = fs::hash_file(&pointer)?;
        if let Some(exp) = &expected {
            if *exp != sha256 {
                remove_cached(&pointer)?;
                return Err(HubError::HashMismatch {
                    repo: repo.to_string(),
                    file: s.rfilename.clone(),
                    expected: exp.clone(),
                    actual: sha256,
                });
            }
        }
        if let Some(exp) = s.size.filter(|&n| n != size) {
            remove_cached(&pointer)?;
            return Err(HubError::SizeMismatch {
                repo: repo.to_string(),
                file: s.rfilename.clone(),
                expected: exp,
                actual: size,
            });
        }
        files.push(FetchedFile {
            path: s.rfilename.clone(),
            size_bytes: size,
            sha256,
            expected_sha256: expected,
            cache_path: pointer,
            action: Action::Downloaded,
            resumed_from_bytes,
        });
    }
    // Pin the revision to the commit, as huggingface_hub does (hf-hub writes it only when it
    // downloads something). A revision that is the commit itself gets no ref in
    // huggingface_hub's layout, but hf-hub writes `refs/<commit>`: remove it.
    let ref_path = repo_dir.join("refs").join(&repo.revision);
    if repo.revision != commit {
        fs::write_atomic(&ref_path, commit.as_bytes())?;
    } else if ref_path.is_file() {
        std::fs::remove_file(&ref_path).map_err(|source| FsError {
            action: "removing",
            path: ref_path.clone(),
            source,
        })?;
    }
    Ok(FetchedRepo {
        repo: repo.clone(),
        commit,
        snapshot_dir,
        files,
        warnings,
    })
}

/// Resolves `repo` in the cache alone and lists the matching files.
fn fetch_offline(
    env: &HubEnv,
    repo: &RepoRef,
    patterns: &[String],
    required: &[String],
) -> Result<FetchedRepo, HubError> {
    let repo_dir = env.cache_dir.join(repo.folder_name());
    let not_cached = || HubError::NotCached {
        repo: repo.to_string(),
        cache: env.cache_dir.clone(),
    };
    let is_commit =
        repo.revision.len() == 40 && repo.revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit && repo_dir.join("snapshots").join(&repo.revision).is_dir() {
        repo.revision.clone()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(&repo.revision))
            .map_err(|_| not_cached())?
            .trim()
            .to_string()
    };
    let snapshot_dir = repo_dir.join("snapshots").join(&commit);
    if !snapshot_dir.is_dir() {
        return Err(not_cached());
    }
    let mut names = Vec::new();
    list_files(&snapshot_dir, "", &mut names)?;
    names.sort();
    names.retain(|n| patterns.iter().any(|p| glob_match(p, n)));
    for pattern in required {
        if !names.iter().any(|n| glob_match(pattern, n)) {
            return Err(HubError::OfflineMissing {
                snapshot: snapshot_dir.clone(),
                pattern: pattern.clone(),
            });
        }
    }
    let mut files = Vec::new();
    for name in names {
        let pointer = snapshot_dir.join(&name);
        let (sha256, size) = fs::hash_file(&pointer)?;
        // An LFS blob is named by its sha256 (the hub's etag): the cache itself records
        // the hash the hub advertised.
        let expected = std::fs::canonicalize(&pointer)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| n.len() == 64 && n.chars().all(|c| c.is_ascii_hexdigit()));
        if let Some(exp) = &expected {
            if *exp != sha256 {
                remove_cached(&pointer)?;
                return Err(HubError::HashMismatch {
                    repo: repo.to_string(),
                    file: name,
                    expected: exp.clone(),
                    actual: sha256,
                });
            }
        }
        files.push(FetchedFile {
            path: name,
            size_bytes: size,
            sha256,
            expected_sha256: expected,
            cache_path: pointer,
            action: Action::Reused,
            resumed_from_bytes: 0,
        });
    }
    Ok(FetchedRepo {
        repo: repo.clone(),
        commit,
        snapshot_dir,
        files,
        warnings: Vec::new(),
    })
}

/// A repository file name that stays inside its snapshot folder when joined to it.
fn is_safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Files under `dir`, as `/`-separated paths relative to the snapshot root.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), FsError> {
    let io = |source| FsError {
        action: "listing",
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.path().is_dir() {
            list_files(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

/// Deletes a snapshot link and the blob it points to, so the cache never presents a bad file
/// as complete.
fn remove_cached(pointer: &Path) -> Result<(), FsError> {
    let blob = std::fs::canonicalize(pointer).ok();
    let rm = |p: &Path| match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FsError {
            action: "removing corrupt cached file",
            path: p.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    };
    rm(pointer)?;
    if let Some(b) = blob.filter(|b| b != pointer) {
        rm(&b)?;
    }
    Ok(())
}

/// Maps a ureq error to what the user should do, using the status and the hub's
/// `X-Error-Code` header (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`).
fn classify(e: ureq::Error, repo: &RepoRef, endpoint: &str, url: &str) -> HubError {
    match e {
        ureq::Error::Status(status, resp) => {
            let code = resp.header("X-Error-Code").unwrap_or("").to_string();
            let message = resp
                .header("X-Error-Message")
                .map(str::to_string)
                .or_else(|| resp.into_string().ok())
                .unwrap_or_default();
            match (status, code.as_str()) {
                (_, "RepoNotFound") | (404, "") => HubError::NotFound {
                    repo: repo.to_string(),
                    endpoint: endpoint.to_string(),
                },
                (_, "RevisionNotFound") => HubError::RevisionNotFound {
                    repo: repo.to_string(),
                    revision: repo.revision.clone(),
                },
                (_, "GatedRepo") | (401 | 403, _) => HubError::Unauthorized {
                    repo: repo.to_string(),
                    status,
                    code: if code.is_empty() {
                        String::new()
                    } else {
                        format!(", {code}")
                    },
                },
                _ => HubError::Http {
                    url: url.to_string(),
                    status,
                    message: message.chars().take(300).collect(),
                },
            }
        }
        transport => HubError::Network {
            url: url.to_string(),
            source: Box::new(transport),
        },
    }
}

/// Forwards hf-hub's per-file progress to the caller's callback.
struct ProgressAdapter<'a, 'b>(&'a mut dyn FnMut(Progress<'b>));

impl hf_hub::api::Progress for ProgressAdapter<'_, '_> {
    fn init(&mut self, _size: usize, _filename: &str) {}
    fn update(&mut self, size: usize) {
        (self.0)(Progress::Advanced { bytes: size as u64 });
    }
    fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_that_escape_the_snapshot_are_unsafe() {
        for ok in ["config.json", "data/train-0.parquet", "a.b/c"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn removing_a_cached_file_removes_its_link_and_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = tmp.path().join("blobs/abc");
        let link = tmp.path().join("snapshots/c1/model.safetensors");
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"bad").unwrap();
        std::os::unix::fs::symlink("../../blobs/abc", &link).unwrap();
        remove_cached(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert!(!blob.exists());
    }
}
