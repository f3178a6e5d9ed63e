//! The dataset fingerprint `uamt plan` decides from, against nibabel and numpy
//! (`tests/oracle/fingerprint_numpy.py` writes the cases and computes every figure itself), and
//! its cache: written through the folder's marker, read back while the cases are unchanged,
//! recomputed when one changes, never written over a file uamt did not write.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use support::{oracle_output, read_json, TempDir};
use uamt::data::fingerprint::{CacheOutcome, Fingerprint, Split, FINGERPRINT};
use uamt::data::{Dataset, DatasetOptions};

fn open(dir: &Path) -> Dataset {
    let opts = DatasetOptions { model_classes: Some(3), ..DatasetOptions::default() };
    Dataset::open(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1.0);
    assert!(err <= tol, "{what}: {got} against numpy's {want} (relative {err:e})");
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// A copy of the oracle's dataset folder in a fresh temporary folder (the cache writes into it).
fn copy_dataset(tmp: &TempDir) -> PathBuf {
    let src = oracle_output("tests/oracle/fingerprint_numpy.py").join("dataset");
    let dst = tmp.join("dataset");
    copy_tree(&src, &dst);
    dst
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != ".cache" {
                copy_tree(&e.path(), &to);
            }
        } else if e.file_name() != FINGERPRINT && e.file_name() != ".uamt-written" {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

#[test]
fn the_fingerprint_agrees_with_nibabel_and_numpy() {
    let tmp = TempDir::new("fingerprint-oracle");
    let dir = copy_dataset(&tmp);
    let want = read_json(&oracle_output("tests/oracle/fingerprint_numpy.py").join("expected.json"));
    let fp = Fingerprint::compute(&open(&dir)).unwrap();
    let counts = &want["counts"];
    assert_eq!(
        (fp.counts.labelled, fp.counts.unlabelled, fp.counts.test, fp.counts.test_labelled),
        (
            counts["labelled"].as_u64().unwrap() as usize,
            counts["unlabelled"].as_u64().unwrap() as usize,
            counts["test"].as_u64().unwrap() as usize,
            counts["test_labelled"].as_u64().unwrap() as usize
        )
    );
    let cases = want["cases"].as_array().unwrap();
    assert_eq!(fp.cases.len(), cases.len());
    let mut with_foreground = 0;
    for (got, w) in fp.cases.iter().zip(cases) {
        let id = w["id"].as_str().unwrap();
        assert_eq!(got.id, id);
        let split = match w["split"].as_str().unwrap() {
            "labelled" => Split::Labelled,
            "unlabelled" => Split::Unlabelled,
            _ => Split::Test,
        };
        assert_eq!(got.split, split, "{id}");
        assert_eq!(got.shape.to_vec(), usizes(&w["shape"]), "{id}");
        assert_eq!(got.orientation, w["orientation"].as_str().unwrap(), "{id}");
        assert_eq!(got.has_label, w["has_label"].as_bool().unwrap(), "{id}");
        for a in 0..3 {
            close(&format!("{id} spacing {a}"), got.spacing[a], f(&w["spacing"][a]), 1e-6);
            close(&format!("{id} extent {a}"), got.extent_mm[a], f(&w["extent_mm"][a]), 1e-6);
        }
        match (&got.foreground, &w["foreground"]) {
            (None, Value::Null) => {}
            (Some(g), wf) if !wf.is_null() => {
                with_foreground += 1;
                assert_eq!(g.voxels, wf["voxels"].as_u64().unwrap(), "{id}");
                assert_eq!(g.bbox_start.to_vec(), usizes(&wf["bbox_start"]), "{id}");
                assert_eq!(g.bbox_end.to_vec(), usizes(&wf["bbox_end"]), "{id}");
                close(&format!("{id} volume"), g.volume_ml, f(&wf["volume_ml"]), 1e-6);
                for a in 0..3 {
                    close(&format!("{id} box {a}"), g.bbox_mm[a], f(&wf["bbox_mm"][a]), 1e-6);
                }
                let i = &g.intensity;
                for (name, v) in [
                    ("mean", i.mean),
                    ("std", i.std),
                    ("min", i.min),
                    ("max", i.max),
                    ("median", i.median),
                    ("p00_5", i.p00_5),
                    ("p99_5", i.p99_5),
                ] {
                    close(&format!("{id} {name}"), v, f(&wf[name]), 1e-9);
                }
                assert_eq!(i.sampled_every, 1, "{id}: every voxel fits the per-case sample");
            }
            (g, wf) => panic!("{id}: foreground {g:?} against numpy's {wf}"),
        }
    }
    assert_eq!(with_foreground, 2, "the oracle's labelled cases with foreground");
    let classes = want["classes"].as_array().unwrap();
    assert_eq!(fp.classes.len(), classes.len());
    for (got, w) in fp.classes.iter().zip(classes) {
        assert_eq!(got.value as u64, w["value"].as_u64().unwrap());
        assert_eq!(got.name, w["name"].as_str().unwrap());
        assert_eq!(got.voxels, w["voxels"].as_u64().unwrap(), "class {}", got.value);
        assert_eq!(got.cases as u64, w["cases"].as_u64().unwrap(), "class {}", got.value);
        close(&format!("class {} fraction", got.value), got.fraction, f(&w["fraction"]), 1e-12);
    }
    let pooled = fp.foreground_intensity.as_ref().expect("pooled foreground");
    let wp = &want["pooled"];
    for (name, v) in [
        ("mean", pooled.mean),
        ("std", pooled.std),
        ("min", pooled.min),
        ("max", pooled.max),
        ("median", pooled.median),
        ("p00_5", pooled.p00_5),
        ("p99_5", pooled.p99_5),
    ] {
        close(&format!("pooled {name}"), v, f(&wp[name]), 1e-9);
    }
    // The big case's foreground is over 100,000 voxels: the pool took every second of them.
    assert_eq!(pooled.sampled_every as u64, wp["sampled_every"].as_u64().unwrap());
    assert_eq!(pooled.sampled_every, 2);
}

#[test]
fn the_cache_is_written_through_the_marker_read_back_and_refreshed_when_a_case_changes() {
    let tmp = TempDir::new("fingerprint-cache");
    let dir = copy_dataset(&tmp);
    let (first, outcome) = Fingerprint::of(&open(&dir)).unwrap();
    assert_eq!(outcome, CacheOutcome::Written);
    assert!(dir.join(FINGERPRINT).is_file());
    assert_eq!(uamt::fsutil::marker::written_by_uamt(&dir), vec![FINGERPRINT.to_string()]);
    let (again, outcome) = Fingerprint::of(&open(&dir)).unwrap();
    assert_eq!(outcome, CacheOutcome::Cached);
    assert_eq!(again, first);
    // A case replaced (by rename, as datasets must be): the key no longer matches, recomputed.
    let label = dir.join("labelsTr/tr_002.nii");
    let copy = dir.join("labelsTr/tr_002.tmp.nii");
    // tr_002's label had no foreground; now one voxel of class 1.
    let img = open(&dir).training.iter().find(|c| c.id == "tr_002").unwrap().image.header().geometry;
    let mut lab = uamt::data::Volume::<u8>::zeros([20, 22, 12]);
    lab.data[5 + 20 * (6 + 22 * 3)] = 1;
    uamt::data::write_nifti(&copy, &lab, &img).unwrap();
    std::fs::rename(&copy, &label).unwrap();
    let (changed, outcome) = Fingerprint::of(&open(&dir)).unwrap();
    assert_eq!(outcome, CacheOutcome::Written);
    let tr2 = changed.cases.iter().find(|c| c.id == "tr_002").unwrap();
    assert_eq!(tr2.foreground.as_ref().map(|f| (f.voxels, f.bbox_start)), Some((1, [5, 6, 3])));
    assert_ne!(changed.key, first.key);
    // The manifest edited (a case's split changed): recomputed too.
    let manifest = std::fs::read_to_string(dir.join("dataset.json")).unwrap();
    let edited = manifest.replacen("\"labelled\": false", "\"labelled\": true", 1);
    assert_ne!(edited, manifest);
    std::fs::write(dir.join("dataset.json.tmp"), edited).unwrap();
    std::fs::rename(dir.join("dataset.json.tmp"), dir.join("dataset.json")).unwrap();
    let (relabelled, outcome) = Fingerprint::of(&open(&dir)).unwrap();
    assert_eq!(outcome, CacheOutcome::Written);
    assert_eq!(relabelled.counts.labelled, changed.counts.labelled + 1);
}

#[test]
fn a_fingerprint_json_that_uamt_did_not_write_is_left_alone() {
    let tmp = TempDir::new("fingerprint-user");
    let dir = copy_dataset(&tmp);
    std::fs::write(dir.join(FINGERPRINT), "the user's notes").unwrap();
    let (fp, outcome) = Fingerprint::of(&open(&dir)).unwrap();
    match outcome {
        CacheOutcome::NotCached(why) => assert!(why.contains("uamt did not write"), "{why}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(std::fs::read_to_string(dir.join(FINGERPRINT)).unwrap(), "the user's notes");
    assert_eq!(fp.counts.labelled, 3);
    // A folder in the file's place: the same.
    let tmp2 = TempDir::new("fingerprint-folder");
    let dir2 = copy_dataset(&tmp2);
    std::fs::create_dir(dir2.join(FINGERPRINT)).unwrap();
    let (_, outcome) = Fingerprint::of(&open(&dir2)).unwrap();
    assert!(matches!(outcome, CacheOutcome::NotCached(_)), "{outcome:?}");
}
