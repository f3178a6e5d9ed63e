//! Who may do what on the daemon's endpoint, through the binary: control requests from loopback
//! only without a token (403 from this machine's own non-loopback address), 401 without or with
//! a wrong token once one is configured, 202 with it, the read token on the read-only endpoints;
//! token files refused at start by name; TLS (a self-signed pair made with openssl): a scrape
//! over HTTPS, plain HTTP refused on that port, bad or mismatched pairs refused at start;
//! 300 checkpoint requests during one step give one checkpoint; `uamt ctl` against a live daemon
//! and its errors. Each daemon waits before a chosen step (`UAMT_HOLD`) while the checks run, so
//! what it has done is known.

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::*;
use std::net::SocketAddr;
use support::TempDir;

/// `UAMT_HOLD` making the daemon wait before step `iteration` while `dir/hold` exists.
fn hold(dir: &TempDir, iteration: i64) -> (String, std::path::PathBuf) {
    let file = dir.join("hold");
    std::fs::write(&file, b"").unwrap();
    (format!("{iteration}:{}", file.display()), file)
}

/// The same port at this machine's non-loopback address.
fn remote(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(non_loopback_ip(), addr.port())
}

#[test]
fn without_a_token_control_is_taken_from_loopback_only() {
    let dir = TempDir::new("access-loopback");
    let cfg = write_config(&dir, 100_000, 0, "listen = \"0.0.0.0:0\"\n");
    let (h, _file) = hold(&dir, 2);
    let mut d = start(&cfg, &dir, &[("UAMT_HOLD", &h)]);
    let bound = wait_addr(&dir.join("addr"), &mut d, 120);
    let local = SocketAddr::from(([127, 0, 0, 1], bound.port()));
    let far = remote(bound);
    wait_iteration(local, None, None, 2, 120);

    // From a non-loopback peer: reading is open, control is refused with 403 and changes nothing.
    assert_eq!(call(far, "GET", "/metrics", None, None).status, 200);
    assert_eq!(call(far, "GET", "/healthz", None, None).status, 200);
    for path in ["/checkpoint", "/stop"] {
        let a = call(far, "POST", path, None, None);
        assert_eq!(a.status, 403, "POST {path} from {far}: {}", a.body);
        assert!(
            a.body.contains("telemetry.control_token_file") && a.body.contains(&far.ip().to_string()),
            "{}",
            a.body
        );
    }
    let s = status(local, None, None);
    assert_eq!((s["phase"].as_str(), s["checkpoint_pending"].as_bool()), (Some("training"), Some(false)), "{s}");
    let out = ctl(&["stop", "--addr", &far.to_string()]);
    assert!(!out.status.success(), "ctl stop from a non-loopback address succeeded: {}", text(&out));
    assert!(
        text(&out).contains("403 Forbidden") && text(&out).contains("telemetry.control_token_file"),
        "{}",
        text(&out)
    );
    assert!(d.0.try_wait().unwrap().is_none(), "a refused stop stopped the daemon");
    let logged = log(&dir);
    assert!(logged.contains("HTTP request refused") && logged.contains(&far.ip().to_string()), "{logged}");

    // From loopback (what --addr-file's 0.0.0.0 reaches): accepted.
    let a = call(local, "POST", "/checkpoint", None, None);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(status(local, None, None)["checkpoint_pending"], true);
    let out = ctl(&["stop", "--addr-file", &dir.join("addr").display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("stop requested"), "{}", text(&out));
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));
}

