//! `uamt rank` through the binary, as a person runs it: a checkpoint trained for a few
//! iterations by `uamt train` on a synthetic dataset ranks the dataset's unlabelled training
//! cases, or a raw folder of images; the order, determinism, `--top`, `--json`, the output files
//! and `--force`, and the refusal of bad inputs, each naming the file or flag.

#[path = "../../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::TempDir;

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

/// A refused command: its stderr (which must name what is wrong), never a panic.
fn refused(args: &[&str]) -> String {
    let out = uamt(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "uamt {args:?} succeeded:\n{err}");
    assert!(!err.contains("panicked"), "uamt {args:?} panicked:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A synthetic dataset (6 training cases, 2 labelled) and a checkpoint after 6 UA-MT iterations.
struct Setup {
    dir: TempDir,
    data: PathBuf,
    ckpt: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let data = dir.join("data");
        ok(&["synth", "--cases", "6", "--labelled", "2", "--test", "1", "--size", "40,40,24", "--out", s(&data)]);
        let config = dir.join("run.toml");
        let text = format!(
            "[data]\ndataset = \"{}\"\npatch = [32, 32, 16]\n[model]\nn_filters = 4\n[method]\nconsistency_interval = 1\n\
             [optim]\niterations = 6\n[device]\ndevice = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{}\"\nevery = 6\n\
             [eval]\npatch = [32, 32, 16]\nstride = [16, 16, 8]\n[telemetry]\nlisten = \"\"\n",
            data.display(),
            dir.join("ckpt").display()
        );
        std::fs::write(&config, text).unwrap();
        ok(&["train", "--config", s(&config)]);
        let ckpt = uamt::checkpoint::list(&dir.join("ckpt")).pop().expect("a checkpoint").1;
        Setup { dir, data, ckpt }
    }

    /// The ids of the dataset's unlabelled training cases.
    fn unlabelled(&self) -> BTreeSet<String> {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(self.data.join("dataset.json")).unwrap()).unwrap();
        m["training"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["labelled"] == false)
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `uamt rank --checkpoint <ckpt> --mc-passes 4 --device cpu` with `args`, as JSON.
    fn rank_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["rank", "--checkpoint", s(&self.ckpt), "--mc-passes", "4", "--device", "cpu", "--json"];
        a.extend(args);
        serde_json::from_slice(&ok(&a).stdout).unwrap()
    }
}

fn ids(r: &Value) -> Vec<String> {
    r["cases"].as_array().unwrap().iter().map(|c| c["case"].as_str().unwrap().to_string()).collect()
}

fn score(c: &Value, name: &str) -> Option<f64> {
    c[name].as_f64()
}

/// Whether the cases are in `name`'s order: defined scores first, highest first, ties by id.
fn assert_sorted(r: &Value, name: &str) {
    let cases = r["cases"].as_array().unwrap();
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(c["rank"], i + 1);
        for k in ["entropy", "bald", "entropy_fg", "bald_fg", "volume_ml", "region_voxels"] {
            assert!(c.get(k).is_some(), "case {i} has no {k}: {c}");
        }
    }
    for w in cases.windows(2) {
        let (a, b) = (score(&w[0], name), score(&w[1], name));
        let in_order = match (a, b) {
            (Some(x), Some(y)) => x > y || (x == y && w[0]["case"].as_str() < w[1]["case"].as_str()),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => w[0]["case"].as_str() < w[1]["case"].as_str(),
        };
        assert!(in_order, "not in {name} order: {} before {}", w[0], w[1]);
    }
}

