//! The calibration metrics (ECE, Brier score, uncertainty AUROC) against an independent Python
//! computation (tests/oracle/calibration_sklearn.py: numpy from the definitions, scikit-learn's
//! `roc_auc_score`) on generated maps: ties, signed zeros, probabilities on the bins' edges, a
//! case without wrong voxels and one without right voxels (AUROC undefined), an empty label, a
//! multi-label reference, a single voxel.

mod support;

use support::{oracle_output, Fixture};
use tch::{Kind, Tensor};
use uamt::eval::calibration::{Calibration, Reliability, BINS};

/// Agreement asked of every metric.
const TOL: f64 = 1e-4;

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1])).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(&t.to_kind(Kind::Uint8).reshape([-1])).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn should_agree_with_numpy_and_scikit_learn() {
    let dir = oracle_output("tests/oracle/calibration_sklearn.py");
    let fx = Fixture::load(dir.join("calibration.npz"));
    let names: Vec<String> =
        std::fs::read_to_string(dir.join("names.txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(names.len() as f64, fx.scalar("count"));
    let mut pooled = Reliability::default();
    let mut worst = 0f64;
    for (i, name) in names.iter().enumerate() {
        let get = |k: &str| fx.get(&format!("c{i}.{k}"));
        let (p, pred, reference, unc) = (f32s(&get("prob")), u8s(&get("pred")), u8s(&get("ref")), f32s(&get("unc")));
        let want = f64s(&get("expect"));
        let (c, bins): (Calibration, Reliability) = Calibration::of(&p, &pred, &reference, &unc).unwrap();
        pooled.merge(&bins);
        for (what, got, want) in
            [("ece", c.ece, want[0]), ("brier", c.brier, want[1]), ("uncertainty_auroc", c.uncertainty_auroc, want[2])]
        {
            match got {
                Some(g) => {
                    assert!(!want.is_nan(), "{name}: {what} is {g} here, undefined in the oracle");
                    worst = worst.max((g - want).abs());
                    assert!((g - want).abs() <= TOL, "{name}: {what} {g}, oracle {want}");
                }
                None => assert!(want.is_nan(), "{name}: {what} undefined here, oracle {want}"),
            }
        }
    }
    // The pooled bins of the reliability diagram, bin by bin.
    let want = f64s(&fx.get("pooled"));
    for k in 0..BINS {
        assert_eq!(pooled.voxels[k] as f64, want[k], "bin {k}: voxels");
        assert!((pooled.probability_sum[k] - want[BINS + k]).abs() <= 1e-6 * want[BINS + k].max(1.0), "bin {k}");
        assert_eq!(pooled.foreground[k] as f64, want[2 * BINS + k], "bin {k}: foreground");
    }
    eprintln!("largest difference from the oracle: {worst:.2e}");
    // The fixture covers what it claims to.
    for must in ["ties", "signed_zeros", "no_wrong_voxel", "no_right_voxel", "empty_label"] {
        assert!(names.iter().any(|n| n == must), "fixture lacks {must}");
    }
}