#[test]
fn with_tokens_every_request_needs_its_token_and_the_token_is_never_shown() {
    let dir = TempDir::new("access-tokens");
    let (control, read) = token_files(&dir);
    let cfg = write_config(
        &dir,
        100_000,
        0,
        &format!(
            "listen = \"0.0.0.0:0\"\ncontrol_token_file = \"{}\"\nread_token_file = \"{}\"\n",
            control.display(),
            read.display()
        ),
    );
    let (h, _file) = hold(&dir, 2);
    let mut d = start(&cfg, &dir, &[("UAMT_HOLD", &h)]);
    let bound = wait_addr(&dir.join("addr"), &mut d, 120);
    let local = SocketAddr::from(([127, 0, 0, 1], bound.port()));
    let far = remote(bound);
    wait_iteration(local, Some(READ_TOKEN), None, 2, 120);

    for path in ["/metrics", "/healthz", "/status"] {
        assert_eq!(call(local, "GET", path, None, None).status, 401, "GET {path} without a token");
        assert_eq!(call(local, "GET", path, Some("read-8b1d6e3f0a2c4e5b9d7f1a3c5e7b9d0"), None).status, 401);
        assert_eq!(call(local, "GET", path, Some(READ_TOKEN), None).status, 200, "GET {path} with the read token");
        assert_eq!(call(far, "GET", path, Some(CONTROL_TOKEN), None).status, 200, "the control token reads too");
    }
    for (peer, token) in [(local, None), (local, Some(READ_TOKEN)), (far, Some("ctl-5f0c2a9e7d3b41c8a6e2f9d0b7c4a1e4"))]
    {
        for path in ["/checkpoint", "/stop"] {
            let a = call(peer, "POST", path, token, None);
            assert_eq!(a.status, 401, "POST {path} from {peer} with {token:?}: {}", a.body);
        }
    }
    let s = status(local, Some(READ_TOKEN), None);
    assert_eq!((s["phase"].as_str(), s["checkpoint_pending"].as_bool()), (Some("training"), Some(false)), "{s}");
    // With the token, from another host too.
    let a = call(far, "POST", "/checkpoint", Some(CONTROL_TOKEN), None);
    assert_eq!(a.status, 202, "{}", a.body);
    let s = status(far, Some(READ_TOKEN), None);
    assert_eq!(s["checkpoint_pending"], true, "{s}");
    let body = serde_json::to_string(&s).unwrap();

    // uamt ctl: 401 without the token, the status with one, an HTTPS client on a plain port.
    let addr_file = dir.join("addr").display().to_string();
    let out = ctl(&["checkpoint", "--addr-file", &addr_file]);
    assert!(
        !out.status.success() && text(&out).contains("401 Unauthorized") && text(&out).contains("--token-file"),
        "{}",
        text(&out)
    );
    let out = ctl(&["status", "--addr-file", &addr_file, "--token-file", &read.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("phase       training (healthy)") && text(&out).contains("iteration   2 of"),
        "{}",
        text(&out)
    );
    let pki = make_pki(&dir, "other");
    let out = ctl(&["status", "--addr-file", &addr_file, "--cacert", &pki.ca.display().to_string()]);
    assert!(!out.status.success() && text(&out).contains("TLS failure"), "{}", text(&out));
    let out = ctl(&["stop", "--addr", &far.to_string(), "--token-file", &control.display().to_string()]);
    assert!(out.status.success() && text(&out).contains("stop requested"), "{}", text(&out));
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));
    let out = ctl(&["status", "--addr-file", &addr_file]);
    assert!(!out.status.success() && text(&out).contains("connection refused"), "{}", text(&out));

    // The tokens appear nowhere: not in the log, /status, the checkpoints (their stored config
    // keeps the paths).
    let logged = log(&dir);
    assert!(logged.contains("HTTP request refused") && logged.contains(&far.ip().to_string()), "{logged}");
    let mut checkpoints = 0;
    for e in std::fs::read_dir(dir.join("ckpt")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            checkpoints += 1;
            let bytes = std::fs::read(&p).unwrap();
            let holds = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(
                holds("control_token_file") && holds(&control.display().to_string()),
                "{} keeps the path",
                p.display()
            );
            assert!(!holds(CONTROL_TOKEN) && !holds(READ_TOKEN), "{} holds a token", p.display());
        }
    }
    assert!(checkpoints >= 1, "no checkpoint written");
    for token in [CONTROL_TOKEN, READ_TOKEN] {
        assert!(!logged.contains(token) && !body.contains(token), "a token leaked");
    }
}

