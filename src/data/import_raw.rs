//! Importing a raw Medical Segmentation Decathlon or nnU-Net folder (`dataset.json`,
//! `imagesTr/`, `labelsTr/`, `imagesTs/`, NIfTI, nnU-Net v2's `_0000` channel suffix) into a
//! dataset folder: per-case intensity normalisation, optional resampling (trilinear images,
//! nearest labels, affine updated), an optional crop of training cases to the label box plus a
//! margin, and the semi-supervised split (`labelled`, `holdout`). What was done is recorded in
//! `preprocessing.json` next to `dataset.json`, which `uamt predict` reads to apply the same to
//! raw images and to undo it on the label maps.

use super::dataset::{test_entry, training_entry, CaseEntry, Manifest};
use super::error::{DataError, IoAt, Result};
use super::import::{ext, report, ImportReport, Progress, Staging};
use super::nifti::{read_header, stem, write_nifti, GzCache, NiftiVolume};
use super::normalize::{normalize, Normalization, Stats};
use super::resample::{resample_case, resample_linear, resampled_dims};
use super::volume::{Geometry, Volume};
use crate::rng::{stream, Rng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The name of the preprocessing record in a dataset folder.
pub const PREPROCESSING: &str = "preprocessing.json";

/// How volumes are resampled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    /// Kept at their own voxel size.
    #[default]
    Keep,
    /// To this voxel size in mm (X, Y, Z).
    Spacing([f64; 3]),
    /// Voxel size multiplied by this factor (2: half the resolution).
    Factor(f64),
}

impl Resample {
    /// The target voxel size for a volume of voxel size `spacing`, or `None` to keep it.
    pub fn target(&self, spacing: [f64; 3]) -> Option<[f64; 3]> {
        match *self {
            Resample::Keep => None,
            Resample::Spacing(s) => Some(s),
            Resample::Factor(f) => Some(spacing.map(|s| s * f)),
        }
    }

    /// Refuses non-positive or non-finite sizes and factors.
    pub fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        match *self {
            Resample::Spacing(s) if !s.iter().all(|&v| ok(v)) => {
                Err(DataError::invalid("--spacing", format!("{s:?} must be positive")))
            }
            Resample::Factor(f) if !(ok(f) && (1.0 / 16.0..=16.0).contains(&f)) => {
                Err(DataError::invalid("--downsample", format!("{f} must be a factor in 1/16..=16")))
            }
            _ => Ok(()),
        }
    }
}

/// What the import did to one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// The source image, relative to the source folder.
    pub source: String,
    /// The source's shape.
    pub source_dims: [usize; 3],
    /// The normalisation's statistics (in source intensities).
    pub stats: Stats,
    /// The first voxel of the crop in the resampled volume (zeros when not cropped).
    pub crop_origin: [usize; 3],
    /// The written shape.
    pub dims: [usize; 3],
}

/// `preprocessing.json`: how raw images become the dataset's volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Preprocessing {
    /// Intensity normalisation per case.
    pub normalization: Normalization,
    /// Resampling.
    pub resample: Resample,
    /// Crop margin in voxels around the label box of training cases (`None`: not cropped).
    pub crop_margin: Option<usize>,
    /// Per case, by ID.
    pub cases: BTreeMap<String, CaseRecord>,
}

impl Preprocessing {
    /// Reads `<dir>/preprocessing.json`; `None` when the dataset has none (imported from HDF5,
    /// NRRD, or synthetic).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(PREPROCESSING);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let text = crate::fsutil::read_text(&path)?;
        serde_json::from_str(&text).map(Some).map_err(|e| DataError::bad(&path, format!("invalid record: {e}")))
    }

    /// Writes `<dir>/preprocessing.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(PREPROCESSING);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DataError::bad(&path, format!("cannot serialise: {e}")))?;
        Ok(crate::fsutil::write_atomic(&path, |w| w.write_all(format!("{text}\n").as_bytes()))?)
    }

    /// Normalises and resamples a raw image (`path` names it in errors): the network's input and
    /// its geometry. Crops are not applied (prediction needs no label box).
    pub fn apply(&self, image: &Volume<f32>, g: &Geometry, path: &Path) -> Result<(Volume<f32>, Geometry)> {
        let mut image = image.clone();
        normalize(&mut image, self.normalization, path)?;
        match self.resample.target(g.spacing()) {
            None => Ok((image, *g)),
            Some(t) => {
                let (img, _, g2) = resample_case(&image, None, g, t)?;
                Ok((img, g2))
            }
        }
    }
}

