//! Importers into dataset folders: UA-MT's HDF5 files and the 2018 challenge's NRRD layout.
//! An import writes into a hidden temporary folder next to the output and renames it into
//! place at the end, so a failed import leaves nothing behind.

use super::dataset::{test_entry, training_entry, CaseEntry, Manifest};
use super::error::{DataError, IoAt, Result};
use super::h5::read_h5_case;
use super::nifti::write_nifti;
use super::nrrd::read_nrrd;
use super::volume::{Geometry, Volume};
use crate::fsutil::{marker, parent_dir, sync_dir, temp_name};
use crate::rng::{stream, Rng};
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
fn locate_all(
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

/// Options of the UA-MT HDF5 importer.
#[derive(Debug, Clone, PartialEq)]
pub struct H5Import {
    /// Source (`<ID>.h5`, `h5/<ID>.h5` or `<ID>/mri_norm2.h5` per case), output and split.
    pub common: ImportCommon,
    /// Voxel spacing written to the headers (the HDF5 files dropped it; LA is 0.625 mm).
    pub spacing: [f64; 3],
    /// Highest label value accepted.
    pub max_label: u8,
    /// Resample every case to this voxel spacing (mm): the image trilinearly, the label by
    /// nearest neighbour, the geometry kept (`None`: as stored).
    pub resample_to: Option<[f64; 3]>,
}

impl H5Import {
    /// The defaults for `src` and `out`: 16 labelled, 0.625 mm, labels 0..=1, `.nii`, no resampling.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        H5Import { common: ImportCommon::new(src, out), spacing: [0.625; 3], max_label: 1, resample_to: None }
    }
}

/// Where the HDF5 file of case `id` is under `src`, if anywhere.
pub fn find_h5(src: &Path, id: &str) -> Option<PathBuf> {
    [src.join(format!("{id}.h5")), src.join("h5").join(format!("{id}.h5")), src.join(id).join("mri_norm2.h5")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Called after each case of a long one-shot job with (cases done, total, case id).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

/// Imports UA-MT HDF5 cases into a dataset folder.
pub fn import_h5(opts: &H5Import) -> Result<ImportReport> {
    import_h5_with(opts, &mut |_, _, _| {})
}

/// [`import_h5`], calling `progress(done, total, id)` after each case.
pub fn import_h5_with(opts: &H5Import, progress: Progress<'_>) -> Result<ImportReport> {
    let c = &opts.common;
    if opts.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(DataError::invalid("spacing", format!("{:?} must be positive", opts.spacing)));
    }
    let train_list = c.train_list.clone().unwrap_or_else(|| c.src.join("train.list"));
    let test_list = c.test_list.clone().unwrap_or_else(|| c.src.join("test.list"));
    let split = Split::from_lists(&train_list, Some(&test_list), c.labelled)?;
    locate_all(&split, (&train_list, Some(&test_list)), |id| find_h5(&c.src, id), "HDF5 file")?;
    let inputs = [("--src", c.src.as_path()), ("--train-list", &train_list), ("--test-list", &test_list)];
    let staging = Staging::new(&c.out, c.force, "uamt import h5", &inputs)?;
    let geometry = Geometry::from_spacing(opts.spacing);
    let (mut training, mut test) = (Vec::new(), Vec::new());
    let cases = split.cases();
    let total = split.train.len() + split.test.len();
    for (n, (id, is_test, labelled)) in cases.enumerate() {
        let path = find_h5(&c.src, id).ok_or_else(|| DataError::bad(&c.src, format!("case `{id}` disappeared")))?;
        let case = read_h5_case(&path, opts.max_label)?;
        let entry = entry_for(id, is_test, labelled, ext(c.gzip));
        match opts.resample_to {
            Some(target) => {
                let (image, label, g) =
                    crate::data::resample::resample_case(&case.image, Some(&case.label), &geometry, target)
                        .map_err(|e| DataError::bad(&path, e.to_string()))?;
                let label = label.ok_or_else(|| DataError::bad(&path, "label lost in resampling"))?;
                write_case(staging.dir(), &entry, &image, &label, &g)?;
            }
            None => write_case(staging.dir(), &entry, &case.image, &case.label, &geometry)?,
        }
        tracing::debug!(case = %id, dims = ?case.image.dims, test = is_test, "imported");
        if is_test {
            test.push(entry)
        } else {
            training.push(entry)
        }
        progress(n + 1, total, id);
    }
    let resampled = opts.resample_to.map_or(String::new(), |t| format!("; resampled to {t:?} mm"));
    let description = format!(
        "imported from UA-MT HDF5 files in {}; spacing {:?} mm (assumed, the HDF5 files carry none){resampled}",
        c.src.display(),
        opts.spacing
    );
    report(staging, Manifest::new("LA2018", &description, "MRI", &["background", "left atrium"], training, test))
}

pub(crate) fn report(staging: Staging, manifest: Manifest) -> Result<ImportReport> {
    let (training, labelled, test) = (manifest.num_training, manifest.num_labelled, manifest.num_test);
    let out = staging.commit(&manifest)?;
    Ok(ImportReport { out, training, labelled, test, ignored: Vec::new() })
}

/// Crop margin per side, in voxels, around the label's x/y bounding box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Margin {
    /// Drawn per side from `lo..=hi` (the reference: `np.random.randint(10, 20)`, i.e. 10..=19).
    Random {
        /// Smallest margin.
        lo: usize,
        /// Largest margin.
        hi: usize,
    },
    /// The same margin on every side.
    Fixed(usize),
}