#[test]
fn bad_token_files_are_refused_at_start_naming_the_key() {
    let dir = TempDir::new("access-files");
    let good = write_mode(&dir, "good.token", CONTROL_TOKEN, 0o600);
    let cases = [
        ("control_token_file", dir.join("missing.token"), "No such file"),
        ("control_token_file", write_mode(&dir, "empty.token", "\n", 0o600), "empty"),
        ("control_token_file", write_mode(&dir, "short.token", "abc123", 0o600), "fewer than the 16"),
        ("control_token_file", write_mode(&dir, "open.token", CONTROL_TOKEN, 0o644), "mode 644"),
        ("read_token_file", write_mode(&dir, "group.token", READ_TOKEN, 0o640), "mode 640"),
        ("control_token_file", dir.to_path_buf(), "a folder"),
    ];
    for (key, file, says) in cases {
        let other = if key == "control_token_file" { "read_token_file" } else { "control_token_file" };
        let cfg = write_config(
            &dir,
            10,
            0,
            &format!("listen = \"127.0.0.1:0\"\n{key} = \"{}\"\n{other} = \"{}\"\n", file.display(), good.display()),
        );
        let mut d = start(&cfg, &dir, &[]);
        let s = wait_exit(&mut d, 60);
        let logged = log(&dir);
        assert_eq!(s.code(), Some(1), "{key} = {}: {logged}", file.display());
        assert!(logged.contains(&format!("telemetry.{key}")) && logged.contains(says), "{key} ({says}): {logged}");
        assert!(
            !logged.contains("panicked") && !logged.contains(CONTROL_TOKEN) && !logged.contains(READ_TOKEN),
            "{logged}"
        );
        assert!(!dir.join("addr").exists(), "it listened with a bad token file");
    }
}

