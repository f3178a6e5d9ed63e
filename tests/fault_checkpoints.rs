//! Hostile checkpoint and weights files, run identity, resume fall-back and the non-finite
//! guard, at the library level: every bad file is an error naming it (never a panic), retention
//! and resume keep to their own run, an unusable newest checkpoint is set aside for the previous
//! good one, and a non-finite state is never written. The files are made here.

mod support;

use std::path::{Path, PathBuf};
use support::TempDir;
use tch::{Device, Kind, Tensor};
use uamt::checkpoint::{self, Snapshot};
use uamt::config::Config;
use uamt::model::params::read_named;
use uamt::model::tensorfile::MAX_FILE_BYTES;
use uamt::train::{Guidance, NonFinite, Trainer};

/// A tiny config (4 filters, CPU) with `seed`.
fn config(seed: u64) -> Config {
    let mut c = Config::demo();
    c.optim.seed = seed;
    c
}

fn trainer(cfg: &Config) -> Trainer {
    Trainer::seeded(&cfg.model, cfg.step_config(), Device::Cpu, cfg.optim.seed).unwrap()
}

/// A good checkpoint of run `run` after `iteration` steps in `dir`.
fn good(dir: &Path, cfg: &Config, iteration: i64, run: &str) -> PathBuf {
    let mut tr = trainer(cfg);
    tr.iter = iteration;
    Snapshot::of_trainer(&tr, cfg.optim.seed, &cfg.to_toml()).with_run_id(run).write_atomic(dir).unwrap()
}

/// Asserts that reading `path` as a checkpoint, by the evaluator and as weights fails with an
/// error naming it.
fn refused(path: &Path, what: &str) -> String {
    assert!(read_named(path).is_err(), "{what}: read as weights");
    bad_checkpoint(path, what)
}

/// Asserts that reading `path` as a checkpoint and by the evaluator fails with an error naming it.
fn bad_checkpoint(path: &Path, what: &str) -> String {
    let e = Snapshot::read(path).expect_err(what).to_string();
    assert!(e.contains(&path.display().to_string()), "{what}: the error does not name the file: {e}");
    assert!(checkpoint::read_student_weights(path).is_err(), "{what}: read by the evaluator");
    e
}

#[test]
fn hostile_files_are_errors_naming_them() {
    let dir = TempDir::new("fault-files");
    let cfg = config(1);
    // A 0-d format version (reading it used to panic in tch).
    let zero_d = dir.join("zero-d.safetensors");
    let named = [
        ("meta.format_version".to_string(), Tensor::from(2i64)),
        ("student.x".to_string(), Tensor::from_slice(&[1.0f32])),
    ];
    Tensor::write_safetensors(&named, &zero_d).unwrap();
    let e = bad_checkpoint(&zero_d, "0-d version"); // as plain weights it is a valid file
    assert!(e.contains("not a checkpoint"), "{e}");
    // Truncated.
    let whole = good(&dir.join("src"), &cfg, 3, &checkpoint::new_run_id(1));
    let bytes = std::fs::read(&whole).unwrap();
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.join(format!("cut-{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        refused(&p, &format!("truncated at {cut}"));
    }
    // A FIFO (opening it for reading would block forever), a device, a folder.
    let fifo = dir.join("fifo.safetensors");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert!(refused(&fifo, "FIFO").contains("FIFO"));
    let zero = dir.join("zero.safetensors");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    assert!(refused(&zero, "/dev/zero").contains("device"));
    let folder = dir.join("folder.safetensors");
    std::fs::create_dir(&folder).unwrap();
    assert!(refused(&folder, "folder").contains("folder"));
    // A symlink to a good file is fine.
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&whole, &link).unwrap();
    assert_eq!(Snapshot::read(&link).unwrap().iteration, 3);
    // Over the size limit (sparse: no disk used).
    let big = dir.join("big.safetensors");
    std::fs::File::create(&big).unwrap().set_len(MAX_FILE_BYTES + 1).unwrap();
    assert!(refused(&big, "oversized").contains("limit"));
    // Corrupt npz: garbage, and a well-formed zip whose array claims more data than it holds
    // (tch's own reader would read past the buffer).
    let npz = dir.join("garbage.npz");
    std::fs::write(&npz, b"PK\x03\x04 this is not a zip at all").unwrap();
    assert!(read_named(&npz).is_err());
    let liar = dir.join("liar.npz");
    Tensor::write_npz(&[("w", Tensor::zeros([4], (Kind::Float, Device::Cpu)))], &liar).unwrap();
    let mut b = std::fs::read(&liar).unwrap();
    let at = b.windows(4).position(|w| w == b"(4,)").expect("the npy header");
    b[at + 1] = b'9';
    std::fs::write(&liar, &b).unwrap();
    let e = read_named(&liar).unwrap_err().to_string();
    assert!(e.contains("liar.npz"), "{e}");
    // A good npz still reads.
    let ok = dir.join("ok.npz");
    Tensor::write_npz(&[("w", Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))], &ok).unwrap();
    assert_eq!(read_named(&ok).unwrap()[0].1.size(), vec![2, 3]);
}

