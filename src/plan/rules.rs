//! The planner's rules, each a plain function of the fingerprint's figures: the voxel size, the
//! median case at it, the patch (multiples of 16, bounded by the median case, shaped like it,
//! shrunk until it fits), the schedule scaled to a run's length, and the evaluation stride.

use crate::data::fingerprint::{percentile, CaseFingerprint, Fingerprint};
use crate::recipe;

/// The V-Net halves each side four times: every side of a patch is a multiple of this.
pub const MULTIPLE: usize = 16;
/// nnU-Net's anisotropy threshold: the coarsest axis more than this many times the finest.
pub const ANISOTROPY: f64 = 3.0;
/// nnU-Net's percentile of the coarse axis' voxel sizes for anisotropic data.
pub const ANISOTROPIC_PERCENTILE: f64 = 10.0;
/// Smallest side a patch is shrunk to before the network is made narrower: the V-Net's
/// bottleneck then still sees 4 voxels per side (a side shorter than the median case's
/// rounded-up side is that instead).
pub const MIN_SIDE: usize = 64;
/// Smallest side a time budget may shrink a patch to (2 voxels at the bottleneck).
pub const TIME_MIN_SIDE: usize = 32;
/// Two voxel sizes closer than this (relative) are the same.
const SAME_SPACING: f64 = 1e-3;

/// How the voxel size was chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VoxelRule {
    /// The import resampled every case to it (`preprocessing.json`).
    Resampled,
    /// Every training case is stored at it.
    Uniform,
    /// The median voxel size per axis.
    Median,
    /// The median, but on `axis`, more than [`ANISOTROPY`] times the finest, the
    /// [`ANISOTROPIC_PERCENTILE`]th percentile instead of the median `median`.
    Anisotropic {
        /// The coarse axis (0, 1, 2 for x, y, z).
        axis: usize,
        /// Its median voxel size, which the percentile replaced.
        median: f64,
    },
}

/// The planned voxel size and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoxelChoice {
    /// Millimetres per voxel `[x, y, z]`.
    pub spacing: [f64; 3],
    /// Which rule gave it.
    pub rule: VoxelRule,
    /// Training cases stored at it ([`at_voxel_size`]; the others must be re-imported at it).
    pub cases_at_it: usize,
    /// Training cases.
    pub training: usize,
}

fn same(a: [f64; 3], b: [f64; 3]) -> bool {
    (0..3).all(|i| (a[i] - b[i]).abs() <= SAME_SPACING * a[i].abs().max(b[i].abs()))
}

/// The median (numpy's) of `v`, sorted here.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

/// The voxel size to plan at: the one the import resampled to (`resampled_to`, from
/// `preprocessing.json`), else the one every training case shares, else the median per axis,
/// with nnU-Net's rule for anisotropic data: when the median's coarsest axis is more than
/// [`ANISOTROPY`] times its finest, that axis takes the [`ANISOTROPIC_PERCENTILE`]th percentile of
/// the cases' voxel sizes instead (never finer than the other axes' coarsest). `None` without
/// training cases.
pub fn voxel_size(fp: &Fingerprint, resampled_to: Option<[f64; 3]>) -> Option<VoxelChoice> {
    let spacings: Vec<[f64; 3]> = fp.training().map(|c| c.spacing).collect();
    let first = *spacings.first()?;
    let count_at = |s: [f64; 3]| fp.training().filter(|c| at_voxel_size(c, s)).count();
    let choice =
        |spacing, rule| Some(VoxelChoice { spacing, rule, cases_at_it: count_at(spacing), training: spacings.len() });
    if let Some(s) = resampled_to {
        return choice(s, VoxelRule::Resampled);
    }
    if spacings.iter().all(|&s| same(s, first)) {
        return choice(first, VoxelRule::Uniform);
    }
    let mut target = [0, 1, 2].map(|a| median(spacings.iter().map(|s| s[a]).collect()));
    let coarse = (0..3).max_by(|&a, &b| target[a].total_cmp(&target[b])).unwrap_or(2);
    let finest = target.iter().copied().fold(f64::INFINITY, f64::min);
    if target[coarse] > ANISOTROPY * finest {
        let mut along: Vec<f64> = spacings.iter().map(|s| s[coarse]).collect();
        along.sort_by(f64::total_cmp);
        let others = (0..3).filter(|&a| a != coarse).map(|a| target[a]).fold(0.0, f64::max);
        let median = target[coarse];
        target[coarse] = percentile(&along, ANISOTROPIC_PERCENTILE).max(others);
        return choice(target, VoxelRule::Anisotropic { axis: coarse, median });
    }
    choice(target, VoxelRule::Median)
}

