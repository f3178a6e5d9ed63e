//! Per-case segmentation metrics exactly as `medpy.metric.binary` defines them: Dice (`dc`),
//! Jaccard (`jc`), the 95 % Hausdorff distance (`hd95`) and the average surface distance (`asd`).
//!
//! - Foreground is every non-zero label (medpy casts to bool).
//! - Surface = mask XOR its erosion by the 6-neighbourhood cross (`generate_binary_structure(3,
//!   1)`, one iteration, scipy's border value 0: a mask voxel on the volume's border is surface).
//! - Distances from each surface voxel of one mask to the nearest surface voxel of the other, by an
//!   exact Euclidean distance transform ([`super::edt`]) with the voxel spacing.
//! - hd95 = 95th percentile (numpy's default linear interpolation) of the distances of BOTH
//!   directions pooled; asd is DIRECTED, prediction -> reference (the mean of the prediction's
//!   surface distances), as the UA-MT reference uses it (not the symmetric `assd`).
//!
//! medpy raises on an empty mask. Here an empty prediction scores zeros by default, as the UA-MT
//! reference evaluation does ([`EmptyPolicy::Zeros`]), and the result says so
//! (`empty_prediction`); an empty reference leaves the distances undefined (`None`).

use super::calibration::Calibration;
use super::edt::squared_edt;
use crate::data::Volume;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How a case with an empty prediction is scored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmptyPolicy {
    /// The UA-MT reference's choice: every metric of an empty prediction is 0 (which flatters
    /// the mean hd95 and asd; the case is flagged `empty_prediction`).
    #[default]
    Zeros,
    /// Dice and Jaccard as medpy computes them (0, or 1 when both masks are empty); hd95 and asd
    /// undefined (`None`) and left out of the means.
    Undefined,
}

/// The metrics of one case. Distances are `None` where undefined (an empty mask).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// `2 |P & R| / (|P| + |R|)`, in [0, 1].
    pub dice: f64,
    /// `|P & R| / |P | R|`, in [0, 1].
    pub jaccard: f64,
    /// 95 % Hausdorff distance in voxels (spacing 1, as the reference evaluation reports it).
    pub hd95: Option<f64>,
    /// Average surface distance prediction -> reference, in voxels.
    pub asd: Option<f64>,
    /// 95 % Hausdorff distance in millimetres (the volume's spacing).
    pub hd95_mm: Option<f64>,
    /// Average surface distance prediction -> reference, in millimetres.
    pub asd_mm: Option<f64>,
    /// Foreground voxels of the prediction.
    pub prediction_voxels: usize,
    /// Foreground voxels of the reference.
    pub reference_voxels: usize,
    /// The prediction has no foreground (scored by the [`EmptyPolicy`]).
    pub empty_prediction: bool,
    /// The reference has no foreground: the distances are undefined.
    pub empty_reference: bool,
    /// ECE, Brier score and uncertainty AUROC (see [`super::calibration`]): only where a model
    /// was run (its probabilities and uncertainty known), absent for label files compared.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// Foreground (non-zero) voxels of a label volume.
pub fn foreground(labels: &Volume<u8>) -> Vec<bool> {
    labels.data.iter().map(|&l| l != 0).collect()
}

/// Surface voxels of `mask` (x fastest, `dims` `[X, Y, Z]`): set voxels with at least one
/// 6-neighbour unset or outside the volume, i.e. `mask ^ binary_erosion(mask, cross, border 0)`.
pub fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = dims;
    let (sy, sz) = (nx, nx * ny);
    let mut out = vec![false; mask.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let i = x + sy * y + sz * z;
                if !mask[i] {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && mask[i - 1]
                    && mask[i + 1]
                    && mask[i - sy]
                    && mask[i + sy]
                    && mask[i - sz]
                    && mask[i + sz];
                out[i] = !interior;
            }
        }
    }
    out
}

