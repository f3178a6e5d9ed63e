//! End-to-end tests of the `uamt` binary: the daemon trains, serves /metrics to a real
//! Prometheus client, writes checkpoints, stops cleanly on SIGTERM with a loadable checkpoint,
//! resumes to the same result as an uninterrupted run, and refuses a bad config by key.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{la_dir, python, repo, Daemon, TempDir};
use uamt::checkpoint::{self, Snapshot};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_uamt")
}

/// A tiny UA-MT config writing everything under `dir`.
fn write_config(dir: &Path, iterations: i64, every: i64, extra: &str) -> PathBuf {
    let text = format!(
        r#"
[data]
synth_dir = "{synth}"
patch = [32, 32, 16]
[data.synth]
cases = 6
labelled = 2
test = 1
size = [40, 40, 24]
[model]
n_filters = 4
[method]
consistency_interval = 1
[optim]
iterations = {iterations}
[device]
device = "cpu"
threads = 1
schedule = "pipelined"
[checkpoint]
dir = "{ckpt}"
every = {every}
keep = 10
[telemetry]
listen = "127.0.0.1:0"
log_every = 5
{extra}
"#,
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts `uamt train` on `config` in `dir`; the guard kills it if the test ends first.
fn start(config: &Path, dir: &Path, args: &[&str]) -> Daemon {
    let child = Command::new(bin())
        .args(["train", "--config"])
        .arg(config)
        .arg("--addr-file")
        .arg(dir.join("addr"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("log-{}", Instant::now().elapsed().as_nanos()))).unwrap())
        .spawn()
        .unwrap();
    Daemon::new(child)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Scrapes /metrics with Python's urllib and parses it with prometheus_client's parser.
fn scrape(addr: &str) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo().join("tests/oracle/scrape_metrics.py"))
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert!(out.status.success(), "scrape failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of sample `name` whose labels include `labels`.
fn sample(m: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m["families"].as_object()?.values().flat_map(|f| f["samples"].as_array().cloned().unwrap_or_default()).find_map(
        |s| {
            let ok = s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v);
            ok.then(|| s[2].as_f64()).flatten()
        },
    )
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("the daemon did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn daemon_trains_serves_metrics_and_writes_checkpoints() {
    let dir = TempDir::new("daemon-metrics");
    let cfg = write_config(&dir, 400, 10, "");
    let mut child = start(&cfg, &dir, &[]);
    wait_for("the metrics address", 120, || dir.join("addr").exists());
    let addr = std::fs::read_to_string(dir.join("addr")).unwrap();
    wait_for("a few iterations", 240, || sample(&scrape(&addr), "uamt_iterations_total", &[]).unwrap_or(0.0) >= 12.0);
    let m = scrape(&addr);
    for (name, labels) in [
        ("uamt_loss", vec![("term", "supervised")]),
        ("uamt_loss", vec![("term", "consistency")]),
        ("uamt_consistency_weight", vec![]),
        ("uamt_uncertainty_threshold", vec![]),
        ("uamt_mask_fraction", vec![]),
        ("uamt_learning_rate", vec![]),
        ("uamt_iteration_seconds_count", vec![]),
        ("uamt_queue_capacity", vec![("queue", "guidance")]),
        ("uamt_queue_depth", vec![("queue", "batches")]),
        ("uamt_queue_pushed_total", vec![("queue", "params")]),
        ("uamt_queue_popped_total", vec![("queue", "teacher")]),
        ("uamt_stage_busy_seconds_total", vec![("stage", "teacher")]),
        ("uamt_stage_idle_seconds_total", vec![("stage", "student")]),
        ("uamt_checkpoint_writes_total", vec![]),
    ] {
        assert!(sample(&m, name, &labels).is_some(), "{name} {labels:?} missing from /metrics");
    }
    assert_eq!(sample(&m, "uamt_learning_rate", &[]), Some(0.01));
    assert_eq!(sample(&m, "uamt_queue_capacity", &[("queue", "guidance")]), Some(2.0));
    let lr_type = &m["families"]["uamt_iterations"]["type"];
    assert_eq!(lr_type, "counter");
    assert!(sample(&m, "uamt_stage_busy_seconds_total", &[("stage", "student")]).unwrap() > 0.0);
    // Checkpoints appear and each one loads.
    wait_for("a checkpoint", 60, || !checkpoint::list(&dir.join("ckpt")).is_empty());
    let (it, path) = checkpoint::list(&dir.join("ckpt")).remove(0);
    let snap = Snapshot::read(&path).unwrap();
    assert_eq!(snap.iteration, it);
    assert!(snap.teacher.is_some());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0() {
    let dir = TempDir::new("daemon-sigterm");
    let cfg = write_config(&dir, 100_000, 0, "");
    let mut child = start(&cfg, &dir, &[]);
    wait_for("the metrics address", 120, || dir.join("addr").exists());
    let addr = std::fs::read_to_string(dir.join("addr")).unwrap();
    wait_for("some iterations", 240, || sample(&scrape(&addr), "uamt_iterations_total", &[]).unwrap_or(0.0) >= 3.0);
    assert!(checkpoint::list(&dir.join("ckpt")).is_empty(), "no periodic checkpoints in this config");
    // SIGUSR1 asks for a checkpoint without stopping.
    assert_eq!(unsafe { libc_kill(child.id() as i32, 10) }, 0);
    wait_for("the requested checkpoint", 60, || checkpoint::list(&dir.join("ckpt")).len() == 1);
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 must not stop the daemon");
    let rc = unsafe { libc_kill(child.id() as i32, 15) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut child, 120);
    assert!(status.success(), "exit status {status:?}");
    let cks = checkpoint::list(&dir.join("ckpt"));
    assert_eq!(cks.len(), 2, "the requested checkpoint and one at shutdown");
    assert!(cks[1].0 > cks[0].0);
    let snap = Snapshot::read(&cks[1].1).unwrap();
    assert!(snap.iteration >= 3 && snap.iteration < 100_000, "iteration {}", snap.iteration);
    assert!(snap.teacher.is_some() && !snap.momentum.is_empty());
    // No temporary files left behind.
    let stray: Vec<_> = std::fs::read_dir(dir.join("ckpt"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn cli_resume_reaches_the_same_weights_as_an_uninterrupted_run() {
    let a = TempDir::new("daemon-resume-a");
    let b = TempDir::new("daemon-resume-b");
    // Uninterrupted: 6 iterations.
    let cfg_a = write_config(&a, 6, 0, "");
    assert!(start(&cfg_a, &a, &[]).wait().unwrap().success());
    // Interrupted: 3 iterations, then resume to 6.
    let cfg_b = write_config(&b, 6, 0, "");
    assert!(start(&cfg_b, &b, &["--stop-after", "3"]).wait().unwrap().success());
    assert_eq!(checkpoint::latest(&b.join("ckpt")).unwrap().0, 3);
    assert!(start(&cfg_b, &b, &["--resume"]).wait().unwrap().success());
    let (ia, pa) = checkpoint::latest(&a.join("ckpt")).unwrap();
    let (ib, pb) = checkpoint::latest(&b.join("ckpt")).unwrap();
    assert_eq!((ia, ib), (6, 6));
    let (sa, sb) = (Snapshot::read(&pa).unwrap(), Snapshot::read(&pb).unwrap());
    // The checkpoint evaluates one-shot with the config stored in it.
    let out = Command::new(bin())
        .args(["eval", "--device", "cpu", "--json", "--checkpoint"])
        .arg(&pa)
        .current_dir(&a)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cases"].as_array().unwrap().len(), 1);
    assert!(report["summary"]["dice"]["mean"].as_f64().is_some_and(|d| (0.0..=1.0).contains(&d)));
    let all = |s: &Snapshot| -> Vec<(String, tch::Tensor)> {
        let teacher = s.teacher.as_deref().unwrap_or(&[]);
        let mut v: Vec<(String, tch::Tensor)> =
            s.student.iter().map(|(n, t)| (format!("s.{n}"), t.shallow_clone())).collect();
        v.extend(teacher.iter().map(|(n, t)| (format!("t.{n}"), t.shallow_clone())));
        v.extend(s.momentum.iter().map(|(n, t)| (format!("m.{n}"), t.shallow_clone())));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (xa, xb) = (all(&sa), all(&sb));
    assert_eq!(xa.len(), xb.len());
    for ((na, ta), (nb, tb)) in xa.iter().zip(&xb) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "`{na}` differs after resume");
    }
}

#[test]
fn a_config_with_a_wrong_key_fails_naming_it() {
    let dir = TempDir::new("daemon-badkey");
    let cfg = write_config(&dir, 5, 0, "[optim2]\nx = 1\n");
    let out = Command::new(bin()).args(["train", "--config"]).arg(&cfg).current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("optim2") && err.contains("run.toml"), "{err}");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[optim2]\nx = 1\n", "")
            .replace("n_filters = 4", "n_filters = 4\nn_filter = 8"),
    )
    .unwrap();
    let out = Command::new(bin()).args(["train", "--config"]).arg(&cfg).current_dir(&dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("n_filter"));
}

#[test]
fn rank_without_unlabelled_cases_or_with_a_bad_key_is_refused_at_start() {
    let dir = TempDir::new("daemon-rank-bad");
    let cfg = write_config(&dir, 5, 0, "[rank]\nevery = 5\nmc_passes = 1\n");
    let out = Command::new(bin()).args(["train", "--config"]).arg(&cfg).current_dir(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rank.mc_passes") && !err.contains("panicked"), "{err}");
    // Every training case labelled: nothing to rank.
    let all = dir.join("all");
    let made = Command::new(bin())
        .args(["synth", "--cases", "2", "--labelled", "2", "--test", "1", "--size", "40,40,24", "--out"])
        .arg(&all)
        .output()
        .unwrap();
    assert!(made.status.success());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("mc_passes = 1", "mc_passes = 2")
        .replace("[data]\n", &format!("[data]\ndataset = \"{}\"\n", all.display()));
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin()).args(["train", "--config"]).arg(&cfg).current_dir(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank.every") && err.contains("no unlabelled training case"), "{err}");
}

#[test]
fn checkpoints_dropped_into_the_watched_folder_are_evaluated_and_bad_ones_reported() {
    let dir = TempDir::new("daemon-watch");
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let extra = format!(
        "[eval]\nwatch_dir = \"{}\"\nreport_dir = \"{}\"\npatch = [32, 32, 16]\nstride = [8, 8, 4]\n",
        watch.display(),
        dir.join("reports").display()
    );
    let cfg = write_config(&dir, 100_000, 4, &extra);
    let mut child = start(&cfg, &dir, &[]);
    wait_for("the metrics address", 120, || dir.join("addr").exists());
    let addr = std::fs::read_to_string(dir.join("addr")).unwrap();
    wait_for("two checkpoints", 240, || checkpoint::list(&dir.join("ckpt")).len() >= 2);
    let cks = checkpoint::list(&dir.join("ckpt"));
    // A good checkpoint, copied in the plain (non-atomic) way, and a truncated one.
    std::fs::copy(&cks[0].1, watch.join("mine.safetensors")).unwrap();
    let bytes = std::fs::read(&cks[0].1).unwrap();
    std::fs::write(watch.join("broken.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let runs = |m: &serde_json::Value| sample(m, "uamt_eval_runs_total", &[("source", "watch")]).unwrap_or(0.0);
    wait_for("the good checkpoint's evaluation", 120, || runs(&scrape(&addr)) >= 1.0);
    wait_for("the broken checkpoint's failure", 60, || {
        sample(&scrape(&addr), "uamt_eval_failures_total", &[]).unwrap_or(0.0) >= 1.0
    });
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reports/mine/report.json")).unwrap()).unwrap();
    assert_eq!(report["cases"].as_array().unwrap().len(), 1);
    let dice = report["summary"]["dice"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice), "dice {dice}");
    // Replacing the file has it evaluated again; the daemon is still training throughout.
    std::fs::copy(&cks[1].1, watch.join("mine.safetensors")).unwrap();
    wait_for("the replaced checkpoint's evaluation", 120, || runs(&scrape(&addr)) >= 2.0);
    assert!(child.try_wait().unwrap().is_none(), "the daemon must survive a corrupt checkpoint");
    let m = scrape(&addr);
    assert!(sample(&m, "uamt_eval_score", &[("metric", "dice"), ("checkpoint", "watch")]).is_some());
    assert_eq!(sample(&m, "uamt_eval_failures_total", &[]), Some(1.0), "the broken file is reported once, not retried");
    assert_eq!(unsafe { libc_kill(child.id() as i32, 15) }, 0);
    assert!(wait_exit(&mut child, 120).success());
}

/// `GET /status` as JSON, over a plain TCP connection.
fn status(addr: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr.trim()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {text}"))
}

#[test]
fn rank_every_n_ranks_the_unlabelled_cases_off_the_training_path() {
    let dir = TempDir::new("daemon-rank");
    let extra = format!(
        "[eval]\npatch = [32, 32, 16]\nstride = [16, 16, 8]\n[rank]\nevery = 2\nmc_passes = 8\ntop = 2\ndir = \"{}\"\n",
        dir.join("rank").display()
    );
    let cfg = write_config(&dir, 40, 20, &extra);
    let mut child = start(&cfg, &dir, &[]);
    wait_for("the metrics address", 120, || dir.join("addr").exists());
    let addr = std::fs::read_to_string(dir.join("addr")).unwrap();
    let mut seen = serde_json::Value::Null;
    wait_for("a ranking on /status", 240, || {
        seen = status(&addr);
        !seen["last_rank"].is_null()
    });
    let r = &seen["last_rank"];
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("synth/dataset.json")).unwrap()).unwrap();
    let unlabelled: Vec<String> = manifest["training"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["labelled"] == false)
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(unlabelled.len(), 4);
    assert_eq!(r["cases"], 4, "{r}");
    assert_eq!((r["score"].as_str(), r["model"].as_str()), (Some("entropy_fg"), Some("teacher")), "{r}");
    assert_eq!(r["iteration"].as_i64().unwrap() % 2, 0, "offered every 2 iterations: {r}");
    let top = r["top"].as_array().unwrap();
    assert_eq!(top.len(), 2, "rank.top entries: {r}");
    for (i, e) in top.iter().enumerate() {
        assert_eq!(e["rank"], i + 1);
        assert!(unlabelled.contains(&e["case"].as_str().unwrap().to_string()), "{e}");
    }
    // The file, written whole (atomically) with every unlabelled case.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rank/ranking.json")).unwrap()).unwrap();
    assert_eq!(file["cases"].as_array().unwrap().len(), 4);
    assert!(dir.join("rank/ranking.csv").is_file());
    // Metrics: runs, duration and a summary of the scores, and no case id anywhere.
    let m = scrape(&addr);
    assert!(sample(&m, "uamt_rank_runs_total", &[]).unwrap_or(0.0) >= 1.0);
    assert!(sample(&m, "uamt_rank_seconds_count", &[]).unwrap_or(0.0) >= 1.0);
    for stat in ["min", "median", "max", "mean"] {
        assert!(sample(&m, "uamt_rank_score", &[("stat", stat)]).is_some(), "uamt_rank_score{{stat={stat}}}");
    }
    let cases = sample(&m, "uamt_rank_cases", &[("score", "defined")]).unwrap()
        + sample(&m, "uamt_rank_cases", &[("score", "undefined")]).unwrap();
    assert_eq!(cases, 4.0);
    let text = m.to_string();
    assert!(unlabelled.iter().all(|id| !text.contains(id.as_str())), "a case id in the metrics: {text}");
    // Training went on while rankings ran: offers made during a ranking were declined (logged),
    // and the run reaches its last iteration.
    assert!(wait_exit(&mut child, 600).success());
    assert_eq!(checkpoint::latest(&dir.join("ckpt")).unwrap().0, 40);
    let log: String = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(log.contains("unlabelled cases ranked"), "{log}");
    assert!(log.contains("the previous ranking is still running; skipping this one"), "{log}");
}

#[test]
fn la_reproduce_runs_the_protocol_at_tiny_scale_and_resumes() {
    let la = la_dir();
    assert!(la.join("train.list").exists(), "the LA data are expected at {}", la.display());
    let work = TempDir::new("daemon-la-reproduce");
    let run = || {
        let out = Command::new(repo().join("ops/la-reproduce"))
            .args(["--tiny", "--budget", "300", "--bin", bin(), "--data"])
            .arg(&la)
            .arg("--work")
            .arg(work.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = run();
    assert!(first.contains("12 of 12 iterations, 1 test cases"), "{first}");
    assert!(first.contains("published") && first.contains("88.88"), "{first}");
    assert_eq!(checkpoint::latest(&work.join("checkpoints")).unwrap().0, 12);
    // Again: nothing left to train, the evaluation is repeated from the same checkpoint.
    let second = run();
    assert!(second.contains("12 of 12 iterations"), "{second}");
    assert!(!second.contains("training uamt from iteration"), "{second}");
}

#[test]
fn la_cpu_runs_the_reduced_protocol_at_tiny_scale_in_pieces() {
    let la = la_dir();
    assert!(la.join("train.list").exists(), "the LA data are expected at {}", la.display());
    let work = TempDir::new("daemon-la-cpu");
    let run = |methods: &str| {
        let out = Command::new(repo().join("ops/la-cpu"))
            .args(["--tiny", "--threads", "1", "--bin", bin(), "--methods", methods, "--data"])
            .arg(&la)
            .arg("--work")
            .arg(work.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        (String::from_utf8_lossy(&out.stdout).to_string(), err)
    };
    // A first piece: the supervised baseline alone.
    let (table, log) = run("supervised");
    assert!(log.contains("training supervised (seed 1)"), "{log}");
    assert!(
        table.contains("| V-Net, 16 labelled | paper (GPU, full protocol) | 86.03 | 76.06 | 14.26 | 3.51"),
        "{table}"
    );
    assert!(table.contains("student at 1.25 mm, 1 seed(s)"), "{table}");
    // The rest: the finished piece is not trained or evaluated again.
    let (table, log) = run("supervised mean_teacher uamt supervised_all");
    assert!(!log.contains("training supervised (seed 1)") && !log.contains("evaluating supervised (seed 1)"), "{log}");
    for m in ["mean_teacher", "uamt", "supervised_all"] {
        assert!(log.contains(&format!("training {m} (seed 1) from iteration 0 of 12")), "{log}");
    }
    assert!(table.contains("| UA-MT, 16 + 64 | paper (GPU, full protocol) | 88.88 | 80.21 | 7.32 | 2.26"), "{table}");
    assert_eq!(table.matches("teacher upsampled to 0.625 mm").count(), 2, "mean teacher and UA-MT: {table}");
    assert!(table.contains("V-Net, all 80 labelled") && table.contains("training wall time"), "{table}");
    // The original-resolution evaluation scores the original labels: 8 times the voxels.
    let report = |res: &str| -> serde_json::Value {
        let p = work.join(format!("uamt-s1/eval-student-{res}.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let voxels = |r: &serde_json::Value| r["cases"][0]["reference_voxels"].as_f64().unwrap();
    let ratio = voxels(&report("full")) / voxels(&report("half"));
    assert!((6.0..10.0).contains(&ratio), "label voxels at 0.625 mm / at 1.25 mm = {ratio}");
    assert_eq!(checkpoint::latest(&work.join("uamt-s1/checkpoints")).unwrap().0, 12);
    // --report prints the same table and trains or evaluates nothing, even for a seed not run.
    let out = Command::new(repo().join("ops/la-cpu"))
        .args(["--tiny", "--report", "--seeds", "1 2", "--methods", "supervised mean_teacher uamt supervised_all"])
        .args(["--bin", bin(), "--data"])
        .arg(&la)
        .arg("--work")
        .arg(work.path())
        .output()
        .unwrap();
    let (report, log) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !log.contains("training") && !log.contains("evaluating"), "{log}");
    assert_eq!(report.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>(), {
        table.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>()
    });
    assert!(!work.join("uamt-s2").exists(), "no seed-2 run was started");
}

#[test]
fn la_active_runs_the_round_at_tiny_scale_and_resumes() {
    let la = la_dir();
    assert!(la.join("train.list").exists(), "the LA data are expected at {}", la.display());
    let work = TempDir::new("daemon-la-active");
    let run = |extra: &[&str]| {
        let out = Command::new(repo().join("ops/la-active"))
            .args(["--tiny", "--threads", "1", "--bin", bin(), "--data"])
            .arg(&la)
            .arg("--work")
            .arg(work.path())
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        (String::from_utf8_lossy(&out.stdout).to_string(), err)
    };
    // Killed by its budget in the first training: it says so and stops cleanly.
    let (_, log) = run(&["--budget", "1"]);
    assert!(log.contains("budget spent"), "{log}");
    // The rest, resumed: every arm trained and evaluated, the table with its answer.
    let (table, log) = run(&[]);
    assert!(log.contains("ranking the 4 unlabelled cases with the base teacher"), "{log}");
    assert!(table.contains("| base: the first 2 | 2 |"), "{table}");
    for arm in ["bald_fg", "entropy_fg", "bald", "entropy"] {
        assert!(table.contains(&format!("| top 2 by {arm}")), "{arm}: {table}");
        assert!(table.contains(&format!("- {arm}: ")), "{arm} against random: {table}");
    }
    assert!(table.contains("| random draw 1 | 4 |") && table.contains("| random draw 2 | 4 |"), "{table}");
    assert!(table.contains("| random, 2 draws: mean ± sd"), "{table}");
    // Every run of distinct cases trained and evaluated with both seeds; twins share theirs.
    assert!(table.contains("teacher Dice % by seed (1, 2)") && table.contains("Training noise"), "{table}");
    for run in ["base", "arm-bald_fg", "arm-entropy_fg", "arm-random-1", "arm-random-2"] {
        for seed in ["", "seed-2/"] {
            let report = work.join(format!("{run}/{seed}eval-teacher.json"));
            assert!(report.exists(), "{}", report.display());
        }
        let toml = std::fs::read_to_string(work.join(format!("{run}/seed-2/run.toml"))).unwrap();
        assert!(toml.contains("seed = 2") && toml.contains(&format!("{run}/data\"")), "{toml}");
    }
    assert!(log.contains("training arm-random-2 (seed 2)"), "{log}");
    // The base teacher scored on the pool's labels, and each score's rank correlation with it.
    let pool: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("base/pool-eval.json")).unwrap()).unwrap();
    assert_eq!(pool["cases"].as_array().unwrap().len(), 4, "the 4 pool cases: {pool}");
    assert!(table.contains("Does a score find the cases the base model gets wrong?"), "{table}");
    for arm in ["bald_fg", "entropy_fg", "bald", "entropy"] {
        let row = format!("| top 2 by {arm} | ");
        assert!(table.lines().any(|l| l.starts_with(&row) && l.contains(" cases) | ")), "{arm}: {table}");
    }
    // The ranking the arms came from, and what each added: the top 2 of the pool by its score.
    let ranking: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("base/rank/ranking.json")).unwrap()).unwrap();
    let cases = ranking["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let added = std::fs::read_to_string(work.join("arm-entropy_fg/selection.list")).unwrap();
    let want: Vec<&str> = cases[..2].iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(added.lines().collect::<Vec<_>>(), want, "entropy_fg (the default) adds the ranking's top 2");
    let arm_ds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("arm-random-1/data/dataset.json")).unwrap()).unwrap();
    let labelled = arm_ds["training"].as_array().unwrap().iter().filter(|c| c["labelled"] == true).count();
    assert_eq!(labelled, 4, "2 initial + 2 added");
    // Again: nothing left to do; the same table.
    let (again, log) = run(&[]);
    for piece in ["training", "evaluating", "ranking", "importing"] {
        assert!(!log.contains(piece), "{piece} again: {log}");
    }
    assert_eq!(again.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>(), {
        table.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>()
    });
}

#[test]
fn a_corrupt_case_is_logged_counted_and_skipped() {
    let dir = TempDir::new("daemon-badcase");
    let cfg = write_config(&dir, 100_000, 0, "");
    // Make the synthetic dataset, then truncate one unlabelled training image.
    let out = Command::new(bin())
        .args(["synth", "--cases", "6", "--labelled", "2", "--test", "1", "--size", "40,40,24", "--out"])
        .arg(dir.join("synth"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let victim = dir.join("synth/imagesTr/synth_004.nii");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 3]).unwrap();
    let mut child = start(&cfg, &dir, &[]);
    wait_for("the metrics address", 120, || dir.join("addr").exists());
    let addr = std::fs::read_to_string(dir.join("addr")).unwrap();
    wait_for("training despite the bad case", 240, || {
        sample(&scrape(&addr), "uamt_iterations_total", &[]).unwrap_or(0.0) >= 2.0
    });
    assert_eq!(sample(&scrape(&addr), "uamt_skipped_cases_total", &[]), Some(1.0));
    assert_eq!(unsafe { libc_kill(child.id() as i32, 15) }, 0);
    assert!(wait_exit(&mut child, 120).success());
    let log: String = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(log.contains("case skipped") && log.contains("synth_004.nii"), "{log}");
}

#[test]
fn bench_measures_the_peer_in_the_same_run_and_gives_every_setting_its_ratio() {
    let dir = TempDir::new("daemon-bench-peer");
    let cfg = write_config(&dir, 20, 0, "");
    let h5 = dir.join("h5");
    let pack = repo().join("benches/reference/la_pack.py");
    let out = Command::new(python())
        .arg(&pack)
        .args(["synth", "--out", h5.to_str().unwrap(), "--cases", "4", "--size", "40,40,24"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let peer = repo().join("benches/reference/uamt_reference.py");
    let bench = |extra: &[&str]| {
        Command::new(bin())
            .args(["bench", "pipeline", "--config", cfg.to_str().unwrap(), "--iterations", "2", "--warmup", "1"])
            .args(["--lags", "0", "--depths", "1", "--workers", "1", "--peer", peer.to_str().unwrap()])
            .args(["--peer-python", python().to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&["--peer-data", h5.to_str().unwrap(), "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    let names: Vec<&str> = lines.iter().map(|l| l["setting"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{stdout}");
    assert!(names[0].starts_with("peer: PyTorch reference, preloaded"), "{names:?}");
    assert_eq!(&names[1..], ["sequential loop", "pipeline lag 0, workers 1, depth 1"]);
    let peer_s = lines[0]["ms_per_iteration"].as_f64().unwrap();
    assert!(peer_s > 0.0 && peer_s.is_finite());
    for l in &lines {
        let (ms, ratio) = (l["ms_per_iteration"].as_f64().unwrap(), l["speedup_vs_peer"].as_f64().unwrap());
        assert!((ratio - peer_s / ms).abs() < 1e-9, "{l}");
    }
    // A peer that cannot run, or data without a train.list, is an error naming the option.
    let out = bench(&["--peer-data", dir.join("nowhere").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--peer-data"), "{err}");
}

#[test]
fn gpu_check_runs_end_to_end_in_its_tiny_cpu_mode() {
    let dir = TempDir::new("daemon-gpu-check");
    let out = Command::new(repo().join("ops/gpu-check"))
        .args(["--tiny", "--synth", "--uamt", bin(), "--python", python().to_str().unwrap()])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The reference against the daemon in one table, then the batched passes and the layouts.
    assert!(stdout.contains("reference (PyTorch)") && stdout.contains("uamt sequential loop"), "{stdout}");
    for section in ["mc_batched = false", "mc_batched = true", "layout = contiguous", "layout = channels_last"] {
        assert!(stdout.contains(section), "no `{section}` section:\n{stdout}");
    }
    assert!(stdout.contains("layout channels-last") && stdout.contains("done; log in"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gpu-check.json")).unwrap()).unwrap();
    let samples = json["samples_ms"].as_object().unwrap();
    assert!(samples.contains_key("reference (PyTorch)") && samples.contains_key("sequential loop"), "{json}");
}