/// Two voxel sizes this close (relative, per axis) need no resampling between them: an import's
/// rounding to whole voxels moves a case's voxel size by a percent or two, and anatomy a tenth
/// larger or smaller in voxels is within what the random crop and the cases' own variation show.
pub const CLOSE_SPACING: f64 = 0.1;

/// Whether `case` is stored at (close enough to) the voxel size `spacing`: every axis within
/// [`CLOSE_SPACING`] of it.
pub fn at_voxel_size(case: &CaseFingerprint, spacing: [f64; 3]) -> bool {
    (0..3).all(|a| (case.spacing[a] - spacing[a]).abs() <= CLOSE_SPACING * spacing[a])
}

/// A case's shape at the voxel size `spacing` (its extent over the voxel size).
pub fn shape_at(case: &CaseFingerprint, spacing: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|a| case.shape[a] as f64 * case.spacing[a] / spacing[a])
}

/// The median shape of the training cases at `spacing`, per axis.
pub fn median_shape(fp: &Fingerprint, spacing: [f64; 3]) -> [f64; 3] {
    let shapes: Vec<[f64; 3]> = fp.training().map(|c| shape_at(c, spacing)).collect();
    [0, 1, 2].map(|a| median(shapes.iter().map(|s| s[a]).collect()))
}

/// `v` rounded up to a multiple of [`MULTIPLE`] (at least one multiple).
pub fn round_up(v: f64) -> usize {
    let n = (v.max(1.0) / MULTIPLE as f64 - 1e-9).ceil().max(1.0);
    n as usize * MULTIPLE
}

/// The largest patch the rules allow: the median case's shape rounded up to multiples of 16.
pub fn patch_cap(median: [f64; 3]) -> [usize; 3] {
    median.map(round_up)
}

/// The patches from `cap` down, one side 16 smaller at each step, until every side is at
/// `floor` (or below it where `cap` is): each step shortens the side that is largest relative to
/// the median case's (`median`), so the patch keeps the median case's shape. Ties go to the longer
/// side, then to the first axis.
pub fn shrinking(cap: [usize; 3], median: [f64; 3], floor: usize) -> Vec<[usize; 3]> {
    let floor = cap.map(|c| c.min(round_up(floor as f64)));
    let mut p = cap;
    let mut out = vec![p];
    loop {
        let axis = (0..3).filter(|&a| p[a] >= floor[a] + MULTIPLE).max_by(|&a, &b| {
            let (ra, rb) = (p[a] as f64 / median[a].max(1.0), p[b] as f64 / median[b].max(1.0));
            ra.total_cmp(&rb).then(p[a].cmp(&p[b])).then(b.cmp(&a))
        });
        let Some(a) = axis else { return out };
        p[a] -= MULTIPLE;
        out.push(p);
    }
}

/// The first of `candidates` for which `fits` holds (the largest, when they shrink).
pub fn first_fitting(candidates: &[[usize; 3]], mut fits: impl FnMut([usize; 3]) -> bool) -> Option<[usize; 3]> {
    candidates.iter().copied().find(|&p| fits(p))
}

/// The learning-rate drop and the consistency ramp's unit for a run of `iterations`, scaled from
/// the recipe's 2500 and 150 of 6000 as `ops/la-cpu` scales them (at least 1 each).
pub fn scaled_schedule(iterations: i64) -> (i64, i64) {
    let scale = |v: i64| ((v as f64 * iterations as f64 / recipe::ITERATIONS as f64).round() as i64).max(1);
    (scale(recipe::LR_STEP), scale(recipe::CONSISTENCY_INTERVAL))
}

/// The reference's sliding-window density for a window of `patch`: its stride is the same
/// fraction of the window per axis as LA's 18/18/4 of 112x112x80.
pub fn reference_stride(patch: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| {
        let s = patch[a] as f64 * recipe::STRIDE[a] as f64 / recipe::PATCH[a] as f64;
        (s.round() as usize).clamp(1, patch[a])
    })
}

/// nnU-Net's sliding-window density: half a window per step.
pub fn half_stride(patch: [usize; 3]) -> [usize; 3] {
    patch.map(|p| (p / 2).max(1))
}

/// Windows covering a voxel inside a volume, about: the product of window over stride per axis.
pub fn coverage(patch: [usize; 3], stride: [usize; 3]) -> f64 {
    (0..3).map(|a| patch[a] as f64 / stride[a].max(1) as f64).product()
}

