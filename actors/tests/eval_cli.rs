//! `uamt eval` as a person runs it: on NIfTI label files and folders the test writes, and with a
//! weights file on a small synthetic dataset; JSON output parsed and checked.

#[path = "../../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use std::process::{Command, Output};
use support::TempDir;
use tch::{Device, Tensor};
use uamt::checkpoint::Snapshot;
use uamt::config::Config;
use uamt::data::synth::{write_synth, SynthConfig};
use uamt::data::{write_nifti, Dataset, DatasetOptions, Geometry, GzCache, NiftiVolume, Volume};
use uamt::eval::{
    case_metrics, evaluate_dataset, mc_uncertainty, model_from_named, Blend, Calibration, EmptyPolicy, EvalOptions,
    InferOptions, McOptions,
};
use uamt::model::{VNet, VNetConfig};
use uamt::train::Trainer;

/// The `uamt` binary cargo built for this test.
fn uamt() -> &'static str {
    env!("CARGO_BIN_EXE_uamt")
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(uamt()).arg("eval").args(args).output().expect("run uamt eval");
    assert!(
        out.status.success(),
        "uamt eval {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn tmp(name: &str) -> TempDir {
    TempDir::new(&format!("eval-cli-{name}"))
}

/// A `dims` label volume with the box `[lo, lo + side)` set to 1.
fn cube(dims: [usize; 3], lo: [usize; 3], side: usize) -> Volume<u8> {
    let mut v = Volume::zeros(dims);
    for z in lo[2]..lo[2] + side {
        for y in lo[1]..lo[1] + side {
            for x in lo[0]..lo[0] + side {
                let i = v.index(x, y, z);
                v.data[i] = 1;
            }
        }
    }
    v
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn should_print_metrics_of_two_nifti_files_as_json() {
    let dir = tmp("files");
    let dims = [16, 14, 12];
    let geometry = Geometry::from_spacing([0.5, 1.0, 2.0]);
    // Two 6-cubes, the prediction shifted by 2 voxels along x: Dice 4/6, Jaccard 4/8.
    let (pred, reference) = (cube(dims, [4, 3, 2], 6), cube(dims, [2, 3, 2], 6));
    let (p, r) = (dir.join("case.nii.gz"), dir.join("case.nii"));
    write_nifti(&p, &pred, &geometry).unwrap();
    write_nifti(&r, &reference, &geometry).unwrap();

    let out = run(&["--prediction", p.to_str().unwrap(), "--reference", r.to_str().unwrap(), "--json"]);
    let report = json(&out);
    let case = &report["cases"][0];
    assert_eq!(case["id"], "case");
    assert!((num(&case["dice"]) - 4.0 / 6.0).abs() < 1e-12, "{case}");
    assert!((num(&case["jaccard"]) - 0.5).abs() < 1e-12, "{case}");
    // Distances as the library computes them (which tests/eval_metrics.rs holds to medpy), in
    // voxels and in the header's millimetres.
    let want = case_metrics(&pred, &reference, [0.5, 1.0, 2.0], EmptyPolicy::Zeros).unwrap();
    for (key, w) in [("hd95", want.hd95), ("asd", want.asd), ("hd95_mm", want.hd95_mm), ("asd_mm", want.asd_mm)] {
        assert!((num(&case[key]) - w.unwrap()).abs() < 1e-9, "{key}: {case}");
    }
    assert!(
        num(&case["hd95"]) > 0.0 && num(&case["hd95_mm"]) != num(&case["hd95"]),
        "the spacing is anisotropic: {case}"
    );
    assert_eq!(case["empty_prediction"], false);
    // Label files carry no probabilities: no calibration metric, no reliability bins.
    for key in ["ece", "brier", "uncertainty_auroc"] {
        assert!(case.get(key).is_none() && report["summary"].get(key).is_none(), "{key}: {report}");
    }
    assert!(report.get("reliability").is_none() && report.get("uncertainty").is_none(), "{report}");
    assert!(report.get("inference").is_none(), "no model ran: {report}");
    assert_eq!(report["summary"]["dice"]["n"], 1);
    assert!((num(&report["summary"]["dice"]["mean"]) - 4.0 / 6.0).abs() < 1e-12);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[1/1] case: dice 0.6667"), "progress line: {stderr}");

    // --spacing overrides the header: 1 mm voxels make millimetres equal voxels.
    let report = json(&run(&[
        "--prediction",
        p.to_str().unwrap(),
        "--reference",
        r.to_str().unwrap(),
        "--spacing",
        "1",
        "--json",
    ]));
    assert_eq!(num(&report["cases"][0]["hd95_mm"]), num(&report["cases"][0]["hd95"]));
}

#[test]
fn should_match_folders_by_name_and_say_what_is_missing() {
    let dir = tmp("folders");
    let (pd, rd, out) = (dir.join("pred"), dir.join("ref"), dir.join("out"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&rd).unwrap();
    let dims = [12, 12, 8];
    let g = Geometry::from_spacing([1.0, 1.0, 1.0]);
    let full = cube(dims, [2, 2, 1], 5);
    write_nifti(pd.join("a.nii.gz"), &full, &g).unwrap();
    write_nifti(rd.join("a.nii"), &full, &g).unwrap();
    write_nifti(pd.join("b.nii"), &Volume::<u8>::zeros(dims), &g).unwrap(); // empty prediction
    write_nifti(rd.join("b.nii"), &full, &g).unwrap();
    write_nifti(rd.join("c.nii"), &full, &g).unwrap(); // no prediction
    write_nifti(pd.join("extra.nii"), &full, &g).unwrap(); // no reference

    let o = run(&[
        "--prediction",
        pd.to_str().unwrap(),
        "--reference",
        rd.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.lines().any(|l| l.starts_with("a ") && l.contains("100.00")), "{table}");
    assert!(table.contains("empty prediction"), "{table}");
    assert!(table.contains("failed: c: no prediction") && table.contains("failed: extra: no reference"), "{table}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let ids: Vec<&str> = report["cases"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"]);
    let b = &report["cases"][1];
    assert_eq!(
        (b["empty_prediction"].as_bool(), num(&b["dice"]), num(&b["hd95"])),
        (Some(true), 0.0, 0.0),
        "the reference scores an empty prediction as zeros"
    );
    assert_eq!(report["summary"]["empty_predictions"], 1);
    assert_eq!(report["failures"].as_array().unwrap().len(), 2);
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 + 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().starts_with("a,1,1,0,0,0,0,"), "{csv}");

    // --empty undefined leaves the empty prediction's distances out of the means.
    let report = json(&run(&[
        "--prediction",
        pd.to_str().unwrap(),
        "--reference",
        rd.to_str().unwrap(),
        "--empty",
        "undefined",
        "--json",
    ]));
    assert!(report["cases"][1]["hd95"].is_null());
    assert_eq!(report["summary"]["hd95"]["n"], 1);
}

#[test]
fn a_folder_written_by_predict_is_scored_by_its_label_maps() {
    let dir = tmp("predict-folder");
    let (pd, rd) = (dir.join("pred"), dir.join("ref"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&rd).unwrap();
    let (dims, g) = ([12, 12, 8], Geometry::from_spacing([1.0; 3]));
    let (a, b) = (cube(dims, [2, 2, 1], 5), cube(dims, [4, 2, 1], 5));
    write_nifti(pd.join("x.label.nii.gz"), &a, &g).unwrap();
    write_nifti(pd.join("x.prob.nii.gz"), &Volume::<f32>::zeros(dims), &g).unwrap();
    write_nifti(pd.join("x.uncertainty.nii.gz"), &Volume::<f32>::zeros(dims), &g).unwrap();
    write_nifti(pd.join("y.label.nii.gz"), &b, &g).unwrap();
    write_nifti(rd.join("x.nii"), &a, &g).unwrap();
    write_nifti(rd.join("y.nii.gz"), &a, &g).unwrap();
    let report = json(&run(&["--prediction", pd.to_str().unwrap(), "--reference", rd.to_str().unwrap(), "--json"]));
    let ids: Vec<&str> = report["cases"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["x", "y"]);
    assert!(report["failures"].as_array().is_none_or(|f| f.is_empty()), "maps are not predictions: {report}");
    assert_eq!(num(&report["cases"][0]["dice"]), 1.0);
    assert!((num(&report["cases"][1]["dice"]) - 0.6).abs() < 1e-12, "5-cubes shifted by 2: 3/5 overlap");
}

#[test]
fn should_evaluate_a_weights_file_on_a_dataset() {
    let dir = tmp("weights");
    let (data, out) = (dir.join("data"), dir.join("out"));
    let cfg = SynthConfig { cases: 1, labelled: 1, test: 2, size: [36, 32, 18], ..SynthConfig::default() };
    write_synth(&data, &cfg, false).unwrap();
    tch::manual_seed(11);
    let config = VNetConfig { n_filters: 4, ..VNetConfig::default() };
    let model = VNet::new(&config, Device::Cpu).unwrap();
    let weights = dir.join("w.safetensors");
    Tensor::write_safetensors(&model.store().named_tensors(), &weights).unwrap();

    let args = ["--patch", "32,32,16", "--stride", "8,8,4", "--batch", "2", "--device", "cpu"];
    let o = run(&[
        &[
            "--weights",
            weights.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--n-filters",
            "4",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ],
        &args[..],
    ]
    .concat());
    let report = json(&o);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.starts_with('[')).count(),
        2,
        "one progress line per case"
    );

    // The same evaluation through the library.
    let dataset = Dataset::open(&data, &DatasetOptions::default()).unwrap();
    let opts = EvalOptions {
        infer: InferOptions {
            patch: [32, 32, 16],
            stride: [8, 8, 4],
            batch_size: 1,
            largest_component: None,
            blend: Blend::Constant,
        },
        ..EvalOptions::default()
    };
    let want = evaluate_dataset(&model, None, &dataset, "w", &opts, &mut |_| {}).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for (got, want) in cases.iter().zip(&want.cases) {
        assert_eq!(got["id"], want.id.as_str());
        // Another process may sum convolutions in another order: allow a voxel's worth of flips.
        assert!((num(&got["dice"]) - want.metrics.dice).abs() < 1e-3, "{got} vs {want:?}");
        assert_eq!(got["reference_voxels"], want.metrics.reference_voxels);
    }

    // Files to look at: labels, probabilities and uncertainty with the image's affine, a PNG.
    let case = &dataset.test[0];
    for kind in ["label", "prob", "uncertainty"] {
        let v = NiftiVolume::open(out.join(format!("{}.{kind}.nii.gz", case.id)), &GzCache::Memory).unwrap();
        assert_eq!(v.dims(), case.image.dims(), "{kind}");
        assert_eq!(v.header().geometry, case.image.header().geometry, "{kind}: affine");
    }
    let labels = NiftiVolume::open(out.join(format!("{}.label.nii.gz", case.id)), &GzCache::Memory)
        .unwrap()
        .read_labels()
        .unwrap();
    let reference = case.label.as_ref().unwrap().read_labels().unwrap();
    let m = case_metrics(&labels, &reference, case.image.header().spacing, EmptyPolicy::Zeros).unwrap();
    assert!((m.dice - num(&cases[0]["dice"])).abs() < 1e-12, "the written labels are the ones scored");
    // The uncertainty is the model's own Monte-Carlo uncertainty (a weights file has no teacher).
    let unc = NiftiVolume::open(out.join(format!("{}.uncertainty.nii.gz", case.id)), &GzCache::Memory)
        .unwrap()
        .read_f32()
        .unwrap();
    let image = case.image.read_f32().unwrap().to_tensor().unwrap();
    let want = mc_uncertainty(&model, &image, &opts.infer, &McOptions::default()).unwrap();
    assert!(
        unc.to_tensor().unwrap().allclose(&want, 1e-4, 1e-5, false),
        "uncertainty map is the 8-pass Monte-Carlo one"
    );
    let prob =
        NiftiVolume::open(out.join(format!("{}.prob.nii.gz", case.id)), &GzCache::Memory).unwrap().read_f32().unwrap();
    assert!(prob.data.iter().all(|p| (0.0..=1.0).contains(p)));
    let agree = prob.data.iter().zip(&labels.data).filter(|(p, l)| (**p > 0.5) == (**l == 1)).count();
    assert!(agree as f64 >= 0.999 * prob.data.len() as f64, "labels are the thresholded probabilities");
    let decoder = png::Decoder::new(std::fs::File::open(out.join(format!("{}.png", case.id))).unwrap());
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert!(info.width >= 2 * 256 && info.height >= 3 * 32 * 8, "{}x{}", info.width, info.height);
    assert!(out.join("report.csv").exists() && out.join("report.json").exists());
}

