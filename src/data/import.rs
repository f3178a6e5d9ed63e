//! What every importer shares: the dataset folder being written ([`Staging`]: a hidden temporary
//! folder next to the output, renamed into place at the end, so a failed or interrupted import
//! leaves nothing behind), case lists and splits, and the report. The importers are
//! `import_h5`, `import_nrrd` and `import_raw`.

use super::dataset::{test_entry, training_entry, CaseEntry, Manifest};
use super::error::{DataError, IoAt, Result};
use super::nifti::write_nifti;
use super::volume::{Geometry, Volume};
use crate::fsutil::{marker, parent_dir, sync_dir, temp_name};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// A dataset folder being written: removed on drop (and on an interrupt, see
/// [`crate::fsutil::cleanup`]) unless [`Staging::commit`]ted.
#[derive(Debug)]
pub struct Staging {
    /// The hidden folder next to `out` that receives the files.
    dir: PathBuf,
    /// The final location.
    out: PathBuf,
    /// Replace an existing `out`.
    force: bool,
    /// Set once renamed into place.
    committed: bool,
    /// Registered for removal on an interrupt while it exists.
    _staged: crate::fsutil::cleanup::Staged,
}

impl Staging {
    /// Starts writing the dataset `out` for the command `by` (`uamt import`), which reads
    /// `inputs` (`(flag, path)`: the source folder, lists). Refused before anything is written:
    /// an `out` that overlaps an input ([`crate::fsutil::check_apart`]), an `out` that exists
    /// (unless `force`, and then only a dataset folder uamt wrote, see
    /// [`crate::fsutil::marker`]).
    pub fn new(out: &Path, force: bool, by: &str, inputs: &[(&str, &Path)]) -> Result<Self> {
        if out.file_name().is_none() {
            return Err(DataError::bad(out, "not a folder name"));
        }
        crate::fsutil::check_apart(&[("--out", out)], inputs)?;
        if std::fs::symlink_metadata(out).is_ok() {
            if !force {
                return Err(DataError::bad(out, "already exists (use --force to replace a dataset uamt wrote)"));
            }
            marker::check_replaceable_folder(out, "--out")?;
        }
        let parent = parent_dir(out);
        fs::create_dir_all(parent).at(parent)?;
        let dir = temp_name(out);
        let staged = crate::fsutil::cleanup::stage(&dir);
        for sub in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
            fs::create_dir_all(dir.join(sub)).at(&dir)?;
        }
        marker::mark_folder(&dir, by)?;
        Ok(Staging { dir, out: out.to_path_buf(), force, committed: false, _staged: staged })
    }

    /// The folder to write into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the manifest and moves the folder into place (over the old dataset with `force`,
    /// checked again: still a folder uamt wrote).
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf> {
        manifest.write(&self.dir)?;
        if std::fs::symlink_metadata(&self.out).is_ok() {
            if !self.force {
                return Err(DataError::bad(&self.out, "appeared while importing: left as it is"));
            }
            marker::check_replaceable_folder(&self.out, "--out")?;
            let old = temp_name(&self.out);
            fs::rename(&self.out, &old).at(&self.out)?;
            if let Err(e) = fs::rename(&self.dir, &self.out) {
                // Put the old dataset back rather than leave neither.
                let _ = fs::rename(&old, &self.out);
                return Err(DataError::io(&self.out, e));
            }
            self.committed = true;
            sync_dir(parent_dir(&self.out))?;
            fs::remove_dir_all(&old).at(&old)?;
        } else {
            fs::rename(&self.dir, &self.out).at(&self.out)?;
            self.committed = true;
            sync_dir(parent_dir(&self.out))?;
        }
        Ok(self.out.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// What an import produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The dataset folder.
    pub out: PathBuf,
    /// Training cases written.
    pub training: usize,
    /// Of which labelled.
    pub labelled: usize,
    /// Test cases written.
    pub test: usize,
    /// Files found in the source's folders and not imported, with the reason.
    pub ignored: Vec<(PathBuf, String)>,
}

/// Reads a case list (one ID per line; blank lines and `#` comments ignored; no duplicates).
pub fn read_list(path: &Path) -> Result<Vec<String>> {
    let text = crate::fsutil::read_text(path)?;
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        if id.contains(['/', '\\']) || id == "." || id == ".." {
            return Err(DataError::bad(path, format!("line {}: `{id}` is not a case ID", n + 1)));
        }
        if !seen.insert(id.to_string()) {
            return Err(DataError::bad(path, format!("line {}: case `{id}` listed twice", n + 1)));
        }
        ids.push(id.to_string());
    }
    Ok(ids)
}

