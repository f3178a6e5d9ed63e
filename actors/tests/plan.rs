//! `uamt plan` through the binary, as a person runs it: on synthetic data (a single labelled case,
//! cases smaller than the smallest patch), on a raw MSD folder with thick, rotated and LPS slices
//! imported with `uamt import nifti` (then re-imported at the planned voxel size), on real LA
//! cases imported from HDF5, for a GPU this machine does not have, once with a measured timing;
//! bad datasets refused as `uamt train` refuses them; the fingerprint cache kept by the marker
//! rules; and a planned config trained for a few iterations.

#[path = "../../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{la_dir, oracle, TempDir};

fn uamt_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_uamt"));
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.output().expect("run uamt")
}

fn ok(args: &[&str]) -> Output {
    let out = uamt_in(None, args);
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

/// `uamt plan --json` with `args`: the plan as JSON.
fn plan(args: &[&str]) -> Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let out = ok(&all);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The planned config, parsed as `uamt train` parses it.
fn config(v: &Value) -> uamt::config::Config {
    uamt::config::Config::from_toml(v["config"].as_str().unwrap(), Path::new("planned.toml")).unwrap()
}

fn notes(v: &Value) -> String {
    v["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect::<Vec<_>>().join("\n")
}

fn synth(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["synth", "--out", s(&out)];
    args.extend_from_slice(extra);
    ok(&args);
    out
}

#[test]
fn a_single_labelled_case_is_planned_and_the_planned_config_trains() {
    let t = TempDir::new("plan-train");
    let ds = synth(&t, "one", &["--cases", "4", "--labelled", "1", "--test", "1", "--size", "40,36,20"]);
    let out = t.join("one.toml");
    let v = plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure", "--out", s(&out)]);
    let cfg = config(&v);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), v["config"].as_str().unwrap());
    assert_eq!((cfg.data.sampler.labelled_bs, cfg.data.sampler.unlabelled_bs), (1, 2));
    assert_eq!(cfg.data.loader.patch, [48, 48, 32], "the median case 40x36x20 rounded up to 16");
    assert_eq!(cfg.model.n_filters, 4);
    assert_eq!(cfg.eval.window.patch, cfg.data.loader.patch);
    assert_eq!(cfg.data.dataset, ds);
    assert_eq!(v["fingerprint"]["cache"], "written");
    assert!(ds.join("fingerprint.json").is_file());
    let batch = v["decisions"].as_array().unwrap().iter().find(|d| d["setting"] == "method, batch").unwrap();
    assert!(batch["why"].as_str().unwrap().contains("1 labelled case"), "{batch}");
    // Every planned value has its reason in the file.
    let text = v["config"].as_str().unwrap();
    for key in ["patch = ", "n_filters = ", "iterations = ", "lr_step = ", "stride = "] {
        let line = text.lines().position(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key}"));
        assert!(text.lines().nth(line - 1).unwrap().starts_with("# "), "{key}");
    }
    // It trains, through the binary, from the folder the config's relative paths start at.
    let run = uamt_in(Some(t.path()), &["train", "--config", s(&out), "--stop-after", "2", "--listen", "127.0.0.1:0"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ckpt = t.join("runs/one/checkpoints");
    let files: Vec<_> = std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(files.iter().any(|f| f.to_string_lossy().starts_with("ckpt-00000002")), "{files:?}");
    // --out again: refused without --force (uamt wrote it), replaced with it.
    let again = uamt_in(None, &["plan", "--dataset", s(&ds), "--device", "cpu", "--no-measure", "--out", s(&out)]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
    ok(&["plan", "--dataset", s(&ds), "--device", "cpu", "--no-measure", "--out", s(&out), "--force"]);
    // Never inside the dataset it reads.
    let inside = uamt_in(None, &["plan", "--dataset", s(&ds), "--no-measure", "--out", s(&ds.join("p.toml"))]);
    assert!(!inside.status.success() && String::from_utf8_lossy(&inside.stderr).contains("--out"));
}

#[test]
fn cases_smaller_than_the_smallest_patch_are_padded_and_said() {
    let t = TempDir::new("plan-small");
    let ds = synth(&t, "small", &["--cases", "3", "--labelled", "2", "--test", "1", "--size", "10,12,8"]);
    let v = plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"]);
    let cfg = config(&v);
    assert_eq!(cfg.data.loader.patch, [16, 16, 16]);
    let n = notes(&v);
    assert!(n.contains("padded") && n.contains("smallest patch"), "{n}");
    // The table says it too.
    let table = ok(&["plan", "--dataset", s(&ds), "--device", "cpu", "--no-measure"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("patch") && text.contains("16x16x16") && text.contains("padded"), "{text}");
    assert!(text.contains("read from") && text.contains("fingerprint.json"), "the second plan reads the cache: {text}");
    // A reader that goes away (`uamt plan | head`) is no reason to panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_uamt"))
        .args(["plan", "--dataset", s(&ds), "--device", "cpu", "--no-measure"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{:?}: {err}", out.status);
}

#[test]
fn a_raw_msd_folder_with_thick_rotated_lps_slices_is_planned_then_reimported_at_the_planned_voxel_size() {
    let t = TempDir::new("plan-raw");
    let raw = t.join("raw");
    oracle("raw_import.py", &[Path::new("make"), &raw, Path::new("anisotropic")]);
    let ds = t.join("ds");
    let import = ok(&["import", "nifti", "--src", s(&raw), "--out", s(&ds), "--labelled", "3", "--holdout", "1"]);
    let stdout = String::from_utf8_lossy(&import.stdout);
    assert!(stdout.contains(&format!("next: uamt plan --dataset {}", ds.display())), "{stdout}");
    let v = plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"]);
    // z is 3.5-5 mm under 0.7-0.8 mm: the 10th percentile of z instead of the median. The
    // training cases (la_005 held out for testing) have z = 4.5, 5, 4, 5, 3.5 mm:
    // np.percentile(..., 10) = 3.7, np.median = 4.5; x and y: median 0.75.
    assert!(v["fingerprint"]["voxel_rule"].as_str().unwrap().contains("Anisotropic"), "{v}");
    let spacing: Vec<f64> =
        v["fingerprint"]["voxel_size"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for (got, want) in spacing.iter().zip([0.75, 0.75, 3.7]) {
        assert!((got - want).abs() < 1e-3, "{spacing:?}");
    }
    let n = notes(&v);
    assert!(n.contains("--spacing 0.75,0.75,3.7`"), "{n}");
    let cfg = config(&v);
    assert!(cfg.eval.every > 0, "the held-out labelled case is evaluated");
    // Re-imported as the note says: the import's voxel size, every case at it, no note.
    let ds2 = t.join("ds2");
    ok(&[
        "import",
        "nifti",
        "--src",
        s(&raw),
        "--out",
        s(&ds2),
        "--labelled",
        "3",
        "--holdout",
        "1",
        "--spacing",
        "0.75,0.75,3.7",
    ]);
    let v2 = plan(&["--dataset", s(&ds2), "--device", "cpu", "--no-measure"]);
    assert_eq!(v2["fingerprint"]["voxel_rule"], "Resampled");
    assert_eq!(v2["fingerprint"]["cases_at_voxel_size"], 5);
    assert!(!notes(&v2).contains("re-import"), "{}", notes(&v2));
    let cfg2 = config(&v2);
    assert!(cfg2.data.loader.patch.iter().all(|s| s % 16 == 0));
    // The planned folder (fingerprint.json and the marker's new entry in it) is still one that
    // `import --force` replaces.
    assert!(ds.join("fingerprint.json").is_file());
    ok(&["import", "nifti", "--src", s(&raw), "--out", s(&ds), "--labelled", "2", "--force"]);
    assert!(!ds.join("fingerprint.json").exists());
    assert_eq!(plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"])["fingerprint"]["counts"]["labelled"], 2);
}

#[test]
fn bad_datasets_get_the_errors_training_gives() {
    let t = TempDir::new("plan-bad");
    // No dataset.json at all.
    let missing = t.join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    // The only labelled case's label holds a value that is not a class: skipped, none left.
    let ds = synth(&t, "bad", &["--cases", "3", "--labelled", "1", "--test", "1", "--size", "24,24,16"]);
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(ds.join("dataset.json")).unwrap()).unwrap();
    let label = ds.join(manifest["training"][0]["label"].as_str().unwrap());
    let geometry = uamt::data::Geometry::from_spacing([0.625, 0.625, 1.25]);
    let mut lab = uamt::data::Volume::<u8>::zeros([24, 24, 16]);
    lab.data[100] = 7;
    let tmp = label.with_extension("tmp.nii");
    uamt::data::write_nifti(&tmp, &lab, &geometry).unwrap();
    std::fs::rename(&tmp, &label).unwrap();
    for (dataset, want) in [(&missing, "dataset.json"), (&ds, "no labelled training case is left")] {
        let cfg = t.join("train.toml");
        std::fs::write(
            &cfg,
            format!(
                "[data]\ndataset = \"{}\"\n[device]\ndevice = \"cpu\"\n[checkpoint]\ndir = \"{}\"\n\
                 [telemetry]\nlisten = \"\"\n",
                dataset.display(),
                t.join("ckpt").display()
            ),
        )
        .unwrap();
        let train = uamt_in(Some(t.path()), &["train", "--config", s(&cfg)]);
        let planned = uamt_in(None, &["plan", "--dataset", s(dataset), "--device", "cpu", "--no-measure"]);
        assert!(!train.status.success() && !planned.status.success());
        let (te, pe) = (String::from_utf8_lossy(&train.stderr), String::from_utf8_lossy(&planned.stderr));
        assert!(!pe.contains("panicked"), "{pe}");
        let opening = format!("opening dataset {}", dataset.display());
        assert!(te.contains(&opening) && te.contains(want), "train: {te}");
        assert!(pe.contains(&opening) && pe.contains(want), "plan: {pe}");
        // The same cause, word for word (anyhow numbers the causes of plan's error).
        let cause = pe.lines().find(|l| l.contains(want)).unwrap().trim();
        let cause = cause.split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map_or(cause, |(_, c)| c);
        assert!(te.contains(cause), "train's error lacks plan's cause `{cause}`:\n{te}");
    }
}

#[test]
fn the_fingerprint_cache_keeps_the_marker_rules() {
    let t = TempDir::new("plan-cache");
    let ds = synth(&t, "d", &["--cases", "3", "--labelled", "2", "--test", "1", "--size", "24,24,16"]);
    assert_eq!(plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"])["fingerprint"]["cache"], "written");
    assert_eq!(plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"])["fingerprint"]["cache"], "cached");
    // The folder is still one uamt wrote whole: --force replaces it, fingerprint and all.
    ok(&["synth", "--out", s(&ds), "--cases", "4", "--labelled", "2", "--test", "1", "--size", "24,24,16", "--force"]);
    assert!(!ds.join("fingerprint.json").exists());
    let v = plan(&["--dataset", s(&ds), "--device", "cpu", "--no-measure"]);
    assert_eq!(v["fingerprint"]["cache"], "written");
    assert_eq!(v["fingerprint"]["counts"]["unlabelled"], 2);
    // A user's own fingerprint.json is never written over: planned without caching.
    let user = synth(&t, "u", &["--cases", "3", "--labelled", "2", "--test", "1", "--size", "24,24,16"]);
    std::fs::write(user.join("fingerprint.json"), "mine").unwrap();
    let out = ok(&["plan", "--dataset", s(&user), "--device", "cpu", "--no-measure"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not cached"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fingerprint not cached"));
    assert_eq!(std::fs::read_to_string(user.join("fingerprint.json")).unwrap(), "mine");
}

#[test]
fn a_gpu_this_machine_does_not_have_needs_its_memory_and_is_not_measured() {
    let t = TempDir::new("plan-cuda");
    let ds = synth(&t, "g", &["--cases", "3", "--labelled", "2", "--test", "1", "--size", "96,80,64"]);
    if uamt::device::cuda_device_count() == 0 {
        let out = uamt_in(None, &["plan", "--dataset", s(&ds), "--device", "cuda"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--memory"), "{}", String::from_utf8_lossy(&out.stderr));
        let v = plan(&["--dataset", s(&ds), "--device", "cuda", "--memory", "141"]);
        assert!(notes(&v).contains("not measured"), "{}", notes(&v));
        assert!(v["estimate"]["iteration"]["source"].as_str().unwrap().starts_with("estimated"));
    }
    let v = plan(&["--dataset", s(&ds), "--device", "cuda:0", "--memory", "141", "--no-measure"]);
    let cfg = config(&v);
    assert_eq!(cfg.device.device, "cuda");
    assert_eq!(cfg.model.n_filters, 16, "the paper's filters fit a 141 GiB card");
    assert_eq!(cfg.data.loader.patch, [96, 80, 64]);
    // A 2 GiB card: fewer filters rather than a patch below 64 per side.
    let small = config(&plan(&["--dataset", s(&ds), "--device", "cuda", "--memory", "2", "--no-measure"]));
    assert!(small.model.n_filters < 16 && small.data.loader.patch.iter().all(|&p| p >= 64), "{small:?}");
    for bad in [&["--memory", "0"][..], &["--memory=-3"], &["--hours", "nan"], &["--device", "tpu"]] {
        let mut args = vec!["plan", "--dataset", s(&ds)];
        args.extend_from_slice(bad);
        let out = uamt_in(None, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        let flag = bad[0].split('=').next().unwrap();
        assert!(!out.status.success() && !err.contains("panicked") && err.contains(flag), "{bad:?}: {err}");
    }
}

#[test]
fn a_time_budget_is_planned_from_a_measured_timing_of_tiny_shapes() {
    let t = TempDir::new("plan-measure");
    let ds = synth(&t, "m", &["--cases", "3", "--labelled", "2", "--test", "1", "--size", "20,20,16"]);
    let v = plan(&["--dataset", s(&ds), "--device", "cpu", "--hours", "0.1"]);
    let cfg = config(&v);
    let e = &v["estimate"];
    assert!(e["iteration"]["source"].as_str().unwrap().starts_with("measured"), "{e}");
    assert!(e["evaluation"]["source"].as_str().unwrap().starts_with("measured"), "{e}");
    let per = e["iteration"]["seconds"].as_f64().unwrap();
    assert!(per > 0.0);
    assert!(e["total_seconds"].as_f64().unwrap() <= 360.0, "{e}");
    assert!(cfg.optim.iterations >= 1 && cfg.optim.iterations as f64 * per <= 0.9 * 360.0);
    let (lr, ramp) = uamt::plan::rules::scaled_schedule(cfg.optim.iterations);
    assert_eq!((cfg.optim.lr_step, cfg.method.consistency_interval), (lr, ramp));
}

#[test]
fn real_la_cases_plan_at_the_paper_s_voxel_size_and_filters() {
    let t = TempDir::new("plan-la");
    let ids: Vec<String> = std::fs::read_to_string(la_dir().join("train.list"))
        .expect("the LA data in ../shared/data/la2018")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .map(str::to_string)
        .collect();
    let test: Vec<String> =
        std::fs::read_to_string(la_dir().join("test.list")).unwrap().lines().take(1).map(str::to_string).collect();
    std::fs::write(t.join("train.list"), ids.join("\n")).unwrap();
    std::fs::write(t.join("test.list"), test.join("\n")).unwrap();
    let ds = t.join("la");
    ok(&[
        "import",
        "h5",
        "--src",
        s(&la_dir()),
        "--out",
        s(&ds),
        "--labelled",
        "2",
        "--train-list",
        s(&t.join("train.list")),
        "--test-list",
        s(&t.join("test.list")),
    ]);
    let v = plan(&["--dataset", s(&ds), "--device", "cuda", "--memory", "141", "--no-measure"]);
    let cfg = config(&v);
    assert_eq!(v["fingerprint"]["voxel_rule"], "Uniform");
    assert_eq!(v["fingerprint"]["voxel_size"], serde_json::json!([0.625, 0.625, 0.625]));
    assert_eq!(cfg.model.n_filters, 16);
    assert_eq!((cfg.optim.iterations, cfg.optim.lr_step, cfg.method.consistency_interval), (6000, 2500, 150));
    assert_eq!(cfg.eval.window.stride, uamt::plan::rules::reference_stride(cfg.data.loader.patch));
    let patch = v["decisions"].as_array().unwrap().iter().find(|d| d["setting"] == "patch").unwrap();
    if cfg.data.loader.patch != [112, 112, 80] {
        assert!(patch["why"].as_str().unwrap().contains("paper's 112x112x80"), "{patch}");
    }
    // LA volumes are 88 slices deep: the patch's z is 96 at most (88 rounded up to 16).
    assert_eq!(cfg.data.loader.patch[2], 96);
    let cpu = config(&plan(&["--dataset", s(&ds), "--device", "cpu", "--hours", "0.5", "--no-measure"]));
    assert_eq!(cpu.model.n_filters, 4);
    assert!(cpu.optim.iterations >= 1 && cpu.optim.iterations <= 6000);
}