/// Windows of `patch` at `stride` over a volume of `dims` (padded to the window where smaller),
/// as the sliding window places them.
pub fn windows(dims: [usize; 3], patch: [usize; 3], stride: [usize; 3]) -> usize {
    (0..3)
        .map(|a| {
            let padded = dims[a].max(patch[a]);
            crate::eval::infer::window_starts(padded, patch[a], stride[a].max(1)).len()
        })
        .product()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fingerprint::{Counts, Split};

    fn case(shape: [usize; 3], spacing: [f64; 3], split: Split) -> CaseFingerprint {
        CaseFingerprint {
            id: format!("c{}", shape[0]),
            split,
            shape,
            spacing,
            orientation: "RAS".into(),
            extent_mm: [0, 1, 2].map(|a| shape[a] as f64 * spacing[a]),
            has_label: true,
            foreground: None,
        }
    }

    fn fp(cases: Vec<CaseFingerprint>) -> Fingerprint {
        Fingerprint {
            version: 1,
            key: Vec::new(),
            counts: Counts { labelled: cases.len(), unlabelled: 0, test: 0, test_labelled: 0 },
            cases,
            classes: Vec::new(),
            foreground_intensity: None,
        }
    }

    #[test]
    fn anisotropic_data_take_a_low_percentile_on_the_coarse_axis() {
        // z is 5 mm in most cases, 4 mm in a few: more than 3x the 1 mm in-plane voxels.
        let mut cases: Vec<_> = (0..8).map(|i| case([100 + i, 100, 20], [1.0, 1.0, 5.0], Split::Labelled)).collect();
        cases.push(case([100, 100, 25], [1.0, 1.0, 4.0], Split::Unlabelled));
        cases.push(case([100, 100, 25], [0.9, 0.9, 4.0], Split::Unlabelled));
        cases.push(case([90, 90, 40], [1.0, 1.0, 1.0], Split::Test)); // test cases do not vote
        let v = voxel_size(&fp(cases), None).unwrap();
        assert_eq!(v.rule, VoxelRule::Anisotropic { axis: 2, median: 5.0 });
        // numpy: np.percentile([4, 4, 5, 5, 5, 5, 5, 5, 5, 5], 10) = 4.0
        assert_eq!(v.spacing, [1.0, 1.0, 4.0]);
        // At it: the 4 mm cases (0.9 mm in plane is within a tenth of 1), not the 5 mm ones.
        assert_eq!((v.cases_at_it, v.training), (2, 10));
    }

    #[test]
    fn nearly_isotropic_data_take_the_median_and_a_shared_voxel_size_is_kept() {
        let cases = vec![
            case([100, 100, 50], [1.0, 1.0, 2.5], Split::Labelled),
            case([100, 100, 50], [1.2, 1.2, 2.0], Split::Labelled),
            case([100, 100, 50], [0.8, 0.8, 3.0], Split::Unlabelled),
        ];
        let v = voxel_size(&fp(cases), None).unwrap();
        assert_eq!(v.rule, VoxelRule::Median);
        assert_eq!(v.spacing, [1.0, 1.0, 2.5]);
        // Exactly 3x is not more than 3x.
        let uniform = vec![case([64, 64, 64], [0.5, 0.5, 1.5], Split::Labelled); 3];
        let v = voxel_size(&fp(uniform), None).unwrap();
        assert_eq!((v.rule, v.spacing, v.cases_at_it), (VoxelRule::Uniform, [0.5, 0.5, 1.5], 3));
        let v = voxel_size(&fp(vec![case([64, 64, 64], [1.0; 3], Split::Labelled)]), Some([1.5; 3])).unwrap();
        assert_eq!((v.rule, v.spacing, v.cases_at_it), (VoxelRule::Resampled, [1.5; 3], 0));
        assert!(voxel_size(&fp(vec![case([9, 9, 9], [1.0; 3], Split::Test)]), None).is_none());
    }

    #[test]
    fn the_anisotropic_percentile_is_never_finer_than_the_in_plane_voxels() {
        // Half the cases at 4 mm, half at 0.3 mm: the median (2.15) is anisotropic, the 10th
        // percentile (0.3) finer than the 0.5 mm in-plane voxels, so 0.5 it is.
        let mut cases: Vec<_> = (0..5).map(|_| case([50, 50, 10], [0.5, 0.5, 4.0], Split::Labelled)).collect();
        cases.extend((0..5).map(|_| case([50, 50, 10], [0.5, 0.5, 0.3], Split::Labelled)));
        let v = voxel_size(&fp(cases), None).unwrap();
        assert!(matches!(v.rule, VoxelRule::Anisotropic { axis: 2, median } if (median - 2.15).abs() < 1e-9));
        assert_eq!(v.spacing, [0.5, 0.5, 0.5]);
    }

    #[test]
    fn a_case_resampled_to_a_voxel_size_counts_as_stored_at_it() {
        // An import to 3.7 mm keeps the field of view: 17 slices of 3.7059 mm for 63 mm.
        let c = case([24, 20, 17], [0.75, 0.75, 3.7059], Split::Labelled);
        assert!(at_voxel_size(&c, [0.75, 0.75, 3.7]));
        assert!(at_voxel_size(&c, [0.8, 0.7, 3.5]), "within a tenth on every axis");
        assert!(!at_voxel_size(&c, [0.75, 0.75, 3.3]));
        assert!(!at_voxel_size(&case([24, 20, 14], [0.75, 0.75, 4.5], Split::Labelled), [0.75, 0.75, 3.7]));
    }

    #[test]
    fn the_median_shape_is_taken_at_the_planned_voxel_size() {
        let cases = vec![
            case([100, 80, 40], [1.0, 1.0, 2.0], Split::Labelled),
            case([200, 160, 80], [0.5, 0.5, 1.0], Split::Labelled),
            case([120, 90, 30], [1.0, 1.0, 2.0], Split::Unlabelled),
        ];
        let m = median_shape(&fp(cases), [1.0, 1.0, 1.0]);
        assert_eq!(m, [100.0, 80.0, 80.0]);
        assert_eq!(patch_cap(m), [112, 80, 80]);
        assert_eq!(patch_cap([1.0, 16.0, 16.5]), [16, 16, 32]);
    }

    #[test]
    fn patches_are_multiples_of_16_within_the_median_shape_and_keep_its_shape() {
        let median = [192.0, 142.5, 88.0]; // LA's median case
        let cap = patch_cap(median);
        assert_eq!(cap, [192, 144, 96]);
        let seq = shrinking(cap, median, MIN_SIDE);
        assert_eq!(seq[0], cap);
        for w in seq.windows(2) {
            let shrunk: Vec<usize> = (0..3).filter(|&a| w[0][a] != w[1][a]).collect();
            assert_eq!(shrunk.len(), 1, "{w:?}");
            assert_eq!(w[0][shrunk[0]] - w[1][shrunk[0]], MULTIPLE);
        }
        for p in &seq {
            assert!(p.iter().all(|s| s % 16 == 0 && *s >= 64), "{p:?}");
            assert!((0..3).all(|a| p[a] <= cap[a]));
            // Shaped like the median case: no side more than 16 voxels (or 1.6x) off its share.
            let r: Vec<f64> = (0..3).map(|a| p[a] as f64 / median[a]).collect();
            let (lo, hi) = (r.iter().cloned().fold(9.0, f64::min), r.iter().cloned().fold(0.0, f64::max));
            assert!(hi / lo < 1.6 || p.contains(&64), "{p:?} {r:?}");
        }
        assert_eq!(*seq.last().unwrap(), [64, 64, 64]);
        // A side shorter than the floor stays as the median case has it.
        let small = shrinking([32, 128, 128], [20.0, 120.0, 120.0], MIN_SIDE);
        assert!(small.iter().all(|p| p[0] == 32));
        assert_eq!(*small.last().unwrap(), [32, 64, 64]);
    }

    #[test]
    fn the_largest_patch_within_a_memory_bound_is_chosen() {
        let median = [160.0, 160.0, 96.0];
        let seq = shrinking(patch_cap(median), median, MIN_SIDE);
        let voxels = |p: [usize; 3]| p.iter().product::<usize>();
        let bound = 1_000_000;
        let p = first_fitting(&seq, |p| voxels(p) <= bound).unwrap();
        assert!(voxels(p) <= bound);
        // Every larger patch of the sequence is over the bound.
        let i = seq.iter().position(|&q| q == p).unwrap();
        assert!(seq[..i].iter().all(|&q| voxels(q) > bound));
        assert!(first_fitting(&seq, |p| voxels(p) < 64 * 64 * 64).is_none());
    }

    #[test]
    fn the_schedule_scales_as_ops_la_cpu_scales_it() {
        assert_eq!(scaled_schedule(6000), (2500, 150));
        assert_eq!(scaled_schedule(2000), (833, 50));
        assert_eq!(scaled_schedule(12), (5, 1));
    }

    #[test]
    fn the_reference_stride_is_la_s_and_windows_are_counted_as_the_sliding_window_places_them() {
        assert_eq!(reference_stride([112, 112, 80]), [18, 18, 4]);
        assert_eq!(half_stride([112, 112, 80]), [56, 56, 40]);
        assert!((coverage([112, 112, 80], [18, 18, 4]) - 774.3).abs() < 0.1);
        // ceil((130 - 112) / 18) + 1 = 2 windows along x; a side smaller than the window: 1.
        assert_eq!(windows([130, 112, 60], [112, 112, 80], [18, 18, 4]), 2);
        // ceil(64 / 56) + 1 = 3, ceil(20 / 56) + 1 = 2, ceil(8 / 40) + 1 = 2.
        assert_eq!(windows([176, 132, 88], [112, 112, 80], [56, 56, 40]), 3 * 2 * 2);
    }
}
