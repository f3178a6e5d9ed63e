//! The one place where uamt touches a file a user named, with the rules every command keeps:
//!
//! - [`open`]: reading. A path is opened only if it is (or links to) a regular file; a FIFO,
//!   device, socket or folder is refused before anything is read, and the open never blocks.
//! - [`atomic`]: writing. Every file is written under a temporary name and renamed into place; a
//!   target that exists and is not a regular file is refused.
//! - [`cleanup`]: what is being written (temporary files, staging folders) is removed on error
//!   and, in the one-shot commands, on SIGINT, SIGTERM and SIGHUP.
//! - [`paths`]: an output never equals, contains or lies inside an input (after resolving links).
//! - [`marker`]: an output is replaced only when uamt wrote it before (`.uamt-written`), and only
//!   when the user asked (`--force`).

pub mod atomic;
pub mod cleanup;
pub mod marker;
pub mod open;
pub mod paths;

pub use atomic::{check_target, replace_atomic, sync_dir, temp_name, write_atomic};
pub use marker::OutputDir;
pub use open::{check_regular, open_regular, read_regular, read_text};
pub use paths::{check_apart, resolve};

use std::path::{Path, PathBuf};

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
