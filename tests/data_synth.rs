//! Synthetic data: deterministic by seed, any size, LA-like statistics, a valid dataset folder.

mod support;

use support::*;
use uamt::data::{synth_case, write_synth, Dataset, DatasetOptions, SynthConfig};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out.push(("dataset.json".into(), std::fs::read(dir.join("dataset.json")).unwrap()));
    out
}

#[test]
fn should_write_identical_datasets_for_the_same_seed() {
    let tmp = TempDir::new("synth-seed");
    let cfg = SynthConfig { cases: 3, labelled: 1, test: 1, size: [24, 20, 12], seed: 42, ..SynthConfig::default() };
    write_synth(&tmp.join("a"), &cfg, false).unwrap();
    write_synth(&tmp.join("b"), &cfg, false).unwrap();
    let (a, b) = (files(&tmp.join("a")), files(&tmp.join("b")));
    assert_eq!(a.len(), 9);
    assert!(a == b, "the same seed must write the same bytes");
    write_synth(&tmp.join("c"), &SynthConfig { seed: 43, ..cfg }, false).unwrap();
    let c = files(&tmp.join("c"));
    assert_ne!(a[0].1, c[0].1, "another seed must give other volumes");

    let ds = Dataset::open(tmp.join("a"), &DatasetOptions::default()).unwrap();
    assert_eq!((ds.training.len(), ds.labelled(), ds.unlabelled(), ds.test.len()), (3, vec![0], vec![1, 2], 1));
    assert_eq!(ds.training[0].image.header().spacing, [0.625, 0.625, 1.25]);
    assert!(ds.test[0].label.is_some());
}

#[test]
fn should_look_like_an_la_scan() {
    let (image, label) = synth_case([64, 64, 40], [0.625, 0.625, 1.25], 1337, 0);
    let n = image.data.len() as f64;
    let fg = label.data.iter().filter(|&&v| v == 1).count() as f64 / n;
    assert!((0.02..0.25).contains(&fg), "foreground fraction {fg}");
    let mean = image.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (image.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 1e-3 && (std - 1.0).abs() < 1e-3, "z-scored: mean {mean}, std {std}");
    let avg = |want: u8| {
        let v: Vec<f64> =
            image.data.iter().zip(&label.data).filter(|(_, &l)| l == want).map(|(&x, _)| x as f64).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(avg(1) > avg(0) + 0.5, "the blood pool should be brighter: {} vs {}", avg(1), avg(0));
    // Noise: neighbouring background voxels differ.
    assert!(image.data.windows(2).filter(|w| w[0] != w[1]).count() as f64 > 0.9 * n);
    // Cases differ from each other.
    let (other, _) = synth_case([64, 64, 40], [0.625, 0.625, 1.25], 1337, 1);
    assert_ne!(image, other);
}

#[test]
fn should_make_any_size_and_refuse_impossible_settings() {
    for size in [[1, 1, 1], [7, 5, 3], [33, 17, 9]] {
        let (image, label) = synth_case(size, [1.0, 1.0, 2.0], 5, 0);
        assert_eq!((image.dims, label.dims), (size, size));
        assert!(image.data.iter().all(|v| v.is_finite()));
    }
    let tmp = TempDir::new("synth-bad");
    let bad = [
        SynthConfig { size: [0, 4, 4], ..SynthConfig::default() },
        SynthConfig { cases: 2, labelled: 3, ..SynthConfig::default() },
        SynthConfig { spacing: [1.0, -1.0, 1.0], ..SynthConfig::default() },
    ];
    for cfg in bad {
        assert!(write_synth(&tmp.join("x"), &cfg, false).is_err(), "{cfg:?}");
        assert!(!tmp.join("x").exists());
    }
}
