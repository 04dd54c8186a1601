//! Free disk space on the filesystem that holds a path, and the check stages make before
//! writing large outputs (issue 15).
//!
//! The numbers come from `statvfs(2)` on the path itself (its nearest existing ancestor), so
//! they are those of the workspace's own filesystem even where the mount table is incomplete:
//! sysinfo leaves tmpfs out of its disk list, and the probe used to report the root disk's
//! 71 GiB for a workspace on a 3 MiB tmpfs. The mount point shown in messages is the mount
//! whose path is the longest prefix of the canonicalized path.

use std::path::{Path, PathBuf};

use super::FsError;

/// Space on the filesystem holding a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpace {
    /// Where that filesystem is mounted, when the mount table says.
    pub mount_point: Option<PathBuf>,
    /// Bytes an unprivileged writer may still use.
    pub available_bytes: u64,
    /// Size of the filesystem in bytes.
    pub total_bytes: u64,
}

/// Not enough room for what a stage is about to write.
#[derive(Debug, thiserror::Error)]
#[error(
    "not enough free disk space for {what} in {path}: needs about {}, {} free on {}",
    human_bytes(*needed_bytes),
    human_bytes(*available_bytes),
    mount_point.as_ref().map(|m| m.display().to_string()).unwrap_or_else(|| "its filesystem".into())
)]
pub struct SpaceError {
    /// What was about to be written ("the NF4 checkpoint").
    pub what: String,
    /// The directory it would go to.
    pub path: PathBuf,
    /// Bytes it needs.
    pub needed_bytes: u64,
    /// Bytes free there.
    pub available_bytes: u64,
    /// The filesystem's mount point.
    pub mount_point: Option<PathBuf>,
}

/// Errors of [`ensure_free`].
#[derive(Debug, thiserror::Error)]
pub enum SpaceCheckError {
    #[error(transparent)]
    Short(#[from] SpaceError),
    #[error(transparent)]
    Io(#[from] FsError),
}

/// `12.3 MiB`, `1.5 GiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The nearest existing ancestor of `path` (itself when it exists), canonicalized.
fn existing_ancestor(path: &Path) -> Result<PathBuf, FsError> {
    let abs = std::path::absolute(path).map_err(|source| FsError {
        action: "resolving",
        path: path.to_path_buf(),
        source,
    })?;
    let mut p = abs.as_path();
    loop {
        match p.canonicalize() {
            Ok(c) => return Ok(c),
            Err(source) => match p.parent() {
                Some(parent) => p = parent,
                None => {
                    return Err(FsError {
                        action: "resolving",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
        }
    }
}

/// Free and total space on the filesystem that holds `path` (or would hold it: a path that
/// does not exist yet is measured at its nearest existing ancestor).
///
/// # Errors
/// The path cannot be resolved or its filesystem cannot be queried.
pub fn disk_space(path: &Path) -> Result<DiskSpace, FsError> {
    let dir = existing_ancestor(path)?;
    let (available_bytes, total_bytes) = statvfs(&dir)?;
    Ok(DiskSpace {
        mount_point: mount_point(&dir),
        available_bytes,
        total_bytes,
    })
}

/// Checks that `needed_bytes` fit on the filesystem of `dir` before a stage writes `what`
/// there.
///
/// # Errors
/// [`SpaceError`] naming what, where, how much is needed and how much is free; or the
/// filesystem cannot be queried.
pub fn ensure_free(dir: &Path, needed_bytes: u64, what: &str) -> Result<(), SpaceCheckError> {
    let space = disk_space(dir)?;
    if space.available_bytes >= needed_bytes {
        return Ok(());
    }
    Err(SpaceError {
        what: what.to_string(),
        path: dir.to_path_buf(),
        needed_bytes,
        available_bytes: space.available_bytes,
        mount_point: space.mount_point,
    }
    .into())
}

#[cfg(unix)]
fn statvfs(dir: &Path) -> Result<(u64, u64), FsError> {
    use std::os::unix::ffi::OsStrExt;
    let io = |source| FsError {
        action: "measuring free space of",
        path: dir.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter that
    // statvfs fills completely when it returns 0.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let frsize = if st.f_frsize > 0 {
        st.f_frsize as u64
    } else {
        st.f_bsize as u64
    };
    #[allow(clippy::unnecessary_cast)] // the field widths differ between platforms
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

#[cfg(not(unix))]
fn statvfs(dir: &Path) -> Result<(u64, u64), FsError> {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| (d.available_space(), d.total_space()))
        .ok_or_else(|| FsError {
            action: "finding the disk of",
            path: dir.to_path_buf(),
            source: std::io::Error::other("no mounted disk holds it"),
        })
}

/// The mount whose mount point is the longest prefix of `dir` (already canonical).
fn mount_point(dir: &Path) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    let mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .collect();
    #[cfg(not(target_os = "linux"))]
    let mounts: Vec<PathBuf> = sysinfo::Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| d.mount_point().to_path_buf())
        .collect();
    mounts
        .into_iter()
        .filter(|m| dir.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes.
#[cfg(target_os = "linux")]
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_does_not_exist_yet_is_measured_at_its_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let here = disk_space(dir.path()).unwrap();
        let deeper = disk_space(&dir.path().join("not/yet/there")).unwrap();
        assert_eq!(here.total_bytes, deeper.total_bytes);
        assert_eq!(here.mount_point, deeper.mount_point);
        assert!(here.total_bytes > 0);
        assert!(here.mount_point.is_some());
    }

    #[test]
    fn a_need_beyond_the_free_space_names_what_where_and_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        ensure_free(dir.path(), 0, "nothing").unwrap();
        let err = ensure_free(dir.path(), 5 << 50, "the NF4 checkpoint")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not enough free disk space for the NF4 checkpoint in"),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("needs about 5120.0 TiB"), "{err}");
        assert!(err.contains(" free on /"), "{err}");
    }

    #[test]
    fn human_bytes_picks_a_readable_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
