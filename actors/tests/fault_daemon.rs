//! The daemon against hostile checkpoints and a shared checkpoint folder, through the binary:
//! every kind of bad file dropped into the watched folder is refused and the good one after them
//! is evaluated while training goes on (no exit 101 or 134); a second run is refused a folder
//! holding another run's checkpoints unless `--share-checkpoint-dir`, and then neither prunes
//! the other's files; a run whose weights go non-finite stops with an error naming the
//! iteration and writes no non-finite checkpoint.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Daemon, TempDir};
use tch::{Device, Kind, Tensor};
use uamt::checkpoint::{self, Snapshot};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_uamt")
}

/// A tiny UA-MT config under `dir` with `extra` appended (sections of its own).
fn write_config(dir: &Path, iterations: i64, every: i64, optim: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[data]\nsynth_dir = \"{synth}\"\npatch = [32, 32, 16]\n[data.synth]\ncases = 5\nlabelled = 2\ntest = 1\n\
         size = [40, 40, 24]\n[model]\nn_filters = 4\n[optim]\niterations = {iterations}\n{optim}\n[device]\n\
         device = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{ckpt}\"\nevery = {every}\nkeep = 2\n[telemetry]\n\
         listen = \"\"\n{extra}\n",
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `uamt train --config <config> <args>` to the end; returns (success, exit code, stderr).
fn run(config: &Path, args: &[&str]) -> (bool, Option<i32>, String) {
    let out = Command::new(bin()).args(["train", "--config"]).arg(config).args(args).output().unwrap();
    (out.status.success(), out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn hostile_files_in_the_watched_folder_are_refused_and_training_goes_on() {
    let dir = TempDir::new("fault-watch");
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let eval = format!(
        "[eval]\nwatch_dir = \"{}\"\nreport_dir = \"{}\"\npatch = [32, 32, 16]\nstride = [32, 32, 16]",
        watch.display(),
        dir.join("reports").display()
    );
    let cfg = write_config(&dir, 100_000, 2, "", &eval);
    let log = dir.join("log");
    let child = Command::new(bin())
        .args(["train", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon::new(child);
    wait_for("a checkpoint", 300, || !checkpoint::list(&dir.join("ckpt")).is_empty());
    let good = checkpoint::list(&dir.join("ckpt"))[0].1.clone();
    let bytes = std::fs::read(&good).unwrap();
    // The hostile files, in name order before the good one.
    Tensor::write_safetensors(
        &[("meta.format_version", Tensor::from(2i64)), ("student.x", Tensor::from_slice(&[1.0f32]))],
        watch.join("a-zero-d.safetensors"),
    )
    .unwrap();
    std::fs::write(watch.join("b-truncated.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(Command::new("mkfifo").arg(watch.join("c-fifo.safetensors")).status().unwrap().success());
    std::os::unix::fs::symlink("/dev/zero", watch.join("d-zero.safetensors")).unwrap();
    std::fs::create_dir(watch.join("e-folder.safetensors")).unwrap();
    std::fs::File::create(watch.join("f-big.safetensors"))
        .unwrap()
        .set_len(uamt::model::tensorfile::MAX_FILE_BYTES + 1)
        .unwrap();
    std::fs::write(watch.join("g-corrupt.npz"), b"PK\x03\x04 not a zip").unwrap();
    Tensor::write_safetensors(
        &[("block_one.conv.0.weight", Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)))],
        watch.join("h-shapes.safetensors"),
    )
    .unwrap();
    std::fs::write(watch.join("i-model.ot"), b"not torchscript").unwrap();
    std::fs::copy(&good, watch.join("z-good.safetensors")).unwrap();
    wait_for("the good file's report", 300, || dir.join("reports/z-good/report.json").exists());
    let text = std::fs::read_to_string(&log).unwrap();
    for name in ["a-zero-d", "b-truncated", "c-fifo", "d-zero", "e-folder", "f-big", "g-corrupt", "h-shapes"] {
        assert!(text.contains(name), "{name} is not reported in the log");
        assert!(!dir.join("reports").join(name).exists(), "{name} was evaluated");
    }
    assert!(!text.contains("i-model"), "a TorchScript file is not even looked at");
    let before = checkpoint::latest(&dir.join("ckpt")).unwrap().0;
    wait_for("training to go on", 300, || checkpoint::latest(&dir.join("ckpt")).unwrap().0 > before);
    assert!(d.try_wait().unwrap().is_none(), "the daemon must keep running");
    assert!(Command::new("kill").args(["-TERM", &d.id().to_string()]).status().unwrap().success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "exit {status:?}");
}

#[test]
fn a_second_run_is_refused_the_folder_unless_shared_and_then_each_keeps_its_own() {
    let dir = TempDir::new("fault-share");
    let cfg = write_config(&dir, 3, 1, "", "");
    let ck = dir.join("ckpt");
    let (ok, _, err) = run(&cfg, &[]);
    assert!(ok, "{err}");
    let a: Vec<checkpoint::Entry> = checkpoint::entries(&ck);
    assert_eq!(a.len(), 2, "keep = 2");
    let run_a = a[0].run_id.clone();
    let (ok, code, err) = run(&cfg, &["--seed", "5"]);
    assert!(!ok && code != Some(101) && code != Some(134), "{err}");
    assert!(err.contains("--share-checkpoint-dir") && err.contains("another run"), "{err}");
    let (ok, _, err) = run(&cfg, &["--seed", "5", "--share-checkpoint-dir"]);
    assert!(ok, "{err}");
    let all = checkpoint::entries(&ck);
    let of = |id: &str| all.iter().filter(|e| e.run_id == id).count();
    assert_eq!(of(&run_a), 2, "run b pruned run a's files");
    let run_b = all.iter().find(|e| e.run_id != run_a).unwrap().run_id.clone();
    assert_eq!(of(&run_b), 2);
    // Resuming (seed of run a, more iterations) takes run a's newest and keeps its id.
    let (ok, _, err) = run(&cfg, &["--resume", "--iterations", "4"]);
    assert!(ok, "{err}");
    let newest_a = checkpoint::latest_of(&ck, &run_a).unwrap();
    assert_eq!(newest_a.iteration, 4);
    assert_eq!(checkpoint::entries(&ck).iter().filter(|e| e.run_id == run_b).count(), 2);
    // The newest truncated: resume sets it aside and continues from the previous one.
    let bytes = std::fs::read(&newest_a.path).unwrap();
    std::fs::write(&newest_a.path, &bytes[..bytes.len() / 3]).unwrap();
    let (ok, _, err) = run(&cfg, &["--resume", "--iterations", "5"]);
    assert!(ok, "{err}");
    assert!(err.contains("set aside"), "{err}");
    assert!(PathBuf::from(format!("{}.rejected", newest_a.path.display())).exists());
    assert_eq!(checkpoint::latest_of(&ck, &run_a).unwrap().iteration, 5);
    // --resume-from a named file of run b.
    let b_file = checkpoint::latest_of(&ck, &run_b).unwrap().path;
    let (ok, _, err) = run(&cfg, &["--seed", "5", "--iterations", "4", "--resume-from", b_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(checkpoint::latest_of(&ck, &run_b).unwrap().iteration, 4);
}

#[test]
fn a_run_being_trained_cannot_be_resumed_by_a_second_process() {
    let dir = TempDir::new("fault-lock");
    let cfg = write_config(&dir, 2, 1, "", "");
    let (ok, _, err) = run(&cfg, &[]);
    assert!(ok, "{err}");
    // Process A resumes the run for a long stretch; B tries to resume the same run meanwhile.
    let mut a = Daemon::new(
        Command::new(bin())
            .args(["train", "--resume", "--iterations", "100000", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("a.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("A to resume", 120, || std::fs::read_to_string(dir.join("a.log")).unwrap_or_default().contains("resumed"));
    let (ok, code, err) = run(&cfg, &["--resume", "--iterations", "100000"]);
    assert!(!ok && code != Some(101) && code != Some(134), "{err}");
    assert!(err.contains("being trained by another process") && err.contains(&format!("pid {}", a.id())), "{err}");
    assert!(a.child().try_wait().unwrap().is_none(), "A goes on");
    // Once A has stopped, the run resumes again.
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: plain libc call on our own child.
    assert_eq!(unsafe { kill(a.id() as i32, 15) }, 0);
    let t0 = Instant::now();
    while a.child().try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(120), "A did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = run(&cfg, &["--resume", "--iterations", "3"]);
    assert!(ok, "{err}");
}

#[test]
fn an_unwritable_checkpoint_folder_is_named_at_start() {
    let dir = TempDir::new("fault-unwritable");
    std::fs::write(dir.join("file"), b"").unwrap();
    let cfg = write_config(&dir, 3, 1, "", "");
    let (ok, _, err) = run(&cfg, &["--checkpoint-dir", dir.join("file/sub").to_str().unwrap()]);
    assert!(!ok && err.contains("checkpoint.dir"), "{err}");
}

#[test]
fn non_finite_weights_stop_the_run_naming_the_iteration_without_a_checkpoint() {
    let dir = TempDir::new("fault-nan");
    let cfg = write_config(&dir, 20, 1, "base_lr = 1e300", "");
    let (ok, code, err) = run(&cfg, &[]);
    assert!(!ok && code != Some(101) && code != Some(134), "exit {code:?}: {err}");
    assert!(err.contains("iteration") && (err.contains("NaN") || err.contains("inf")), "{err}");
    for (_, path) in checkpoint::list(&dir.join("ckpt")) {
        assert!(Snapshot::read(&path).unwrap().non_finite().is_none(), "{} is not finite", path.display());
    }
}

/// A UA-MT config of `patch` and `filters` on a synthetic dataset of `size` under `dir`.
fn sized_config(dir: &Path, patch: [usize; 3], filters: usize, size: [usize; 3], iterations: i64) -> PathBuf {
    let text = format!(
        "[data]\nsynth_dir = \"{synth}\"\npatch = {patch:?}\n[data.synth]\ncases = 4\nlabelled = 2\ntest = 1\n\
         size = {size:?}\n[model]\nn_filters = {filters}\n[optim]\niterations = {iterations}\n[device]\n\
         device = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{ckpt}\"\nevery = 0\n[telemetry]\nlisten = \"\"\n",
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_config_that_cannot_fit_is_refused_at_start_saying_how_much_it_needs() {
    let dir = TempDir::new("fault-memory");
    let cfg = sized_config(&dir, [512, 512, 256], 256, [40, 40, 24], 3);
    let t0 = Instant::now();
    let (ok, code, err) = run(&cfg, &[]);
    assert!(!ok && code != Some(101) && code != Some(134), "{code:?}: {err}");
    assert!(err.contains("needs about") && err.contains("GiB") && err.contains("available"), "{err}");
    assert!(err.contains("model.n_filters") && err.contains("data.patch"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(60), "refused before anything is allocated or generated");
    assert!(!dir.join("synth").exists(), "nothing was generated");
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

#[test]
fn the_memory_estimate_covers_what_a_run_uses_without_overstating_it() {
    let dir = TempDir::new("fault-memory-estimate");
    let cfg_path = sized_config(&dir, [64, 64, 48], 8, [72, 72, 56], 3);
    let cfg = uamt::config::Config::load(&cfg_path).unwrap();
    let estimate = uamt::footprint::Footprint::of(&cfg);
    let mut child = Command::new(bin())
        .args(["train", "--config"])
        .arg(&cfg_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // VmHWM only grows: its last reading before the exit is the run's peak (to a poll's accuracy).
    let mut peak = 0;
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if let Some(p) = peak_rss(child.id()) {
            peak = peak.max(p);
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "the run did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    let (est, gib) = (estimate.total(), |b: u64| b as f64 / (1u64 << 30) as f64);
    assert!(peak > 0);
    assert!(est >= peak, "estimate {:.2} GiB below the measured peak {:.2} GiB", gib(est), gib(peak));
    assert!(est <= 3 * peak, "estimate {:.2} GiB more than 3x the measured peak {:.2} GiB", gib(est), gib(peak));
}
