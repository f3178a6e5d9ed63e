//! The binary's log output: no colour codes when stderr is not a terminal (a file, a pipe),
//! numbers rounded for people in text (`loss=0.572`, `it/s=7.8`) and at full precision with
//! `--log-format json` (one JSON object per line), and the HTTP server's own start-up and
//! shutdown lines only at debug level. Runs a two-iteration demo in a temporary working directory
//! (the demo makes its synthetic data under `runs/` there).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workdir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `uamt [global] train --iterations 2 --listen <listen> --checkpoint-dir <dir>/ckpt-<tag>` in
/// `dir`, with `RUST_LOG` = `rust_log` (unset when `None`).
fn train_with(dir: &Path, global: &[&str], listen: &str, tag: &str, rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_uamt"));
    cmd.args(global)
        .args(["train", "--iterations", "2", "--listen", listen, "--checkpoint-dir"])
        .arg(dir.join(format!("ckpt-{tag}")))
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    if let Some(l) = rust_log {
        cmd.env("RUST_LOG", l);
    }
    let out = cmd.output().expect("run uamt");
    assert!(out.status.success(), "uamt train failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn train(dir: &Path, global: &[&str], listen: &str, tag: &str) -> Output {
    train_with(dir, global, listen, tag, None)
}

/// Significant digits of a number as written (`0.0572` -> 3, `473` -> 3, `1e-5` -> 1).
fn significant(text: &str) -> usize {
    let mantissa = text.trim_start_matches('-').split(['e', 'E']).next().unwrap_or_default();
    mantissa.replace('.', "").trim_start_matches('0').len()
}

/// The training progress lines' numbers: (key, value as written).
fn progress_numbers(text: &str) -> Vec<(String, String)> {
    let keys = ["loss", "supervised", "consistency", "weight", "mask", "lr", "it/s"];
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains(" training ") && l.contains("iteration=")) {
        for word in line.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                if keys.contains(&k) {
                    out.push((k.to_string(), v.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn logs_have_no_colour_off_a_terminal_and_json_is_one_object_per_line() {
    let dir = workdir();

    let text = train(&dir, &[], "127.0.0.1:0", "text");
    assert!(!text.stderr.is_empty(), "the run logged nothing");
    assert!(!text.stderr.contains(&0x1b), "ESC in logs written to a pipe:\n{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8(text.stderr).expect("logs are UTF-8");
    assert!(text.contains("INFO") && text.contains("done"), "{text}");
    // Numbers for people: three significant digits at most (integers of 4+ digits aside).
    let numbers = progress_numbers(&text);
    assert_eq!(numbers.len(), 7, "the progress line (after the last step) with all its numbers:\n{text}");
    for (k, v) in &numbers {
        assert!(v.parse::<f64>().is_ok(), "{k}={v} is not a number");
        assert!(significant(v) <= 3 || !v.contains('.'), "{k}={v} is not rounded for people:\n{text}");
    }
    // The endpoint's own line stays; actix-server's start-up and shutdown lines do not.
    assert!(text.contains("metrics at http://127.0.0.1:"), "{text}");
    for chatter in ["actix_server", "starting 2 workers", "Actix runtime found", "shutting down"] {
        assert!(!text.contains(chatter), "`{chatter}` logged at the default level:\n{text}");
    }
    let debug = train_with(&dir, &[], "127.0.0.1:0", "debug", Some("debug"));
    let debug = String::from_utf8_lossy(&debug.stderr);
    assert!(
        debug.contains("actix_server") && debug.contains("starting 2 workers"),
        "RUST_LOG=debug shows them:\n{debug}"
    );

    let json = train(&dir, &["--log-format", "json"], "127.0.0.1:0", "json");
    assert!(!json.stderr.contains(&0x1b), "ESC in JSON logs");
    let json = String::from_utf8(json.stderr).expect("logs are UTF-8");
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "too few log lines:\n{json}");
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{json}"));
        assert!(v.is_object(), "{line}");
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(messages.iter().any(|m| m.contains("/metrics")), "the endpoint's address is logged: {messages:?}");
    assert!(messages.iter().any(|m| m == "done"), "{messages:?}");
    // JSON keeps full precision: the losses as computed, not rounded.
    let progress: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"].clone())
        .filter(|f| f["message"] == "training" && f["iteration"].is_i64())
        .collect();
    assert_eq!(progress.len(), 1, "{json}");
    for f in &progress {
        assert!(f["it/s"].is_f64() && f["lr"].is_f64(), "{f}");
    }
    let digits: Vec<usize> = progress.iter().map(|f| significant(&f["loss"].as_f64().unwrap().to_string())).collect();
    assert!(digits.iter().all(|d| *d > 3), "JSON losses rounded: {progress:?}");
}
