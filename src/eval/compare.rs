//! Metrics between label volumes made elsewhere: two NIfTI files, or two folders of them matched
//! by file name (the stem without `.nii` / `.nii.gz`, so `a.nii.gz` matches `a.nii`). A folder
//! written by `uamt predict` or `uamt eval --out` is understood as it is: its `<case>.label.nii.gz`
//! files are the predictions of `<case>`, its probability and uncertainty maps are left aside.

use super::metrics::{case_metrics, CaseMetrics, EmptyPolicy};
use super::report::{CaseEvent, CaseFailure, CaseResult, Report};
use crate::data::nifti::{stem, GzCache, NiftiVolume};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Metrics of the prediction file against the reference file. Millimetres use `spacing`, or the
/// reference header's voxel size (`pixdim`) when `None`.
pub fn compare_files(
    prediction: &Path,
    reference: &Path,
    spacing: Option<[f64; 3]>,
    empty: EmptyPolicy,
) -> Result<CaseMetrics> {
    let r = NiftiVolume::open(reference, &GzCache::Memory)?;
    let p = NiftiVolume::open(prediction, &GzCache::Memory)?;
    if p.dims() != r.dims() {
        return Err(Error::File {
            path: prediction.into(),
            why: format!("shape {:?} differs from the reference's {:?}", p.dims(), r.dims()),
        });
    }
    let spacing = spacing.unwrap_or(r.header().spacing);
    case_metrics(&p.read_labels()?, &r.read_labels()?, spacing, empty)
}

/// The NIfTI files of `dir` by stem.
fn nifti_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let io = |e| Error::Io { path: dir.into(), source: e };
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Not only regular files: a FIFO or socket of that name fails its case with its kind named.
        if !path.is_dir() && !name.starts_with('.') && (name.ends_with(".nii") || name.ends_with(".nii.gz")) {
            out.insert(stem(&path), path);
        }
    }
    Ok(out)
}

/// The prediction files of `dir` by case: [`nifti_files`], except that in a folder holding
/// `<case>.label.nii[.gz]` files (what `uamt predict` and `uamt eval --out` write) those are the
/// predictions, named `<case>`, and the `.prob` / `.uncertainty` maps beside them are skipped.
fn prediction_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let all = nifti_files(dir)?;
    if !all.keys().any(|k| k.ends_with(".label")) {
        return Ok(all);
    }
    Ok(all.into_iter().filter_map(|(k, p)| k.strip_suffix(".label").map(|c| (c.to_string(), p))).collect())
}

/// A prediction file and the reference file it is scored against.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The case's name: the reference's stem.
    pub id: String,
    /// The predicted labels.
    pub prediction: PathBuf,
    /// The reference labels.
    pub reference: PathBuf,
}

/// The pairs of two files, or of two folders matched by stem, and the stems found on one side
/// only (as failures).
pub fn pair_paths(prediction: &Path, reference: &Path) -> Result<(Vec<Pair>, Vec<CaseFailure>)> {
    match (prediction.is_dir(), reference.is_dir()) {
        (false, false) => {
            Ok((vec![Pair { id: stem(reference), prediction: prediction.into(), reference: reference.into() }], vec![]))
        }
        (true, true) => {
            let (preds, refs) = (prediction_files(prediction)?, nifti_files(reference)?);
            let mut pairs = Vec::new();
            let mut lone = Vec::new();
            for (id, r) in &refs {
                match preds.get(id) {
                    Some(p) => pairs.push(Pair { id: id.clone(), prediction: p.clone(), reference: r.clone() }),
                    None => {
                        lone.push(CaseFailure { id: id.clone(), error: format!("no prediction for {}", r.display()) })
                    }
                }
            }
            for (id, p) in preds.iter().filter(|(id, _)| !refs.contains_key(*id)) {
                lone.push(CaseFailure { id: id.clone(), error: format!("no reference for {}", p.display()) });
            }
            if pairs.is_empty() {
                return Err(Error::invalid(
                    "prediction",
                    format!("no file of {} matches a file of {} by name", prediction.display(), reference.display()),
                ));
            }
            Ok((pairs, lone))
        }
        _ => Err(Error::invalid("prediction", "give two files or two folders, not one of each")),
    }
}

/// The report of [`compare_files`] over [`pair_paths`]; a case that fails is listed, not fatal.
pub fn compare_paths(
    prediction: &Path,
    reference: &Path,
    spacing: Option<[f64; 3]>,
    empty: EmptyPolicy,
    progress: &mut dyn FnMut(&CaseEvent),
) -> Result<Report> {
    let (pairs, mut failures) = pair_paths(prediction, reference)?;
    let mut cases = Vec::new();
    for (index, Pair { id, prediction: p, reference: r }) in pairs.iter().enumerate() {
        let t0 = Instant::now();
        let outcome = compare_files(p, r, spacing, empty);
        let outcome = outcome.as_ref().map_err(|e| e.to_string());
        progress(&CaseEvent {
            index,
            total: pairs.len(),
            id,
            outcome: outcome.as_ref().copied().map_err(String::as_str),
            seconds: t0.elapsed().as_secs_f64(),
        });
        match outcome {
            Ok(metrics) => cases.push(CaseResult { id: id.clone(), metrics: metrics.clone() }),
            Err(error) => failures.push(CaseFailure { id: id.clone(), error }),
        }
    }
    Ok(Report::new(prediction.display().to_string(), cases, failures))
}