impl Margin {
    /// The reference's margin: 10..=19 voxels, drawn per side.
    pub const REFERENCE: Margin = Margin::Random { lo: 10, hi: 19 };
}

/// Options of the 2018 challenge importer.
#[derive(Debug, Clone, PartialEq)]
pub struct NrrdImport {
    /// Source (`<ID>/lgemri.nrrd` and `<ID>/laendo.nrrd` per case; without lists, every case
    /// folder not in the test list is a training case), output and split.
    pub common: ImportCommon,
    /// The patch size the crop must at least cover in x and y (z is not cropped).
    pub patch: [usize; 3],
    /// Crop margin.
    pub margin: Margin,
    /// Seed of the random margins.
    pub seed: u64,
}

impl NrrdImport {
    /// The reference's defaults: margins 10..=19, patch 112 x 112 x 80, 16 labelled, seed 1337.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        NrrdImport { common: ImportCommon::new(src, out), patch: [112, 112, 80], margin: Margin::REFERENCE, seed: 1337 }
    }
}

/// A preprocessed challenge case.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// Z-scored (over the whole uncropped volume) and cropped intensities.
    pub image: Volume<f32>,
    /// 1 where the challenge label was 255, else 0; cropped.
    pub label: Volume<u8>,
    /// The crop's first voxel in the original volume.
    pub origin: [usize; 3],
}

/// The reference preprocessing (UA-MT's `la_heart_processing.py`): label = (raw == 255);
/// image z-scored with the mean and population std of the whole volume; x and y cropped to
/// `[min - m - p, max + m + p)` clipped to the volume, where `min`/`max` are the label's
/// bounding box (inclusive), `m` the margin of that side and `p = max(patch - (max - min), 0) / 2`
/// so the crop covers at least the patch; z is kept whole. `margins` = `[x low, x high, y low, y high]`.
/// `paths` (image, label) name the files in errors.
pub fn preprocess_challenge(
    image: &Volume<f32>,
    label_raw: &Volume<f32>,
    patch: [usize; 3],
    margins: [usize; 4],
    paths: (&Path, &Path),
) -> Result<Preprocessed> {
    let (image_path, path) = paths;
    if image.dims != label_raw.dims {
        return Err(DataError::bad(
            path,
            format!(
                "label shape {:?} differs from image shape {:?} ({})",
                label_raw.dims,
                image.dims,
                image_path.display()
            ),
        ));
    }
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        return Err(DataError::bad(image_path, format!("NaN or infinite voxels (first at index {i})")));
    }
    let [w, h, d] = image.dims;
    let (mut lo, mut hi) = ([usize::MAX; 2], [0usize; 2]);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                if label_raw.data[label_raw.index(x, y, z)] == 255.0 {
                    lo = [lo[0].min(x), lo[1].min(y)];
                    hi = [hi[0].max(x), hi[1].max(y)];
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        return Err(DataError::bad(path, "the label has no foreground (255) voxels"));
    }
    let n = image.data.len() as f64;
    let mean = image.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (image.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    if std == 0.0 {
        return Err(DataError::bad(image_path, "the image is constant (standard deviation 0)"));
    }
    let dims_xy = [w, h];
    let mut start = [0usize; 2];
    let mut end = [0usize; 2];
    for a in 0..2 {
        let p = patch[a].saturating_sub(hi[a] - lo[a]) / 2;
        start[a] = lo[a].saturating_sub(margins[2 * a] + p);
        end[a] = (hi[a] + margins[2 * a + 1] + p).min(dims_xy[a]);
    }
    let dims = [end[0] - start[0], end[1] - start[1], d];
    let mut out_image = Volume::zeros(dims);
    let mut out_label = Volume::zeros(dims);
    for z in 0..d {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let (o, s) = (out_image.index(x, y, z), image.index(x + start[0], y + start[1], z));
                out_image.data[o] = ((image.data[s] as f64 - mean) / std) as f32;
                out_label.data[o] = (label_raw.data[s] == 255.0) as u8;
            }
        }
    }
    Ok(Preprocessed { image: out_image, label: out_label, origin: [start[0], start[1], 0] })
}

