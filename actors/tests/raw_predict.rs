//! From a raw MSD / nnU-Net folder to label maps, as a person runs it: `uamt import nifti`,
//! `uamt predict`, `uamt export`, with nibabel (tests/oracle/raw_import.py) reading what was
//! written and the reference PyTorch V-Net loading the exported weights.

#[path = "../../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{affine, assert_affine_close, oracle, python, read_f32, read_json, repo, TempDir};
use tch::{Device, Kind, Tensor};
use uamt::checkpoint::Snapshot;
use uamt::model::{Dropout, VNet, VNetConfig};

fn uamt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uamt")).args(args).output().expect("run uamt")
}

fn ok(args: &[&str]) -> Output {
    let out = uamt(args);
    assert!(
        out.status.success(),
        "uamt {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw folder written by nibabel.
fn make(dir: &Path, variant: &str) -> PathBuf {
    let src = dir.join(format!("raw-{}", if variant.is_empty() { "msd" } else { variant }));
    let v = PathBuf::from(variant);
    let mut args: Vec<&Path> = vec![Path::new("make"), &src];
    if !variant.is_empty() {
        args.push(&v);
    }
    oracle("raw_import.py", &args);
    src
}

/// nibabel's view of `files`: shape, affine, mean, std, axis codes, and the data.
fn dump(dir: &Path, files: &[PathBuf]) -> Vec<(Value, Vec<f32>)> {
    let out = dir.join(format!("dump-{}", files.len() + files.first().map_or(0, |f| s(f).len())));
    let mut args: Vec<&Path> = vec![Path::new("dump"), &out];
    args.extend(files.iter().map(PathBuf::as_path));
    oracle("raw_import.py", &args);
    (0..files.len())
        .map(|i| (read_json(&out.join(format!("{i}.json"))), read_f32(&out.join(format!("{i}.f32")))))
        .collect()
}

fn dims(v: &Value) -> [usize; 3] {
    let a = v["shape"].as_array().unwrap();
    [0, 1, 2].map(|i| a[i].as_u64().unwrap() as usize)
}

/// The world position of voxel coordinate `p` under `a`.
fn world(a: &[[f64; 4]; 4], p: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| a[i][0] * p[0] + a[i][1] * p[1] + a[i][2] * p[2] + a[i][3])
}

fn manifest(ds: &Path) -> Value {
    read_json(&ds.join("dataset.json"))
}

fn image_files(ds: &Path, split: &str) -> Vec<PathBuf> {
    let m = manifest(ds);
    m[split].as_array().unwrap().iter().map(|e| ds.join(e["image"].as_str().or_else(|| e.as_str()).unwrap())).collect()
}

/// A small random V-Net's weights (4 filters), BatchNorm statistics perturbed so they matter.
fn weights(dir: &Path) -> (PathBuf, Vec<(String, Tensor)>) {
    tch::manual_seed(5);
    let cfg = VNetConfig { n_filters: 4, ..VNetConfig::default() };
    let model = VNet::new(&cfg, Device::Cpu).unwrap();
    let named: Vec<(String, Tensor)> = model
        .store()
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("running_var") {
                t.rand_like() + 0.5
            } else if t.kind() == Kind::Float {
                &t + t.randn_like() * 0.05
            } else {
                t
            };
            (n, t)
        })
        .collect();
    let path = dir.join("w.safetensors");
    Tensor::write_safetensors(&named, &path).unwrap();
    (path, named)
}

const WINDOW: [&str; 6] = ["--patch", "16,16,16", "--stride", "8,8,8", "--device", "cpu"];

