//! The one-shot commands (`import`, `predict`, `export`, `eval`, `info`) as a careless user or an
//! attacker runs them, through the binary: one test per finding of the data-safety report (issue
//! 21), each asserting that the user's files are left exactly as they were, that the command
//! fails (non-zero, no panic, no abort) with a message naming what is wrong, and that nothing
//! hangs. The rules behind them are unit-tested where they are implemented (`src/fsutil/`).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::TempDir;
use tch::Device;
use uamt::checkpoint::Snapshot;
use uamt::config::Config;
use uamt::data::{write_nifti, Geometry, Volume};
use uamt::train::Trainer;

/// What a finished command left: exit code (`None`: killed by a signal), stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts a clean refusal: exit code 1 (not a panic's 101 or an abort's 134), no panic
    /// message, and stderr containing every one of `needles`.
    fn refused(&self, needles: &[&str]) {
        assert_eq!(self.code, Some(1), "expected a clean refusal:\n{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{}", self.stderr);
        }
    }

    fn ok(&self) {
        assert_eq!(self.code, Some(0), "{}\n{}", self.stdout, self.stderr);
    }
}

/// Runs `uamt <args>` with `env`, failing the test if it has not ended within `secs` (it is then
/// killed: a hang is a failure, never a stuck test run).
fn uamt_env(args: &[&str], env: &[(&str, &str)], secs: u64) -> Run {
    let dir = TempDir::new("oneshot-out");
    let (o, e) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_uamt"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("uamt {args:?} hung for {secs} s:\n{}", std::fs::read_to_string(&e).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&o).unwrap_or_default(),
        stderr: std::fs::read_to_string(&e).unwrap_or_default(),
    }
}

fn uamt(args: &[&str]) -> Run {
    uamt_env(args, &[], 120)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Every file under `dir` (relative path -> bytes), to check that nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), Vec::new()));
            }
        }
    }
    out.sort();
    out
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

const DIMS: [usize; 3] = [20, 18, 12];

/// An image with some structure and a label with a box of foreground.
fn case_volumes(seed: usize) -> (Volume<f32>, Volume<u8>) {
    let n: usize = DIMS.iter().product();
    let image = Volume::new(DIMS, (0..n).map(|i| ((i * 7 + seed * 13) % 23) as f32 * 0.5).collect()).unwrap();
    let mut label = Volume::<u8>::zeros(DIMS);
    for z in 3..8 {
        for y in 4..12 {
            for x in 5..14 {
                let i = label.index(x, y, z);
                label.data[i] = 1;
            }
        }
    }
    (image, label)
}