/// Takes resampled per-class probabilities (`[C]` volumes) back to `dims` (trilinear) and
/// returns their argmax, the label map in the input's own grid.
pub fn labels_in_grid(probabilities: &[Volume<f32>], dims: [usize; 3]) -> Result<(Vec<Volume<f32>>, Volume<u8>)> {
    let back: Vec<Volume<f32>> = probabilities
        .iter()
        .map(|p| if p.dims == dims { Ok(p.clone()) } else { resample_linear(p, dims) })
        .collect::<Result<_>>()?;
    let mut labels = Volume::<u8>::zeros(dims);
    for (i, l) in labels.data.iter_mut().enumerate() {
        let mut best = (f32::NEG_INFINITY, 0u8);
        for (c, p) in back.iter().enumerate() {
            if p.data[i] > best.0 {
                best = (p.data[i], c as u8);
            }
        }
        *l = best.1;
    }
    Ok((back, labels))
}

/// How the labelled training cases are chosen among those with labels (after the holdout).
#[derive(Debug, Clone, PartialEq)]
pub enum Labelled {
    /// The first N, in the source's order.
    First(usize),
    /// These IDs.
    List(Vec<String>),
    /// This fraction (rounded, at least 1), drawn with this seed.
    Fraction(f64, u64),
    /// All of them (fully supervised).
    All,
}

/// Options of the raw MSD / nnU-Net importer.
#[derive(Debug, Clone, PartialEq)]
pub struct RawImport {
    /// The raw folder (`dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/`).
    pub src: PathBuf,
    /// The dataset folder to create.
    pub out: PathBuf,
    /// Intensity normalisation.
    pub normalization: Normalization,
    /// Resampling.
    pub resample: Resample,
    /// Crop training cases to the label box plus this margin (voxels, after resampling).
    pub crop_margin: Option<usize>,
    /// The labelled subset.
    pub labelled: Labelled,
    /// Move the last K labelled training cases into a labelled test split.
    pub holdout: usize,
    /// Write `.nii.gz`.
    pub gzip: bool,
    /// Replace an existing output.
    pub force: bool,
}

impl RawImport {
    /// From `src` to `out`: whole-volume z-score, no resampling, no crop, all labelled.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        RawImport {
            src: src.into(),
            out: out.into(),
            normalization: Normalization::Volume,
            resample: Resample::Keep,
            crop_margin: None,
            labelled: Labelled::All,
            holdout: 0,
            gzip: false,
            force: false,
        }
    }
}

/// One case found in the raw folder.
#[derive(Debug, Clone)]
struct RawCase {
    /// The case ID.
    id: String,
    /// The image.
    image: PathBuf,
    /// The label, if any.
    label: Option<PathBuf>,
}

/// Case ID of an image file: MSD names it `<id>.nii.gz`; nnU-Net v2 `<id>_0000.nii.gz`. The ID
/// must be a plain name (outputs are written as `<id>.<kind>`).
fn case_id(path: &Path, nnunet: bool) -> Result<String> {
    let s = stem(path);
    let id = if !nnunet {
        s
    } else {
        match s.rsplit_once('_') {
            Some((id, "0000")) if !id.is_empty() => id.to_string(),
            Some((_, ch)) if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(DataError::bad(
                    path,
                    format!("channel `_{ch}`: only single-channel images (`_0000`) are supported"),
                ))
            }
            _ => {
                return Err(DataError::bad(
                    path,
                    "unknown channel suffix: nnU-Net images are named `<case>_0000.nii[.gz]` (a folder without \
                     dataset.json's `training` list is read as nnU-Net v2's layout)",
                ))
            }
        }
    };
    crate::data::dataset::check_case_id(&id).map_err(|why| DataError::bad(path, why))?;
    Ok(id)
}

/// Whether `path`'s name is a NIfTI file name (`.nii`, `.nii.gz`, any case) and not hidden.
fn is_nifti_name(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    !name.starts_with('.') && (name.ends_with(".nii") || name.ends_with(".nii.gz"))
}

/// Every entry of the folder `dir` (none when it does not exist), sorted.
fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in fs::read_dir(dir).at(dir)? {
        v.push(e.at(dir)?.path());
    }
    v.sort();
    Ok(v)
}