/// A stored zip archive of `entries`.
fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        z.start_file(*name, zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored))
            .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// PyTorch's own formats from untrusted places: every bad file an error naming it, read by
/// content whatever its extension.
#[test]
fn hostile_pytorch_files_are_errors_naming_them() {
    let dir = TempDir::new("fault-torch");
    let cfg = config(3);
    let named = trainer(&cfg).student.store().named_tensors();
    let pt = dir.join("w.pt");
    let f = std::fs::File::create(&pt).unwrap();
    uamt::model::torchsave::write_state_dict(&named, std::io::BufWriter::new(f), &pt).unwrap();
    assert_eq!(read_named(&pt).unwrap().len(), named.len());
    // The format is the content's: the same bytes under another name read the same.
    let renamed = dir.join("w.safetensors");
    std::fs::copy(&pt, &renamed).unwrap();
    assert_eq!(read_named(&renamed).unwrap().len(), named.len());
    let bytes = std::fs::read(&pt).unwrap();
    let named_in = |e: &uamt::Error, p: &Path| e.to_string().contains(&p.display().to_string());
    for cut in [0, 3, 30, 300, bytes.len() / 3, bytes.len() / 2, bytes.len() - 22, bytes.len() - 1] {
        let p = dir.join(format!("cut-{cut}.pt"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = read_named(&p).expect_err(&format!("truncated at {cut}"));
        assert!(named_in(&e, &p), "{e}");
    }
    // `__reduce__` returning (os.system, ('echo',)), in a state_dict archive and in a TorchScript one.
    let evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.".as_slice();
    for (name, extra) in [("evil.pt", None), ("evil-script.pt", Some("evil/constants.pkl"))] {
        let mut entries = vec![("evil/data.pkl", evil)];
        entries.extend(extra.map(|n| (n, b"\x80\x02).".as_slice())));
        let p = dir.join(name);
        std::fs::write(&p, zip_of(&entries)).unwrap();
        let e = read_named(&p).unwrap_err();
        assert!(named_in(&e, &p) && e.to_string().contains("os.system"), "{e}");
    }
    // A storage record shorter than its tensor.
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice())).unwrap();
    let entries: Vec<(String, Vec<u8>)> = (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut b).unwrap();
            let name = f.name().to_string();
            if name == "archive/data/0" {
                b.truncate(b.len() - 4);
            }
            (name, b)
        })
        .collect();
    let short = dir.join("short.pt");
    std::fs::write(&short, zip_of(&entries.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect::<Vec<_>>()))
        .unwrap();
    let e = read_named(&short).unwrap_err();
    assert!(named_in(&e, &short) && e.to_string().contains("storage `0`"), "{e}");
    // Neither a weights file nor a zip.
    let junk = dir.join("junk.pth");
    std::fs::write(&junk, b"just some text, no weights").unwrap();
    let e = read_named(&junk).unwrap_err();
    assert!(named_in(&e, &junk) && e.to_string().contains("not a weights file"), "{e}");
}