/// The smallest box `[lo, hi)` per axis holding every set voxel of `masks`, or `None` if all are empty.
fn bounding_box(masks: &[&[bool]], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for m in masks {
        for (i, _) in m.iter().enumerate().filter(|(_, &b)| b) {
            let p = [i % dims[0], (i / dims[0]) % dims[1], i / (dims[0] * dims[1])];
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a] + 1);
            }
        }
    }
    (lo[0] != usize::MAX).then_some((lo, hi))
}

/// Copies the box `[lo, hi)` out of `mask`.
fn crop(mask: &[bool], dims: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
    let mut out = Vec::with_capacity((hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2]));
    for z in lo[2]..hi[2] {
        for y in lo[1]..hi[1] {
            let row = dims[0] * (y + dims[1] * z);
            out.extend_from_slice(&mask[row + lo[0]..row + hi[0]]);
        }
    }
    out
}

/// The surfaces of a prediction and a reference, cropped to the box holding both (the distance
/// transform inside that box is exact for every voxel in it: all features lie inside).
#[derive(Debug, Clone)]
pub struct Surfaces {
    /// Size of the cropped box.
    dims: [usize; 3],
    /// The prediction's surface in the box.
    prediction: Vec<bool>,
    /// The reference's surface in the box.
    reference: Vec<bool>,
}

impl Surfaces {
    /// The surfaces of two non-empty masks of shape `dims`; `None` if either is empty.
    pub fn new(prediction: &[bool], reference: &[bool], dims: [usize; 3]) -> Option<Self> {
        let p = surface(prediction, dims);
        let r = surface(reference, dims);
        if !p.contains(&true) || !r.contains(&true) {
            return None;
        }
        let (lo, hi) = bounding_box(&[&p, &r], dims)?;
        let cdims = [0, 1, 2].map(|a| hi[a] - lo[a]);
        Some(Surfaces { dims: cdims, prediction: crop(&p, dims, lo, hi), reference: crop(&r, dims, lo, hi) })
    }

    /// Distances from every surface voxel of `from` to the nearest surface voxel of `to`
    /// (medpy's `__surface_distances(from, to)`), in scan order (x fastest).
    fn directed(from: &[bool], to: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
        let d2 = squared_edt(to, dims, spacing);
        from.iter().zip(d2).filter(|(&f, _)| f).map(|(_, d)| d.sqrt()).collect()
    }

    /// Prediction -> reference surface distances.
    pub fn prediction_to_reference(&self, spacing: [f64; 3]) -> Vec<f64> {
        Self::directed(&self.prediction, &self.reference, self.dims, spacing)
    }

    /// Reference -> prediction surface distances.
    pub fn reference_to_prediction(&self, spacing: [f64; 3]) -> Vec<f64> {
        Self::directed(&self.reference, &self.prediction, self.dims, spacing)
    }

    /// `(hd95, asd)` with `spacing`: the 95th percentile of both directions pooled, and the
    /// mean of the prediction -> reference direction.
    pub fn hd95_asd(&self, spacing: [f64; 3]) -> (f64, f64) {
        let forward = self.prediction_to_reference(spacing);
        let asd = mean(&forward);
        let mut pooled = forward;
        pooled.extend(self.reference_to_prediction(spacing));
        (percentile(&mut pooled, 95.0), asd)
    }
}

/// Arithmetic mean (NaN for no values).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// numpy's `percentile(v, q)` with the default linear interpolation: the value at fractional
/// rank `q / 100 * (n - 1)` of the sorted values. Reorders `v`. NaN for no values.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = q / 100.0 * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let t = rank - lo as f64;
    let (_, &mut a, above) = v.select_nth_unstable_by(lo, f64::total_cmp);
    if t == 0.0 || above.is_empty() {
        return a;
    }
    let b = above.iter().copied().fold(f64::INFINITY, f64::min);
    // numpy's _lerp: a + (b - a) t, computed from the nearer end.
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// The metrics of `prediction` against `reference` (same shape, foreground = non-zero),
/// distances in voxels and in millimetres of `spacing`.
pub fn case_metrics(
    prediction: &Volume<u8>,
    reference: &Volume<u8>,
    spacing: [f64; 3],
    empty: EmptyPolicy,
) -> Result<CaseMetrics> {
    if prediction.dims != reference.dims {
        return Err(Error::shape("prediction", format!("the reference's shape {:?}", reference.dims), prediction.dims));
    }
    if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::invalid(
            "spacing",
            format!("every voxel size must be positive and finite, got {spacing:?}"),
        ));
    }
    Ok(mask_metrics(&foreground(prediction), &foreground(reference), prediction.dims, spacing, empty))
}