/// The NIfTI files of `dir`, sorted; what else it holds goes to `ignored` with the reason.
fn nifti_files(dir: &Path, ignored: &mut Vec<(PathBuf, String)>) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for p in entries(dir)? {
        if is_nifti_name(&p) {
            v.push(p);
        } else {
            let why = match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => "a folder (sub-folders are not read)",
                _ if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) => "a hidden file",
                _ => "not a NIfTI file (.nii, .nii.gz)",
            };
            ignored.push((p, why.into()));
        }
    }
    Ok(v)
}

/// The label file of case `id` in `dir` (`.nii.gz` or `.nii`), if either name exists.
fn label_for(dir: &Path, id: &str) -> Option<PathBuf> {
    [".nii.gz", ".nii"].iter().map(|e| dir.join(format!("{id}{e}"))).find(|p| std::fs::symlink_metadata(p).is_ok())
}

/// The source's `dataset.json` fields the importer uses.
struct Source {
    /// Training and test cases.
    training: Vec<RawCase>,
    /// Unlabelled test images (and labelled ones when `labelsTs/` has them).
    test: Vec<RawCase>,
    /// Class names by value.
    labels: Vec<String>,
    /// The modality of channel 0.
    modality: String,
    /// The dataset's name.
    name: String,
    /// Files found in the source's folders that are not imported, with the reason.
    ignored: Vec<(PathBuf, String)>,
}

/// The largest class value a label may hold (labels are written as 8-bit integers).
const MAX_CLASS: u64 = 255;

/// The classes `dataset.json`'s `labels` names, by value: MSD's `{"0": "background"}` or nnU-Net
/// v2's `{"background": 0}`; every value a distinct integer in 0..=255. Absent: background and
/// foreground.
fn read_label_names(j: &serde_json::Value, mpath: &Path) -> Result<Vec<String>> {
    use serde_json::Value;
    let bad = |why: String| DataError::bad(mpath, format!("`labels`: {why}"));
    let Some(v) = j.get("labels") else { return Ok(vec!["background".into(), "foreground".into()]) };
    let m = v.as_object().ok_or_else(|| {
        bad(format!(
            "{v} is not an object such as {{\"0\": \"background\", \"1\": \"atrium\"}} (MSD) or {{\"background\": 0, \
             \"atrium\": 1}} (nnU-Net)"
        ))
    })?;
    let mut labels: BTreeMap<u64, String> = BTreeMap::new();
    for (k, v) in m {
        let (value, name) = match v {
            Value::String(s) => {
                let n = k.trim().parse::<u64>().ok().filter(|&n| n <= MAX_CLASS);
                (n.ok_or_else(|| bad(format!("key `{k}` is not a class value in 0..={MAX_CLASS}")))?, s.clone())
            }
            Value::Number(n) => {
                let value = n.as_u64().filter(|&n| n <= MAX_CLASS);
                (value.ok_or_else(|| bad(format!("`{k}`: {n} is not a class value in 0..={MAX_CLASS}")))?, k.clone())
            }
            other => {
                return Err(bad(format!(
                    "`{k}`: {other} is neither a class name nor a class value (region-based labels are not supported)"
                )))
            }
        };
        if let Some(prev) = labels.insert(value, name.clone()) {
            return Err(bad(format!("class value {value} is given twice (`{prev}` and `{name}`)")));
        }
    }
    let Some(&max) = labels.keys().max() else { return Err(bad("names no class".into())) };
    Ok((0..=max).map(|v| labels.get(&v).cloned().unwrap_or_else(|| format!("class {v}"))).collect())
}

/// A path `dataset.json` gives (`rel`, relative to `src`), refused when absolute or leading
/// outside `src`; `what` says which entry, for the error.
fn listed_path(src: &Path, mpath: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    if rel.contains('\0') || Path::new(rel).is_absolute() {
        return Err(DataError::bad(
            mpath,
            format!("{what}: `{}` is not a path inside the source folder", rel.escape_debug()),
        ));
    }
    let path = src.join(rel);
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(DataError::bad(&path, format!("listed in {} ({what}) but missing", mpath.display())));
    }
    inside_src(src, &path)
}

/// `path` (a file found under the source folder `src`) if it stays inside `src` after resolving
/// symbolic links; else an error naming it: a source folder is untrusted input, like a dataset.
fn inside_src(src: &Path, path: &Path) -> Result<PathBuf> {
    let base = fs::canonicalize(src).at(src)?;
    let real = fs::canonicalize(path).at(path)?;
    if !real.starts_with(&base) {
        return Err(DataError::bad(
            path,
            format!("leads outside the source folder {} (to {}): refused", src.display(), real.display()),
        ));
    }
    Ok(path.to_path_buf())
}

