//! Surface metrics and the distance transform against medpy and scipy, run from Python on
//! generated masks (tests/oracle/eval_medpy.py): blobs, anisotropic spacing, masks touching the
//! border, single voxels, thin sheets, salt noise, multi-label predictions, a one-slice volume
//! and empty masks.

mod support;

use support::{oracle_output, Fixture};
use tch::{Kind, Tensor};
use uamt::data::Volume;
use uamt::eval::edt::edt;
use uamt::eval::metrics::{case_metrics, EmptyPolicy};

const TOL: f64 = 1e-6;

fn volume(t: &Tensor) -> Volume<u8> {
    Volume::from_tensor(t).expect("[X, Y, Z] mask")
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn close(what: &str, got: f64, want: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(err <= TOL || (got - want).abs() <= 1e-12, "{what}: got {got}, medpy {want} (relative error {err:.2e})");
}

#[test]
fn should_agree_with_medpy_on_generated_masks() {
    let dir = oracle_output("tests/oracle/eval_medpy.py");
    let fx = Fixture::load(dir.join("metrics.npz"));
    let names: Vec<String> =
        std::fs::read_to_string(dir.join("names.txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(names.len() as f64, fx.scalar("count"));
    for (i, name) in names.iter().enumerate() {
        let pred = volume(&fx.get(&format!("c{i}.pred")));
        let reference = volume(&fx.get(&format!("c{i}.ref")));
        let s = f64s(&fx.get(&format!("c{i}.spacing")));
        let want = f64s(&fx.get(&format!("c{i}.expect")));
        let m = case_metrics(&pred, &reference, [s[0], s[1], s[2]], EmptyPolicy::Zeros).unwrap();
        let got = [Some(m.dice), Some(m.jaccard), m.hd95, m.asd, m.hd95_mm, m.asd_mm];
        for (k, (g, w)) in ["dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"].iter().zip(got.iter().zip(&want)) {
            match g {
                Some(g) => close(&format!("{name}: {k}"), *g, *w),
                None => assert!(w.is_nan(), "{name}: {k} undefined here, medpy gives {w}"),
            }
        }
        let (np, nr) =
            (pred.data.iter().filter(|&&l| l != 0).count(), reference.data.iter().filter(|&&l| l != 0).count());
        assert_eq!((m.prediction_voxels, m.reference_voxels), (np, nr), "{name}");
        assert_eq!((m.empty_prediction, m.empty_reference), (np == 0, nr == 0), "{name}: empty flags");

        // Without the reference's zero scoring: medpy's own dc and jc, distances undefined.
        let u = case_metrics(&pred, &reference, [s[0], s[1], s[2]], EmptyPolicy::Undefined).unwrap();
        let dc_jc = f64s(&fx.get(&format!("c{i}.dc_jc")));
        // medpy's dc is NaN (0 / 0) when both masks are empty; we say 1, as its jc does.
        let want_dc = if dc_jc[0].is_nan() { 1.0 } else { dc_jc[0] };
        close(&format!("{name}: medpy dc"), u.dice, want_dc);
        close(&format!("{name}: medpy jc"), u.jaccard, dc_jc[1]);
        if np == 0 {
            assert_eq!((u.hd95, u.asd_mm), (None, None), "{name}: distances of an empty prediction are undefined");
        } else {
            assert_eq!(u.hd95, m.hd95, "{name}: the policy only concerns empty predictions");
        }
    }
    // The fixture covers what it claims to.
    for must in ["touching_borders", "empty_prediction", "empty_reference", "single_voxels", "one_slice_volume"] {
        assert!(names.iter().any(|n| n == must), "fixture lacks {must}");
    }
}

#[test]
fn should_refuse_masks_of_different_shapes_and_bad_spacing() {
    let a = Volume::<u8>::zeros([4, 4, 4]);
    let b = Volume::<u8>::zeros([4, 4, 5]);
    let e = case_metrics(&a, &b, [1.0; 3], EmptyPolicy::Zeros).unwrap_err().to_string();
    assert!(e.contains("[4, 4, 4]") && e.contains("[4, 4, 5]"), "{e}");
    let e = case_metrics(&a, &a, [1.0, 0.0, 1.0], EmptyPolicy::Zeros).unwrap_err().to_string();
    assert!(e.contains("spacing"), "{e}");
}

#[test]
fn should_agree_with_scipy_distance_transform() {
    let dir = oracle_output("tests/oracle/eval_medpy.py");
    let fx = Fixture::load(dir.join("edt.npz"));
    let n = fx.scalar("count") as usize;
    assert!(n >= 6);
    for i in 0..n {
        let feature = volume(&fx.get(&format!("e{i}.feature")));
        let s = f64s(&fx.get(&format!("e{i}.sampling")));
        let want = Volume::<f64>::from_tensor(&fx.get(&format!("e{i}.distance"))).unwrap();
        let mask: Vec<bool> = feature.data.iter().map(|&f| f != 0).collect();
        let got = edt(&mask, feature.dims, [s[0], s[1], s[2]]);
        let worst = got.iter().zip(&want.data).map(|(g, w)| (g - w).abs() / w.max(1e-12)).fold(0.0, f64::max);
        assert!(worst <= 1e-9, "edt case {i} {:?}: worst relative error {worst:.2e}", feature.dims);
    }
}