/// Imports the 2018 challenge's NRRD cases with the reference preprocessing.
pub fn import_nrrd(opts: &NrrdImport) -> Result<ImportReport> {
    import_nrrd_with(opts, &mut |_, _, _| {})
}

/// [`import_nrrd`], calling `progress(done, total, id)` after each case.
pub fn import_nrrd_with(opts: &NrrdImport, progress: Progress<'_>) -> Result<ImportReport> {
    let c = &opts.common;
    let default_train = c.src.join("train.list");
    let default_test = c.src.join("test.list");
    let train_list = c.train_list.clone().or_else(|| default_train.is_file().then_some(default_train));
    let test_list = c.test_list.clone().or_else(|| default_test.is_file().then_some(default_test));
    let image_of = |id: &str| c.src.join(id).join("lgemri.nrrd");
    let label_of = |id: &str| c.src.join(id).join("laendo.nrrd");
    let split = match &train_list {
        Some(tl) => Split::from_lists(tl, test_list.as_deref(), c.labelled)?,
        None => {
            let mut ids: Vec<String> = fs::read_dir(&c.src)
                .at(&c.src)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("lgemri.nrrd").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ids.sort();
            // Without a training list, every case folder not in the test list is a training case.
            let test = test_list.as_deref().map(read_list).transpose()?.unwrap_or_default();
            ids.retain(|id| !test.contains(id));
            if ids.is_empty() {
                return Err(DataError::bad(&c.src, "no training case folders with lgemri.nrrd"));
            }
            if c.labelled > ids.len() {
                return Err(DataError::invalid(
                    "labelled",
                    format!("{} labelled cases but {} has only {}", c.labelled, c.src.display(), ids.len()),
                ));
            }
            Split { train: ids, test, labelled: c.labelled }
        }
    };
    let listed = (train_list.as_deref().unwrap_or(&c.src), test_list.as_deref());
    locate_all(&split, listed, |id| image_of(id).is_file().then(|| image_of(id)), "lgemri.nrrd")?;
    locate_all(&split, listed, |id| label_of(id).is_file().then(|| label_of(id)), "laendo.nrrd")?;
    let mut inputs = vec![("--src", c.src.as_path())];
    inputs.extend(train_list.as_deref().map(|p| ("--train-list", p)));
    inputs.extend(test_list.as_deref().map(|p| ("--test-list", p)));
    let staging = Staging::new(&c.out, c.force, "uamt import nrrd", &inputs)?;
    let (mut training, mut test) = (Vec::new(), Vec::new());
    let cases = split.cases();
    for (n, (id, is_test, labelled)) in cases.enumerate() {
        let image = read_nrrd(image_of(id))?;
        let label = read_nrrd(label_of(id))?;
        let margins = match opts.margin {
            Margin::Fixed(m) => [m; 4],
            Margin::Random { lo, hi } => {
                let mut rng = Rng::keyed(opts.seed, &[stream::MARGIN, n as u64]);
                [0; 4].map(|_| rng.range(lo, hi.max(lo) + 1))
            }
        };
        let p =
            preprocess_challenge(&image.volume, &label.volume, opts.patch, margins, (&image_of(id), &label_of(id)))?;
        let geometry = image.geometry.cropped(p.origin);
        let entry = entry_for(id, is_test, labelled, ext(c.gzip));
        write_case(staging.dir(), &entry, &p.image, &p.label, &geometry)?;
        tracing::debug!(case = %id, dims = ?p.image.dims, origin = ?p.origin, "imported");
        if is_test {
            test.push(entry)
        } else {
            training.push(entry)
        }
        progress(n + 1, split.train.len() + split.test.len(), id);
    }
    let margin = match opts.margin {
        Margin::Fixed(m) => format!("{m}"),
        Margin::Random { lo, hi } => format!("random {lo}..={hi} (seed {})", opts.seed),
    };
    let description = format!("imported from the 2018 LA challenge NRRD files in {}; z-scored, cropped in x/y to the label box plus a {margin} voxel margin, at least {:?}", c.src.display(), &opts.patch[..2]);
    report(staging, Manifest::new("LA2018", &description, "MRI", &["background", "left atrium"], training, test))
}
