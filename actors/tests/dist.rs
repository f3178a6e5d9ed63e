//! Data-parallel training through the real binary: 2 ranks launched as torchrun launches them
//! (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), Gloo on loopback. A rank killed or stopped
//! mid-run ends the other with an error within `distributed.timeout_s`; a stop request on one
//! rank stops both after the same step with rank 0's final checkpoint; both resume from it (the
//! other rank from rank 0's state), and one process cannot resume a 2-rank run. Each rank
//! serves metrics labelled with its rank.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{free_port, Daemon, TempDir};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGSTOP: i32 = 19;

/// A tiny UA-MT config for both ranks, everything under `dir`.
fn write_config(dir: &Path, iterations: i64, timeout_s: f64) -> PathBuf {
    write_config_listening(dir, iterations, timeout_s, "", "")
}

/// [`write_config`] with the metrics endpoint at `listen`.
/// `distributed` goes at the end of the `[distributed]` section.
fn write_config_listening(dir: &Path, iterations: i64, timeout_s: f64, listen: &str, distributed: &str) -> PathBuf {
    let text = format!(
        "[data]\nsynth_dir = \"{synth}\"\npatch = [32, 32, 16]\n[data.synth]\ncases = 8\nlabelled = 4\ntest = 1\n\
         size = [40, 40, 24]\n[model]\nn_filters = 4\n[optim]\niterations = {iterations}\n[device]\n\
         device = \"cpu\"\nthreads = 1\n[checkpoint]\ndir = \"{ckpt}\"\nevery = 0\nkeep = 10\n[eval]\nevery = 0\n\
         [telemetry]\nlisten = \"{listen}\"\nlog_every = 1\n[distributed]\ntimeout_s = {timeout_s}\ncheck_every = 2\n{distributed}\n",
        synth = dir.join("synth").display(),
        ckpt = dir.join("ckpt").display(),
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts rank `rank` of 2, logging to `dir/rank<rank>.log`.
fn rank(dir: &Path, config: &Path, rank: usize, port: u16, args: &[&str]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uamt"));
    cmd.args(["train", "--config"]).arg(config).args(args).current_dir(dir).stdout(Stdio::null());
    cmd.stderr(std::fs::File::create(dir.join(format!("rank{rank}.log"))).unwrap());
    cmd.env("RANK", rank.to_string()).env("WORLD_SIZE", "2").env("LOCAL_RANK", rank.to_string());
    cmd.env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
    Daemon::new(cmd.spawn().unwrap())
}

/// `GET /metrics` from the address in `file`.
fn metrics(file: &Path) -> String {
    use std::io::{Read, Write};
    let addr = std::fs::read_to_string(file).unwrap();
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn log(dir: &Path, rank: usize) -> String {
    std::fs::read_to_string(dir.join(format!("rank{rank}.log"))).unwrap_or_default()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the process to exit, at most `secs`; returns the status and the seconds waited.
fn wait_exit(d: &mut Daemon, secs: f64) -> (std::process::ExitStatus, f64) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = d.child().try_wait().unwrap() {
            return (s, t0.elapsed().as_secs_f64());
        }
        assert!(t0.elapsed().as_secs_f64() < secs, "the rank did not exit within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The checkpoint files in `dir` as `ckpt-<iteration>`, sorted (the run id cut off).
fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("ckpt-") && f.ends_with(".safetensors"))
        .map(|f| f[..13].to_string())
        .collect();
    v.sort();
    v
}

/// The step counts of the `done` lines.
fn done_steps(text: &str) -> Option<i64> {
    let line = text.lines().rev().find(|l| l.contains(" done ") || l.contains(": done"))?;
    let at = line.find("steps=")? + "steps=".len();
    line[at..].split_whitespace().next()?.parse().ok()
}

#[test]
fn a_killed_or_stalled_rank_ends_the_other_with_an_error_within_the_timeout() {
    for (name, sig) in [("killed", SIGKILL), ("stalled", SIGSTOP)] {
        let dir = TempDir::new(&format!("dist-{name}"));
        let timeout = 6.0;
        let cfg = write_config(&dir, 100_000, timeout);
        let port = free_port();
        let mut r0 = rank(&dir, &cfg, 0, port, &[]);
        let r1 = rank(&dir, &cfg, 1, port, &[]);
        wait_for("rank 1's third step", 120, || log(&dir, 1).contains("iteration=3 "));
        r1.signal(sig);
        let (status, waited) = wait_exit(&mut r0, timeout + 20.0);
        let text = log(&dir, 0);
        assert!(!status.success(), "{name}: rank 0 exited 0\n{text}");
        assert!(text.contains("distributed training") && text.contains("rank 0 of 2"), "{name}: {text}");
        eprintln!("{name}: rank 0 exited after {waited:.1} s ({status})");
        drop(r1); // killed and reaped by the guard (a stopped process is killed too)
    }
}

#[test]
fn a_stop_is_not_held_by_a_collective_waiting_on_a_stalled_rank() {
    let dir = TempDir::new("dist-stuck-stop");
    // A long collective timeout: the stop must not wait for it.
    let timeout = 120.0;
    let cfg = write_config(&dir, 100_000, timeout);
    let port = free_port();
    let mut r0 = rank(&dir, &cfg, 0, port, &[]);
    let r1 = rank(&dir, &cfg, 1, port, &[]);
    wait_for("rank 1's third step", 120, || log(&dir, 1).contains("iteration=3 "));
    r1.signal(SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    r0.signal(SIGTERM);
    let (status, waited) = wait_exit(&mut r0, 30.0);
    let text = log(&dir, 0);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("a collective is waiting on another rank"), "{text}");
    assert!(waited < 20.0, "the stop took {waited:.1} s with a {timeout} s collective timeout");
    eprintln!("rank 0 exited {waited:.1} s after SIGTERM");
    drop(r1);
}

#[test]
fn a_stop_on_one_rank_stops_both_after_the_same_step_and_both_resume_from_rank_0() {
    let dir = TempDir::new("dist-stop");
    // The all-reduce started during backward: the stop vote travels in its last bucket.
    let cfg = write_config_listening(&dir, 100_000, 60.0, "127.0.0.1:0", "overlap = true");
    let port = free_port();
    let addr = ["--addr-file", "addr"];
    let (mut r0, mut r1) = (rank(&dir, &cfg, 0, port, &addr), rank(&dir, &cfg, 1, port, &addr));
    wait_for("rank 1's second step", 120, || log(&dir, 1).contains("iteration=2 "));
    // Every rank serves its metrics, labelled with its rank (rank 1's address file is suffixed).
    for (r, file) in [(0, "addr"), (1, "addr.rank1")] {
        let text = metrics(&dir.join(file));
        let line = text.lines().find(|l| l.starts_with("uamt_iterations_total")).unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains(&format!("rank=\"{r}\"")), "rank {r}: {line}");
    }
    r1.signal(SIGTERM);
    let (s1, _) = wait_exit(&mut r1, 60.0);
    let (s0, _) = wait_exit(&mut r0, 60.0);
    let (l0, l1) = (log(&dir, 0), log(&dir, 1));
    assert!(s0.success() && s1.success(), "exits {s0} {s1}\n{l0}\n{l1}");
    let (n0, n1) = (done_steps(&l0).expect("rank 0 done"), done_steps(&l1).expect("rank 1 done"));
    assert_eq!(n0, n1, "the ranks stopped after different steps");
    let ckpts = checkpoints(&dir.join("ckpt"));
    assert_eq!(ckpts, vec![format!("ckpt-{n0:08}")], "one checkpoint, rank 0's final one");

    // Both resume: rank 0 from its checkpoint, rank 1 (told to resume from a folder it has
    // never seen) from rank 0's state; 3 more steps each, the final checkpoint at n0 + 3.
    let port = free_port();
    let (mut r0, mut r1) = (
        rank(&dir, &cfg, 0, port, &["--resume", "--stop-after", "3"]),
        rank(&dir, &cfg, 1, port, &["--resume", "--stop-after", "3", "--checkpoint-dir", "/nonexistent"]),
    );
    let (s0, _) = wait_exit(&mut r0, 120.0);
    let (s1, _) = wait_exit(&mut r1, 120.0);
    let (l0, l1) = (log(&dir, 0), log(&dir, 1));
    assert!(s0.success() && s1.success(), "resume exits {s0} {s1}\n{l0}\n{l1}");
    assert!(l0.contains("resumed"), "{l0}");
    assert_eq!((done_steps(&l0), done_steps(&l1)), (Some(3), Some(3)), "{l0}\n{l1}");
    assert_eq!(checkpoints(&dir.join("ckpt")), vec![format!("ckpt-{n0:08}"), format!("ckpt-{:08}", n0 + 3)]);

    // One process cannot continue a 2-process run: its batches would differ.
    let out = Command::new(env!("CARGO_BIN_EXE_uamt"))
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--resume", "--stop-after", "1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a single process resumed a 2-rank run\n{text}");
    assert!(text.contains("2 process(es)") && text.contains("same world size"), "{text}");
}

/// The `done` line of a JSON log (`--log-format json`: full precision, where text rounds) with
/// its `final_loss` and whether it wrote a checkpoint (only rank 0 does).
fn final_loss_line(line: &str) -> Option<(usize, String)> {
    // (torchrun may put a rank prefix before the object)
    let v: serde_json::Value = serde_json::from_str(&line[line.find('{')?..]).ok()?;
    let f = &v["fields"];
    let loss = f["final_loss"].as_f64()?;
    Some((usize::from(f["checkpoint"] == "None"), format!("{loss:?}")))
}

/// The last `final_loss` of a JSON log.
fn final_loss(text: &str) -> Option<String> {
    text.lines().rev().find_map(final_loss_line).map(|(_, loss)| loss)
}

/// torchrun (its agent serves the store; every rank is a client) runs the same training as the
/// ranks launched by hand: the same final losses on both ranks, bit for bit.
#[test]
fn torchrun_launches_the_same_run_as_a_launch_by_hand() {
    let dir = TempDir::new("dist-torchrun");
    let cfg = write_config(&dir, 4, 60.0);
    let port = free_port();
    let json = ["--log-format", "json"];
    let (mut r0, mut r1) = (rank(&dir, &cfg, 0, port, &json), rank(&dir, &cfg, 1, port, &json));
    let (s0, s1) = (wait_exit(&mut r0, 120.0).0, wait_exit(&mut r1, 120.0).0);
    assert!(s0.success() && s1.success(), "{}\n{}", log(&dir, 0), log(&dir, 1));
    let by_hand = (final_loss(&log(&dir, 0)).unwrap(), final_loss(&log(&dir, 1)).unwrap());
    std::fs::remove_dir_all(dir.join("ckpt")).unwrap();
    let torchrun = support::python().with_file_name("torchrun");
    let out = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args(["--no-python", env!("CARGO_BIN_EXE_uamt"), "--log-format", "json", "train", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", torchrun.display()));
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "torchrun failed\n{text}");
    let mut losses: Vec<(usize, String)> = text.lines().filter_map(final_loss_line).collect();
    losses.sort();
    assert_eq!(losses, vec![(0, by_hand.0), (1, by_hand.1)], "{text}");
}

/// `ops/dist-local` starts the ranks with torchrun's variables, logs each, and exits 0 when all
/// did; with a rank that cannot start (a world too large for the labelled cases) it exits
/// non-zero naming the rank.
#[test]
fn ops_dist_local_runs_the_ranks_and_reports_a_failed_one() {
    let dir = TempDir::new("dist-local");
    let cfg = write_config(&dir, 3, 60.0);
    let run = |n: &str, logs: &str| {
        Command::new(support::repo().join("ops/dist-local"))
            .args(["-n", n, "--logs"])
            .arg(dir.join(logs))
            .args(["--grace", "5", "--", "--config"])
            .arg(&cfg)
            .env("UAMT_BIN", env!("CARGO_BIN_EXE_uamt"))
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run("2", "ok");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for r in 0..2 {
        let l = std::fs::read_to_string(dir.join(format!("ok/rank{r}.log"))).unwrap();
        assert_eq!(done_steps(&l), Some(3), "rank {r}: {l}");
    }
    // 3 ranks x 2 labelled patches need 6 labelled cases; the synthetic data has 4.
    std::fs::remove_dir_all(dir.join("ckpt")).ok();
    let out = run("3", "bad");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("rank 0") && text.contains("failed") && text.contains("rank0.log"), "{text}");
}
