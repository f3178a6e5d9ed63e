//! Dataset folders: the Medical Segmentation Decathlon / nnU-Net layout (`dataset.json`,
//! `imagesTr/`, `labelsTr/`, `imagesTs/`, `labelsTs/`) with two additions per training case,
//! an `id` and a `labelled` flag, which carry the semi-supervised split. See `README.md` here.

use super::error::{DataError, IoAt, Result};
use super::nifti::{GzCache, NiftiVolume};
use super::volume::Geometry;
use crate::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The manifest's file name inside a dataset folder.
pub const MANIFEST: &str = "dataset.json";

/// One case as the manifest lists it. Paths are relative to the dataset folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseEntry {
    /// The case's name (the file stem when absent, e.g. in a plain MSD manifest).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The image, e.g. `./imagesTr/<id>.nii`.
    pub image: String,
    /// The label volume, if there is one (unlabelled training cases may lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Whether training may use the label (absent: true exactly when a label is listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<bool>,
}

impl CaseEntry {
    /// Whether the case counts as labelled for training.
    pub fn is_labelled(&self) -> bool {
        self.labelled.unwrap_or(self.label.is_some())
    }
}

/// A test entry: MSD lists bare image paths, we list objects with labels; both are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TestEntry {
    /// `{"id": ..., "image": ..., "label": ...}`.
    Case(CaseEntry),
    /// `"./imagesTs/x.nii.gz"` (MSD).
    Image(String),
}

impl TestEntry {
    /// As a [`CaseEntry`].
    pub fn to_case(&self) -> CaseEntry {
        match self {
            TestEntry::Case(c) => c.clone(),
            TestEntry::Image(p) => {
                CaseEntry { id: String::new(), image: p.clone(), label: None, labelled: Some(false) }
            }
        }
    }
}

/// `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Short name of the dataset.
    #[serde(default)]
    pub name: String,
    /// Free text: where it came from, how it was made.
    #[serde(default)]
    pub description: String,
    /// Always `"3D"` here.
    #[serde(rename = "tensorImageSize", default = "three_d")]
    pub tensor_image_size: String,
    /// Input channels by index (`{"0": "MRI"}`).
    #[serde(default)]
    pub modality: BTreeMap<String, String>,
    /// Class names by label value (`{"0": "background", "1": "left atrium"}`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Number of training cases (labelled and unlabelled).
    #[serde(rename = "numTraining", default)]
    pub num_training: usize,
    /// Number of training cases whose labels training uses.
    #[serde(rename = "numLabelled", default)]
    pub num_labelled: usize,
    /// Number of test cases.
    #[serde(rename = "numTest", default)]
    pub num_test: usize,
    /// Training cases, labelled and unlabelled, in the order of the source's list.
    pub training: Vec<CaseEntry>,
    /// Test cases.
    #[serde(default)]
    pub test: Vec<TestEntry>,
}

fn three_d() -> String {
    "3D".into()
}

impl Manifest {
    /// A manifest for `training` and `test` with the counts filled in.
    pub fn new(
        name: &str,
        description: &str,
        modality: &str,
        labels: &[&str],
        training: Vec<CaseEntry>,
        test: Vec<CaseEntry>,
    ) -> Self {
        Manifest {
            name: name.into(),
            description: description.into(),
            tensor_image_size: three_d(),
            modality: BTreeMap::from([("0".to_string(), modality.to_string())]),
            labels: labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.to_string())).collect(),
            num_training: training.len(),
            num_labelled: training.iter().filter(|c| c.is_labelled()).count(),
            num_test: test.len(),
            training,
            test: test.into_iter().map(TestEntry::Case).collect(),
        }
    }

    /// Reads `<dir>/dataset.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = crate::fsutil::read_text(&path)?;
        serde_json::from_str(&text).map_err(|e| DataError::bad(&path, format!("invalid manifest: {e}")))
    }

    /// The number of classes label volumes may hold: one more than the largest value named in
    /// `labels` (its keys are label values), or 256 when `labels` names none.
    pub fn n_classes(&self) -> usize {
        self.labels.keys().filter_map(|k| k.trim().parse::<u8>().ok()).map(|v| v as usize + 1).max().unwrap_or(256)
    }

    /// Writes `<dir>/dataset.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DataError::bad(&path, format!("cannot serialise: {e}")))?;
        Ok(write_atomic(&path, |w| w.write_all(format!("{text}\n").as_bytes()))?)
    }
}

/// A standard training-case entry `./imagesTr/<id><ext>` (+ `./labelsTr/<id><ext>`).
pub fn training_entry(id: &str, ext: &str, labelled: bool) -> CaseEntry {
    CaseEntry {
        id: id.into(),
        image: format!("./imagesTr/{id}{ext}"),
        label: Some(format!("./labelsTr/{id}{ext}")),
        labelled: Some(labelled),
    }
}

/// A standard test-case entry `./imagesTs/<id><ext>` + `./labelsTs/<id><ext>`.
pub fn test_entry(id: &str, ext: &str) -> CaseEntry {
    CaseEntry {
        id: id.into(),
        image: format!("./imagesTs/{id}{ext}"),
        label: Some(format!("./labelsTs/{id}{ext}")),
        labelled: None,
    }
}