/// A raw MSD folder `dir/name`: `train` labelled training cases, one test image, a note.
fn raw(dir: &Path, name: &str, train: usize) -> PathBuf {
    let src = dir.join(name);
    for sub in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    let g = Geometry::from_spacing([1.0, 1.2, 1.5]);
    let mut entries = Vec::new();
    for i in 0..train {
        let (image, label) = case_volumes(i);
        write_nifti(src.join(format!("imagesTr/c{i}.nii")), &image, &g).unwrap();
        write_nifti(src.join(format!("labelsTr/c{i}.nii")), &label, &g).unwrap();
        entries.push(format!(r#"{{"image": "./imagesTr/c{i}.nii", "label": "./labelsTr/c{i}.nii"}}"#));
    }
    write_nifti(src.join("imagesTs/t0.nii"), &case_volumes(9).0, &g).unwrap();
    manifest(&src, &entries.join(", "), r#"{"0": "background", "1": "atrium"}"#, r#"["./imagesTs/t0.nii"]"#);
    std::fs::write(src.join("notes.txt"), "the user's own notes").unwrap();
    src
}

/// Writes `src/dataset.json` with these `training`, `labels` and `test` JSON values.
fn manifest(src: &Path, training: &str, labels: &str, test: &str) {
    let text = format!(
        r#"{{"name": "Tiny", "modality": {{"0": "MRI"}}, "labels": {labels}, "training": [{training}], "test": {test}}}"#
    );
    std::fs::write(src.join("dataset.json"), text).unwrap();
}

fn import(src: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["import", "nifti", "--src", s(src), "--out", s(out), "--labelled", "2"];
    args.extend_from_slice(extra);
    uamt(&args)
}

/// A checkpoint of an untrained 4-filter demo model.
fn checkpoint(dir: &Path) -> PathBuf {
    let config = Config::demo();
    let tr = Trainer::seeded(&config.model, config.step_config(), Device::Cpu, 5).unwrap();
    std::fs::create_dir_all(dir.join("ck")).unwrap();
    Snapshot::of_trainer(&tr, 5, &config.to_toml()).write_atomic(&dir.join("ck")).unwrap()
}

#[test]
fn f01_import_force_never_deletes_the_source_or_a_folder_above_it() {
    let dir = TempDir::new("f01");
    let src = raw(&dir, "raw", 3);
    let before = snapshot(&src);
    import(&src, &src, &["--force"]).refused(&["--out is the same file or folder as --src"]);
    import(dir.path(), dir.path(), &["--force"]).refused(&["--out"]);
    import(&src, dir.path(), &["--force"]).refused(&["--out contains --src"]);
    import(&src, &src.join("imagesTr/ds"), &["--force"]).refused(&["--out lies inside --src"]);
    // Through a symbolic link to the source, too.
    std::os::unix::fs::symlink(&src, dir.join("alias")).unwrap();
    import(&src, &dir.join("alias"), &["--force"]).refused(&["the same"]);
    assert_eq!(snapshot(&src), before, "the raw folder changed");
    // A folder the user made (no marker) is not replaced by --force either.
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("keep.txt"), "mine").unwrap();
    import(&src, &mine, &["--force"]).refused(&["not written by uamt"]);
    assert_eq!(std::fs::read_to_string(mine.join("keep.txt")).unwrap(), "mine");
    // One uamt wrote is replaced with --force (and only with it).
    let ds = dir.join("ds");
    import(&src, &ds, &[]).ok();
    import(&src, &ds, &[]).refused(&["already exists"]);
    import(&src, &ds, &["--force"]).ok();
    assert!(ds.join("dataset.json").is_file());
}

#[test]
fn f02_export_never_overwrites_its_checkpoint() {
    let dir = TempDir::new("f02");
    let ck = checkpoint(&dir);
    let before = std::fs::read(&ck).unwrap();
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&ck), "--force"]).refused(&["the same file"]);
    // A hard link to it is the same file.
    let link = dir.join("ck/link.safetensors");
    std::fs::hard_link(&ck, &link).unwrap();
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&link), "--force"]).refused(&["the same file"]);
    assert_eq!(std::fs::read(&ck).unwrap(), before);
    // A user's file of the export's name is never replaced; an earlier export is, with --force.
    let user = dir.join("model.safetensors");
    std::fs::write(&user, "the user's weights").unwrap();
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&user), "--force"]).refused(&["uamt did not write"]);
    assert_eq!(std::fs::read_to_string(&user).unwrap(), "the user's weights");
    let w = dir.join("w.safetensors");
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&w)]).ok();
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&w)]).refused(&["give --force"]);
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&w), "--force"]).ok();
}

#[test]
fn f03_predict_never_overwrites_its_input_nor_reads_its_outputs() {
    let dir = TempDir::new("f03");
    let ck = checkpoint(&dir);
    let scans = dir.join("scans");
    std::fs::create_dir_all(&scans).unwrap();
    let g = Geometry::from_spacing([1.0, 1.2, 1.5]);
    write_nifti(scans.join("a.nii"), &case_volumes(1).0, &g).unwrap();
    // The user's own label next to the scan (a map of another image of the folder: not an input).
    write_nifti(scans.join("a.label.nii.gz"), &case_volumes(1).1, &g).unwrap();
    let before = snapshot(&scans);
    let predict = |input: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec!["predict", "--checkpoint", s(&ck), "--input", s(input), "--out", s(out), "--device", "cpu"];
        a.extend_from_slice(extra);
        uamt(&a)
    };
    predict(&scans, &scans, &["--maps", "--force"]).refused(&["--out is the same file or folder as --input"]);
    predict(&scans.join("a.nii"), &scans, &["--force"]).refused(&["--out contains --input"]);
    predict(&scans, &scans.join("pred"), &[]).refused(&["--out lies inside --input"]);
    assert_eq!(snapshot(&scans), before);
    // Into a folder of its own: a second run needs --force; a user's file there is never replaced.
    let out = dir.join("pred");
    predict(&scans, &out, &[]).ok();
    predict(&scans, &out, &[]).refused(&["give --force"]);
    predict(&scans, &out, &["--force"]).ok();
    std::fs::write(out.join("a.prob.nii.gz"), "the user's").unwrap();
    predict(&scans, &out, &["--force", "--maps"]).refused(&["uamt did not write"]);
    assert_eq!(std::fs::read_to_string(out.join("a.prob.nii.gz")).unwrap(), "the user's");
    std::fs::remove_file(out.join("a.prob.nii.gz")).unwrap();
    // The output folder given as input: its outputs are not segmented as new images.
    write_nifti(out.join("b.nii"), &case_volumes(2).0, &g).unwrap();
    let again = predict(&out, &dir.join("pred2"), &["--json"]);
    again.ok();
    let cases: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    let ids: Vec<&str> = cases.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["b"], "{}", again.stderr);
}