#[test]
fn import_normalises_splits_and_records() {
    let t = TempDir::new("raw-import");
    let src = make(t.path(), "");
    let ds = t.join("ds");
    ok(&["import", "nifti", "--src", s(&src), "--out", s(&ds), "--labelled", "2", "--holdout", "1"]);
    let m = manifest(&ds);
    assert_eq!(
        (m["numTraining"].as_u64(), m["numLabelled"].as_u64(), m["numTest"].as_u64()),
        (Some(5), Some(2), Some(4))
    );
    let labelled: Vec<bool> =
        m["training"].as_array().unwrap().iter().map(|e| e["labelled"].as_bool().unwrap()).collect();
    assert_eq!(labelled, vec![true, true, false, false, false]);
    let held = &m["test"][0];
    assert_eq!(held["id"], "la_005");
    assert!(held["label"].as_str().is_some(), "the held-out case keeps its label");
    // Imported images: z-scored (nibabel's mean 0, std 1), same shape and affine as the raw ones.
    let imported = image_files(&ds, "training");
    let raw: Vec<PathBuf> =
        (0..5).map(|i| src.join(format!("imagesTr/la_{i:03}.nii{}", if i % 2 == 0 { ".gz" } else { "" }))).collect();
    let (a, b) = (dump(t.path(), &imported), dump(t.path(), &raw));
    let rec = read_json(&ds.join("preprocessing.json"));
    for (i, ((ia, _), (ra, _))) in a.iter().zip(&b).enumerate() {
        assert!(ia["mean"].as_f64().unwrap().abs() < 1e-4, "case {i} mean {}", ia["mean"]);
        assert!((ia["std"].as_f64().unwrap() - 1.0).abs() < 1e-4, "case {i} std {}", ia["std"]);
        assert_eq!(dims(ia), dims(ra));
        assert_affine_close(&affine(&ia["affine"]), &affine(&ra["affine"]), 1e-4, "imported affine");
        assert_eq!(ia["axcodes"], ra["axcodes"]);
        let st = &rec["cases"][format!("la_{i:03}")]["stats"];
        assert!((st["mean"].as_f64().unwrap() - ra["mean"].as_f64().unwrap()).abs() < 1e-3);
        assert!((st["std"].as_f64().unwrap() - ra["std"].as_f64().unwrap()).abs() < 1e-3);
    }
    // A seeded fraction is reproducible; the foreground scheme normalises over non-zero voxels.
    let f1 = t.join("f1");
    let f2 = t.join("f2");
    for d in [&f1, &f2] {
        ok(&[
            "import",
            "nifti",
            "--src",
            s(&src),
            "--out",
            s(d),
            "--labelled-fraction",
            "0.5",
            "--seed",
            "3",
            "--normalize",
            "foreground",
        ]);
    }
    assert_eq!(manifest(&f1)["training"], manifest(&f2)["training"]);
    assert_eq!(manifest(&f1)["numLabelled"].as_u64(), Some(3));
    // nnU-Net v2 names (`_0000`) import to the same case IDs.
    let nn = make(t.path(), "nnunet");
    let dn = t.join("dn");
    ok(&["import", "nifti", "--src", s(&nn), "--out", s(&dn)]);
    let ids: Vec<String> =
        manifest(&dn)["training"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, (0..6).map(|i| format!("la_{i:03}")).collect::<Vec<_>>());
}