/// The string field `key` of a `dataset.json` entry, if present; an error when not a string.
fn field<'a>(e: &'a serde_json::Value, key: &str, mpath: &Path, what: &str) -> Result<Option<&'a str>> {
    match e.get(key) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DataError::bad(mpath, format!("{what}: \"{key}\" is {other}, not a path"))),
    }
}

/// Reads the raw folder's layout; every training case must have its label. A source folder is
/// untrusted input: every path stays inside `src` after resolving links, `dataset.json`'s shape
/// and `labels` are checked, and every file of `imagesTr/`, `labelsTr/`, `imagesTs/` and
/// `labelsTs/` that is not imported is listed in `ignored` with the reason.
fn read_source(src: &Path) -> Result<Source> {
    let mpath = src.join("dataset.json");
    let text = crate::fsutil::read_text(&mpath)?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::bad(&mpath, format!("invalid JSON: {e}")))?;
    if !j.is_object() {
        return Err(DataError::bad(&mpath, "must hold a JSON object (MSD's or nnU-Net's dataset.json)"));
    }
    let name = j.get("name").and_then(|v| v.as_str()).unwrap_or("imported").to_string();
    let modality = ["modality", "channel_names"]
        .iter()
        .find_map(|k| j.get(*k).and_then(|m| m.get("0")).and_then(|v| v.as_str()))
        .unwrap_or("image")
        .to_string();
    let labels = read_label_names(&j, &mpath)?;
    let list = match j.get("training") {
        None => None,
        Some(serde_json::Value::Array(list)) => Some(list),
        Some(other) => {
            return Err(DataError::bad(
                &mpath,
                format!(
                    "`training` is {other}, not a list of {{\"image\": \"./imagesTr/<case>.nii.gz\", \"label\": \
                     \"./labelsTr/<case>.nii.gz\"}} entries (leave it out for nnU-Net v2's layout)"
                ),
            ))
        }
    };
    let nnunet = list.is_none();
    let (images_tr, labels_tr) = (src.join("imagesTr"), src.join("labelsTr"));
    let (images_ts, labels_ts) = (src.join("imagesTs"), src.join("labelsTs"));
    let mut ignored = Vec::new();
    let found_tr = nifti_files(&images_tr, &mut ignored)?;
    let mut training = Vec::new();
    if let Some(list) = list {
        for (i, e) in list.iter().enumerate() {
            let what = format!("`training` entry {i}");
            if !e.is_object() {
                return Err(DataError::bad(
                    &mpath,
                    format!("{what} is {e}, not an object with \"image\" and \"label\""),
                ));
            }
            let img = field(e, "image", &mpath, &what)?
                .ok_or_else(|| DataError::bad(&mpath, format!("{what} has no \"image\"")))?;
            let image = listed_path(src, &mpath, img, &what)?;
            let id = case_id(&image, false)?;
            let label = match field(e, "label", &mpath, &what)? {
                Some(l) => listed_path(src, &mpath, l, &what)?,
                None => {
                    let l = labels_tr.join(format!("{id}.nii.gz"));
                    if std::fs::symlink_metadata(&l).is_err() {
                        return Err(DataError::bad(&l, format!("missing: the label of training case `{id}`")));
                    }
                    inside_src(src, &l)?
                }
            };
            training.push(RawCase { id, image, label: Some(label) });
        }
    } else {
        for image in &found_tr {
            let image = inside_src(src, image)?;
            let id = case_id(&image, true)?;
            let label = label_for(&labels_tr, &id).ok_or_else(|| {
                DataError::bad(&image, format!("no label for training case `{id}` in {}", labels_tr.display()))
            })?;
            training.push(RawCase { id, label: Some(inside_src(src, &label)?), image });
        }
    }
    let mut test = Vec::new();
    for image in nifti_files(&images_ts, &mut ignored)? {
        let image = inside_src(src, &image)?;
        let id = case_id(&image, nnunet)?;
        let label = label_for(&labels_ts, &id).map(|l| inside_src(src, &l)).transpose()?;
        test.push(RawCase { label, id, image });
    }
    // dataset.json's `test` list (MSD): each image must exist; those outside imagesTs/ are
    // imported too.
    match j.get("test") {
        None => {}
        Some(serde_json::Value::Array(list)) => {
            for (i, e) in list.iter().enumerate() {
                let what = format!("`test` entry {i}");
                let rel = match e {
                    serde_json::Value::String(s) => s.as_str(),
                    _ => field(e, "image", &mpath, &what)?
                        .ok_or_else(|| DataError::bad(&mpath, format!("{what} is {e}, not a path")))?,
                };
                let image = listed_path(src, &mpath, rel, &what)?;
                let same = |c: &RawCase| fs::canonicalize(&c.image).ok() == fs::canonicalize(&image).ok();
                if !test.iter().any(same) {
                    let id = case_id(&image, false)?;
                    test.push(RawCase { id, image, label: None });
                }
            }
        }
        Some(other) => {
            return Err(DataError::bad(&mpath, format!("`test` is {other}, not a list of image paths")));
        }
    }
    let mut seen = HashSet::new();
    if let Some(c) = training.iter().chain(&test).find(|c| !seen.insert(c.id.clone())) {
        return Err(DataError::bad(&c.image, format!("case `{}` appears twice", c.id)));
    }
    if training.is_empty() {
        return Err(DataError::bad(src, "no training cases (imagesTr/ is empty and dataset.json lists none)"));
    }
    // What the folders hold that is not imported.
    let used: HashSet<PathBuf> = training
        .iter()
        .chain(&test)
        .flat_map(|c| std::iter::once(&c.image).chain(c.label.as_ref()))
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    for p in &found_tr {
        if !fs::canonicalize(p).is_ok_and(|c| used.contains(&c)) {
            ignored.push((p.clone(), "not listed in dataset.json's `training`".into()));
        }
    }
    for dir in [&labels_tr, &labels_ts] {
        for p in nifti_files(dir, &mut ignored)? {
            if !fs::canonicalize(&p).is_ok_and(|c| used.contains(&c)) {
                ignored.push((p, "a label without an image of the same case".into()));
            }
        }
    }
    ignored.sort();
    Ok(Source { training, test, labels, modality, name, ignored })
}