#[test]
fn f04_writers_refuse_to_replace_devices_fifos_and_links() {
    let dir = TempDir::new("f04");
    let ck = checkpoint(&dir);
    let fifo = dir.join("w.safetensors");
    mkfifo(&fifo);
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&fifo), "--force"]).refused(&["a FIFO"]);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));
    let target = dir.join("elsewhere.pt");
    std::fs::write(&target, "x").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("link.pt")).unwrap();
    uamt(&["export", "--checkpoint", s(&ck), "--out", s(&dir.join("link.pt")), "--force"]).refused(&[]);
    assert!(std::fs::symlink_metadata(dir.join("link.pt")).unwrap().file_type().is_symlink());
    // As root a rename would replace a device node: /dev/full must stay a character device.
    let r = uamt(&["export", "--checkpoint", s(&ck), "--out", "/dev/full", "--force"]);
    r.refused(&["/dev/full"]);
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &std::fs::symlink_metadata("/dev/full").unwrap().file_type()
    ));
}

#[test]
fn f05_import_force_onto_a_user_file_leaves_it_and_writes_nothing() {
    let dir = TempDir::new("f05");
    let src = raw(&dir, "raw", 3);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let f = work.join("f.txt");
    std::fs::write(&f, "the user's file").unwrap();
    import(&src, &f, &["--force"]).refused(&["a regular file", "not a folder uamt wrote"]);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "the user's file");
    assert_eq!(names(&work), vec!["f.txt"], "hidden leftovers");
}