#[test]
fn ranks_the_unlabelled_cases_of_a_dataset_most_informative_first() {
    let t = Setup::new("rank-dataset");
    let r = t.rank_json(&["--dataset", s(&t.data)]);
    assert_eq!(ids(&r).into_iter().collect::<BTreeSet<_>>(), t.unlabelled(), "every unlabelled case, once");
    assert_eq!(r["score"], "entropy_fg", "the default score");
    assert_sorted(&r, "entropy_fg");
    assert_eq!(r["source"]["teacher"], true);
    assert_eq!(r["source"]["iteration"], 6);
    assert_eq!(r["source"]["mc_passes"], 4);
    assert!(r["cases"].as_array().unwrap().iter().any(|c| score(c, "bald_fg").is_some()), "{r}");
    for c in r["cases"].as_array().unwrap() {
        let (h, b) = (score(c, "entropy").unwrap(), score(c, "bald").unwrap());
        assert!(b >= 0.0 && b <= h && h <= std::f64::consts::LN_2 + 1e-6, "0 <= BALD <= H <= ln 2: {c}");
    }
    // Without --dataset: the checkpoint config's dataset, the same ranking.
    assert_eq!(t.rank_json(&[]), r);
    // Another score: another order, the same scores.
    let e = t.rank_json(&["--score", "entropy"]);
    assert_eq!(e["score"], "entropy");
    assert_sorted(&e, "entropy");
    let by_id = |v: &Value| {
        let mut c: Vec<(String, String)> = v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["case"].as_str().unwrap().to_string(), c["entropy"].to_string()))
            .collect();
        c.sort();
        c
    };
    assert_eq!(by_id(&e), by_id(&r));
    let st = t.rank_json(&["--top", "1"]);
    assert_eq!(st["cases"].as_array().unwrap().len(), 1, "--top 1 with --json prints one case");
}

#[test]
fn the_same_seed_gives_the_same_files_and_another_seed_other_scores() {
    let t = Setup::new("rank-seed");
    let run = |out: &Path, seed: &str| {
        ok(&[
            "rank",
            "--checkpoint",
            s(&t.ckpt),
            "--teacher",
            "--mc-passes",
            "4",
            "--seed",
            seed,
            "--device",
            "cpu",
            "--out",
            s(out),
        ]);
        (std::fs::read(out.join("ranking.json")).unwrap(), std::fs::read(out.join("ranking.csv")).unwrap())
    };
    let a = run(&t.dir.join("a"), "3");
    let b = run(&t.dir.join("b"), "3");
    assert_eq!(a, b, "the same seed, the same ranking, byte for byte");
    let c = run(&t.dir.join("c"), "4");
    let bald = |json: &[u8]| -> Vec<f64> {
        let v: Value = serde_json::from_slice(json).unwrap();
        v["cases"].as_array().unwrap().iter().map(|c| c["bald"].as_f64().unwrap()).collect()
    };
    assert_ne!(bald(&a.0), bald(&c.0), "another seed draws other passes");
}

#[test]
fn top_k_limits_the_table_and_the_pictures_and_outputs_need_force() {
    let t = Setup::new("rank-top");
    let out = t.dir.join("out");
    let args = |force: bool| {
        let mut a = vec!["rank", "--checkpoint", s(&t.ckpt), "--mc-passes", "3", "--device", "cpu", "--top", "2"];
        a.extend(["--out", s(&out)]);
        if force {
            a.push("--force");
        }
        a
    };
    let table = String::from_utf8(ok(&args(false)).stdout).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(table.contains("2 of 4 cases shown"), "{table}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("ranking.json")).unwrap()).unwrap();
    let all = ids(&json);
    assert_eq!(all.len(), 4, "ranking.json lists every case");
    let csv = std::fs::read_to_string(out.join("ranking.csv")).unwrap();
    assert_eq!(csv.lines().next(), Some("case,rank,entropy,bald,entropy_fg,bald_fg,volume_ml"));
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.lines().nth(1).unwrap().starts_with(&format!("{},1,", all[0])));
    for (i, id) in all.iter().enumerate() {
        let png = out.join(format!("{id}.png"));
        assert_eq!(png.is_file(), i < 2, "a picture for the top 2 only ({id}, rank {})", i + 1);
        if i < 2 {
            assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"), "{id}.png is a PNG");
        }
    }
    assert!(rows[0].contains(&all[0]) && rows[1].contains(&all[1]), "{table}");
    // Again: refused without --force, the files as they were; with --force, replaced.
    let before = std::fs::read(out.join("ranking.json")).unwrap();
    let err = refused(&args(false));
    assert!(err.contains("ranking.json") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("ranking.json")).unwrap(), before);
    ok(&args(true));
    // A file of the user's with the name of a case's picture: refused before any work, even
    // with --force, and left alone.
    let mine = t.dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    let user = mine.join(format!("{}.png", all[3]));
    std::fs::write(&user, "the user's").unwrap();
    let err = refused(&[
        "rank",
        "--checkpoint",
        s(&t.ckpt),
        "--mc-passes",
        "3",
        "--device",
        "cpu",
        "--out",
        s(&mine),
        "--force",
    ]);
    assert!(err.contains("uamt did not write") && err.contains(&format!("{}.png", all[3])), "{err}");
    assert!(!err.contains("[1/4]"), "refused before any case was ranked: {err}");
    assert_eq!(std::fs::read_to_string(&user).unwrap(), "the user's");
    assert!(!mine.join("ranking.json").exists());
}

