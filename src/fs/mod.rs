//! The one way medpipe writes files: atomically (temp file in the same directory, fsync,
//! rename), so a crash or kill -9 never leaves a half-written file under its final name.
//! Also the hashing used for artifacts' outputs, and `space`: free disk space (statvfs) and the
//! checks that refuse work a full disk would break.

pub mod space;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// An I/O failure with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct FsError {
    /// What was being done ("writing", "hashing", ...).
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically, creating parent directories.
///
/// # Errors
/// Any I/O failure (full disk, permissions); the target is then untouched and the temp file
/// removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], for content produced by a writer callback (large files).
///
/// # Errors
/// As [`write_atomic`], or whatever `fill` returns.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> Result<(), FsError> {
    let (dir, tmp) = temp_beside(path)?;
    let result = (|| {
        let file = File::create(&tmp)?;
        {
            let mut w = io::BufWriter::new(&file);
            fill(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        FsError {
            action: "writing",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The directory of `path` (created if missing) and a temp file name beside `path`, unique
/// to this process, for writing then renaming into place.
fn temp_beside(path: &Path) -> Result<(&Path, PathBuf), FsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(err("creating directory", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    Ok((dir, tmp))
}

/// Writes `bytes` to `path` through a temp file and a rename, creating parent directories,
/// but without fsync: a kill -9 never leaves a half-written file under `path`, yet after a
/// power loss `path` may be empty or old. Only for many small files whose sha256 is recorded
/// (itself with [`write_atomic`]) and checked before reuse, such as the prepare stage's page
/// images, where an fsync per file (about 7 ms here) would cost more than drawing the page.
///
/// # Errors
/// Any I/O failure; the temp file is then removed.
pub fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let (_, tmp) = temp_beside(path)?;
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = fs::remove_file(&tmp);
            FsError {
                action: "writing",
                path: path.to_path_buf(),
                source,
            }
        })
}

/// Serializes `value` as pretty JSON (trailing newline) and writes it atomically.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), FsError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| FsError {
        action: "serializing",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Renames a finished `<dir>.partial` directory to `dir`, replacing an older `dir`.
///
/// The older `dir` is first renamed to `<dir>.old` and removed only after the new one is in
/// place, so a kill at any point leaves a complete directory under `dir` or `<dir>.old`;
/// [`recover_dir`] puts the latter back.
///
/// # Errors
/// I/O failures, naming the directory.
pub fn commit_dir(partial: &Path, dir: &Path) -> Result<(), FsError> {
    let old = old_path(dir);
    if old.exists() {
        fs::remove_dir_all(&old).map_err(err("removing old", &old))?;
    }
    if dir.exists() {
        fs::rename(dir, &old).map_err(err("moving aside", dir))?;
    }
    fs::rename(partial, dir).map_err(err("renaming into place", dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(err("removing old", &old))?;
    }
    Ok(())
}

/// Undoes an interrupted [`commit_dir`]: when `dir` is missing but `<dir>.old` exists, the
/// old directory is moved back; a `<dir>.old` left beside a committed `dir` is removed.
///
/// # Errors
/// I/O failures, naming the directory.
pub fn recover_dir(dir: &Path) -> Result<(), FsError> {
    let old = old_path(dir);
    if !old.exists() {
        return Ok(());
    }
    if dir.exists() {
        fs::remove_dir_all(&old).map_err(err("removing old", &old))
    } else {
        fs::rename(&old, dir).map_err(err("restoring", dir))
    }
}

/// `<dir>.old`, where [`commit_dir`] keeps the replaced directory until the new one is in place.
fn old_path(dir: &Path) -> PathBuf {
    sibling(dir, ".old")
}

/// `dir` with `suffix` appended to its last component (`a/b` → `a/b.old`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

/// The empty `<dir>.partial` path a directory is built in before [`commit_dir`] renames
/// it to `dir`. A stale one left by a killed run is removed first; the directory itself is
/// not created (writers create what they need).
///
/// # Errors
/// The stale directory cannot be removed.
pub fn fresh_partial(dir: &Path) -> Result<PathBuf, FsError> {
    let partial = sibling(dir, ".partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(err("removing stale", &partial))?;
    }
    Ok(partial)
}

/// sha256 (hex) and size in bytes of a file, or of a directory (hash over the sorted relative
/// paths and file hashes, so renames and content changes both show).
///
/// # Errors
/// The path is missing or unreadable.
pub fn hash_path(path: &Path) -> Result<(String, u64), FsError> {
    let meta = fs::metadata(path).map_err(err("reading", path))?;
    if !meta.is_dir() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    let mut total = 0;
    for rel in files {
        let (digest, bytes) = hash_file(&path.join(&rel))?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update(digest.as_bytes());
        h.update([0]);
        total += bytes;
    }
    Ok((hex::encode(h.finalize()), total))
}

/// The files under `dir`, relative to `root`, leaving out the temp files of [`write_atomic`]
/// and [`write_replace`]: a write killed before its rename leaves one (named for its
/// process), and it is no part of the content (a resumed stage used to hash its output
/// directory differently from an uninterrupted one because of it).
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FsError> {
    for entry in fs::read_dir(dir).map_err(err("listing", dir))? {
        let entry = entry.map_err(err("listing", dir))?;
        let p = entry.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else if !is_temp_name(&entry.file_name().to_string_lossy()) {
            out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
        }
    }
    Ok(())
}

/// Whether `name` is a temp file name of [`temp_beside`]: `.<name>.tmp<pid>`.
fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(".tmp").is_some_and(|(stem, pid)| {
            stem.len() > 1 && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
}

/// A cheap fingerprint of a file or directory from metadata only: sha256 over each file's
/// relative path, size and modification time (ns). Equal fingerprints let the runner trust a
/// recorded content hash without re-reading gigabytes (DVC keeps the same mtime/size cache);
/// any write changes the mtime, so a changed file is still re-hashed.
///
/// # Errors
/// The path is missing or unreadable.
pub fn stat_fingerprint(path: &Path) -> Result<String, FsError> {
    let meta = fs::metadata(path).map_err(err("reading", path))?;
    let mut files = Vec::new();
    if meta.is_dir() {
        collect_files(path, path, &mut files)?;
        files.sort();
    } else {
        files.push(PathBuf::new());
    }
    let mut h = Sha256::new();
    for rel in files {
        // `join("")` would add a trailing slash to a plain file's path.
        let p = if rel.as_os_str().is_empty() {
            path.to_path_buf()
        } else {
            path.join(&rel)
        };
        let m = fs::metadata(&p).map_err(err("reading", &p))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(format!("{}\0{}\0{}\0", rel.display(), m.len(), mtime).as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 (hex) and size of one file, streamed.
///
/// # Errors
/// The file is missing or unreadable.
pub fn hash_file(path: &Path) -> Result<(String, u64), FsError> {
    let mut f = File::open(path).map_err(err("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(h.finalize()), total))
}

/// sha256 (hex) of bytes in memory.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temp_file_left_by_a_killed_write_is_no_part_of_a_directorys_hash() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("eval");
        write_atomic(&out.join("images/a.png"), b"page").unwrap();
        let clean = (hash_path(&out).unwrap(), stat_fingerprint(&out).unwrap());
        // What a kill -9 between the temp file's write and its rename leaves behind.
        std::fs::write(out.join("images/.a.png.tmp4242"), b"half a pa").unwrap();
        assert_eq!(hash_path(&out).unwrap(), clean.0);
        assert_eq!(stat_fingerprint(&out).unwrap(), clean.1);
        // Files that only look alike still count.
        for name in [".a.png.tmp", "a.png.tmp12", ".tmp12", ".a.png.tmp1x"] {
            assert!(!is_temp_name(name), "{name}");
        }
        assert!(is_temp_name(".a.png.tmp12"));
    }

    #[test]
    fn write_atomic_creates_parents_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.json");
        write_atomic(&p, b"hello").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the final file remains");
    }

    fn dir_with(root: &Path, name: &str, content: &[u8]) -> PathBuf {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("f"), content).unwrap();
        d
    }

    #[test]
    fn commit_dir_replaces_the_old_directory_and_leaves_nothing_aside() {
        let root = tempfile::tempdir().unwrap();
        let dir = dir_with(root.path(), "best", b"old");
        let partial = dir_with(root.path(), "best.partial", b"new");
        commit_dir(&partial, &dir).unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"new");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_commit_killed_between_its_renames_is_recovered_to_the_old_directory() {
        let root = tempfile::tempdir().unwrap();
        // What a kill after "move aside" and before "rename into place" leaves.
        dir_with(root.path(), "best.old", b"old");
        dir_with(root.path(), "best.partial", b"new");
        let dir = root.path().join("best");
        recover_dir(&dir).unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"old");
        assert!(!root.path().join("best.old").exists());
        // A kill after the new one is in place: the leftover is removed, the new one kept.
        dir_with(root.path(), "best.old", b"older");
        recover_dir(&dir).unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"old");
        assert!(!root.path().join("best.old").exists());
    }

    #[test]
    fn write_replace_creates_parents_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/page.png");
        write_replace(&p, b"first").unwrap();
        write_replace(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_keeps_the_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        write_atomic(&p, b"old").unwrap();
        let r = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.unwrap_err().to_string().contains("writing"));
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn directory_hash_changes_with_any_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("d/one"), b"1").unwrap();
        write_atomic(&dir.path().join("d/sub/two"), b"2").unwrap();
        let (h1, n1) = hash_path(&dir.path().join("d")).unwrap();
        assert_eq!(n1, 2);
        write_atomic(&dir.path().join("d/sub/two"), b"3").unwrap();
        let (h2, _) = hash_path(&dir.path().join("d")).unwrap();
        assert_ne!(h1, h2);
    }

    #[test]
    fn stat_fingerprint_changes_when_a_file_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d/f");
        write_atomic(&p, b"1").unwrap();
        let a = stat_fingerprint(&dir.path().join("d")).unwrap();
        let f = stat_fingerprint(&p).unwrap();
        assert_eq!(a, stat_fingerprint(&dir.path().join("d")).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(5));
        write_atomic(&p, b"2").unwrap();
        assert_ne!(a, stat_fingerprint(&dir.path().join("d")).unwrap());
        assert_ne!(f, stat_fingerprint(&p).unwrap());
    }

    #[test]
    fn sha256_of_known_bytes() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