/// A PyTorch `state_dict` (as `uamt export --out F.pt` and `torch.save` write it, here under a
/// name that does not say its format) evaluated with `--blend gaussian`: the library's numbers
/// with the Gaussian blend, unlike the plain average's; an unknown blend is refused by name.
#[test]
fn should_evaluate_a_pytorch_state_dict_with_gaussian_blending() {
    let dir = tmp("blend");
    let data = dir.join("data");
    let cfg = SynthConfig { cases: 1, labelled: 1, test: 2, size: [36, 32, 18], ..SynthConfig::default() };
    write_synth(&data, &cfg, false).unwrap();
    tch::manual_seed(12);
    let config = VNetConfig { n_filters: 4, ..VNetConfig::default() };
    let model = VNet::new(&config, Device::Cpu).unwrap();
    let weights = dir.join("exported.weights");
    let file = std::fs::File::create(&weights).unwrap();
    uamt::model::torchsave::write_state_dict(&model.store().named_tensors(), std::io::BufWriter::new(file), &weights)
        .unwrap();
    let eval = |blend: &str| {
        let w = weights.to_str().unwrap();
        let d = data.to_str().unwrap();
        json(&run(&[
            "--weights",
            w,
            "--dataset",
            d,
            "--n-filters",
            "4",
            "--json",
            "--patch",
            "32,32,16",
            "--stride",
            "8,8,4",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--blend",
            blend,
        ]))
    };
    let (gaussian, constant) = (eval("gaussian"), eval("constant"));
    let dataset = Dataset::open(&data, &DatasetOptions::default()).unwrap();
    let infer = InferOptions {
        patch: [32, 32, 16],
        stride: [8, 8, 4],
        batch_size: 2,
        largest_component: None,
        blend: Blend::Gaussian,
    };
    let opts = EvalOptions { infer, ..EvalOptions::default() };
    let want = evaluate_dataset(&model, None, &dataset, "w", &opts, &mut |_| {}).unwrap();
    for (k, w) in want.cases.iter().enumerate() {
        let (g, c) = (&gaussian["cases"][k], &constant["cases"][k]);
        assert_eq!(g["id"], w.id.as_str());
        let brier = w.metrics.calibration.as_ref().unwrap().brier.unwrap();
        assert!((num(&g["brier"]) - brier).abs() < 1e-6, "{}: {} vs the library's {brier}", w.id, g["brier"]);
        let moved = (num(&g["brier"]) - num(&c["brier"])).abs();
        assert!(moved > 1e-5, "{}: the blend changed the Brier score by only {moved}", w.id);
    }
    // Each report says how its predictions were made, the default blend too.
    for (report, blend) in [(&gaussian, "gaussian"), (&constant, "constant")] {
        let inference = &report["inference"];
        assert_eq!(inference["blend"], blend, "{report}");
        assert_eq!(inference["patch"], serde_json::json!([32, 32, 16]));
        assert_eq!(inference["stride"], serde_json::json!([8, 8, 4]));
        assert!(inference["largest_component"].is_null() && inference["network_spacing"].is_null(), "{inference}");
    }
    let o = Command::new(uamt())
        .args(["predict", "--weights", weights.to_str().unwrap(), "--blend", "mean"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--blend") && err.contains("gaussian"), "{err}");
}

#[test]
fn should_draw_the_uncertainty_of_a_checkpoint_s_teacher() {
    let dir = tmp("checkpoint");
    let (data, out) = (dir.join("data"), dir.join("out"));
    write_synth(
        &data,
        &SynthConfig { cases: 1, labelled: 1, test: 1, size: [36, 32, 18], ..SynthConfig::default() },
        false,
    )
    .unwrap();
    // The demo's model (4 filters) and sliding window (32x32x16, stride 8,8,4); the student and
    // the teacher start from separate initialisations, so their maps differ.
    let config = Config::demo();
    let tr = Trainer::seeded(&config.model, config.step_config(), Device::Cpu, 17).unwrap();
    let ck = Snapshot::of_trainer(&tr, 17, &config.to_toml()).write_atomic(&dir.join("ck")).unwrap();
    let o = run(&[
        "--checkpoint",
        ck.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
        "--out",
        out.to_str().unwrap(),
        "--mc-passes",
        "4",
        "--mc-seed",
        "5",
    ]);
    assert_eq!(json(&o)["cases"].as_array().unwrap().len(), 1);

    let case = &Dataset::open(&data, &DatasetOptions::default()).unwrap().test[0];
    let got = NiftiVolume::open(out.join(format!("{}.uncertainty.nii.gz", case.id)), &GzCache::Memory)
        .unwrap()
        .read_f32()
        .unwrap()
        .to_tensor()
        .unwrap();
    let snap = Snapshot::read(&ck).unwrap();
    let infer = config.eval.window.clone();
    let mc = McOptions { passes: 4, seed: 5, ..McOptions::default() };
    let image = case.image.read_f32().unwrap().to_tensor().unwrap();
    let map = |named: &[(String, Tensor)]| {
        let m = model_from_named(&config.model, Device::Cpu, named, &ck).unwrap();
        mc_uncertainty(&m, &image, &infer, &mc).unwrap()
    };
    let (teacher, student) = (map(snap.teacher.as_ref().unwrap()), map(&snap.student));
    assert!(got.allclose(&teacher, 1e-4, 1e-5, false), "the map is the teacher's");
    let apart = (&student - &teacher).abs().max().double_value(&[]);
    assert!(apart > 1e-3, "student and teacher maps should differ (max {apart})");

    // --teacher scores the teacher's weights: the same predictions as the library's on the
    // teacher (the two untrained nets predict different numbers of foreground voxels).
    let predicted = |extra: &[&str]| {
        let o = run(&[
            &["--checkpoint", ck.to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--device", "cpu", "--json"],
            extra,
        ]
        .concat());
        num(&json(&o)["cases"][0]["prediction_voxels"])
    };
    let dataset = Dataset::open(&data, &DatasetOptions::default()).unwrap();
    let lib = |named: &[(String, Tensor)]| {
        let m = model_from_named(&config.model, Device::Cpu, named, &ck).unwrap();
        let r = evaluate_dataset(
            &m,
            None,
            &dataset,
            "x",
            &EvalOptions { infer: infer.clone(), ..EvalOptions::default() },
            &mut |_| {},
        )
        .unwrap();
        r.cases[0].metrics.prediction_voxels as f64
    };
    let (t, s) = (lib(snap.teacher.as_ref().unwrap()), lib(&snap.student));
    assert!(
        (t - s).abs() > 10.0,
        "teacher and student predict alike ({t} vs {s} voxels): the test cannot tell them apart"
    );
    // Another process may sum convolutions in another order: allow a few voxels to flip.
    let (got_t, got_s) = (predicted(&["--teacher"]), predicted(&[]));
    assert!(
        (got_t - t).abs() <= 3.0 && (got_s - s).abs() <= 3.0,
        "--teacher {got_t} (library {t}), student {got_s} (library {s})"
    );
}

#[test]
fn a_checkpoint_trained_for_a_gpu_evaluates_on_the_cpu_with_device_cpu() {
    // The checkpoint's stored config says `device = "cuda"`; parsing it asks no hardware, so
    // `--device cpu` evaluates it on a machine with or without a GPU.
    let dir = tmp("cuda-checkpoint");
    let data = dir.join("data");
    write_synth(
        &data,
        &SynthConfig { cases: 1, labelled: 1, test: 1, size: [32, 32, 16], ..SynthConfig::default() },
        false,
    )
    .unwrap();
    let mut config = Config::demo();
    config.device.device = "cuda".into();
    let text = config.to_toml();
    assert!(text.contains("device = \"cuda\""), "{text}");
    let tr = Trainer::seeded(&config.model, config.step_config(), Device::Cpu, 3).unwrap();
    let ck = Snapshot::of_trainer(&tr, 3, &text).write_atomic(&dir.join("ck")).unwrap();
    let o =
        run(&["--checkpoint", ck.to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--device", "cpu", "--json"]);
    assert_eq!(json(&o)["cases"].as_array().unwrap().len(), 1);
}

#[test]
fn a_model_run_at_a_coarser_voxel_size_is_scored_in_the_image_s_own_grid() {
    let dir = tmp("network-spacing");
    let (data, out) = (dir.join("data"), dir.join("out"));
    let cfg = SynthConfig { cases: 1, labelled: 1, test: 1, size: [40, 36, 20], ..SynthConfig::default() };
    write_synth(&data, &cfg, false).unwrap();
    tch::manual_seed(5);
    let model = VNet::new(&VNetConfig { n_filters: 4, ..VNetConfig::default() }, Device::Cpu).unwrap();
    let dataset = Dataset::open(&data, &DatasetOptions::default()).unwrap();
    let case = &dataset.test[0];
    let geometry = case.image.header().geometry;
    let coarse = geometry.spacing().map(|s| 2.0 * s);
    let infer = InferOptions {
        patch: [16, 16, 16],
        stride: [8, 8, 8],
        batch_size: 2,
        largest_component: None,
        blend: Blend::Constant,
    };
    let opts = EvalOptions {
        infer: infer.clone(),
        network_spacing: Some(coarse),
        outputs: Some(uamt::eval::Outputs {
            dir: out.clone(),
            nifti: true,
            pictures: false,
            picture: Default::default(),
            uncertainty: None,
        }),
        ..EvalOptions::default()
    };
    let report = evaluate_dataset(&model, None, &dataset, "w", &opts, &mut |_| {}).unwrap();
    assert_eq!(report.cases.len(), 1, "{:?}", report.failures);

    // What the option promises, composed from the library's parts: the image resampled to the
    // coarse grid, the sliding window there, the probabilities back in the image's grid.
    let image = case.image.read_f32().unwrap();
    let (small, _, _) = uamt::data::resample::resample_case(&image, None, &geometry, coarse).unwrap();
    assert_eq!(small.dims, [20, 18, 10], "the network sees half as many voxels per axis");
    let pred = uamt::eval::sliding_window(&model, &small.to_tensor().unwrap(), &infer).unwrap();
    let want_labels = pred.labels_in(image.dims, None).unwrap();
    let want_prob =
        uamt::data::resample::resample_linear(&Volume::<f32>::from_tensor(&pred.foreground()).unwrap(), image.dims)
            .unwrap();

    let open =
        |kind: &str| NiftiVolume::open(out.join(format!("{}.{kind}.nii.gz", case.id)), &GzCache::Memory).unwrap();
    for kind in ["label", "prob", "uncertainty"] {
        let v = open(kind);
        assert_eq!(v.dims(), image.dims, "{kind}: the image's own shape");
        assert_eq!(v.header().geometry, geometry, "{kind}: the image's own affine");
    }
    let labels = open("label").read_labels().unwrap();
    assert_eq!(labels.data, want_labels.data, "labels: argmax of the upsampled probabilities");
    let prob = open("prob").read_f32().unwrap();
    let worst = prob.data.iter().zip(&want_prob.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "foreground probability upsampled from the coarse grid (off by {worst})");
    // Scored against the full-resolution label with the image's spacing.
    let reference = case.label.as_ref().unwrap().read_labels().unwrap();
    let m = case_metrics(&labels, &reference, case.image.header().spacing, EmptyPolicy::Zeros).unwrap();
    assert_eq!(m.dice, report.cases[0].metrics.dice);
    assert_eq!(m.reference_voxels, report.cases[0].metrics.reference_voxels);
}

#[test]
fn should_score_the_probabilities_and_the_uncertainty_of_a_checkpoint() {
    let dir = tmp("calibration");
    let (data, out) = (dir.join("data"), dir.join("out"));
    write_synth(
        &data,
        &SynthConfig { cases: 1, labelled: 1, test: 2, size: [36, 32, 18], ..SynthConfig::default() },
        false,
    )
    .unwrap();
    let config = Config::demo();
    let tr = Trainer::seeded(&config.model, config.step_config(), Device::Cpu, 23).unwrap();
    let ck = Snapshot::of_trainer(&tr, 23, &config.to_toml()).write_atomic(&dir.join("ck")).unwrap();
    let (ck_s, data_s, out_s) = (ck.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let common = ["--checkpoint", ck_s, "--dataset", data_s, "--device", "cpu", "--json"];
    let with_out = [&common[..], &["--out", out_s, "--mc-passes", "2", "--mc-seed", "3"]].concat();
    let report = json(&run(&with_out));

    // Per case the three metrics, and their means over the cases where they are defined.
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    let mut defined = 0;
    for c in cases {
        for key in ["ece", "brier"] {
            assert!((0.0..=1.0).contains(&num(&c[key])), "{key}: {c}");
        }
        match &c["uncertainty_auroc"] {
            Value::Null => {}
            v => {
                assert!((0.0..=1.0).contains(&num(v)), "{c}");
                defined += 1;
            }
        }
    }
    let s = &report["summary"];
    assert_eq!((s["ece"]["n"].as_u64(), s["brier"]["n"].as_u64()), (Some(2), Some(2)), "{s}");
    assert_eq!(s["uncertainty_auroc"]["n"], defined, "the mean covers the defined cases: {s}");
    let mean = (num(&cases[0]["ece"]) + num(&cases[1]["ece"])) / 2.0;
    assert!((num(&s["ece"]["mean"]) - mean).abs() < 1e-12);
    // The AUROC scores the map written: the teacher's Monte-Carlo uncertainty.
    assert_eq!(
        report["uncertainty"],
        serde_json::json!({"kind": "monte_carlo", "passes": 2, "seed": 3, "teacher": true}),
        "{report}"
    );

    // The metrics are those of the maps written (labels, probability, uncertainty).
    let dataset = Dataset::open(&data, &DatasetOptions::default()).unwrap();
    let mut voxels = 0u64;
    for (case, got) in dataset.test.iter().zip(cases) {
        let open = |kind: &str| NiftiVolume::open(out.join(format!("{}.{kind}.nii.gz", case.id)), &GzCache::Memory);
        let prob = open("prob").unwrap().read_f32().unwrap();
        let unc = open("uncertainty").unwrap().read_f32().unwrap();
        let labels = open("label").unwrap().read_labels().unwrap();
        let reference = case.label.as_ref().unwrap().read_labels().unwrap();
        let (want, _) = Calibration::of(&prob.data, &labels.data, &reference.data, &unc.data).unwrap();
        assert!((num(&got["ece"]) - want.ece.unwrap()).abs() < 1e-12, "{got} vs {want:?}");
        assert!((num(&got["brier"]) - want.brier.unwrap()).abs() < 1e-12, "{got} vs {want:?}");
        assert_eq!(got["uncertainty_auroc"].as_f64(), want.uncertainty_auroc, "{got}");
        voxels += prob.data.len() as u64;
    }
    // The reliability bins pool every voxel of every case; the diagram is drawn next to the report.
    let bins: u64 = report["reliability"]["voxels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(bins, voxels);
    let written = support::read_json(&out.join("report.json"));
    assert_eq!(written["reliability"], report["reliability"]);
    let png = png::Decoder::new(std::fs::File::open(out.join("reliability.png")).unwrap()).read_info().unwrap();
    assert_eq!(png.info().color_type, png::ColorType::Rgb);
    assert!(png.info().width >= 400 && png.info().height >= 400, "{}x{}", png.info().width, png.info().height);
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",ece,brier,uncertainty_auroc"), "{csv}");
    assert_eq!(csv.lines().count(), 1 + 2 + 2, "{csv}");

    // Without --out, no Monte-Carlo passes: the AUROC scores the prediction's entropy; the
    // probabilities, so ECE and Brier, are the same.
    let plain = json(&run(&common));
    assert_eq!(plain["uncertainty"], serde_json::json!({"kind": "entropy"}), "{plain}");
    for (a, b) in plain["cases"].as_array().unwrap().iter().zip(cases) {
        assert!((num(&a["ece"]) - num(&b["ece"])).abs() < 1e-6 && (num(&a["brier"]) - num(&b["brier"])).abs() < 1e-6);
        assert!(a.get("uncertainty_auroc").is_some(), "null where undefined, never absent: {a}");
    }
    // The table says it too.
    let table = run(&common[..common.len() - 1]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().next().unwrap().contains("ECE") && table.contains("AUROC(u)"), "{table}");
    assert!(table.contains("entropy of the prediction") && table.contains("of 2 cases"), "{table}");

    // The diagram's name is claimed like every output: a file uamt did not write is not replaced.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("reliability.png"), b"mine").unwrap();
    let o = Command::new(uamt())
        .arg("eval")
        .args(common)
        .args(["--out", other.to_str().unwrap(), "--mc-passes", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reliability.png"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(other.join("reliability.png")).unwrap(), b"mine");
}
