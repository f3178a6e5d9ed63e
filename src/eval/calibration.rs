//! How far the probabilities and the uncertainty of a segmentation can be trusted, per voxel:
//!
//! - **ECE** (expected calibration error) of the foreground probability: the voxels are put in
//!   [`BINS`] equal-width bins of their probability over [0, 1] (bin `k` holds `k/15 <= p <
//!   (k+1)/15`, the last one also `p = 1`), and `ECE = sum_k (n_k / N) |mean p in bin k - share of
//!   foreground voxels in bin k|` over the non-empty bins.
//! - **Brier score**: `mean_i (p_i - y_i)^2`, `y_i` 1 on the reference's foreground, else 0.
//! - **Uncertainty AUROC**: the area under the ROC curve of the voxel uncertainty as a detector of
//!   the wrongly labelled voxels (predicted label != reference label), i.e. the Mann-Whitney
//!   probability that a wrong voxel is more uncertain than a right one, ties counting one half
//!   (what scikit-learn's `roc_auc_score` computes). Undefined (`None`) when a case has no wrong
//!   voxel or no right one.
//!
//! Everything works on flat slices of the same length (one entry per voxel, any order);
//! labels are `u8` with every non-zero label foreground (as [`super::metrics`] reads them).
//! A non-finite probability or uncertainty makes the metrics that read it undefined rather than
//! a number.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Bins of the calibration error and of the reliability diagram.
pub const BINS: usize = 15;

/// The bin of probability `p` (assumed finite): `floor(15 p)`, clamped to `0..BINS`, so that
/// `p = 1` falls in the last bin (values outside [0, 1] in the end bins).
pub fn bin_of(p: f32) -> usize {
    // 15 p is exact in f64 for every f32 p: the bins' edges are where the definition puts them.
    ((p as f64 * BINS as f64).floor().max(0.0) as usize).min(BINS - 1)
}

/// Voxel counts per probability bin: what the calibration error and the reliability diagram
/// are computed from. Sums, so that cases pool exactly ([`Reliability::merge`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reliability {
    /// Voxels per bin (bin `k`: predicted probability in `[k/15, (k+1)/15)`, the last bin closed).
    pub voxels: [u64; BINS],
    /// Sum of the predicted probabilities of the voxels of each bin.
    pub probability_sum: [f64; BINS],
    /// Reference foreground voxels per bin.
    pub foreground: [u64; BINS],
    /// Voxels left out because their probability is not a finite number.
    #[serde(default)]
    pub non_finite: u64,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability { voxels: [0; BINS], probability_sum: [0.0; BINS], foreground: [0; BINS], non_finite: 0 }
    }
}

impl Reliability {
    /// The bins of `probability` against `label` (non-zero: foreground).
    pub fn of(probability: &[f32], label: &[u8]) -> Result<Self> {
        same_length("labels", probability.len(), label.len())?;
        let mut r = Reliability::default();
        for (&p, &l) in probability.iter().zip(label) {
            if !p.is_finite() {
                r.non_finite += 1;
                continue;
            }
            let k = bin_of(p);
            r.voxels[k] += 1;
            r.probability_sum[k] += p as f64;
            r.foreground[k] += (l != 0) as u64;
        }
        Ok(r)
    }

    /// Adds the voxels of `other`.
    pub fn merge(&mut self, other: &Reliability) {
        for k in 0..BINS {
            self.voxels[k] += other.voxels[k];
            self.probability_sum[k] += other.probability_sum[k];
            self.foreground[k] += other.foreground[k];
        }
        self.non_finite += other.non_finite;
    }

    /// Voxels counted in the bins.
    pub fn total(&self) -> u64 {
        self.voxels.iter().sum()
    }

    /// Mean predicted probability in bin `k` (`None` when the bin is empty).
    pub fn mean_probability(&self, k: usize) -> Option<f64> {
        (self.voxels[k] > 0).then(|| self.probability_sum[k] / self.voxels[k] as f64)
    }