#[test]
fn resampling_keeps_the_field_of_view_and_crop_keeps_world_positions() {
    let t = TempDir::new("raw-resample");
    let src = make(t.path(), "");
    for (tag, opt, val) in [("sp", "--spacing", "2"), ("ds", "--downsample", "2")] {
        let ds = t.join(tag);
        ok(&["import", "nifti", "--src", s(&src), "--out", s(&ds), opt, val, "--gzip"]);
        let imported = image_files(&ds, "training");
        let raw: Vec<PathBuf> = (0..6)
            .map(|i| src.join(format!("imagesTr/la_{i:03}.nii{}", if i % 2 == 0 { ".gz" } else { "" })))
            .collect();
        let (a, b) = (dump(t.path(), &imported), dump(t.path(), &raw));
        for ((ia, _), (ra, _)) in a.iter().zip(&b) {
            let (am, rm) = (affine(&ia["affine"]), affine(&ra["affine"]));
            let (n, m) = (dims(ra), dims(ia));
            let new_spacing: Vec<f64> = (0..3).map(|j| (0..3).map(|i| am[i][j].powi(2)).sum::<f64>().sqrt()).collect();
            // Each corner of the field of view (outer voxel faces) and of the voxel-centre box:
            // within half a (new) voxel of where it was.
            for c in 0..8 {
                let pick = |k: usize, d: usize| if c >> k & 1 == 1 { d as f64 - 0.5 } else { -0.5 };
                let (wr, wi) =
                    (world(&rm, [0, 1, 2].map(|k| pick(k, n[k]))), world(&am, [0, 1, 2].map(|k| pick(k, m[k]))));
                let dist = (0..3).map(|i| (wr[i] - wi[i]).powi(2)).sum::<f64>().sqrt();
                assert!(dist < 1e-3, "{tag}: face corner {c} moved {dist} mm");
                let cen = |k: usize, d: usize| if c >> k & 1 == 1 { d as f64 - 1.0 } else { 0.0 };
                let (wr, wi) =
                    (world(&rm, [0, 1, 2].map(|k| cen(k, n[k]))), world(&am, [0, 1, 2].map(|k| cen(k, m[k]))));
                for i in 0..3 {
                    let half = new_spacing.iter().cloned().fold(0.0, f64::max) / 2.0;
                    assert!(
                        (wr[i] - wi[i]).abs() <= half + 1e-6,
                        "{tag}: centre corner {c} axis {i} off by {}",
                        (wr[i] - wi[i]).abs()
                    );
                }
            }
        }
    }
    // Crop: the label box plus margin; the affine moves so the labelled voxels keep their world position.
    let ds = t.join("crop");
    ok(&["import", "nifti", "--src", s(&src), "--out", s(&ds), "--crop-margin", "2"]);
    let lab = ds.join("labelsTr/la_000.nii");
    let raw_lab = src.join("labelsTr/la_000.nii.gz");
    let d = dump(t.path(), &[lab, raw_lab]);
    let (c, r) = (&d[0], &d[1]);
    assert!(dims(&c.0).iter().zip(dims(&r.0)).all(|(a, b)| a < &b), "cropped {:?} from {:?}", dims(&c.0), dims(&r.0));
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    assert_eq!(sum(&c.1), sum(&r.1), "every labelled voxel is inside the crop");
    let shift = world(&affine(&c.0["affine"]), [0.0; 3]);
    let [rx, ry, rz] = dims(&r.0);
    let origin = read_json(&ds.join("preprocessing.json"))["cases"]["la_000"]["crop_origin"].clone();
    let o: Vec<f64> = (0..3).map(|i| origin[i].as_f64().unwrap()).collect();
    let want = world(&affine(&r.0["affine"]), [o[0], o[1], o[2]]);
    assert!((0..3).all(|i| (shift[i] - want[i]).abs() < 1e-4), "{shift:?} vs {want:?} ({rx},{ry},{rz})");
}

