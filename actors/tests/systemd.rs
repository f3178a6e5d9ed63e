//! The daemon as a systemd service: its notifications against a fake `NOTIFY_SOCKET` (a Unix
//! datagram socket this test binds), with `WATCHDOG_USEC` and `WATCHDOG_PID` set as systemd sets
//! them: `READY=1` once the data are open and the endpoint listens, `WATCHDOG=1` while healthy,
//! none while training is stalled (the student held before a step past `stall_after_s`), again
//! once it moves, and `STOPPING=1` on a stop. And `ops/systemd/uamt.service` passes
//! `systemd-analyze verify` and `systemd-analyze security` at the exposure level the README states.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{repo, TempDir};

/// Every message received on the socket, with when it came.
type Received = Arc<Mutex<Vec<(Instant, String)>>>;

/// Binds the fake notify socket at `path` and collects what arrives on a thread.
fn listen(path: &std::path::Path) -> Received {
    let sock = UnixDatagram::bind(path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let got: Received = Arc::default();
    let into = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => into.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned())),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if Arc::strong_count(&into) == 1 {
                        return;
                    }
                }
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    });
    got
}

/// How many messages holding `line` (a line of their own) arrived after `since`.
fn count(got: &Received, line: &str, since: Instant) -> usize {
    got.lock().unwrap().iter().filter(|(t, m)| *t >= since && m.lines().any(|l| l == line)).count()
}

#[test]
fn readiness_watchdog_and_stopping_reach_systemd() {
    let dir = TempDir::new("systemd-notify");
    let socket = dir.join("notify.sock");
    let got = listen(&socket);
    let cfg = write_config(&dir, 100_000, 0, "listen = \"127.0.0.1:0\"\nstall_after_s = 1\n");
    let hold_file = dir.join("hold");
    std::fs::write(&hold_file, b"").unwrap();
    let hold = format!("3:{}", hold_file.display());
    // systemd sets WATCHDOG_PID to the service's main process: a shell that execs uamt keeps its pid.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", bin(), "train", "--config"])
        .arg(&cfg)
        .arg("--addr-file")
        .arg(dir.join("addr"));
    let socket_s = socket.display().to_string();
    let env = [("NOTIFY_SOCKET", socket_s.as_str()), ("WATCHDOG_USEC", "400000"), ("UAMT_HOLD", hold.as_str())];
    let mut d = start_cmd(cmd, &dir, &env);
    let t0 = Instant::now();

    // READY=1 once, after the data are open and the endpoint listens.
    wait_for("READY=1", 120, || count(&got, "READY=1", t0) == 1);
    assert!(dir.join("addr").exists(), "READY=1 before the endpoint listened");
    assert!(log(&dir).contains("dataset open"), "READY=1 before the data were open:\n{}", log(&dir));
    let addr = wait_addr(&dir.join("addr"), &mut d, 10);

    // Healthy: the watchdog is fed (every 0.2 s).
    let healthy = Instant::now();
    wait_for("WATCHDOG=1 while healthy", 60, || count(&got, "WATCHDOG=1", healthy) >= 3);

    // Held before step 3 past stall_after_s: /healthz 503, and no WATCHDOG=1 any more.
    wait_for("/healthz 503 while the student is held", 120, || call(addr, "GET", "/healthz", None, None).status == 503);
    std::thread::sleep(Duration::from_millis(600));
    let stalled = Instant::now();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(call(addr, "GET", "/healthz", None, None).status, 503, "still stalled");
    assert_eq!(count(&got, "WATCHDOG=1", stalled), 0, "the watchdog was fed while /healthz said 503");
    assert!(log(&dir).contains("not feeding systemd's watchdog"), "{}", log(&dir));

    // Moving again: fed again.
    std::fs::remove_file(&hold_file).unwrap();
    let moving = Instant::now();
    wait_for("WATCHDOG=1 once training moves again", 120, || count(&got, "WATCHDOG=1", moving) >= 1);

    // A stop: STOPPING=1, exit 0; READY=1 was sent once.
    assert_eq!(call(addr, "POST", "/stop", None, None).status, 202);
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));
    wait_for("STOPPING=1", 10, || count(&got, "STOPPING=1", t0) == 1);
    assert_eq!(count(&got, "READY=1", t0), 1);
    let all = got.lock().unwrap();
    let first = |line: &str| all.iter().position(|(_, m)| m.lines().any(|l| l == line)).unwrap();
    assert!(first("READY=1") < first("STOPPING=1"), "{all:?}");
}

/// The unit file with its binary replaced by the one under test (verify checks that it exists).
fn unit_under_test(dir: &TempDir) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(repo().join("ops/systemd/uamt.service")).unwrap();
    assert!(unit.contains("/opt/uamt/bin/uamt train"), "the unit's ExecStart changed: update this test");
    let p = dir.join("uamt@.service");
    std::fs::write(&p, unit.replace("/opt/uamt/bin/uamt", bin())).unwrap();
    p
}

#[test]
fn the_unit_is_hardened_verified_and_scored_as_the_readme_says() {
    let dir = TempDir::new("systemd-unit");
    let unit = unit_under_test(&dir);
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "User=uamt",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=\n",
        "--resume",
    ] {
        assert!(text.contains(line), "the unit lacks {line:?}");
    }
    let analyze = |args: &[&str]| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(&unit)
            .output()
            .expect("run systemd-analyze (ops/setup installs Debian's systemd package)")
    };
    let verify = analyze(&["verify"]);
    assert!(verify.status.success() && verify.stderr.is_empty(), "systemd-analyze verify:\n{}", text_of(&verify));
    let security = analyze(&["security", "--offline=true", "--threshold=20"]);
    let report = text_of(&security);
    assert!(security.status.success(), "systemd-analyze security:\n{report}");
    let level = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .and_then(|l| l.rsplit_once(": ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    let score: f64 = level.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap();
    println!("systemd-analyze security: {level}");
    assert!(score <= 2.0, "the unit's exposure level {score} is above 2.0:\n{report}");
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let stated = format!("exposure level {score:.1}");
    assert!(readme.contains(&stated), "README does not state the measured `{stated}`");
}

fn text_of(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}