#[test]
fn f06_raw_paths_never_lead_outside_the_source() {
    let dir = TempDir::new("f06");
    let outside = raw(&dir, "outside", 1);
    let src = raw(&dir, "raw", 3);
    let entry = |image: &str| format!(r#"{{"image": "{image}", "label": "./labelsTr/c0.nii"}}"#);
    let labels = r#"{"0": "background", "1": "atrium"}"#;
    for (image, needle) in [
        ("../outside/imagesTr/c0.nii", "leads outside the source folder"),
        (s(&outside.join("imagesTr/c0.nii")), "not a path inside the source folder"),
    ] {
        manifest(&src, &format!("{}, {}", entry(image), entry("./imagesTr/c1.nii")), labels, "[]");
        import(&src, &dir.join("ds"), &[]).refused(&[needle]);
        assert!(!dir.join("ds").exists());
    }
    // A symbolic link inside imagesTr/ that points outside.
    std::fs::remove_file(src.join("imagesTr/c2.nii")).unwrap();
    std::os::unix::fs::symlink(outside.join("imagesTr/c0.nii"), src.join("imagesTr/c2.nii")).unwrap();
    let all: Vec<String> = (0..3).map(|i| entry(&format!("./imagesTr/c{i}.nii"))).collect();
    manifest(&src, &all.join(", "), labels, "[]");
    import(&src, &dir.join("ds"), &[]).refused(&["c2.nii", "leads outside the source folder"]);
    assert!(!dir.join("ds").exists());
}

#[test]
fn f07_labels_of_dataset_json_are_validated() {
    let dir = TempDir::new("f07");
    let src = raw(&dir, "raw", 3);
    let training: Vec<String> =
        (0..3).map(|i| format!(r#"{{"image": "./imagesTr/c{i}.nii", "label": "./labelsTr/c{i}.nii"}}"#)).collect();
    for (labels, needle) in [
        (r#"{"0": "background", "4294967296": "huge"}"#, "key `4294967296` is not a class value"),
        (r#"{"background": 0, "la": -1}"#, "-1 is not a class value"),
        (r#"{"background": 0, "la": 1e12}"#, "is not a class value"),
        (r#"{"background": 0, "la": 0}"#, "given twice"),
        (r#"{"background": 0, "la": [1, 2]}"#, "region-based"),
        (r#"["background"]"#, "is not an object"),
    ] {
        manifest(&src, &training.join(", "), labels, "[]");
        import(&src, &dir.join("ds"), &[]).refused(&["dataset.json", "`labels`", needle]);
    }
}

/// Rewrites the header of the NIfTI file `path` at byte `at` with `bytes`.
fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

/// Header bytes to overwrite: (offset, bytes).
type Edits = Vec<(usize, Vec<u8>)>;

#[test]
fn f08_degenerate_spacing_or_affine_is_refused_naming_the_file() {
    let dir = TempDir::new("f08");
    let cases: [(&str, Edits); 3] = [
        // qform only, pixdim[2] = 0
        ("zero", vec![(254, 0i16.to_le_bytes().to_vec()), (84, 0f32.to_le_bytes().to_vec())]),
        // qform only, pixdim[2] = NaN
        ("nan", vec![(254, 0i16.to_le_bytes().to_vec()), (84, f32::NAN.to_le_bytes().to_vec())]),
        // sform set, all zero
        ("sform", vec![(280, vec![0u8; 48])]),
    ];
    for (name, edits) in cases {
        let src = raw(&dir, name, 3);
        let bad = src.join("imagesTr/c1.nii");
        let label = src.join("labelsTr/c1.nii");
        for (at, bytes) in &edits {
            patch(&bad, *at, bytes);
            patch(&label, *at, bytes);
        }
        import(&src, &dir.join("ds"), &[]).refused(&["c1.nii"]);
        import(&src, &dir.join("ds"), &["--spacing", "1.5"]).refused(&["c1.nii"]);
        assert!(!dir.join("ds").exists());
    }
}

#[test]
fn f09_a_label_value_outside_labels_is_refused_at_import() {
    let dir = TempDir::new("f09");
    let src = raw(&dir, "raw", 3);
    let (_, mut label) = case_volumes(0);
    label.data[5] = 255;
    write_nifti(src.join("labelsTr/c1.nii"), &label, &Geometry::from_spacing([1.0, 1.2, 1.5])).unwrap();
    import(&src, &dir.join("ds"), &[]).refused(&["labelsTr/c1.nii", "label value 255", "not a class"]);
    assert!(!dir.join("ds").exists());
}

#[test]
fn f10_every_case_found_is_imported_or_reported_and_flags_are_bounded() {
    let dir = TempDir::new("f10");
    let src = raw(&dir, "raw", 3);
    // A test image listed in dataset.json outside imagesTs/, a hidden one and a stray file.
    std::fs::create_dir_all(src.join("more")).unwrap();
    let g = Geometry::from_spacing([1.0, 1.2, 1.5]);
    write_nifti(src.join("more/t1.nii"), &case_volumes(3).0, &g).unwrap();
    write_nifti(src.join("imagesTs/.t2.nii"), &case_volumes(4).0, &g).unwrap();
    std::fs::write(src.join("imagesTs/readme.txt"), "x").unwrap();
    let training: Vec<String> =
        (0..3).map(|i| format!(r#"{{"image": "./imagesTr/c{i}.nii", "label": "./labelsTr/c{i}.nii"}}"#)).collect();
    let labels = r#"{"0": "background", "1": "atrium"}"#;
    manifest(&src, &training.join(", "), labels, r#"["./imagesTs/t0.nii", "./more/t1.nii"]"#);
    let ds = dir.join("ds");
    let r = import(&src, &ds, &[]);
    r.ok();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ds.join("dataset.json")).unwrap()).unwrap();
    let test: Vec<String> = m["test"].as_array().unwrap().iter().map(|e| e.to_string()).collect();
    assert!(test.iter().any(|t| t.contains("t1")), "{test:?}");
    assert!(r.stderr.contains(".t2.nii") && r.stderr.contains("a hidden file"), "{}", r.stderr);
    assert!(r.stderr.contains("readme.txt") && r.stderr.contains("not imported"), "{}", r.stderr);
    // `training` of the wrong shape: the message is about dataset.json.
    std::fs::write(src.join("dataset.json"), r#"{"training": {"a": 1}, "labels": {"0": "bg", "1": "fg"}}"#).unwrap();
    import(&src, &dir.join("ds2"), &[]).refused(&["dataset.json", "`training`", "not a list"]);
    manifest(&src, &training.join(", "), labels, "[]");
    import(&src, &dir.join("ds2"), &["--downsample", "1000"]).refused(&["--downsample", "1/16..=16"]);
    import(&src, &dir.join("ds2"), &["--downsample", "4"]).refused(&["--downsample", "fewer than 4 per axis"]);
    let r = import(&src, &dir.join("ds2"), &["--crop-margin", "18446744073709551615"]);
    assert_eq!(r.code, Some(2), "clap's usage error: {}", r.stderr);
    assert!(r.stderr.contains("--crop-margin"), "{}", r.stderr);
    assert!(!dir.join("ds2").exists());
}

#[test]
fn f11_an_interrupted_import_leaves_nothing_behind() {
    let dir = TempDir::new("f11");
    // Big enough to take a while: 12 cases of 96x96x64, resampled and gzipped.
    let src = dir.join("raw");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    let dims = [96, 96, 64];
    let n: usize = dims.iter().product();
    let g = Geometry::from_spacing([1.0; 3]);
    let image = Volume::new(dims, (0..n).map(|i| (i % 97) as f32).collect()).unwrap();
    let label = Volume::new(dims, (0..n).map(|i| u8::from(i % 5 == 0)).collect()).unwrap();
    let mut entries = Vec::new();
    for i in 0..12 {
        write_nifti(src.join(format!("imagesTr/c{i}.nii")), &image, &g).unwrap();
        write_nifti(src.join(format!("labelsTr/c{i}.nii")), &label, &g).unwrap();
        entries.push(format!(r#"{{"image": "./imagesTr/c{i}.nii", "label": "./labelsTr/c{i}.nii"}}"#));
    }
    manifest(&src, &entries.join(", "), r#"{"0": "bg", "1": "fg"}"#, "[]");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = work.join("ds");
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut child = support::Daemon::new(
            Command::new(env!("CARGO_BIN_EXE_uamt"))
                .args(["import", "nifti", "--src", s(&src), "--out", s(&out), "--spacing", "0.8", "--gzip"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Wait until the staging folder exists, and a case or two is written into it.
        let t0 = Instant::now();
        while names(&work).is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(60), "no staging folder appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.child().wait().unwrap();
        assert_eq!(status.code(), Some(128 + signal), "{status:?}");
        let mut err = String::new();
        std::io::Read::read_to_string(child.child().stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.contains("interrupted by SIG"), "{err}");
        assert_eq!(names(&work), Vec::<String>::new(), "left behind after signal {signal}: {err}");
    }
}

#[test]
fn f12_fifos_are_refused_never_waited_on() {
    let dir = TempDir::new("f12");
    // dataset.json a FIFO.
    let src = raw(&dir, "raw", 3);
    std::fs::remove_file(src.join("dataset.json")).unwrap();
    mkfifo(&src.join("dataset.json"));
    uamt_env(&["import", "nifti", "--src", s(&src), "--out", s(&dir.join("ds"))], &[], 30)
        .refused(&["dataset.json", "a FIFO"]);
    // An image a FIFO.
    let src = raw(&dir, "raw2", 3);
    std::fs::remove_file(src.join("imagesTs/t0.nii")).unwrap();
    mkfifo(&src.join("imagesTs/t0.nii"));
    uamt_env(&["import", "nifti", "--src", s(&src), "--out", s(&dir.join("ds")), "--labelled", "2"], &[], 30)
        .refused(&["t0.nii", "a FIFO"]);
    assert!(!dir.join("ds").exists());
    // One inside a predict --input folder.
    let ck = checkpoint(&dir);
    let scans = dir.join("scans");
    std::fs::create_dir_all(&scans).unwrap();
    write_nifti(scans.join("a.nii"), &case_volumes(1).0, &Geometry::from_spacing([1.0; 3])).unwrap();
    mkfifo(&scans.join("b.nii.gz"));
    let pred = dir.join("pred");
    uamt_env(&["predict", "--checkpoint", s(&ck), "--input", s(&scans), "--out", s(&pred)], &[], 60)
        .refused(&["b.nii.gz", "a FIFO"]);
    // --config, info, eval --reference.
    let fifo = dir.join("fifo.toml");
    mkfifo(&fifo);
    uamt_env(&["train", "--config", s(&fifo)], &[], 30).refused(&["fifo.toml", "a FIFO"]);
    let fifo_nii = dir.join("fifo.nii");
    mkfifo(&fifo_nii);
    uamt_env(&["info", s(&fifo_nii)], &[], 30).refused(&["fifo.nii", "a FIFO"]);
    let label = dir.join("a.nii");
    write_nifti(&label, &case_volumes(0).1, &Geometry::from_spacing([1.0; 3])).unwrap();
    uamt_env(&["eval", "--prediction", s(&label), "--reference", s(&fifo_nii)], &[], 30).refused(&["a FIFO"]);
}

#[test]
fn f13_memory_is_estimated_before_the_work() {
    let dir = TempDir::new("f13");
    let ck = checkpoint(&dir);
    let scans = dir.join("scans");
    std::fs::create_dir_all(&scans).unwrap();
    write_nifti(scans.join("a.nii"), &case_volumes(1).0, &Geometry::from_spacing([1.0; 3])).unwrap();
    let p = dir.join("p");
    let args = ["predict", "--checkpoint", s(&ck), "--input", s(&scans), "--out", s(&p), "--device", "cpu"];
    let r = uamt_env(&[&args[..], &["--patch", "1024,1024,1024"]].concat(), &[], 60);
    r.refused(&["a.nii", "needs about", "--patch"]);
    assert!(!dir.join("p").exists(), "nothing is written before the estimate");
    // An import whose header declares 1024x1024x1000 voxels (the file itself is a few bytes of
    // gzip: refused from the header, before anything is decompressed or allocated).
    let src = raw(&dir, "raw", 3);
    let big = src.join("imagesTs/t0.nii");
    patch(&big, 42, &1024i16.to_le_bytes());
    patch(&big, 44, &1024i16.to_le_bytes());
    patch(&big, 46, &1000i16.to_le_bytes());
    let r = uamt_env(
        &["import", "nifti", "--src", s(&src), "--out", s(&dir.join("ds")), "--labelled", "2"],
        &[("UAMT_MAX_MEMORY", "2G")],
        60,
    );
    r.refused(&["t0.nii", "needs about", "2.0 GiB available"]);
    assert!(!dir.join("ds").exists());
}

#[test]
fn f17_export_writes_only_the_formats_it_names() {
    let dir = TempDir::new("f17");
    let ck = checkpoint(&dir);
    for out in ["w.onnx", "w", "w.safetensors.tmp"] {
        let path = dir.join(out);
        uamt(&["export", "--checkpoint", s(&ck), "--out", s(&path)]).refused(&["not a format export writes"]);
        assert!(!path.exists());
    }
    for out in ["w.safetensors", "w.pt", "w.pth", "w.npz"] {
        uamt(&["export", "--checkpoint", s(&ck), "--out", s(&dir.join(out))]).ok();
    }
}

#[test]
fn f18_when_every_labelled_case_is_skipped_the_error_names_them_and_why() {
    let dir = TempDir::new("f18");
    let src = raw(&dir, "raw", 3);
    let ds = dir.join("ds");
    import(&src, &ds, &[]).ok();
    // Both labelled cases' labels get a value that is not a class (replaced by rename).
    let (_, mut label) = case_volumes(0);
    label.data[7] = 9;
    let g = Geometry::from_spacing([1.0, 1.2, 1.5]);
    for id in ["c0", "c1"] {
        write_nifti(ds.join(format!("labelsTr/{id}.nii")), &label, &g).unwrap();
    }
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\ndataset = \"{}\"\npatch = [16, 16, 16]\n[model]\nn_filters = 4\n[optim]\niterations = 2\n\
             [device]\ndevice = \"cpu\"\n[checkpoint]\ndir = \"{}\"\n[telemetry]\nlisten = \"\"\n",
            ds.display(),
            dir.join("ck2").display()
        ),
    )
    .unwrap();
    let r = uamt_env(&["train", "--config", s(&config)], &[], 120);
    assert_ne!(r.code, Some(0));
    for id in ["c0", "c1"] {
        assert!(r.stderr.contains(&format!("labelsTr/{id}.nii: label value 9")), "{}", r.stderr);
    }
    assert!(r.stderr.contains("after skipping 2 bad one(s)"), "{}", r.stderr);
}
