//! `preprocessing.json`: what an import did to raw images (normalisation, resampling, crops, each
//! case's source shape and statistics), so that `uamt predict` applies the same to new raw images
//! and undoes it on their label maps ([`labels_in_grid`]).

use super::error::{DataError, Result};
use super::normalize::{normalize, Normalization, Stats};
use super::resample::{resample_case, resample_linear};
use super::volume::{Geometry, Volume};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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
/// returns their argmax, the label map in the input's own grid (both on every core).
pub fn labels_in_grid(probabilities: &[Volume<f32>], dims: [usize; 3]) -> Result<(Vec<Volume<f32>>, Volume<u8>)> {
    let back: Vec<Volume<f32>> = probabilities
        .iter()
        .map(|p| if p.dims == dims { Ok(p.clone()) } else { resample_linear(p, dims) })
        .collect::<Result<_>>()?;
    let mut labels = Volume::<u8>::zeros(dims);
    super::parallel::for_each_chunk(
        &mut labels.data,
        super::parallel::BLOCK,
        super::parallel::threads(),
        |first, part| {
            for (k, l) in part.iter_mut().enumerate() {
                let i = first + k;
                let mut best = (f32::NEG_INFINITY, 0u8);
                for (c, p) in back.iter().enumerate() {
                    if p.data[i] > best.0 {
                        best = (p.data[i], c as u8);
                    }
                }
                *l = best.1;
            }
        },
    );
    Ok((back, labels))
}