/// One opened case.
#[derive(Debug)]
pub struct Case {
    /// The case's name.
    pub id: String,
    /// The image, mapped.
    pub image: NiftiVolume,
    /// The label volume, mapped, if listed.
    pub label: Option<NiftiVolume>,
    /// Whether training uses the label.
    pub labelled: bool,
}

/// How a dataset folder is opened.
#[derive(Debug, Clone, Default)]
pub struct DatasetOptions {
    /// Where `.nii.gz` volumes are decompressed to (default `<dataset>/.cache`).
    pub cache_dir: Option<PathBuf>,
    /// The number of classes of the model that will use the dataset: label values must be below
    /// it, and a manifest naming more classes is refused. `None`: only the manifest's count.
    pub model_classes: Option<usize>,
}

/// An opened dataset folder: every volume mapped, shapes checked.
#[derive(Debug)]
pub struct Dataset {
    /// The folder.
    pub root: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Training cases, in manifest order.
    pub training: Vec<Case>,
    /// Test cases.
    pub test: Vec<Case>,
}

impl Dataset {
    /// Opens the dataset folder `root`: reads the manifest, maps every listed volume and
    /// validates every case (see [`Dataset::open_skipping_bad`] for the checks); any bad case is
    /// an error.
    pub fn open(root: impl AsRef<Path>, opts: &DatasetOptions) -> Result<Self> {
        let (dataset, mut skipped) = Self::open_inner(root.as_ref(), opts, false)?;
        match skipped.pop() {
            Some(e) => Err(e),
            None => Ok(dataset),
        }
    }

    /// Like [`Dataset::open`], but a bad *training* case is left out and returned with its error
    /// (naming the file and the value) instead of failing the whole dataset.
    ///
    /// Every case is checked, reading every voxel once (O(data), at open): its id is a plain
    /// name (no `/`, `\\`, NUL, `.` or `..`); its image and label paths stay inside `root`
    /// (after resolving symbolic links); the volumes open (header and size, see
    /// [`NiftiVolume::open`]); image voxels are finite; label values are integers below the number
    /// of classes the manifest's `labels` names (any 0..=255 when it names none); the label's
    /// shape and affine agree with the image's.
    ///
    /// Refused outright, skipping mode or not: a manifest that cannot be read, a bad *test* case
    /// (an evaluation silently missing cases would report wrong means), and a dataset left with
    /// no labelled training case.
    pub fn open_skipping_bad(root: impl AsRef<Path>, opts: &DatasetOptions) -> Result<(Self, Vec<DataError>)> {
        Self::open_inner(root.as_ref(), opts, true)
    }

    fn open_inner(root: &Path, opts: &DatasetOptions, skip: bool) -> Result<(Self, Vec<DataError>)> {
        let root = root.to_path_buf();
        let manifest = Manifest::read(&root)?;
        let cache = GzCache::Dir(opts.cache_dir.clone().unwrap_or_else(|| root.join(".cache")));
        let base = std::fs::canonicalize(&root).at(&root)?;
        let mut n_classes = manifest.n_classes();
        if let Some(m) = opts.model_classes {
            let named = manifest.n_classes();
            if !manifest.labels.is_empty() && named > m {
                return Err(DataError::bad(
                    root.join(MANIFEST),
                    format!("its `labels` name {named} classes but the model has {m} (model.n_classes)"),
                ));
            }
            n_classes = n_classes.min(m);
        }
        let mut ids = HashSet::new();
        let mut skipped = Vec::new();
        let mut training = Vec::new();
        for e in manifest.training.clone() {
            match open_case(&root, &base, e, &cache, &mut ids, n_classes) {
                Ok(c) => training.push(c),
                Err(err) if skip => skipped.push(err),
                Err(err) => return Err(err),
            }
        }
        if skip && !skipped.is_empty() && !training.iter().any(|c| c.labelled) {
            let why: Vec<String> = skipped.iter().map(|e| format!("  {e}")).collect();
            return Err(DataError::bad(
                root.join(MANIFEST),
                format!(
                    "no labelled training case is left after skipping {} bad one(s):\n{}",
                    skipped.len(),
                    why.join("\n")
                ),
            ));
        }
        let mut test = Vec::new();
        for e in manifest.test.iter().map(TestEntry::to_case) {
            test.push(open_case(&root, &base, e, &cache, &mut ids, n_classes)?);
        }
        Ok((Dataset { root, manifest, training, test }, skipped))
    }

    /// Indices into [`Self::training`] of the labelled cases, in manifest order.
    pub fn labelled(&self) -> Vec<usize> {
        (0..self.training.len()).filter(|&i| self.training[i].labelled).collect()
    }

    /// Indices into [`Self::training`] of the unlabelled cases, in manifest order.
    pub fn unlabelled(&self) -> Vec<usize> {
        (0..self.training.len()).filter(|&i| !self.training[i].labelled).collect()
    }
}