#[test]
fn bad_raw_folders_are_refused_naming_the_file() {
    let t = TempDir::new("raw-refuse");
    for (variant, needle) in
        [("missing_label", "la_003"), ("mismatch", "labelsTr/la_001.nii"), ("bad_suffix", "la_002_abc")]
    {
        let src = make(t.path(), variant);
        let out = t.join(format!("out-{variant}"));
        let r = uamt(&["import", "nifti", "--src", s(&src), "--out", s(&out)]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{variant} accepted");
        assert!(err.contains(needle), "{variant}: `{needle}` not in: {err}");
        assert!(!out.exists(), "{variant}: output left behind");
    }
    let src = make(t.path(), "");
    let out = t.join("too-many");
    let r = uamt(&["import", "nifti", "--src", s(&src), "--out", s(&out), "--labelled", "6", "--holdout", "1"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("labelled") && err.contains("only 5"), "{err}");
    assert!(!out.exists());
}

#[test]
fn predicted_label_maps_keep_the_inputs_geometry() {
    let t = TempDir::new("raw-predict");
    let src = make(t.path(), "");
    let (w, _) = weights(t.path());
    for (tag, extra) in [("keep", vec![]), ("resampled", vec!["--spacing", "1.5,1.5,2"])] {
        let ds = t.join(format!("ds-{tag}"));
        let mut args = vec!["import", "nifti", "--src", s(&src), "--out", s(&ds)];
        args.extend(extra);
        ok(&args);
        let out = t.join(format!("pred-{tag}"));
        let mut args = vec!["predict", "--weights", s(&w), "--n-filters", "4", "--input"];
        let ts = src.join("imagesTs");
        args.extend([s(&ts), "--out", s(&out), "--dataset", s(&ds), "--maps", "--png", "--json"]);
        args.extend(WINDOW);
        let r = ok(&args);
        let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
        let cases = summary.as_array().unwrap();
        assert_eq!(cases.len(), 3);
        let inputs: Vec<PathBuf> = ["t_000.nii.gz", "t_001.nii", "t_002.nii.gz"].iter().map(|n| ts.join(n)).collect();
        let labels: Vec<PathBuf> =
            ["t_000", "t_001", "t_002"].iter().map(|n| out.join(format!("{n}.label.nii.gz"))).collect();
        let maps: Vec<PathBuf> =
            ["t_000", "t_001", "t_002"].iter().map(|n| out.join(format!("{n}.uncertainty.nii.gz"))).collect();
        let (di, dl, dm) = (dump(t.path(), &inputs), dump(t.path(), &labels), dump(t.path(), &maps));
        for i in 0..3 {
            let (inp, lab, map) = (&di[i].0, &dl[i].0, &dm[i].0);
            assert_eq!(dims(lab), dims(inp), "{tag} case {i} shape");
            assert_eq!(dims(map), dims(inp), "{tag} case {i} map shape");
            assert_affine_close(&affine(&lab["affine"]), &affine(&inp["affine"]), 1e-4, "label affine");
            assert_eq!(lab["axcodes"], inp["axcodes"]);
            let a = affine(&inp["affine"]);
            let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
                - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
                + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
            let n = dl[i].1.iter().filter(|&&v| v != 0.0).count() as f64;
            let ml: f64 = cases[i]["volume_ml"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
            assert!((ml - n * det.abs() / 1000.0).abs() < 1e-9, "{tag} case {i}: {ml} ml for {n} voxels");
            assert!(out.join(format!("t_00{i}.png")).is_file());
        }
    }
}

#[test]
fn predict_on_a_raw_case_equals_eval_on_its_imported_version() {
    let t = TempDir::new("raw-roundtrip");
    let src = make(t.path(), "");
    let (w, _) = weights(t.path());
    let ds = t.join("ds");
    ok(&["import", "nifti", "--src", s(&src), "--out", s(&ds), "--labelled", "2", "--holdout", "1"]);
    let ev = t.join("eval");
    let mut args = vec![
        "eval",
        "--weights",
        s(&w),
        "--n-filters",
        "4",
        "--dataset",
        s(&ds),
        "--out",
        s(&ev),
        "--mc-passes",
        "0",
        "--json",
    ];
    args.extend(WINDOW);
    ok(&args);
    let pr = t.join("pred");
    let raw = src.join("imagesTr/la_005.nii");
    let mut args = vec![
        "predict",
        "--weights",
        s(&w),
        "--n-filters",
        "4",
        "--input",
        s(&raw),
        "--out",
        s(&pr),
        "--dataset",
        s(&ds),
    ];
    args.extend(WINDOW);
    ok(&args);
    let d = dump(t.path(), &[ev.join("la_005.label.nii.gz"), pr.join("la_005.label.nii.gz")]);
    assert_eq!(dims(&d[0].0), dims(&d[1].0));
    assert_eq!(d[0].1, d[1].1, "predict and eval label maps differ");
}

#[test]
fn exported_weights_load_into_the_reference_vnet_with_the_same_logits() {
    let t = TempDir::new("raw-export");
    let (_, named) = weights(t.path());
    let teacher: Vec<(String, Tensor)> = named.iter().map(|(n, x)| (n.clone(), x.copy())).collect();
    let snap = Snapshot {
        iteration: 7,
        seed: 1,
        run_id: String::new(),
        config: String::new(),
        student: named,
        teacher: Some(teacher),
        momentum: vec![],
    };
    let ck = snap.write_atomic(t.path()).unwrap();
    let out = t.join("export.safetensors");
    ok(&["export", "--checkpoint", s(&ck), "--teacher", "--out", s(&out)]);
    let exported = Tensor::read_safetensors(&out).unwrap();
    assert!(exported
        .iter()
        .all(|(n, _)| !n.starts_with("student.") && !n.starts_with("teacher.") && !n.starts_with("meta.")));
    let cfg = VNetConfig { n_filters: 4, ..VNetConfig::default() };
    let model = uamt::eval::load_weights(&out, &cfg, Device::Cpu).unwrap();
    tch::manual_seed(9);
    let x = Tensor::randn([1, 1, 32, 32, 16], (Kind::Float, Device::Cpu));
    let ours = tch::no_grad(|| model.forward_with(&x, false, Dropout::Random)).unwrap();
    let xf = t.join("x.f32");
    let data: Vec<f32> = Vec::try_from(&x.flatten(0, -1)).unwrap();
    std::fs::write(&xf, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    // The same weights in PyTorch's own format, under README's file names.
    let readme_st = t.join("tiny-teacher.safetensors");
    std::fs::copy(&out, &readme_st).unwrap();
    let pt = t.join("tiny-teacher.pt");
    ok(&["export", "--checkpoint", s(&ck), "--teacher", "--out", s(&pt)]);
    let readme = repo().join("README.md");
    // Our own safetensors reader, then README's two snippets verbatim (safetensors' load_file,
    // torch.load with weights_only=True).
    for (weights, snippet) in [(&out, None), (&readme_st, Some(&readme)), (&pt, Some(&readme))] {
        let yf = t.join("y.f32");
        let _ = std::fs::remove_file(&yf);
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/oracle/raw_import.py")).args([
            "logits",
            s(weights),
            "4",
            s(&xf),
            "1,1,32,32,16",
            s(&yf),
        ]);
        if let Some(r) = snippet {
            cmd.arg(r);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}: {}", weights.display(), String::from_utf8_lossy(&o.stderr));
        let theirs = Tensor::from_slice(&read_f32(&yf)).view([1, 2, 32, 32, 16]);
        let err = (&ours - &theirs).abs().max().double_value(&[]);
        let scale = theirs.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale.max(1.0), "{}: logits differ by {err} (scale {scale})", weights.display());
    }
}

#[test]
fn the_inference_benchmark_runs_and_its_label_maps_agree_with_pytorch_s() {
    // benches/predict_compare.py at a tiny window and width on two real LA test volumes: it
    // exits non-zero if a label differs from PyTorch's beyond the ties that the measured
    // probability difference explains, and its summary carries the timings and the ratio.
    let dir = TempDir::new("predict-bench");
    let json = dir.join("bench.json");
    let la = support::la_dir();
    let out = Command::new(python())
        .arg(repo().join("benches/predict_compare.py"))
        .args(["--data", la.to_str().unwrap(), "--uamt", env!("CARGO_BIN_EXE_uamt")])
        .args(["--patch", "32,32,16", "--n-filters", "4", "--strides", "24,24,12", "--rounds", "1", "--threads", "2"])
        .args(["--workdir", dir.join("work").to_str().unwrap(), "--json-out", json.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("| 24/24/12 |"), "the table: {text}");
    let summary = &read_json(&json)["summary"][0];
    for key in ["uamt_wall_s", "uamt_inference_s", "peer_s", "speedup_command", "speedup_inference"] {
        let v = summary[key].as_f64().unwrap_or_else(|| panic!("{key} in {summary}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(summary["uamt_inference_s"].as_f64() < summary["uamt_wall_s"].as_f64(), "{summary}");
    for (case, c) in summary["labels"].as_object().unwrap() {
        assert_eq!(c["mismatched"], 0, "{case}: {c}");
        assert!(c["max_probability_difference"].as_f64().unwrap() < 1e-3, "{case}: {c}");
        assert!(c["foreground"].as_u64().unwrap() > 0, "{case}: a non-trivial label map expected: {c}");
    }
}