/// The indices (into `ids`) of the labelled cases.
fn choose_labelled(ids: &[String], how: &Labelled, holdout: usize) -> Result<Vec<bool>> {
    let n = ids.len();
    let too_many = |k: usize| {
        DataError::invalid(
            "labelled",
            format!("{k} labelled cases asked but only {n} training cases have labels (after holding out {holdout})"),
        )
    };
    let mut pick = vec![false; n];
    match how {
        Labelled::All => pick.fill(true),
        Labelled::First(k) => {
            if *k > n {
                return Err(too_many(*k));
            }
            pick[..*k].fill(true);
        }
        Labelled::List(list) => {
            for id in list {
                let i = ids
                    .iter()
                    .position(|x| x == id)
                    .ok_or_else(|| DataError::invalid("labelled", format!("case `{id}` is not a training case")))?;
                pick[i] = true;
            }
        }
        Labelled::Fraction(f, seed) => {
            if !(f.is_finite() && *f > 0.0 && *f <= 1.0) {
                return Err(DataError::invalid("labelled", format!("fraction {f} must be in (0, 1]")));
            }
            let k = ((*f * n as f64).round() as usize).clamp(1, n.max(1));
            let order = Rng::keyed(*seed, &[stream::LABELLED_SUBSET]).permutation(n);
            for &i in &order[..k.min(n)] {
                pick[i] = true;
            }
        }
    }
    Ok(pick)
}

/// The label box of `label` (non-zero voxels) grown by `margin` and clipped: (origin, dims).
fn crop_box(label: &Volume<u8>, margin: usize, path: &Path) -> Result<([usize; 3], [usize; 3])> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    let [w, h, d] = label.dims;
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                if label.data[label.index(x, y, z)] != 0 {
                    let p = [x, y, z];
                    for a in 0..3 {
                        lo[a] = lo[a].min(p[a]);
                        hi[a] = hi[a].max(p[a]);
                    }
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        return Err(DataError::bad(path, "the label has no foreground voxels to crop around"));
    }
    let origin = [0, 1, 2].map(|a| lo[a].saturating_sub(margin));
    let end = [0, 1, 2].map(|a| hi[a].saturating_add(margin).saturating_add(1).min(label.dims[a]));
    Ok((origin, [0, 1, 2].map(|a| end[a] - origin[a])))
}

