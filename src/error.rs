//! Typed errors of the core library: lowercase messages that name the file, key or shape at fault.

use std::path::PathBuf;

/// Everything the core library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch refused an operation (wrong shape, wrong device, ...).
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A tensor handed in has the wrong shape or kind for where it is used.
    #[error("{what}: expected {expected}, got {got}")]
    Shape { what: String, expected: String, got: String },
    /// A hyper-parameter or setting outside its allowed range.
    #[error("invalid setting `{key}`: {why}")]
    Invalid { key: String, why: String },
    /// A named tensor is missing from, or does not fit, a parameter file.
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    /// A collective of data-parallel training failed or timed out (a rank died or stalled), or
    /// the ranks disagree (see [`crate::dist`]).
    #[error("distributed training: {0}")]
    Distributed(String),
    /// Plain I/O, with the file it concerns.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl From<crate::fsutil::IoError> for Error {
    fn from(e: crate::fsutil::IoError) -> Self {
        Error::Io { path: e.path, source: e.source }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Invalid`] for `key`.
    pub fn invalid(key: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Invalid { key: key.into(), why: why.into() }
    }

    /// An [`Error::Shape`] for `what`.
    pub fn shape(what: impl Into<String>, expected: impl Into<String>, got: impl std::fmt::Debug) -> Self {
        Error::Shape { what: what.into(), expected: expected.into(), got: format!("{got:?}") }
    }
}