#[test]
fn wrong_shapes_and_kinds_leave_the_model_untouched() {
    let dir = TempDir::new("fault-shapes");
    let cfg = config(2);
    let mut tr = trainer(&cfg);
    let before: Vec<Tensor> = tr.student.store().iter().map(|p| p.tensor.copy()).collect();
    let other = {
        let mut c = cfg.clone();
        c.model.n_filters = 8;
        c
    };
    let path = good(&dir, &other, 5, "");
    let snap = Snapshot::read(&path).unwrap();
    let e = snap.restore_into(&mut tr, &path).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    // Integer weights where floats belong.
    let mut snap = Snapshot::of_trainer(&trainer(&cfg), 2, &cfg.to_toml());
    let t = &mut snap.student[0].1;
    *t = t.to_kind(Kind::Int64);
    assert!(snap.restore_into(&mut tr, &path).unwrap_err().to_string().contains("Int64"));
    for (p, b) in tr.student.store().iter().zip(&before) {
        assert!(p.tensor.equal(b), "`{}` changed by a refused checkpoint", p.name);
    }
    assert_eq!(tr.iter, 0);
}

#[test]
fn version_1_files_read_as_run_id_empty() {
    let dir = TempDir::new("fault-v1");
    let cfg = config(3);
    let tr = trainer(&cfg);
    let snap = Snapshot::of_trainer(&tr, 3, &cfg.to_toml());
    let mut named = vec![
        ("meta.format_version".to_string(), Tensor::from_slice(&[1i64])),
        ("meta.iteration".to_string(), Tensor::from_slice(&[7i64])),
        ("meta.seed".to_string(), Tensor::from_slice(&[3i64])),
        ("meta.config".to_string(), Tensor::from_slice(cfg.to_toml().as_bytes())),
    ];
    named.extend(snap.student.iter().map(|(n, t)| (format!("student.{n}"), t.shallow_clone())));
    named.extend(snap.teacher.as_ref().unwrap().iter().map(|(n, t)| (format!("teacher.{n}"), t.shallow_clone())));
    named.extend(snap.momentum.iter().map(|(n, t)| (format!("optimizer.momentum.{n}"), t.shallow_clone())));
    let path = dir.join("ckpt-00000007.safetensors");
    Tensor::write_safetensors(&named, &path).unwrap();
    let read = Snapshot::read(&path).unwrap();
    assert_eq!((read.iteration, read.run_id.as_str()), (7, ""));
    let mut tr = trainer(&cfg);
    let r = checkpoint::resume_newest(&dir, &cfg, &mut tr).unwrap().unwrap();
    assert_eq!((r.iteration, r.run_id.as_str(), tr.iter), (7, "", 7));
}

#[test]
fn runs_prune_only_their_own_files_and_resume_their_own() {
    let dir = TempDir::new("fault-runs");
    let (ca, cb) = (config(10), config(11));
    let (a, b) = (checkpoint::new_run_id(10), checkpoint::new_run_id(11));
    for i in 1..=3 {
        good(&dir, &ca, i, &a);
        good(&dir, &cb, 10 + i, &b);
    }
    assert_eq!(checkpoint::prune(&dir, 1, &a).len(), 2);
    let left: Vec<(i64, String)> = checkpoint::entries(&dir).into_iter().map(|e| (e.iteration, e.run_id)).collect();
    assert_eq!(left, vec![(3, a.clone()), (11, b.clone()), (12, b.clone()), (13, b.clone())]);
    // Run a resumes its own newest even though b's are newer; b resumes b's.
    let mut tr = trainer(&ca);
    let r = checkpoint::resume_newest(&dir, &ca, &mut tr).unwrap().unwrap();
    assert_eq!((r.iteration, &r.run_id), (3, &a));
    let mut tr = trainer(&cb);
    assert_eq!(checkpoint::resume_newest(&dir, &cb, &mut tr).unwrap().unwrap().run_id, b);
    // A config of neither run finds nothing and says why, file by file.
    let mut tr = trainer(&config(12));
    let e = checkpoint::resume_newest(&dir, &config(12), &mut tr).unwrap_err().to_string();
    assert!(e.contains("another seed") && e.contains(&a) && e.contains(&b), "{e}");
    assert_eq!(checkpoint::entries(&dir).len(), 4, "other runs' files are left alone");
}