/// [`case_metrics`] on boolean masks (x fastest, `dims` `[X, Y, Z]`, equal lengths).
pub fn mask_metrics(
    prediction: &[bool],
    reference: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
    empty: EmptyPolicy,
) -> CaseMetrics {
    let (mut np, mut nr, mut both) = (0usize, 0usize, 0usize);
    for (&p, &r) in prediction.iter().zip(reference) {
        np += p as usize;
        nr += r as usize;
        both += (p && r) as usize;
    }
    let union = np + nr - both;
    let mut m = CaseMetrics {
        // medpy: 1.0 when both masks are empty (ZeroDivisionError caught).
        dice: if np + nr == 0 { 1.0 } else { 2.0 * both as f64 / (np + nr) as f64 },
        jaccard: if union == 0 { 1.0 } else { both as f64 / union as f64 },
        hd95: None,
        asd: None,
        hd95_mm: None,
        asd_mm: None,
        prediction_voxels: np,
        reference_voxels: nr,
        empty_prediction: np == 0,
        empty_reference: nr == 0,
        calibration: None,
    };
    if np == 0 {
        if empty == EmptyPolicy::Zeros {
            m = CaseMetrics {
                dice: 0.0,
                jaccard: 0.0,
                hd95: Some(0.0),
                asd: Some(0.0),
                hd95_mm: Some(0.0),
                asd_mm: Some(0.0),
                ..m
            };
        }
        return m;
    }
    let Some(surfaces) = Surfaces::new(prediction, reference, dims) else {
        return m; // empty reference: distances undefined
    };
    let (hd95, asd) = surfaces.hd95_asd([1.0; 3]);
    let (hd95_mm, asd_mm) = if spacing == [1.0; 3] { (hd95, asd) } else { surfaces.hd95_asd(spacing) };
    CaseMetrics { hd95: Some(hd95), asd: Some(asd), hd95_mm: Some(hd95_mm), asd_mm: Some(asd_mm), ..m }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_interpolate_percentiles_like_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], 95) == 8.8
        assert!((percentile(&mut [10.0, 1.0, 4.0, 3.0, 2.0], 95.0) - 8.8).abs() < 1e-12);
        assert_eq!(percentile(&mut [3.0], 95.0), 3.0);
        assert_eq!(percentile(&mut [1.0, 2.0], 100.0), 2.0);
    }

    #[test]
    fn should_mark_border_voxels_as_surface() {
        let mask = vec![true; 27];
        let s = surface(&mask, [3, 3, 3]);
        assert_eq!(s.iter().filter(|&&b| b).count(), 26, "only the centre is interior");
        assert!(!s[13]);
    }

    #[test]
    fn should_score_an_empty_prediction_as_zeros_by_default() {
        let (p, r) = (vec![false; 8], vec![true; 8]);
        let m = mask_metrics(&p, &r, [2, 2, 2], [1.0; 3], EmptyPolicy::Zeros);
        assert!(m.empty_prediction && !m.empty_reference);
        assert_eq!((m.dice, m.hd95, m.asd_mm), (0.0, Some(0.0), Some(0.0)));
        let m = mask_metrics(&p, &r, [2, 2, 2], [1.0; 3], EmptyPolicy::Undefined);
        assert_eq!((m.dice, m.hd95), (0.0, None));
    }
}