/// The sub-volume at `origin` of shape `dims`.
fn crop<T: Copy + Default>(v: &Volume<T>, origin: [usize; 3], dims: [usize; 3]) -> Volume<T> {
    let mut data = Vec::with_capacity(dims.iter().product());
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            let at = v.index(origin[0], origin[1] + y, origin[2] + z);
            data.extend_from_slice(&v.data[at..at + dims[0]]);
        }
    }
    Volume { dims, data }
}

/// Refuses a label whose shape or affine differs from its image's (beyond 1e-3 of a voxel).
fn check_same_grid(image: &NiftiVolume, label: &NiftiVolume) -> Result<()> {
    if image.dims() != label.dims() {
        return Err(DataError::bad(
            label.path(),
            format!(
                "label shape {:?} differs from image shape {:?} ({})",
                label.dims(),
                image.dims(),
                image.path().display()
            ),
        ));
    }
    let (a, b) = (&image.header().geometry.affine, &label.header().geometry.affine);
    let tol = 1e-3 * image.header().geometry.spacing().iter().fold(f64::INFINITY, |m, &s| m.min(s)).max(1e-6);
    let off =
        (0..3).flat_map(|i| (0..4).map(move |j| (i, j))).map(|(i, j)| (a[i][j] - b[i][j]).abs()).fold(0.0, f64::max);
    if off > tol {
        return Err(DataError::bad(
            label.path(),
            format!("label geometry (affine) differs from its image's {} by {off:.4} mm", image.path().display()),
        ));
    }
    Ok(())
}

/// The most voxels resampling may leave on an axis below the source's own count: fewer than this
/// (`--downsample 1000`) is refused.
const MIN_RESAMPLED_SIDE: usize = 4;

/// Checks a case before any voxel is read, from the headers alone: the image's and label's
/// geometry are finite and non-degenerate, resampling keeps at least [`MIN_RESAMPLED_SIDE`]
/// voxels per axis (or the source's own count), and what the case needs in memory fits.
fn plan_case(case: &RawCase, opts: &RawImport) -> Result<()> {
    let h = read_header(&case.image)?;
    h.geometry.check().map_err(|why| DataError::bad(&case.image, why))?;
    let label = case.label.as_ref().map(|l| read_header(l).map(|h| (l, h))).transpose()?;
    if let Some((path, lh)) = &label {
        lh.geometry.check().map_err(|why| DataError::bad(path, why))?;
    }
    let source = h.dims.iter().map(|&d| d as u64).product::<u64>();
    let out = match opts.resample.target(h.geometry.spacing()) {
        None => h.dims,
        Some(t) => {
            let flag = match opts.resample {
                Resample::Factor(_) => "--downsample",
                _ => "--spacing",
            };
            let dims = resampled_dims(h.dims, h.geometry.spacing(), t)
                .map_err(|e| DataError::bad(&case.image, format!("{flag}: {e}")))?;
            if (0..3).any(|a| dims[a] < MIN_RESAMPLED_SIDE.min(h.dims[a])) {
                return Err(DataError::bad(
                    &case.image,
                    format!(
                        "{flag} would resample its {:?} voxels of {:?} mm to {dims:?} voxels of {t:?} mm: fewer than \
                         {MIN_RESAMPLED_SIDE} per axis; choose a finer {flag}",
                        h.dims,
                        h.geometry.spacing()
                    ),
                ));
            }
            dims
        }
    };
    let resampled = out.iter().map(|&d| d as u64).product::<u64>();
    // The decompressed file(s), the float image, the 8-bit label, the resampled pair, the
    // written copy, and the runtime.
    let file_bytes =
        |h: &crate::data::nifti::Header| h.dims.iter().map(|&d| d as u64).product::<u64>() * h.dtype.size() as u64;
    let need = file_bytes(&h)
        + label.as_ref().map_or(0, |(_, lh)| file_bytes(lh) + source)
        + 4 * source
        + 9 * resampled
        + crate::footprint::RUNTIME_BYTES;
    crate::footprint::check_fits(
        need,
        &format!("importing this {:?} volume", h.dims),
        "import it on a machine with more memory, or resample it coarser (--downsample / --spacing) beforehand",
    )
    .map_err(|why| DataError::bad(&case.image, why))
}

/// Refuses a label value that is not a class `dataset.json`'s `labels` names.
fn check_classes(label: &Volume<u8>, n_classes: usize, path: &Path, src: &Path) -> Result<()> {
    if let Some(i) = label.data.iter().position(|&v| v as usize >= n_classes) {
        let [nx, ny, _] = label.dims;
        let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
        return Err(DataError::bad(
            path,
            format!(
                "label value {} at voxel ({x}, {y}, {z}) is not a class of {}'s `labels` (0..{n_classes})",
                label.data[i],
                src.join("dataset.json").display()
            ),
        ));
    }
    Ok(())
}