    /// Share of foreground voxels in bin `k` (`None` when the bin is empty).
    pub fn frequency(&self, k: usize) -> Option<f64> {
        (self.voxels[k] > 0).then(|| self.foreground[k] as f64 / self.voxels[k] as f64)
    }

    /// The expected calibration error, `sum_k (n_k / N) |mean p_k - frequency_k|`; `None` with no
    /// voxel or when some probability was not finite.
    pub fn ece(&self) -> Option<f64> {
        let n = self.total();
        if n == 0 || self.non_finite > 0 {
            return None;
        }
        // (n_k / N) |sum p / n_k - fg / n_k| = |sum p - fg| / N.
        let gap: f64 = (0..BINS).map(|k| (self.probability_sum[k] - self.foreground[k] as f64).abs()).sum();
        Some(gap / n as f64)
    }
}

/// The expected calibration error of `probability` against `label` (see [`Reliability::ece`]).
pub fn ece(probability: &[f32], label: &[u8]) -> Result<Option<f64>> {
    Ok(Reliability::of(probability, label)?.ece())
}

/// The Brier score `mean (p - y)^2`; `None` with no voxel or a non-finite probability.
pub fn brier(probability: &[f32], label: &[u8]) -> Result<Option<f64>> {
    same_length("labels", probability.len(), label.len())?;
    if probability.is_empty() {
        return Ok(None);
    }
    let sum: f64 = probability
        .iter()
        .zip(label)
        .map(|(&p, &l)| {
            let d = p as f64 - (l != 0) as u8 as f64;
            d * d
        })
        .sum();
    let mean = sum / probability.len() as f64;
    Ok(mean.is_finite().then_some(mean))
}

/// A key whose unsigned order is the numeric order of finite `x` (-0 and +0 equal).
fn order_key(x: f32) -> u32 {
    let bits = (x + 0.0).to_bits(); // -0 + 0 = +0
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The area under the ROC curve of `score` as a detector of `positive`: the share of
/// (positive, negative) pairs where the positive scores higher, ties counting one half (the
/// Mann-Whitney U over `n_pos * n_neg`, what scikit-learn's `roc_auc_score` gives). `None` when
/// there is no positive, no negative, or a non-finite score.
pub fn auroc(score: &[f32], positive: &[bool]) -> Result<Option<f64>> {
    same_length("positives", score.len(), positive.len())?;
    if score.iter().any(|s| !s.is_finite()) {
        return Ok(None);
    }
    // Two sorted key lists (4 bytes a voxel in all), walked together.
    let (mut pos, mut neg): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    for (&s, &p) in score.iter().zip(positive) {
        if p {
            pos.push(order_key(s));
        } else {
            neg.push(order_key(s));
        }
    }
    if pos.is_empty() || neg.is_empty() {
        return Ok(None);
    }
    pos.sort_unstable();
    neg.sort_unstable();
    // 2U = sum over positives of (2 * negatives below + negatives equal): an exact integer.
    let (mut twice_u, mut below, mut i) = (0u128, 0u64, 0usize);
    let mut j = 0usize;
    while i < pos.len() {
        let v = pos[i];
        let run = pos[i..].iter().take_while(|&&k| k == v).count() as u64;
        while j < neg.len() && neg[j] < v {
            j += 1;
            below += 1;
        }
        let equal = neg[j..].iter().take_while(|&&k| k == v).count() as u64;
        twice_u += run as u128 * (2 * below + equal) as u128;
        i += run as usize;
    }
    let pairs = pos.len() as f64 * neg.len() as f64;
    Ok(Some(twice_u as f64 / (2.0 * pairs)))
}

/// [`auroc`] of `uncertainty` as a detector of the voxels where `predicted` differs from
/// `reference`.
pub fn uncertainty_auroc(uncertainty: &[f32], predicted: &[u8], reference: &[u8]) -> Result<Option<f64>> {
    same_length("predicted labels", uncertainty.len(), predicted.len())?;
    same_length("reference labels", uncertainty.len(), reference.len())?;
    let wrong: Vec<bool> = predicted.iter().zip(reference).map(|(p, r)| p != r).collect();
    auroc(uncertainty, &wrong)
}

/// The calibration metrics of one case. A metric is `None` where it is undefined: AUROC when the
/// case has no wrong voxel or no right one; any of them over a non-finite value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Expected calibration error of the foreground probability ([`BINS`] bins).
    pub ece: Option<f64>,
    /// Brier score of the foreground probability.
    pub brier: Option<f64>,
    /// AUROC of the uncertainty as a detector of wrongly labelled voxels.
    pub uncertainty_auroc: Option<f64>,
}