/// Whether `id` can name a case: a plain file name (no separator, NUL, `.` or `..`, at most 200
/// bytes), since outputs are written to `<folder>/<id>.<kind>`. `Err` says why not.
pub fn check_case_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() {
        return Err("the case id is empty".into());
    }
    if id == "." || id == ".." {
        return Err(format!("case id `{id}` is not a plain name"));
    }
    if let Some(c) = id.chars().find(|&c| c == '/' || c == '\\' || c == '\0' || c.is_control()) {
        return Err(format!("case id `{}` contains {c:?}; ids must be plain names", id.escape_debug()));
    }
    if id.len() > 200 {
        return Err(format!("case id of {} bytes is longer than 200", id.len()));
    }
    Ok(())
}

/// `rel` (a manifest path) resolved inside the dataset folder `root` (canonical `base`), or an
/// error naming the manifest when it is absolute, contains NUL, or leads outside (`..`, a
/// symbolic link pointing out).
fn inside(root: &Path, base: &Path, rel: &str, id: &str) -> Result<PathBuf> {
    let manifest = root.join(MANIFEST);
    let outside = || {
        DataError::bad(&manifest, format!("case `{id}`: path `{}` is outside the dataset folder", rel.escape_debug()))
    };
    if rel.contains('\0') || Path::new(rel).is_absolute() {
        return Err(outside());
    }
    let joined = root.join(rel);
    let canonical = std::fs::canonicalize(&joined).at(&joined)?;
    if !canonical.starts_with(base) {
        return Err(outside());
    }
    Ok(joined)
}

/// Reads every voxel of `image` (and `label`) once, a z-slice at a time: image voxels must be
/// finite, label values integers in `0..n_classes`.
fn scan_voxels(image: &NiftiVolume, label: Option<&NiftiVolume>, n_classes: usize) -> Result<()> {
    let [nx, ny, nz] = image.dims();
    let slice = nx * ny;
    let mut buf = vec![0f64; slice];
    for z in 0..nz {
        image.read_line(z * slice, 1, &mut buf)?;
        if let Some((i, v)) = buf.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let (x, y) = (i % nx, i / nx);
            return Err(DataError::bad(image.path(), format!("voxel ({x}, {y}, {z}) is {v}, not a finite number")));
        }
    }
    let Some(label) = label else { return Ok(()) };
    let top = n_classes as f64;
    for z in 0..nz {
        label.read_line(z * slice, 1, &mut buf)?;
        if let Some((i, v)) = buf.iter().enumerate().find(|(_, &v)| !(v.fract() == 0.0 && (0.0..top).contains(&v))) {
            let (x, y) = (i % nx, i / nx);
            return Err(DataError::bad(
                label.path(),
                format!("label value {v} at voxel ({x}, {y}, {z}) is not a class (0..{n_classes})"),
            ));
        }
    }
    Ok(())
}

/// Whether two affines agree to within 1e-3 of their entries' scale (rounding in float32
/// headers), so that a label lies on its image's voxels.
fn same_geometry(a: &Geometry, b: &Geometry) -> bool {
    a.affine
        .iter()
        .flatten()
        .zip(b.affine.iter().flatten())
        .all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(y.abs()).max(1.0))
}

fn open_case(
    root: &Path,
    base: &Path,
    e: CaseEntry,
    cache: &GzCache,
    ids: &mut HashSet<String>,
    n_classes: usize,
) -> Result<Case> {
    let manifest = root.join(MANIFEST);
    let derived = if e.id.is_empty() { super::nifti::stem(Path::new(&e.image)) } else { e.id.clone() };
    check_case_id(&derived).map_err(|why| DataError::bad(&manifest, why))?;
    let id = derived;
    let image_path = inside(root, base, &e.image, &id)?;
    if !ids.insert(id.clone()) {
        return Err(DataError::bad(&manifest, format!("case `{id}` is listed twice")));
    }
    let labelled = e.is_labelled();
    if labelled && e.label.is_none() {
        return Err(DataError::bad(&manifest, format!("case `{id}` is marked labelled but lists no label")));
    }
    let image = NiftiVolume::open(&image_path, cache)?;
    image.header().geometry.check().map_err(|why| DataError::bad(&image_path, why))?;
    let label = match &e.label {
        Some(l) => {
            let label = NiftiVolume::open(inside(root, base, l, &id)?, cache)?;
            if label.dims() != image.dims() {
                return Err(DataError::bad(
                    label.path(),
                    format!(
                        "label shape {:?} differs from image shape {:?} ({})",
                        label.dims(),
                        image.dims(),
                        image_path.display()
                    ),
                ));
            }
            let (lg, ig) = (label.header().geometry, image.header().geometry);
            if !same_geometry(&lg, &ig) {
                return Err(DataError::bad(
                    label.path(),
                    format!(
                        "label affine {:?} differs from image affine {:?} ({})",
                        lg.affine,
                        ig.affine,
                        image_path.display()
                    ),
                ));
            }
            Some(label)
        }
        None => None,
    };
    scan_voxels(&image, label.as_ref(), n_classes)?;
    Ok(Case { id, image, label, labelled })
}
