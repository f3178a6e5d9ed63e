//! The benchmark's peer (benches/reference/uamt_reference.py, the reference UA-MT loop in
//! PyTorch) runs and trains: two iterations at a tiny shape on synthetic UA-MT HDF5 cases give
//! finite, plausible losses; and the packing that carries LA cases to a GPU machine
//! (benches/reference/la_pack.py) gives back the very arrays, gzip level and chunks.

mod support;

use std::process::Command;
use support::{la_dir, python, repo, TempDir};

fn run_py(args: &[&str]) -> String {
    let out = Command::new(python()).args(args).env("PYTHONWARNINGS", "ignore").output().expect("run python");
    assert!(out.status.success(), "{args:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn field(line: &serde_json::Value, key: &str) -> f64 {
    line[key].as_f64().unwrap_or_else(|| panic!("no number `{key}` in {line}"))
}

#[test]
fn should_run_the_reference_loop_two_iterations_with_finite_plausible_losses() {
    let dir = TempDir::new("bench-reference-run");
    let data = dir.join("h5");
    let pack = repo().join("benches/reference/la_pack.py");
    let reference = repo().join("benches/reference/uamt_reference.py");
    run_py(&[pack.to_str().unwrap(), "synth", "--out", data.to_str().unwrap(), "--cases", "4", "--size", "40,40,24"]);
    let out = run_py(&[
        reference.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--labelled",
        "2",
        "--patch",
        "32,32,16",
        "--n-filters",
        "4",
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--workers",
        "0",
        "--threads",
        "2",
        "--device",
        "cpu",
        "--print-losses",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> =
        out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "two loss lines and the summary expected, got:\n{out}");
    for l in &lines[..2] {
        for k in ["loss", "ce", "dice", "supervised", "consistency", "mask_fraction"] {
            assert!(field(l, k).is_finite(), "{k} not finite: {l}");
        }
    }
    let first = &lines[0];
    let (ce, dice, sup, loss) =
        (field(first, "ce"), field(first, "dice"), field(first, "supervised"), field(first, "loss"));
    // A fresh two-class network: the cross-entropy is near ln 2 (0.69), the Dice loss in [0, 1].
    assert!((0.2..1.5).contains(&ce), "first cross-entropy {ce} implausible for a fresh network (ln 2 = 0.69)");
    assert!((0.0..=1.0).contains(&dice), "Dice loss {dice} outside [0, 1]");
    assert!((sup - 0.5 * (ce + dice)).abs() < 1e-6, "supervised {sup} != 0.5 (ce + dice)");
    // Iteration 0: weight 0.1 * exp(-5) times a consistency in [0, 1].
    assert!(loss >= sup && loss - sup <= 0.1 * (-5.0f64).exp() + 1e-6, "loss {loss} vs supervised {sup}");
    let frac = field(first, "mask_fraction");
    assert!((0.0..=1.0).contains(&frac), "mask fraction {frac}");
    let summary = &lines[2];
    assert_eq!(summary["finite"], serde_json::Value::Bool(true));
    assert!(field(summary, "ms_per_iteration_median") > 0.0);
    assert_eq!(summary["patch"], serde_json::json!([32, 32, 16]));
}

#[test]
fn should_pack_and_unpack_an_la_case_exactly() {
    let la = la_dir();
    assert!(la.join("train.list").exists(), "the LA data in ../shared/data/la2018");
    let dir = TempDir::new("bench-reference-pack");
    let pack = repo().join("benches/reference/la_pack.py");
    let (packed, unpacked) = (dir.join("packed"), dir.join("unpacked"));
    run_py(&[
        pack.to_str().unwrap(),
        "pack",
        "--src",
        la.to_str().unwrap(),
        "--out",
        packed.to_str().unwrap(),
        "--cases",
        "1",
    ]);
    run_py(&[
        pack.to_str().unwrap(),
        "unpack",
        "--src",
        packed.to_str().unwrap(),
        "--out",
        unpacked.to_str().unwrap(),
        "--labelled",
        "2",
        "--unlabelled",
        "1",
    ]);
    let check = r#"
import sys, h5py, numpy as np
la, out = sys.argv[1], sys.argv[2]
ids = open(out + "/train.list").read().split()
assert len(ids) == 3 and ids[1] == ids[0] + "r1" and ids[2] == ids[0] + "r2", ids
a, b = h5py.File(la + "/h5/" + ids[0] + ".h5", "r"), h5py.File(out + "/h5/" + ids[2] + ".h5", "r")
for k in ("image", "label"):
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k][:], b[k][:]), k
    assert (a[k].chunks, a[k].compression, a[k].compression_opts) == (b[k].chunks, b[k].compression, b[k].compression_opts), k
print("exact")
"#;
    let out = run_py(&["-c", check, la.to_str().unwrap(), unpacked.to_str().unwrap()]);
    assert_eq!(out.trim(), "exact");
}