impl Calibration {
    /// The metrics of one case and its reliability bins, from the foreground `probability`, the
    /// `predicted` and `reference` labels and the `uncertainty`, one entry per voxel each.
    pub fn of(
        probability: &[f32],
        predicted: &[u8],
        reference: &[u8],
        uncertainty: &[f32],
    ) -> Result<(Calibration, Reliability)> {
        let bins = Reliability::of(probability, reference)?;
        let c = Calibration {
            ece: bins.ece(),
            brier: brier(probability, reference)?,
            uncertainty_auroc: uncertainty_auroc(uncertainty, predicted, reference)?,
        };
        Ok((c, bins))
    }
}

/// Which uncertainty a report's `uncertainty_auroc` scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UncertaintySource {
    /// The entropy of the sliding-window prediction (no extra passes).
    Entropy,
    /// The Monte-Carlo uncertainty (see [`super::mc_uncertainty`]): of the checkpoint's teacher
    /// when `teacher`, else of the evaluated model itself.
    MonteCarlo {
        /// Passes per window.
        passes: usize,
        /// Seed of the noise and dropout.
        seed: u64,
        /// Drawn from a teacher rather than the evaluated model.
        teacher: bool,
    },
}

impl std::fmt::Display for UncertaintySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UncertaintySource::Entropy => write!(f, "entropy of the prediction"),
            UncertaintySource::MonteCarlo { passes, seed, teacher } => write!(
                f,
                "Monte-Carlo entropy of the {}, {passes} passes, seed {seed}",
                if *teacher { "teacher" } else { "evaluated model" }
            ),
        }
    }
}