#[test]
fn ranks_a_raw_folder_of_images_as_predict_prepares_them() {
    let t = Setup::new("rank-raw");
    let raw = t.dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for id in t.unlabelled() {
        std::fs::copy(t.data.join(format!("imagesTr/{id}.nii")), raw.join(format!("{id}.nii"))).unwrap();
    }
    std::fs::write(raw.join("notes.txt"), "not an image").unwrap();
    // The images as they are (--normalize none; the synthetic dataset records no preprocessing):
    // the same volumes as the dataset's, so the same scores and order.
    let from_files = t.rank_json(&["--input", s(&raw), "--normalize", "none"]);
    let from_dataset = t.rank_json(&["--dataset", s(&t.data)]);
    assert_eq!(ids(&from_files), ids(&from_dataset));
    for (a, b) in from_files["cases"].as_array().unwrap().iter().zip(from_dataset["cases"].as_array().unwrap()) {
        for k in ["entropy", "bald", "entropy_fg", "bald_fg", "volume_ml"] {
            assert_eq!(a[k], b[k], "{k} of {}", a["case"]);
        }
        assert!(a["source"].as_str().unwrap().starts_with(s(&raw)));
    }
    // One file; the default normalisation (z-score per volume) changes the input, so the scores.
    let one = raw.join(format!("{}.nii", ids(&from_dataset)[0]));
    let r = t.rank_json(&["--input", s(&one)]);
    assert_eq!(ids(&r), vec![ids(&from_dataset)[0].clone()]);
}

#[test]
fn bad_inputs_are_refused_with_the_file_or_flag_named() {
    let t = Setup::new("rank-bad");
    let ck = s(&t.ckpt);
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> =
            ["rank", "--checkpoint", ck, "--device", "cpu"].iter().map(|s| s.to_string()).collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| refused(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let missing = t.dir.join("nowhere");
    let mut a = base(&["--input"]);
    a.push(s(&missing).into());
    assert!(run(a).contains("nowhere"));
    let empty = t.dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut a = base(&["--input"]);
    a.push(s(&empty).into());
    assert!(run(a).contains("no .nii or .nii.gz files"));
    assert!(run(base(&["--mc-passes", "1"])).contains("--mc-passes"));
    assert!(run(base(&["--mc-passes", "65"])).contains("--mc-passes"));
    assert!(run(base(&["--band=-1"])).contains("--band"));
    assert!(run(base(&["--band", "NaN"])).contains("--band"));
    assert!(run(base(&["--top", "0"])).contains("--top"));
    assert!(run(base(&["--score", "variance"])).contains("bald_fg"));
    // A dataset with nothing unlabelled.
    let all = t.dir.join("all-labelled");
    ok(&["synth", "--cases", "2", "--labelled", "2", "--test", "1", "--size", "40,40,24", "--out", s(&all)]);
    let mut a = base(&["--dataset"]);
    a.push(s(&all).into());
    let err = run(a);
    assert!(err.contains("no unlabelled training case") && err.contains("all-labelled"), "{err}");
    // A weights file needs a dataset or images.
    let w = t.dir.join("w.safetensors");
    ok(&["export", "--checkpoint", ck, "--out", s(&w)]);
    let err = refused(&["rank", "--weights", s(&w), "--n-filters", "4", "--device", "cpu"]);
    assert!(err.contains("--dataset") && err.contains("--input"), "{err}");
    // A truncated checkpoint.
    let bytes = std::fs::read(&t.ckpt).unwrap();
    let cut = t.dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(refused(&["rank", "--checkpoint", s(&cut), "--device", "cpu"]).contains("cut.safetensors"));
    // An output inside what it reads.
    let inside = t.data.join("ranked");
    let err = refused(&["rank", "--checkpoint", ck, "--dataset", s(&t.data), "--device", "cpu", "--out", s(&inside)]);
    assert!(err.contains("--out") && err.contains("--dataset"), "{err}");
    assert!(!inside.exists(), "nothing written inside the dataset");
}
