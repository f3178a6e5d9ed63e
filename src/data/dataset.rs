//! Dataset folders: the Medical Segmentation Decathlon / nnU-Net layout (`dataset.json`,
//! `imagesTr/`, `labelsTr/`, `imagesTs/`, `labelsTs/`) with two additions per training case,
//! an `id` and a `labelled` flag, which carry the semi-supervised split. See `README.md` here.

use super::error::{DataError, IoAt, Result};
use super::nifti::{GzCache, NiftiVolume};
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
        let text = std::fs::read_to_string(&path).at(&path)?;
        serde_json::from_str(&text).map_err(|e| DataError::bad(&path, format!("invalid manifest: {e}")))
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
    /// Opens the dataset folder `root`: reads the manifest, maps every listed volume and checks
    /// that each label matches its image's shape and that every labelled case has a label.
    pub fn open(root: impl AsRef<Path>, opts: &DatasetOptions) -> Result<Self> {
        let (dataset, mut skipped) = Self::open_inner(root.as_ref(), opts, false)?;
        match skipped.pop() {
            Some(e) => Err(e),
            None => Ok(dataset),
        }
    }

    /// Like [`Dataset::open`], but a case whose volumes cannot be opened (missing, truncated,
    /// corrupt, mismatched shapes) is left out and returned with its error instead of failing the
    /// whole dataset. A manifest that cannot be read is still an error.
    pub fn open_skipping_bad(root: impl AsRef<Path>, opts: &DatasetOptions) -> Result<(Self, Vec<DataError>)> {
        Self::open_inner(root.as_ref(), opts, true)
    }

    fn open_inner(root: &Path, opts: &DatasetOptions, skip: bool) -> Result<(Self, Vec<DataError>)> {
        let root = root.to_path_buf();
        let manifest = Manifest::read(&root)?;
        let cache = GzCache::Dir(opts.cache_dir.clone().unwrap_or_else(|| root.join(".cache")));
        let mut ids = HashSet::new();
        let mut skipped = Vec::new();
        let mut open_all = |entries: Vec<CaseEntry>, skipped: &mut Vec<DataError>| -> Result<Vec<Case>> {
            let mut cases = Vec::new();
            for e in entries {
                match open_case(&root, e, &cache, &mut ids) {
                    Ok(c) => cases.push(c),
                    Err(err) if skip => skipped.push(err),
                    Err(err) => return Err(err),
                }
            }
            Ok(cases)
        };
        let training = open_all(manifest.training.clone(), &mut skipped)?;
        let test = open_all(manifest.test.iter().map(TestEntry::to_case).collect(), &mut skipped)?;
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

fn open_case(root: &Path, e: CaseEntry, cache: &GzCache, ids: &mut HashSet<String>) -> Result<Case> {
    let manifest = root.join(MANIFEST);
    let image_path = root.join(&e.image);
    let id = if e.id.is_empty() { super::nifti::stem(&image_path) } else { e.id.clone() };
    if !ids.insert(id.clone()) {
        return Err(DataError::bad(&manifest, format!("case `{id}` is listed twice")));
    }
    let labelled = e.is_labelled();
    if labelled && e.label.is_none() {
        return Err(DataError::bad(&manifest, format!("case `{id}` is marked labelled but lists no label")));
    }
    let image = NiftiVolume::open(&image_path, cache)?;
    let label = match &e.label {
        Some(l) => {
            let label = NiftiVolume::open(root.join(l), cache)?;
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
            Some(label)
        }
        None => None,
    };
    Ok(Case { id, image, label, labelled })
}
