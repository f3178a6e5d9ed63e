//! Typed errors of the data module: every message names the file (or setting) at fault.

use std::path::{Path, PathBuf};

/// Everything reading, writing, importing or sampling volumes can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The operating system refused a read, write, rename or mapping.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file's content is wrong: truncated, corrupt, an unsupported data type, NaN voxels,
    /// shapes that do not match, a case missing from a list.
    #[error("{path}: {why}")]
    Bad {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it, lowercase.
        why: String,
    },
    /// A setting (patch size, batch split, number of labelled cases, ...) out of range.
    #[error("invalid setting `{key}`: {why}")]
    Invalid {
        /// The setting's name.
        key: String,
        /// Why it is refused.
        why: String,
    },
    /// libtorch refused to build a batch tensor.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The data module's result type.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    /// A [`DataError::Bad`] for `path`.
    pub fn bad(path: impl AsRef<Path>, why: impl Into<String>) -> Self {
        DataError::Bad { path: path.as_ref().to_path_buf(), why: why.into() }
    }

    /// A [`DataError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// A [`DataError::Invalid`] for the setting `key`.
    pub fn invalid(key: impl Into<String>, why: impl Into<String>) -> Self {
        DataError::Invalid { key: key.into(), why: why.into() }
    }

    /// The file this error concerns, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. } | DataError::Bad { path, .. } => Some(path),
            _ => None,
        }
    }
}

impl From<DataError> for crate::Error {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Io { path, source } => crate::Error::Io { path, source },
            DataError::Bad { path, why } => crate::Error::File { path, why },
            DataError::Invalid { key, why } => crate::Error::Invalid { key, why },
            DataError::Torch(t) => crate::Error::Torch(t),
        }
    }
}

impl From<crate::fsutil::IoError> for DataError {
    fn from(e: crate::fsutil::IoError) -> Self {
        DataError::Io { path: e.path, source: e.source }
    }
}

/// Attaches a path to I/O results: `file.read(..).at(path)?`.
pub(crate) trait IoAt<T> {
    /// Turns an I/O error into a [`DataError::Io`] naming `path`.
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoAt<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| DataError::io(path, e))
    }
}
