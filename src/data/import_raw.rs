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
use super::nifti::{stem, write_nifti, GzCache, NiftiVolume};
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
                Err(DataError::invalid("spacing", format!("{s:?} must be positive")))
            }
            Resample::Factor(f) if !ok(f) => Err(DataError::invalid("downsample", format!("{f} must be positive"))),
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
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).at(&path)?;
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

/// Case ID of an image file: MSD names it `<id>.nii.gz`; nnU-Net v2 `<id>_0000.nii.gz`.
fn case_id(path: &Path, nnunet: bool) -> Result<String> {
    let s = stem(path);
    if !nnunet {
        return Ok(s);
    }
    match s.rsplit_once('_') {
        Some((id, "0000")) if !id.is_empty() => Ok(id.to_string()),
        Some((_, ch)) if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) => {
            Err(DataError::bad(path, format!("channel `_{ch}`: only single-channel images (`_0000`) are supported")))
        }
        _ => Err(DataError::bad(path, "unknown channel suffix: nnU-Net images are named `<case>_0000.nii[.gz]`")),
    }
}

/// The NIfTI files of `dir` (hidden files such as macOS `._*` skipped), sorted.
fn nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in fs::read_dir(dir).at(dir)? {
        let p = e.at(dir)?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if !name.starts_with('.') && (name.ends_with(".nii") || name.ends_with(".nii.gz")) {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// The label file of case `id` in `dir` (`.nii.gz` or `.nii`).
fn label_for(dir: &Path, id: &str) -> Option<PathBuf> {
    [".nii.gz", ".nii"].iter().map(|e| dir.join(format!("{id}{e}"))).find(|p| p.is_file())
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
}

/// Reads the raw folder's layout; every training case must have its label.
fn read_source(src: &Path) -> Result<Source> {
    let mpath = src.join("dataset.json");
    let text = fs::read_to_string(&mpath).at(&mpath)?;
    let j: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DataError::bad(&mpath, format!("invalid JSON: {e}")))?;
    let name = j.get("name").and_then(|v| v.as_str()).unwrap_or("imported").to_string();
    let modality = ["modality", "channel_names"]
        .iter()
        .find_map(|k| j.get(*k).and_then(|m| m.get("0")).and_then(|v| v.as_str()))
        .unwrap_or("image")
        .to_string();
    // MSD: {"0": "background"}; nnU-Net v2: {"background": 0}.
    let mut labels: BTreeMap<u64, String> = BTreeMap::new();
    if let Some(m) = j.get("labels").and_then(|v| v.as_object()) {
        for (k, v) in m {
            match (k.parse::<u64>(), v) {
                (Ok(n), serde_json::Value::String(s)) => labels.insert(n, s.clone()),
                (_, serde_json::Value::Number(n)) => labels.insert(n.as_u64().unwrap_or(u64::MAX), k.clone()),
                _ => None,
            };
        }
    }
    if labels.is_empty() {
        labels = BTreeMap::from([(0, "background".into()), (1, "foreground".into())]);
    }
    let nnunet = j.get("training").and_then(|t| t.as_array()).is_none();
    let (images_tr, labels_tr) = (src.join("imagesTr"), src.join("labelsTr"));
    let mut training = Vec::new();
    if let Some(list) = j.get("training").and_then(|t| t.as_array()) {
        for (i, e) in list.iter().enumerate() {
            let img = e
                .get("image")
                .and_then(|v| v.as_str())
                .ok_or_else(|| DataError::bad(&mpath, format!("training entry {i} has no \"image\"")))?;
            let image = src.join(img);
            let id = case_id(&image, false)?;
            if !image.is_file() {
                return Err(DataError::bad(&image, format!("listed in {} but missing", mpath.display())));
            }
            let label = match e.get("label").and_then(|v| v.as_str()) {
                Some(l) => src.join(l),
                None => labels_tr.join(format!("{id}.nii.gz")),
            };
            if !label.is_file() {
                return Err(DataError::bad(&label, format!("missing: the label of training case `{id}`")));
            }
            training.push(RawCase { id, image, label: Some(label) });
        }
    } else {
        for image in nifti_files(&images_tr)? {
            let id = case_id(&image, true)?;
            let label = label_for(&labels_tr, &id).ok_or_else(|| {
                DataError::bad(&image, format!("no label for training case `{id}` in {}", labels_tr.display()))
            })?;
            training.push(RawCase { id, image, label: Some(label) });
        }
    }
    let mut test = Vec::new();
    for image in nifti_files(&src.join("imagesTs"))? {
        let id = case_id(&image, nnunet)?;
        test.push(RawCase { label: label_for(&src.join("labelsTs"), &id), id, image });
    }
    let mut seen = HashSet::new();
    if let Some(c) = training.iter().chain(&test).find(|c| !seen.insert(c.id.clone())) {
        return Err(DataError::bad(&c.image, format!("case `{}` appears twice", c.id)));
    }
    if training.is_empty() {
        return Err(DataError::bad(src, "no training cases (imagesTr/ is empty and dataset.json lists none)"));
    }
    let max = labels.keys().copied().max().unwrap_or(1);
    let labels = (0..=max).map(|v| labels.get(&v).cloned().unwrap_or_else(|| format!("class {v}"))).collect();
    Ok(Source { training, test, labels, modality, name })
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
    let end = [0, 1, 2].map(|a| (hi[a] + margin + 1).min(label.dims[a]));
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

/// Imports a raw MSD / nnU-Net folder.
pub fn import_raw(opts: &RawImport) -> Result<ImportReport> {
    import_raw_with(opts, &mut |_, _, _| {})
}

/// [`import_raw`], calling `progress(done, total, id)` after each case.
pub fn import_raw_with(opts: &RawImport, progress: Progress<'_>) -> Result<ImportReport> {
    opts.resample.validate()?;
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
    let staging = Staging::new(&opts.out, opts.force)?;
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
    let (mut training, mut test) = (Vec::new(), Vec::new());
    for (done, (case, labelled)) in cases.enumerate() {
        let image_file = NiftiVolume::open(&case.image, &GzCache::Memory)?;
        let label_file = case.label.as_ref().map(|l| NiftiVolume::open(l, &GzCache::Memory)).transpose()?;
        if let Some(l) = &label_file {
            check_same_grid(&image_file, l)?;
        }
        let mut image = image_file.read_f32()?;
        let stats = normalize(&mut image, opts.normalization, &case.image)?;
        let label = label_file.as_ref().map(|l| l.read_labels()).transpose()?;
        let g = image_file.header().geometry;
        let (mut image, mut label, mut g) = match opts.resample.target(g.spacing()) {
            None => (image, label, g),
            Some(t) => {
                resampled_dims(image.dims, g.spacing(), t)?;
                resample_case(&image, label.as_ref(), &g, t)?
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
    report(staging, Manifest::new(&source.name, &description, &source.modality, &labels, training, test))
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
