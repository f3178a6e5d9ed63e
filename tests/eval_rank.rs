//! The ranking scores of `uamt rank` (src/eval/rank.rs) against an independent numpy / scipy
//! computation (tests/oracle/rank_numpy.py) on generated Monte-Carlo passes: predictive entropy,
//! BALD, the foreground-and-band region and the four per-volume means, including passes that
//! agree, one-hot passes, an empty prediction and a one-voxel-thick volume; and the one-sweep
//! maps against the sliding window and the Monte-Carlo uncertainty they must equal.

mod support;

use support::{oracle_output, Fixture};
use tch::{Device, Kind, Tensor};
use uamt::data::Volume;
use uamt::eval::rank::{case_scores, foreground_band, rank_maps, uncertainty_maps, PassMeans};
use uamt::eval::{mc_uncertainty, sliding_window, InferOptions, McOptions};
use uamt::model::{VNet, VNetConfig};

/// Agreement asked of the maps and the scores (float32 maps against float64 sums).
const TOL: f64 = 1e-5;

#[test]
fn should_agree_with_numpy_and_scipy() {
    let dir = oracle_output("tests/oracle/rank_numpy.py");
    let fx = Fixture::load(dir.join("rank.npz"));
    let names: Vec<String> =
        std::fs::read_to_string(dir.join("names.txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(names.len() as f64, fx.scalar("count"));
    let mut worst = 0f64;
    for (i, name) in names.iter().enumerate() {
        let get = |k: &str| fx.get(&format!("c{i}.{k}"));
        let probs = get("probs"); // [T, C, X, Y, Z]
        let classes = probs.size()[1];
        let mut means = PassMeans::default();
        for t in 0..probs.size()[0] {
            means.add(&probs.get(t).unsqueeze(0)).unwrap();
        }
        let all = means.finish().unwrap().get(0);
        let (h, bald) = uncertainty_maps(&all.narrow(0, 0, classes), &all.get(classes)).unwrap();
        for (what, got, want) in [("entropy", &h, get("entropy")), ("bald", &bald, get("bald"))] {
            let got = Volume::<f64>::from_tensor(got).unwrap().data;
            let want = Volume::<f64>::from_tensor(&want).unwrap().data;
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                worst = worst.max((g - w).abs());
                assert!((g - w).abs() <= TOL, "{name}: {what} at voxel {k}: {g}, oracle {w}");
            }
        }
        let labels = Volume::<u8>::from_tensor(&get("labels")).unwrap();
        let band = fx.scalar(&format!("c{i}.band"));
        let region = foreground_band(&labels, band);
        let want_region: Vec<bool> =
            Volume::<u8>::from_tensor(&get("region")).unwrap().data.into_iter().map(|r| r != 0).collect();
        assert_eq!(region, want_region, "{name}: the region (band {band})");
        let entropy = Volume::<f32>::from_tensor(&h).unwrap().data;
        let bald = Volume::<f32>::from_tensor(&bald).unwrap().data;
        let s = case_scores(&entropy, &bald, &region);
        let want = Vec::<f64>::try_from(&get("scores")).unwrap();
        for (what, got, want) in [
            ("entropy", s.entropy, want[0]),
            ("bald", s.bald, want[1]),
            ("entropy_fg", s.entropy_fg, want[2]),
            ("bald_fg", s.bald_fg, want[3]),
        ] {
            match got {
                Some(g) => {
                    assert!(!want.is_nan(), "{name}: {what} is {g} here, undefined in the oracle");
                    worst = worst.max((g - want).abs());
                    assert!((g - want).abs() <= TOL, "{name}: {what} {g}, oracle {want}");
                }
                None => assert!(want.is_nan(), "{name}: {what} undefined here, oracle {want}"),
            }
        }
        if name == "agreeing passes" {
            // 0 up to the rounding of a mean of 6 equal floats.
            assert!(bald.iter().all(|&b| b <= 1e-6), "passes that agree: BALD 0");
        }
        if name == "empty prediction" {
            assert_eq!((s.entropy_fg, s.bald_fg), (None, None));
        }
    }
    eprintln!("largest difference from the oracle: {worst:.2e}");
}

/// A tiny V-Net initialised from `seed` and a random image of `dims`.
fn model_and_image(seed: i64, dims: [i64; 3]) -> (VNet, Tensor) {
    tch::manual_seed(seed);
    let model = VNet::new(&VNetConfig { n_filters: 4, ..VNetConfig::default() }, Device::Cpu).unwrap();
    (model, Tensor::randn(dims, (Kind::Float, Device::Cpu)))
}

#[test]
fn one_sweep_gives_the_sliding_window_prediction_and_the_monte_carlo_uncertainty() {
    let (model, image) = model_and_image(3, [40, 36, 20]);
    let (teacher, _) = model_and_image(4, [1, 1, 1]);
    let infer = InferOptions { patch: [32, 32, 16], stride: [8, 8, 4], batch_size: 3, ..InferOptions::default() };
    let mc = McOptions { passes: 3, seed: 11, ..McOptions::default() };
    let maps = rank_maps(&model, Some(&teacher), &image, &infer, &mc).unwrap();
    let pred = sliding_window(&model, &image, &infer).unwrap();
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(diff(&maps.prediction.probabilities, &pred.probabilities) <= 1e-6);
    assert!(maps.prediction.labels.equal(&pred.labels), "the same labels as predict");
    let u = mc_uncertainty(&teacher, &image, &infer, &mc).unwrap();
    assert!(diff(&maps.entropy, &u) <= 1e-6, "the predictive entropy is eval's Monte-Carlo map");
    let min_bald = maps.bald.min().double_value(&[]);
    assert!(min_bald >= 0.0 && maps.bald.max().double_value(&[]) > 0.0, "BALD >= 0, and dropout makes it > 0");
    assert!(bool::try_from((&maps.bald - &maps.entropy).le(1e-6).all()).unwrap(), "BALD <= H(mu)");
    // The same seed, another batching: the same maps; another seed: other maps.
    let again =
        rank_maps(&model, Some(&teacher), &image, &InferOptions { batch_size: 1, ..infer.clone() }, &mc).unwrap();
    assert!(diff(&again.bald, &maps.bald) <= 1e-6);
    let other = rank_maps(&model, Some(&teacher), &image, &infer, &McOptions { seed: 12, ..mc.clone() }).unwrap();
    assert!(diff(&other.bald, &maps.bald) > 1e-6);
}