#[test]
fn tls_serves_https_only_and_refuses_bad_pairs_at_start() {
    let dir = TempDir::new("access-tls");
    // A self-signed pair: the client trusts the certificate itself.
    let pki = make_self_signed(&dir, "daemon");
    let other = make_pki(&dir, "other");
    let (control, read) = token_files(&dir);
    let telemetry = format!(
        "listen = \"127.0.0.1:0\"\n{}read_token_file = \"{}\"\ncontrol_token_file = \"{}\"\n",
        tls_lines(&pki),
        read.display(),
        control.display()
    );
    let cfg = write_config(&dir, 100_000, 0, &telemetry);
    let (h, _file) = hold(&dir, 2);
    let mut d = start(&cfg, &dir, &[("UAMT_HOLD", &h)]);
    let addr = wait_addr(&dir.join("addr"), &mut d, 120);
    wait_iteration(addr, Some(READ_TOKEN), Some(&pki.ca), 2, 120);
    assert!(log(&dir).contains(&format!("https://{addr}/metrics")), "{}", log(&dir));

    // A scrape over HTTPS with the read token.
    let a = call(addr, "GET", "/metrics", Some(READ_TOKEN), Some(&pki.ca));
    assert_eq!(a.status, 200);
    assert!(a.body.contains("uamt_iterations_total 2"), "{}", a.body);
    assert_eq!(call(addr, "GET", "/metrics", None, Some(&pki.ca)).status, 401, "TLS is no token");
    // Plain HTTP on the TLS port: no HTTP answer.
    let plain = try_call(addr, "GET", "/metrics", Some(READ_TOKEN), None);
    assert!(
        matches!(plain, Err(uamt_actors::client::ClientError::NoAnswer { .. })),
        "plain HTTP on the TLS port got {plain:?}"
    );
    // Another CA's certificate is not trusted.
    let wrong = try_call(addr, "GET", "/metrics", Some(READ_TOKEN), Some(&other.ca));
    assert!(matches!(wrong, Err(uamt_actors::client::ClientError::Tls { .. })), "{wrong:?}");

    // uamt ctl: HTTPS needs --cacert, says so, and works with it.
    let addr_s = addr.to_string();
    let out = ctl(&["status", "--addr", &addr_s, "--token-file", &read.display().to_string()]);
    assert!(!out.status.success() && text(&out).contains("--cacert"), "{}", text(&out));
    let out = ctl(&["status", "--addr", &addr_s, "--cacert", &other.ca.display().to_string()]);
    assert!(!out.status.success() && text(&out).contains("TLS failure"), "{}", text(&out));
    let (ca, tok) = (pki.ca.display().to_string(), control.display().to_string());
    let out = ctl(&["status", "--json", "--addr", &addr_s, "--cacert", &ca, "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctl status --json prints JSON");
    assert_eq!(v["iteration"], 2);
    let out = ctl(&["stop", "--addr", &addr_s, "--cacert", &ca, "--token-file", &tok]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));

    // Bad pairs are refused at start, naming the file.
    let garbage = write_mode(
        &dir,
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let cases = [
        (
            format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", pki.cert.display(), other.key.display()),
            "telemetry.tls_key_file",
            "does not belong",
        ),
        (
            format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", garbage.display(), pki.key.display()),
            "telemetry.tls_cert_file",
            "garbage.pem",
        ),
        (
            format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", pki.cert.display(), pki.cert.display()),
            "telemetry.tls_key_file",
            "no private key",
        ),
        (format!("tls_cert_file = \"{}\"\n", pki.cert.display()), "telemetry.tls_key_file", "give its private key"),
        (
            format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                dir.join("none.pem").display(),
                pki.key.display()
            ),
            "telemetry.tls_cert_file",
            "No such file",
        ),
    ];
    for (lines, key, says) in cases {
        let cfg = write_config(&dir, 10, 0, &format!("listen = \"127.0.0.1:0\"\n{lines}"));
        let _ = std::fs::remove_file(dir.join("addr"));
        let mut d = start(&cfg, &dir, &[]);
        let s = wait_exit(&mut d, 60);
        let logged = log(&dir);
        assert_eq!(s.code(), Some(1), "{lines}: {logged}");
        assert!(logged.contains(key) && logged.contains(says), "{key} ({says}):\n{logged}");
        assert!(!logged.contains("panicked"), "{logged}");
        assert!(!dir.join("addr").exists(), "it listened with a bad pair");
    }
}

#[test]
fn checkpoint_requests_during_one_step_give_one_checkpoint() {
    let dir = TempDir::new("access-coalesce");
    let cfg = write_config(&dir, 6, 0, "listen = \"127.0.0.1:0\"\n");
    let (h, file) = hold(&dir, 3);
    let mut d = start(&cfg, &dir, &[("UAMT_HOLD", &h)]);
    let addr = wait_addr(&dir.join("addr"), &mut d, 120);
    wait_iteration(addr, None, None, 3, 120);
    let mut again = 0;
    for _ in 0..300 {
        let a = call(addr, "POST", "/checkpoint", None, None);
        assert_eq!(a.status, 202, "{}", a.body);
        again += usize::from(a.body.contains("\"already_requested\":true"));
    }
    assert_eq!(again, 299, "every request after the first finds one pending");
    let s = status(addr, None, None);
    assert_eq!((s["iteration"].as_i64(), s["checkpoint_pending"].as_bool()), (Some(3), Some(true)), "{s}");
    std::fs::remove_file(&file).unwrap();
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));
    // One checkpoint after step 4 for the 300 requests, and the final one at 6: nothing else.
    let logged = log(&dir);
    let written: Vec<&str> = logged.lines().filter(|l| l.contains("checkpoint written")).collect();
    assert_eq!(written.len(), 2, "{logged}");
    assert!(written[0].contains("iteration=4") && written[1].contains("iteration=6"), "{written:?}");
}
