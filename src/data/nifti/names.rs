//! What a NIfTI file's name says: compressed or not, and the case it names.

use std::path::Path;

/// Whether `path` names a gzip-compressed NIfTI file.
pub fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// `path`'s name without `.nii` / `.nii.gz`.
pub fn stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for ext in [".nii.gz", ".nii"] {
        if name.len() > ext.len() && name.to_ascii_lowercase().ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}
