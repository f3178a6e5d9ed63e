//! What uamt wrote, so that `--force` can replace exactly that and nothing else. An output folder
//! holds a marker, `.uamt-written` (JSON), naming the files a one-shot command wrote there
//! (`predict`, `eval --out`, `export`), or saying that uamt wrote the whole folder (a dataset
//! written by `import` or `synth`).
//!
//! - A file whose name exists is never written over unless the command was given `--force` *and*
//!   the marker lists it: a user's own file of the same name is refused either way.
//! - A folder is replaced as a whole (`import --force`) only if it is a folder (not a link) whose
//!   marker says uamt wrote it.
//! - A file the marker lists is uamt's output, so `predict` does not read it as an input.

use super::atomic::write_atomic;
use super::io::{kind_of, IoError};
use super::open::read_text;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The marker's file name.
pub const MARKER: &str = ".uamt-written";

/// The marker's content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// The command that wrote the whole folder, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    folder: Option<String>,
    /// File name -> the command that wrote it.
    #[serde(default)]
    files: BTreeMap<String, String>,
}

impl Record {
    /// The marker of `dir`; an absent or unreadable one claims nothing (so nothing can be
    /// replaced on its word).
    fn read(dir: &Path) -> Self {
        let path = dir.join(MARKER);
        read_text(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    fn write(&self, dir: &Path) -> Result<(), IoError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        write_atomic(&dir.join(MARKER), |w| w.write_all(format!("{text}\n").as_bytes()))
    }
}

/// The files of `dir` that uamt wrote there (names, from its marker).
pub fn written_by_uamt(dir: &Path) -> Vec<String> {
    Record::read(dir).files.into_keys().collect()
}

/// Marks the folder `dir` (being staged) as written whole by the command `by`.
pub fn mark_folder(dir: &Path, by: &str) -> Result<(), IoError> {
    Record { folder: Some(by.into()), files: BTreeMap::new() }.write(dir)
}

/// Refuses to replace `dir` unless it is a folder (not a link) that uamt wrote whole.
pub fn check_replaceable_folder(dir: &Path, flag: &str) -> Result<(), IoError> {
    let meta = super::io::at(std::fs::symlink_metadata(dir), dir)?;
    if !meta.is_dir() {
        return Err(IoError::refused(
            dir,
            format!(
                "{flag} exists and is {}, not a folder uamt wrote: --force replaces only a dataset folder written \
                 by uamt; remove it yourself or choose another {flag}",
                kind_of(&meta.file_type())
            ),
        ));
    }
    if Record::read(dir).folder.is_none() {
        return Err(IoError::refused(
            dir,
            format!(
                "{flag} exists and was not written by uamt (it has no {MARKER} marker): --force replaces only a \
                 dataset folder written by uamt; remove it yourself or choose another {flag}"
            ),
        ));
    }
    Ok(())
}

/// An output folder of a one-shot command: files are claimed by name before they are written.
#[derive(Debug)]
pub struct OutputDir {
    dir: PathBuf,
    by: String,
    force: bool,
    record: Record,
}

impl OutputDir {
    /// Opens the output folder `dir` (created if missing) for the command `by` (`uamt predict`);
    /// `force` lets it replace files that uamt wrote there before. A `dir` that exists and is not
    /// a folder is refused.
    pub fn open(dir: &Path, by: &str, force: bool) -> Result<Self, IoError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(IoError::refused(dir, format!("exists and is {}, not a folder", kind_of(&m.file_type()))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => super::io::at(std::fs::create_dir_all(dir), dir)?,
            Err(e) => return Err(IoError { path: dir.to_path_buf(), source: e }),
        }
        Ok(OutputDir { dir: dir.to_path_buf(), by: by.into(), force, record: Record::read(dir) })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Claims the file names this run will write in the folder, before any is written: a name
    /// given twice, one that is not a plain file name, or one that exists (unless `force` and the
    /// marker lists it as uamt's) is refused, naming the file; then the names are recorded in the
    /// marker.
    pub fn claim(&mut self, names: &[String]) -> Result<(), IoError> {
        self.check(names)?;
        for name in names {
            self.record.files.insert(name.clone(), self.by.clone());
        }
        self.record.write(&self.dir)
    }

    /// Whether [`OutputDir::claim`] would take `names` now (the same refusals), recording nothing:
    /// for outputs whose names are known before the work but which are chosen only after it.
    pub fn check(&self, names: &[String]) -> Result<(), IoError> {
        let mut seen = std::collections::HashSet::new();
        for name in names {
            let path = self.dir.join(name);
            let plain = !name.is_empty()
                && name != "."
                && name != ".."
                && name != MARKER
                && !name.contains(['/', '\\', '\0'])
                && Path::new(name).file_name() == Some(std::ffi::OsStr::new(name));
            if !plain {
                return Err(IoError::refused(&path, format!("`{}` is not a plain file name", name.escape_debug())));
            }
            if !seen.insert(name) {
                return Err(IoError::refused(
                    &path,
                    "would be written twice in one run (two inputs with the same name?): refused",
                ));
            }
            match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(IoError { path, source: e }),
                Ok(m) => {
                    let ours = m.is_file() && self.record.files.contains_key(name);
                    if !(self.force && ours) {
                        let why = if ours {
                            "exists (written by uamt before): give --force to replace it".to_string()
                        } else {
                            format!(
                                "exists and is {} that uamt did not write: refusing to replace it (even with --force); \
                                 move it or choose another output folder",
                                kind_of(&m.file_type())
                            )
                        };
                        return Err(IoError::refused(&path, why));
                    }
                }
            }
        }
        Ok(())
    }