fn same_length(what: &str, want: usize, got: usize) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::shape(what, format!("{want} voxels, as the probabilities"), [got as i64]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: Option<f64>, want: f64) {
        let g = got.expect("defined");
        assert!((g - want).abs() < 1e-12, "got {g}, want {want}");
    }

    #[test]
    fn bins_have_their_edges_where_the_definition_puts_them() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.0666), 0);
        assert_eq!(bin_of(0.0667), 1);
        assert_eq!(bin_of(0.5), 7);
        assert_eq!(bin_of(0.99), 14);
        assert_eq!(bin_of(1.0), 14, "1 falls in the last bin");
        assert_eq!((bin_of(-0.1), bin_of(1.5)), (0, 14));
    }

    #[test]
    fn ece_by_hand() {
        // Bin 0: p 0.0 and 0.06, labels 0 and 1: mean p 0.03, frequency 0.5: |0.47| * 2/5.
        // Bin 7: p 0.5, label 1: |0.5 - 1| * 1/5.
        // Bin 14: p 0.95 and 1.0, labels 1 and 1: |0.975 - 1| * 2/5.
        let p = [0.0, 0.06, 0.5, 0.95, 1.0];
        let y = [0, 1, 1, 1, 2]; // 2: foreground too
        let want = 0.47 * 0.4 + 0.5 * 0.2 + 0.025 * 0.4;
        let got = ece(&p, &y).unwrap().unwrap();
        assert!((got - want).abs() < 1e-7, "{got} vs {want}"); // f32 inputs
                                                               // A perfectly calibrated map: p = 0.2 with one voxel in five foreground.
        close(ece(&[0.2; 5], &[1, 0, 0, 0, 0]).unwrap().map(|e| (e * 1e6).round() / 1e6), 0.0);
        assert_eq!(ece(&[], &[]).unwrap(), None);
        assert_eq!(ece(&[0.5, f32::NAN], &[0, 1]).unwrap(), None);
    }

    #[test]
    fn brier_by_hand() {
        // (0.25)^2 + (1 - 0.75)^2 + 0 + 1: 1.125 / 4.
        close(brier(&[0.25, 0.75, 0.0, 1.0], &[0, 1, 0, 0]).unwrap(), 1.125 / 4.0);
        assert_eq!(brier(&[], &[]).unwrap(), None);
        assert!(brier(&[0.5], &[0, 1]).is_err(), "lengths differ");
    }

    #[test]
    fn auroc_by_hand_with_ties() {
        // Positives 0.8, 0.4; negatives 0.4, 0.1, 0.1: pairs above 0.8>all 3, 0.4>0.1 x2, 0.4=0.4
        // half: (3 + 2 + 0.5) / 6.
        let s = [0.8, 0.4, 0.4, 0.1, 0.1];
        let y = [true, true, false, false, false];
        close(auroc(&s, &y).unwrap(), 5.5 / 6.0);
        // Everything tied: one half.
        close(auroc(&[0.3; 4], &[true, false, true, false]).unwrap(), 0.5);
        // -0 and +0 tie; negative scores order below them.
        close(auroc(&[-0.0, 0.0, -1e-7], &[true, false, false]).unwrap(), 0.75);
        // Perfect and inverted detectors.
        close(auroc(&[0.9, 0.8, 0.1], &[true, true, false]).unwrap(), 1.0);
        close(auroc(&[0.1, 0.8, 0.9], &[true, false, false]).unwrap(), 0.0);
    }

    #[test]
    fn auroc_is_undefined_without_both_classes_or_over_nan() {
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]).unwrap(), None);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]).unwrap(), None);
        assert_eq!(auroc(&[], &[]).unwrap(), None);
        assert_eq!(auroc(&[0.1, f32::NAN], &[true, false]).unwrap(), None);
        // No wrong voxel: the prediction equals the reference.
        assert_eq!(uncertainty_auroc(&[0.1, 0.5], &[0, 1], &[0, 1]).unwrap(), None);
        // Multi-label: a wrong class is wrong.
        close(uncertainty_auroc(&[0.9, 0.1], &[2, 1], &[1, 1]).unwrap(), 1.0);
    }

    #[test]
    fn cases_pool_into_the_bins_of_all_their_voxels() {
        let (p, y) = ([0.1f32, 0.5, 0.95, 0.99], [0u8, 1, 1, 0]);
        let mut pooled = Reliability::of(&p[..2], &y[..2]).unwrap();
        pooled.merge(&Reliability::of(&p[2..], &y[2..]).unwrap());
        assert_eq!(pooled, Reliability::of(&p, &y).unwrap());
        assert_eq!(pooled.total(), 4);
        assert_eq!(pooled.voxels[14], 2);
        close(pooled.frequency(14), 0.5);
        close(pooled.mean_probability(14).map(|m| (m * 1e6).round() / 1e6), 0.97);
        assert_eq!(pooled.mean_probability(3), None);
    }

    #[test]
    fn one_case_s_metrics_together() {
        let (c, bins) = Calibration::of(&[0.9, 0.2, 0.6], &[1, 0, 1], &[1, 0, 0], &[0.1, 0.2, 0.6]).unwrap();
        assert_eq!(bins.total(), 3);
        close(c.uncertainty_auroc, 1.0); // the one wrong voxel is the most uncertain
        assert!(c.ece.unwrap() > 0.0 && c.brier.unwrap() > 0.0);
        assert!(Calibration::of(&[0.9], &[1], &[1], &[0.1, 0.2]).is_err());
    }
}