/// Imports a raw MSD / nnU-Net folder.
pub fn import_raw(opts: &RawImport) -> Result<ImportReport> {
    import_raw_with(opts, &mut |_, _, _| {})
}

/// [`import_raw`], calling `progress(done, total, id)` after each case.
pub fn import_raw_with(opts: &RawImport, progress: Progress<'_>) -> Result<ImportReport> {
    opts.resample.validate()?;
    crate::fsutil::check_apart(&[("--out", &opts.out)], &[("--src", &opts.src)])?;
    let source = read_source(&opts.src)?;
    let n = source.training.len();
    if opts.holdout >= n {
        return Err(DataError::invalid(
            "holdout",
            format!("{} held out but the source has only {n} labelled training cases", opts.holdout),
        ));
    }
    let (train, held) = source.training.split_at(n - opts.holdout);
    let ids: Vec<String> = train.iter().map(|c| c.id.clone()).collect();
    let pick = choose_labelled(&ids, &opts.labelled, opts.holdout)?;
    let inputs = [("--src", opts.src.as_path())];
    let staging = Staging::new(&opts.out, opts.force, "uamt import nifti", &inputs)?;
    let mut record = Preprocessing {
        normalization: opts.normalization,
        resample: opts.resample,
        crop_margin: opts.crop_margin,
        cases: BTreeMap::new(),
    };
    let e = ext(opts.gzip);
    let cases =
        train.iter().zip(&pick).map(|(c, &l)| (c, Some(l))).chain(held.iter().chain(&source.test).map(|c| (c, None)));
    let total = n + source.test.len();
    let n_classes = source.labels.len();
    let (mut training, mut test) = (Vec::new(), Vec::new());
    for (done, (case, labelled)) in cases.enumerate() {
        plan_case(case, opts)?;
        let image_file = NiftiVolume::open(&case.image, &GzCache::Memory)?;
        let label_file = case.label.as_ref().map(|l| NiftiVolume::open(l, &GzCache::Memory)).transpose()?;
        if let Some(l) = &label_file {
            check_same_grid(&image_file, l)?;
        }
        let mut image = image_file.read_f32()?;
        let stats = normalize(&mut image, opts.normalization, &case.image)?;
        let label = label_file.as_ref().map(|l| l.read_labels()).transpose()?;
        if let (Some(l), Some(path)) = (&label, &case.label) {
            check_classes(l, n_classes, path, &opts.src)?;
        }
        drop(label_file);
        let g = image_file.header().geometry;
        let (mut image, mut label, mut g) = match opts.resample.target(g.spacing()) {
            None => (image, label, g),
            Some(t) => {
                resample_case(&image, label.as_ref(), &g, t).map_err(|e| DataError::bad(&case.image, e.to_string()))?
            }
        };
        let mut origin = [0; 3];
        if let (Some(m), Some(_), Some(l)) = (opts.crop_margin, labelled, &label) {
            let path = case.label.as_deref().unwrap_or(&case.image);
            let (o, dims) = crop_box(l, m, path)?;
            image = crop(&image, o, dims);
            label = Some(crop(l, o, dims));
            g = g.cropped(o);
            origin = o;
        }
        let entry = match labelled {
            Some(l) => training_entry(&case.id, e, l),
            None if label.is_some() => test_entry(&case.id, e),
            None => CaseEntry {
                id: case.id.clone(),
                image: format!("./imagesTs/{}{e}", case.id),
                label: None,
                labelled: None,
            },
        };
        write_nifti(staging.dir().join(&entry.image), &image, &g)?;
        if let (Some(p), Some(l)) = (&entry.label, &label) {
            write_nifti(staging.dir().join(p), l, &g)?;
        }
        let rel = case.image.strip_prefix(&opts.src).unwrap_or(&case.image).display().to_string();
        record.cases.insert(
            case.id.clone(),
            CaseRecord { source: rel, source_dims: image_file.dims(), stats, crop_origin: origin, dims: image.dims },
        );
        if labelled.is_some() {
            training.push(entry)
        } else {
            test.push(entry)
        }
        progress(done + 1, total, &case.id);
    }
    record.write(staging.dir())?;
    let description = format!(
        "imported from {} ({}); normalisation {:?}, resampling {:?}, crop margin {:?}; {} held out as labelled test cases",
        opts.src.display(),
        source.name,
        opts.normalization,
        opts.resample,
        opts.crop_margin,
        opts.holdout
    );
    let labels: Vec<&str> = source.labels.iter().map(String::as_str).collect();
    let mut r = report(staging, Manifest::new(&source.name, &description, &source.modality, &labels, training, test))?;
    r.ignored = source.ignored;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_suffixes() {
        assert_eq!(case_id(Path::new("a/la_003_0000.nii.gz"), true).unwrap(), "la_003");
        assert!(case_id(Path::new("a/la_003_0001.nii.gz"), true).is_err());
        assert!(case_id(Path::new("a/la_003.nii.gz"), true).is_err());
        assert_eq!(case_id(Path::new("a/la_003.nii.gz"), false).unwrap(), "la_003");
    }

    #[test]
    fn labels_of_dataset_json_are_bounded_unique_non_negative_integers() {
        let read = |labels: &str| {
            let j: serde_json::Value = serde_json::from_str(&format!(r#"{{"labels": {labels}}}"#)).unwrap();
            read_label_names(&j, Path::new("d/dataset.json")).map_err(|e| e.to_string())
        };
        assert_eq!(read(r#"{"0": "bg", "2": "b"}"#).unwrap(), vec!["bg", "class 1", "b"]);
        assert_eq!(read(r#"{"bg": 0, "a": 1}"#).unwrap(), vec!["bg", "a"]);
        assert_eq!(read(r#"{"0": "bg", "255": "x"}"#).unwrap().len(), 256);
        for bad in [
            r#"{"0": "bg", "4294967296": "x"}"#,
            r#"{"0": "bg", "256": "x"}"#,
            r#"{"bg": 0, "a": -1}"#,
            r#"{"bg": 0, "a": 1e12}"#,
            r#"{"bg": 0, "a": 1.5}"#,
            r#"{"bg": 0, "a": 0}"#,
            r#"{"0": "bg", "00": "a"}"#,
            r#"{"bg": 0, "a": [1, 2]}"#,
            r#"{}"#,
            r#"[1]"#,
        ] {
            let e = read(bad).unwrap_err();
            assert!(e.starts_with("d/dataset.json: `labels`"), "{bad}: {e}");
        }
        // Absent: background and foreground.
        let j = serde_json::json!({});
        assert_eq!(read_label_names(&j, Path::new("x")).unwrap(), vec!["background", "foreground"]);
    }

    #[test]
    fn listed_paths_stay_inside_the_source() {
        let dir = std::env::temp_dir().join(format!("uamt-listed-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("imagesTr")).unwrap();
        std::fs::write(src.join("imagesTr/a.nii"), "x").unwrap();
        std::fs::write(dir.join("outside.nii"), "x").unwrap();
        std::os::unix::fs::symlink(dir.join("outside.nii"), src.join("imagesTr/b.nii")).unwrap();
        let m = src.join("dataset.json");
        assert!(listed_path(&src, &m, "./imagesTr/a.nii", "entry 0").is_ok());
        for bad in ["../outside.nii", "./imagesTr/b.nii", dir.join("outside.nii").to_str().unwrap(), "./gone.nii"] {
            assert!(listed_path(&src, &m, bad, "entry 0").is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn labelled_choices() {
        let ids: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        assert_eq!(choose_labelled(&ids, &Labelled::First(2), 0).unwrap(), vec![true, true, false, false, false]);
        assert!(choose_labelled(&ids, &Labelled::First(6), 0).is_err());
        let f = choose_labelled(&ids, &Labelled::Fraction(0.4, 7), 0).unwrap();
        assert_eq!(f.iter().filter(|&&b| b).count(), 2);
        assert_eq!(f, choose_labelled(&ids, &Labelled::Fraction(0.4, 7), 0).unwrap());
        assert!(choose_labelled(&ids, &Labelled::List(vec!["zz".into()]), 0).is_err());
    }

    #[test]
    fn crop_box_adds_margin_and_clips() {
        let mut l = Volume::<u8>::zeros([10, 10, 10]);
        let i = l.index(5, 1, 8);
        l.data[i] = 1;
        let (o, d) = crop_box(&l, 2, Path::new("l")).unwrap();
        assert_eq!(o, [3, 0, 6]);
        assert_eq!(d, [5, 4, 4]);
    }
}