    /// The path of a claimed file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("uamt-marker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn should_replace_only_files_uamt_wrote_and_only_with_force() {
        let dir = scratch("files");
        std::fs::write(dir.join("mine.label.nii.gz"), "the user's").unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut out = OutputDir::open(&dir, "uamt predict", false).unwrap();
        out.claim(&names(&["a.label.nii.gz", "a.png"])).unwrap();
        std::fs::write(out.path("a.label.nii.gz"), "ours").unwrap();
        // A second run: ours needs --force; the user's is refused even with it.
        let mut again = OutputDir::open(&dir, "uamt predict", false).unwrap();
        let err = again.claim(&names(&["a.label.nii.gz"])).unwrap_err().to_string();
        assert!(err.contains("give --force"), "{err}");
        let mut forced = OutputDir::open(&dir, "uamt predict", true).unwrap();
        forced.claim(&names(&["a.label.nii.gz"])).unwrap();
        let err = forced.claim(&names(&["mine.label.nii.gz"])).unwrap_err().to_string();
        assert!(err.contains("uamt did not write") && err.contains("even with --force"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("mine.label.nii.gz")).unwrap(), "the user's");
        for bad in [&["x", "x"][..], &["../x"], &[MARKER], &[""]] {
            assert!(forced.claim(&names(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(written_by_uamt(&dir), vec!["a.label.nii.gz".to_string(), "a.png".to_string()]);
        let file = dir.join("a.png");
        std::fs::write(&file, "png").unwrap();
        assert!(OutputDir::open(&file, "uamt predict", true).unwrap_err().to_string().contains("not a folder"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_refuses_what_claim_refuses_and_records_nothing() {
        let dir = scratch("check");
        std::fs::write(dir.join("user.png"), "the user's").unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let out = OutputDir::open(&dir, "uamt rank", true).unwrap();
        out.check(&names(&["a.png", "b.png"])).unwrap();
        assert!(written_by_uamt(&dir).is_empty(), "a check records no name");
        let err = out.check(&names(&["a.png", "user.png"])).unwrap_err().to_string();
        assert!(err.contains("user.png") && err.contains("uamt did not write"), "{err}");
        assert!(out.check(&names(&["a.png", "a.png"])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_replace_a_folder_only_when_uamt_wrote_it_whole() {
        let dir = scratch("folder");
        let user = dir.join("notes");
        std::fs::create_dir_all(&user).unwrap();
        let err = check_replaceable_folder(&user, "--out").unwrap_err().to_string();
        assert!(err.contains("not written by uamt"), "{err}");
        let ours = dir.join("dataset");
        std::fs::create_dir_all(&ours).unwrap();
        mark_folder(&ours, "uamt import").unwrap();
        check_replaceable_folder(&ours, "--out").unwrap();
        std::os::unix::fs::symlink(&ours, dir.join("link")).unwrap();
        let err = check_replaceable_folder(&dir.join("link"), "--out").unwrap_err().to_string();
        assert!(err.contains("a symbolic link"), "{err}");
        std::fs::write(dir.join("f.txt"), "x").unwrap();
        let err = check_replaceable_folder(&dir.join("f.txt"), "--out").unwrap_err().to_string();
        assert!(err.contains("a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
