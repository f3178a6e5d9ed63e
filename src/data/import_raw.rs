//! Importing a raw Medical Segmentation Decathlon or nnU-Net folder (`dataset.json`,
//! `imagesTr/`, `labelsTr/`, `imagesTs/`, NIfTI, nnU-Net v2's `_0000` channel suffix) into a
//! dataset folder: per-case intensity normalisation, optional resampling (trilinear images,
//! nearest labels, affine updated), an optional crop of training cases to the label box plus a
//! margin, and the semi-supervised split (`labelled`, `holdout`). What was done is recorded in
//! `preprocessing.json` next to `dataset.json`, which `uamt predict` reads to apply the same to
//! raw images and to undo it on the label maps.

use super::dataset::{test_entry, training_entry, CaseEntry, Manifest};
use super::error::{DataError, Result};
use super::import::{ext, report, ImportReport, Progress, Staging};
use super::nifti::{read_header, write_nifti, GzCache, NiftiVolume};
use super::normalize::{normalize, Normalization};
use super::preprocessing::{CaseRecord, Preprocessing, Resample};
use super::raw_source::{read_source, RawCase};
use super::resample::{resample_case, resampled_dims};
use super::volume::Volume;
use crate::rng::{stream, Rng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        + crate::memory::RUNTIME_BYTES;
    crate::memory::check_fits(
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
