//! The error every part of `fsutil` returns, and the small helpers they share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O failure, or a refusal, with the file or folder it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct IoError {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What the operating system said, or why uamt refused.
    pub source: std::io::Error,
}

impl IoError {
    /// A refusal of `path` for the reason `why` (no system call failed).
    pub fn refused(path: &Path, why: impl Into<String>) -> Self {
        IoError { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.into()) }
    }
}

/// Attaches `path` to an I/O result.
pub(crate) fn at<T>(r: std::io::Result<T>, path: &Path) -> Result<T, IoError> {
    r.map_err(|source| IoError { path: path.to_path_buf(), source })
}

/// The folder holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// What kind of file `t` is, in words (`a FIFO`, `a folder`, ...).
pub fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// A hidden, process-unique name next to `path` for writing it before a rename:
/// `dir/.<name>.tmp-<pid>-<n>`.
pub fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(path).join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}
