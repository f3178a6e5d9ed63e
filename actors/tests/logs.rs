//! The binary's log output: no colour codes when stderr is not a terminal (a file, a pipe), and
//! `--log-format json` writes one JSON object per line. Runs a two-iteration demo in a temporary
//! working directory (the demo makes its synthetic data under `runs/` there).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workdir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `uamt [global] train --iterations 2 --listen <listen> --checkpoint-dir <dir>/ckpt-<tag>` in `dir`.
fn train(dir: &Path, global: &[&str], listen: &str, tag: &str) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_uamt"))
        .args(global)
        .args(["train", "--iterations", "2", "--listen", listen, "--checkpoint-dir"])
        .arg(dir.join(format!("ckpt-{tag}")))
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .output()
        .expect("run uamt");
    assert!(out.status.success(), "uamt train failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn logs_have_no_colour_off_a_terminal_and_json_is_one_object_per_line() {
    let dir = workdir();

    let text = train(&dir, &[], "", "text");
    assert!(!text.stderr.is_empty(), "the run logged nothing");
    assert!(!text.stderr.contains(&0x1b), "ESC in logs written to a pipe:\n{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8(text.stderr).expect("logs are UTF-8");
    assert!(text.contains("INFO") && text.contains("done"), "{text}");

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
}