/// The split to import: training IDs (the first `labelled` of them labelled) and test IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training IDs, in list order.
    pub train: Vec<String>,
    /// Test IDs.
    pub test: Vec<String>,
    /// The first this many training IDs are labelled.
    pub labelled: usize,
}

impl Split {
    /// Every case in import order, training cases first: (id, is a test case, is labelled).
    pub fn cases(&self) -> impl Iterator<Item = (&String, bool, bool)> {
        let labelled = self.labelled;
        self.train
            .iter()
            .enumerate()
            .map(move |(i, id)| (id, false, i < labelled))
            .chain(self.test.iter().map(|id| (id, true, false)))
    }

    /// Reads `train_list` and `test_list` (the latter optional) and checks `labelled` and overlaps.
    pub fn from_lists(train_list: &Path, test_list: Option<&Path>, labelled: usize) -> Result<Self> {
        let train = read_list(train_list)?;
        let test = test_list.map(read_list).transpose()?.unwrap_or_default();
        if labelled > train.len() {
            return Err(DataError::invalid(
                "labelled",
                format!("{labelled} labelled cases but {} lists only {}", train_list.display(), train.len()),
            ));
        }
        let in_train: HashSet<&String> = train.iter().collect();
        if let (Some(id), Some(tl)) = (test.iter().find(|id| in_train.contains(id)), test_list) {
            return Err(DataError::bad(tl, format!("case `{id}` is in both the training and the test list")));
        }
        Ok(Split { train, test, labelled })
    }
}

/// Where a case's file is, checked for every listed case before anything is written.
pub(crate) fn locate_all(
    split: &Split,
    list_of: (&Path, Option<&Path>),
    find: impl Fn(&str) -> Option<PathBuf>,
    what: &str,
) -> Result<()> {
    for (ids, list) in [(&split.train, Some(list_of.0)), (&split.test, list_of.1)] {
        if let (Some(id), Some(list)) = (ids.iter().find(|id| find(id).is_none()), list) {
            return Err(DataError::bad(list, format!("case `{id}` is listed but has no {what}")));
        }
    }
    Ok(())
}

/// The manifest entry of a training or test case.
pub(crate) fn entry_for(id: &str, test: bool, labelled: bool, ext: &str) -> CaseEntry {
    if test {
        test_entry(id, ext)
    } else {
        training_entry(id, ext, labelled)
    }
}

/// Writes one case's volumes where `entry` says, inside the staging folder `dir`.
pub(crate) fn write_case(
    dir: &Path,
    entry: &CaseEntry,
    image: &Volume<f32>,
    label: &Volume<u8>,
    geometry: &Geometry,
) -> Result<()> {
    write_nifti(dir.join(&entry.image), image, geometry)?;
    if let Some(l) = &entry.label {
        write_nifti(dir.join(l), label, geometry)?;
    }
    Ok(())
}

/// The file extension of written volumes.
pub(crate) fn ext(gzip: bool) -> &'static str {
    if gzip {
        ".nii.gz"
    } else {
        ".nii"
    }
}

/// What both importers share: where to read and write, and the split.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportCommon {
    /// The source folder.
    pub src: PathBuf,
    /// The dataset folder to create.
    pub out: PathBuf,
    /// The first this many training IDs are labelled (16 = the 20 % protocol on LA).
    pub labelled: usize,
    /// The training list (default `<src>/train.list`).
    pub train_list: Option<PathBuf>,
    /// The test list (default `<src>/test.list`).
    pub test_list: Option<PathBuf>,
    /// Write `.nii.gz` instead of `.nii`.
    pub gzip: bool,
    /// Replace an existing output folder.
    pub force: bool,
}

impl ImportCommon {
    /// From `src` to `out`, 16 labelled, default lists, `.nii`, no replacing.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ImportCommon {
            src: src.into(),
            out: out.into(),
            labelled: 16,
            train_list: None,
            test_list: None,
            gzip: false,
            force: false,
        }
    }
}

/// Called after each case of a long one-shot job with (cases done, total, case id).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

pub(crate) fn report(staging: Staging, manifest: Manifest) -> Result<ImportReport> {
    let (training, labelled, test) = (manifest.num_training, manifest.num_labelled, manifest.num_test);
    let out = staging.commit(&manifest)?;
    Ok(ImportReport { out, training, labelled, test, ignored: Vec::new() })
}
