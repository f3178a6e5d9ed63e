//! The daemon's lifecycle through the real binary: a failing training stage ends the run with a
//! non-zero exit naming the stage, with and without a watched folder; an evaluation that fails
//! (even by a panic inside libtorch) leaves training running and later files are evaluated;
//! SIGUSR1 before training starts is harmless; a second SIGTERM forces the exit.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Daemon, TempDir};
use tch::Tensor;
use uamt::checkpoint;

/// Waits for the daemon to exit, at most `secs`.
fn wait_exit(d: &mut Daemon, secs: u64) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = d.child().try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(secs), "the daemon did not exit within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const SIGUSR1: i32 = 10;
const SIGTERM: i32 = 15;

/// A tiny UA-MT config writing everything under `dir`.
fn write_config(dir: &Path, iterations: i64, every: i64, extra: &str) -> PathBuf {
    let text = format!(
        "[data]\nsynth_dir = \"{synth}\"\npatch = [32, 32, 16]\n[data.synth]\ncases = 6\nlabelled = 2\ntest = 1\n\
         size = [40, 40, 24]\n[model]\nn_filters = 4\n[method]\nconsistency_interval = 1\n[optim]\n\
         iterations = {iterations}\n[device]\ndevice = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{ckpt}\"\n\
         every = {every}\nkeep = 10\n[telemetry]\nlisten = \"\"\nlog_every = 1\n{extra}\n",
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn start(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Daemon {
    support::start_train(env!("CARGO_BIN_EXE_uamt"), config, dir, env)
}

/// The daemon's log without colour escapes (were there any).
fn log(dir: &Path) -> String {
    let raw = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn watch_section(dir: &Path) -> String {
    format!(
        "[eval]\nwatch_dir = \"{}\"\nreport_dir = \"{}\"\npatch = [32, 32, 16]\nstride = [8, 8, 4]\n",
        dir.join("watch").display(),
        dir.join("reports").display()
    )
}

#[test]
fn a_failing_stage_exits_non_zero_within_30_s_naming_it_with_and_without_a_watched_folder() {
    for (name, watching) in [("fail-plain", false), ("fail-watch", true)] {
        let dir = TempDir::new(name);
        std::fs::create_dir_all(dir.join("watch")).unwrap();
        let extra = if watching { watch_section(&dir) } else { String::new() };
        // teacher_lag = 1 runs the pipeline (its own teacher thread) on a CPU too.
        let cfg = write_config(&dir, 100_000, 0, &format!("{extra}\n"));
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("consistency_interval = 1", "consistency_interval = 1\nteacher_lag = 1");
        std::fs::write(&cfg, text).unwrap();
        let mut d = start(&cfg, &dir, &[("UAMT_FAULT", "teacher@3")]);
        wait_for("training", 240, || log(&dir).contains("training"));
        let t0 = Instant::now();
        let status = wait_exit(&mut d, 120);
        assert!(!status.success(), "{name}: the run must fail");
        assert_ne!(status.code(), Some(101), "{name}: no panic exit");
        let log = log(&dir);
        assert!(log.contains("teacher") && log.contains("injected fault"), "{name}: {log}");
        assert!(t0.elapsed() < Duration::from_secs(30), "{name}: took {:?}", t0.elapsed());
    }
}

#[test]
fn an_evaluation_that_fails_leaves_training_running_and_the_next_file_is_evaluated() {
    let dir = TempDir::new("evalfail");
    std::fs::create_dir_all(dir.join("watch")).unwrap();
    let cfg = write_config(&dir, 100_000, 3, &watch_section(&dir));
    let mut d = start(&cfg, &dir, &[]);
    wait_for("a checkpoint", 240, || !checkpoint::list(&dir.join("ckpt")).is_empty());
    // A checkpoint whose format version is a 0-d tensor: reading it used to panic in tch.
    let bad = vec![
        ("meta.format_version".to_string(), Tensor::from(1i64)),
        ("student.x".to_string(), Tensor::from_slice(&[1.0f32])),
    ];
    Tensor::write_safetensors(&bad, dir.join("watch/a-bad.safetensors")).unwrap();
    wait_for("the failure", 60, || log(&dir).contains("a-bad.safetensors"));
    let good = checkpoint::list(&dir.join("ckpt"))[0].1.clone();
    std::fs::copy(good, dir.join("watch/b-good.safetensors")).unwrap();
    wait_for("the good file's report", 180, || dir.join("reports/b-good/report.json").exists());
    let before = checkpoint::latest(&dir.join("ckpt")).unwrap().0;
    wait_for("training to go on", 120, || checkpoint::latest(&dir.join("ckpt")).unwrap().0 > before);
    assert!(d.child().try_wait().unwrap().is_none(), "the daemon must keep running");
    d.signal(SIGTERM);
    assert!(wait_exit(&mut d, 120).success());
}

#[test]
fn sigusr1_before_training_is_harmless_and_a_second_sigterm_forces_the_exit() {
    let dir = TempDir::new("signals");
    let cfg = write_config(&dir, 100_000, 0, "");
    let mut d = start(&cfg, &dir, &[]);
    // As soon as the daemon logs anything, its handlers are installed.
    wait_for("the first log line", 60, || !log(&dir).is_empty());
    d.signal(SIGUSR1);
    wait_for("a training step", 240, || log(&dir).contains("iteration="));
    assert!(d.child().try_wait().unwrap().is_none(), "SIGUSR1 must not kill the daemon");
    d.signal(SIGTERM);
    d.signal(SIGTERM);
    let status = wait_exit(&mut d, 60);
    // Either the step and its checkpoint finished within the grace (exit 0) or the forced exit
    // (130); never a hang.
    assert!(status.success() || status.code() == Some(130), "{status:?}");
}

/// The highest `iteration=N` the daemon logged.
fn last_logged_iteration(text: &str) -> Option<i64> {
    text.lines()
        .filter(|l| l.contains("training"))
        .filter_map(|l| l.split("iteration=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .max()
}

#[test]
fn sigterm_at_random_points_always_leaves_a_final_checkpoint_to_resume_from() {
    let dir = TempDir::new("signals-random");
    let cfg = write_config(&dir, 100_000, 0, "");
    let ckpt = dir.join("ckpt");
    // A restart loop under a supervisor that kills at random: start (resuming), SIGTERM after a
    // random delay (start-up, data generation, model building or mid-step), check, repeat.
    let mut state = 0x2545f4914f6cdd1du64;
    let mut before = 0;
    for trial in 0..6 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = Duration::from_millis(100 + state % 3000);
        let _ = std::fs::remove_file(dir.join("log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uamt"));
        cmd.args(["train", "--resume", "--config"]).arg(&cfg).current_dir(dir.path()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(dir.join("log")).unwrap());
        let mut d = Daemon::new(cmd.spawn().unwrap());
        wait_for("the first log line", 60, || !log(&dir).is_empty());
        std::thread::sleep(delay);
        d.signal(SIGTERM);
        let status = wait_exit(&mut d, 120);
        let text = log(&dir);
        assert!(status.success(), "trial {trial} ({delay:?}): {status:?}\n{text}");
        let latest = checkpoint::latest(&ckpt).map(|(it, _)| it).unwrap_or(0);
        assert!(latest >= before, "trial {trial}: the newest checkpoint went back from {before} to {latest}");
        if let Some(done) = last_logged_iteration(&text) {
            assert!(
                latest >= done,
                "trial {trial} ({delay:?}): logged iteration {done}, newest checkpoint {latest}\n{text}"
            );
        }
        if latest > 0 {
            let (_, path) = checkpoint::latest(&ckpt).unwrap();
            let snap = checkpoint::Snapshot::read(&path).unwrap();
            assert_eq!(snap.iteration, latest);
        }
        eprintln!("trial {trial}: SIGTERM after {delay:?}, newest checkpoint {latest}");
        before = latest;
    }
    assert!(before > 0, "six runs of up to 3 s made no step at all");
}

/// The shared objects the dynamic loader loaded for `uamt args...` (its `LD_DEBUG=files` trace).
fn loaded_libraries(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_uamt")).args(args).env("LD_DEBUG", "files").output().unwrap();
    String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("file=")).collect::<Vec<_>>().join("\n")
}

#[test]
fn only_a_cuda_device_loads_libtorch_s_cuda_backend() {
    // `uamt --version`, and a CPU command, never pay for the CUDA libraries (0.4 s and 470 MB).
    let version = loaded_libraries(&["--version"]);
    assert!(version.contains("libtorch_cpu"), "the trace names what is loaded: {version}");
    assert!(!version.contains("libtorch_cuda"), "{version}");
    let cpu = loaded_libraries(&[
        "predict",
        "--device",
        "cpu",
        "--weights",
        "/nonexistent.safetensors",
        "--input",
        "/nonexistent",
        "--out",
        "/nonexistent-out",
    ]);
    assert!(!cpu.contains("libtorch_cuda"), "{cpu}");
    // Asking for a GPU loads the backend (where the libtorch built against has one), so that
    // libtorch can answer; without a GPU the answer is the usual error.
    let cuda = loaded_libraries(&[
        "predict",
        "--device",
        "cuda:0",
        "--weights",
        "/nonexistent.safetensors",
        "--input",
        "/nonexistent",
        "--out",
        "/nonexistent-out",
    ]);
    assert_eq!(cuda.contains("libtorch_cuda"), cfg!(libtorch_cuda), "{cuda}");
}
