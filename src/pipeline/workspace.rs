//! The workspace: where a pipeline's outputs live (`data/`, `checkpoints/`, `reports/`,
//! `BUILD_LOG.md`) and the lock that keeps two runs apart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::fs::FsError;

/// Errors opening or locking a workspace.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error(
        "workspace {path} is locked by pid {holder} (a run is in progress; wait for it or stop it)"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(transparent)]
    Io(#[from] FsError),
    #[error("no workspace at {path}: the directory does not exist (`medpipe run --workspace {path}` creates one)")]
    Missing { path: PathBuf },
    #[error("no workspace at {path}: it is not a directory")]
    NotADirectory { path: PathBuf },
}

/// A workspace directory. Paths handed out are absolute.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Opens (creating if needed) the workspace at `root`.
    ///
    /// # Errors
    /// The directory cannot be created or resolved.
    pub fn open(root: &Path) -> Result<Self, FsError> {
        std::fs::create_dir_all(root).map_err(|source| FsError {
            action: "creating workspace",
            path: root.to_path_buf(),
            source,
        })?;
        Self::resolved(root)
    }

    /// The workspace at the existing directory `root`, by its canonical path.
    fn resolved(root: &Path) -> Result<Self, FsError> {
        let root = root.canonicalize().map_err(|source| FsError {
            action: "resolving workspace",
            path: root.to_path_buf(),
            source,
        })?;
        Ok(Self { root })
    }

    /// Opens the workspace at `root` only if it exists, creating nothing (for `status`,
    /// which must not leave a directory behind for a mistyped path).
    ///
    /// # Errors
    /// [`WorkspaceError::Missing`] or [`WorkspaceError::NotADirectory`], or the directory
    /// cannot be resolved.
    pub fn existing(root: &Path) -> Result<Self, WorkspaceError> {
        match std::fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(WorkspaceError::NotADirectory {
                    path: root.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(WorkspaceError::Missing {
                    path: root.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(FsError {
                    action: "reading workspace",
                    path: root.to_path_buf(),
                    source,
                }
                .into())
            }
        }
        Ok(Self::resolved(root)?)
    }

    /// The workspace directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `reports/`: artifacts and final reports.
    pub fn reports(&self) -> PathBuf {
        self.root.join("reports")
    }
    /// `data/`: prepared datasets.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    /// `checkpoints/`: models, quantized models, adapters.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// `BUILD_LOG.md`: the human story of every run.
    pub fn build_log(&self) -> PathBuf {
        self.root.join("BUILD_LOG.md")
    }
    /// A path relative to the workspace when it is inside it (for artifacts), else as is.
    pub fn relative(&self, p: &Path) -> PathBuf {
        p.strip_prefix(&self.root).unwrap_or(p).to_path_buf()
    }

    /// Takes the workspace lock for the life of the returned guard. The OS releases it when
    /// the process dies, even on kill -9, so a stale lock file never blocks a later run.
    ///
    /// # Errors
    /// [`WorkspaceError::Locked`] with the holder's pid when another process holds it.
    pub fn lock(&self) -> Result<WorkspaceLock, WorkspaceError> {
        let path = self.root.join(".medpipe.lock");
        let io = |source| FsError {
            action: "opening lock",
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.split_whitespace().next().unwrap_or("?").to_string();
                return Err(WorkspaceError::Locked {
                    path: self.root.clone(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e).into()),
        }
        // We hold it: record who we are for the next one who asks. Best effort: the OS lock is
        // what excludes others, and a full disk must not turn every run into a lock error
        // (the stages then fail, and say so, with exit 1).
        let stamp = format!(
            "{} {}\n",
            std::process::id(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        let write = (|| {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(stamp.as_bytes())?;
            file.sync_all()
        })();
        if let Err(e) = write {
            tracing::warn!(
                "{:#}",
                anyhow::Error::from(io(e)).context("recording the lock holder")
            );
        }
        Ok(WorkspaceLock { _file: file })
    }
}

/// Holds the workspace lock until dropped.
#[derive(Debug)]
pub struct WorkspaceLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_in_same_workspace_names_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        let _held = ws.lock().unwrap();
        let err = ws.lock().unwrap_err().to_string();
        assert!(
            err.contains(&format!("locked by pid {}", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn opening_a_missing_workspace_for_reading_creates_nothing_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let err = Workspace::existing(&missing).unwrap_err().to_string();
        assert!(err.starts_with("no workspace at "), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!dir.path().join("no").exists(), "nothing was created");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = Workspace::existing(&dir.path().join("file"))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("it is not a directory"), "{err}");
        assert!(Workspace::existing(dir.path()).is_ok());
    }

    #[test]
    fn lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path()).unwrap();
        drop(ws.lock().unwrap());
        assert!(ws.lock().is_ok());
    }
}
