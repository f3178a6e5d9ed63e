//! Atomic file writing shared by every writer: a temporary name in the target's own folder, the
//! content written and synced, a rename over the target, then the folder synced, so a reader sees
//! either the old file or the whole new one and a crash leaves no half-written file behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O failure with the file or folder it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct IoError {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What the operating system said.
    pub source: std::io::Error,
}

/// Attaches `path` to an I/O result.
fn at<T>(r: std::io::Result<T>, path: &Path) -> Result<T, IoError> {
    r.map_err(|source| IoError { path: path.to_path_buf(), source })
}

/// The folder holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A hidden, process-unique name next to `path` for writing it before a rename:
/// `dir/.<name>.tmp-<pid>-<n>`.
pub fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(path).join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Flushes the folder `dir`'s entries (a rename into it) to disk. File systems that cannot sync
/// a folder are not an error.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    #[cfg(unix)]
    {
        use std::io::ErrorKind;
        let synced = File::open(dir).and_then(|d| d.sync_all());
        match synced {
            Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) => Ok(()),
            r => at(r, dir),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Replaces `path` atomically with a file that `fill` writes at the temporary path it is given:
/// then the temporary file is synced, renamed over `path` and the folder synced. On any error
/// the temporary file is removed and `path` is left as it was.
pub fn replace_atomic<E: From<IoError>>(path: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let tmp = temp_name(path);
    let result = fill(&tmp)
        .and_then(|()| Ok(at(File::open(&tmp).and_then(|f| f.sync_all()), &tmp)?))
        .and_then(|()| Ok(at(std::fs::rename(&tmp, path), path)?));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(sync_dir(parent_dir(path))?)
}

/// Replaces `path` atomically with what `write` writes (buffered), as [`replace_atomic`] does.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), IoError> {
    replace_atomic(path, |tmp| {
        let written = File::create(tmp).and_then(|f| {
            let mut w = BufWriter::with_capacity(1 << 20, f);
            write(&mut w)?;
            w.flush()
        });
        at(written, path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uamt-fsutil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn should_replace_the_file_and_leave_no_temporary_behind() {
        let dir = scratch("replace");
        let path = dir.join("a.txt");
        write_atomic(&path, |w| w.write_all(b"old")).unwrap();
        write_atomic(&path, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.txt")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_keep_the_old_file_when_writing_fails() {
        let dir = scratch("fail");
        let path = dir.join("a.txt");
        write_atomic(&path, |w| w.write_all(b"old")).unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.path, path);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_name_temporaries_uniquely_in_the_same_folder() {
        let p = Path::new("some/dir/file.nii.gz");
        let (a, b) = (temp_name(p), temp_name(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("some/dir")));
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".file.nii.gz.tmp-"));
        assert_eq!(parent_dir(Path::new("x")), Path::new("."));
    }
}