#[test]
fn resume_sets_a_truncated_newest_aside_and_uses_the_previous() {
    let dir = TempDir::new("fault-fallback");
    let cfg = config(20);
    let run = checkpoint::new_run_id(20);
    good(&dir, &cfg, 4, &run);
    let newest = good(&dir, &cfg, 8, &run);
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let mut tr = trainer(&cfg);
    let r = checkpoint::resume_newest(&dir, &cfg, &mut tr).unwrap().unwrap();
    assert_eq!((r.iteration, tr.iter, &r.run_id), (4, 4, &run));
    assert_eq!(r.set_aside.len(), 1);
    let rejected = PathBuf::from(format!("{}.rejected", newest.display()));
    assert!(rejected.exists() && !newest.exists(), "the bad file is renamed, not deleted");
    assert_eq!(checkpoint::latest(&dir).unwrap().0, 4);
    // --resume-from: a named file, checked against the config.
    let mut tr = trainer(&cfg);
    let from = checkpoint::resume_from(&checkpoint::latest(&dir).unwrap().1, &cfg, &mut tr).unwrap();
    assert_eq!((from.iteration, from.run_id), (4, run));
    let mut tr = trainer(&config(21));
    let e = checkpoint::resume_from(&checkpoint::latest(&dir).unwrap().1, &config(21), &mut tr).unwrap_err();
    assert!(e.to_string().contains("another seed"), "{e}");
    assert!(checkpoint::resume_from(&rejected, &cfg, &mut trainer(&cfg)).is_err());
}

#[test]
fn a_non_finite_state_is_never_written() {
    let dir = TempDir::new("fault-nan");
    let cfg = config(30);
    let mut snap = Snapshot::of_trainer(&trainer(&cfg), 30, &cfg.to_toml());
    let _ = snap.student[0].1.fill_(f64::NAN);
    let e = snap.write_atomic(&dir).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains(&snap.student[0].0), "{e}");
    assert!(checkpoint::entries(&dir).is_empty());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no temporary file left");
}

/// One student step whose consistency target is NaN, under `policy`.
fn nan_step(policy: NonFinite) -> (Trainer, Vec<Tensor>, bool) {
    let mut cfg = config(40);
    cfg.optim.on_nonfinite = policy;
    cfg.data.sampler.labelled_bs = 1;
    let mut tr = trainer(&cfg);
    let before: Vec<Tensor> = tr.student.store().trainable().map(|p| p.tensor.detach().copy()).collect();
    let shape = [2, 1, 16, 16, 16];
    let images = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let labels = Tensor::zeros([1, 16, 16, 16], (Kind::Int64, Device::Cpu));
    let rnd = tr.draw_random(40, &shape);
    let logits = tr.student_forward(&images, &rnd.student).unwrap();
    let g = Guidance {
        target: Tensor::full([1, 2, 16, 16, 16], f64::NAN, (Kind::Float, Device::Cpu)),
        mask: Tensor::ones([1, 1, 16, 16, 16], (Kind::Float, Device::Cpu)),
        uncertainty: None,
        threshold: f64::INFINITY,
    };
    let stats = tr.student_finish(&logits, &labels, Some(&g)).unwrap();
    assert_eq!(tr.iter, 1);
    (tr, before, stats.skipped)
}

#[test]
fn skip_leaves_the_weights_and_stop_leaves_it_to_the_read_back() {
    let (tr, before, skipped) = nan_step(NonFinite::Skip);
    assert!(skipped);
    for (p, b) in tr.student.store().trainable().zip(&before) {
        assert!(p.tensor.equal(b), "`{}` updated by a skipped step", p.name);
    }
    assert!(Snapshot::of_trainer(&tr, 40, "").non_finite().is_none());
    let (tr, _, skipped) = nan_step(NonFinite::Stop);
    assert!(!skipped, "stop costs no check in the step");
    assert!(Snapshot::of_trainer(&tr, 40, "").non_finite().is_some(), "the update went through");
}
