//! A real Prometheus (Debian's package, which `ops/setup` installs) scrapes the daemon over HTTPS
//! with a bearer token from a credentials file, using `ops/prometheus/prometheus-https.yml` with
//! its paths and target replaced; the test reads the target's health and a scraped sample back
//! from Prometheus's HTTP API. The daemon refuses the same scrape without the token (a second
//! job in the same Prometheus, which must show the target down with 401).

mod common;
#[path = "../../tests/support/mod.rs"]
mod support;

use common::*;
use std::net::SocketAddr;
use std::process::Command;
use support::{free_port, repo, TempDir};

/// Prometheus's API answer to `path` (plain HTTP on loopback), as JSON.
fn api(prom: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let a = try_call(prom, "GET", path, None, None).ok()?;
    (a.status == 200).then(|| serde_json::from_str(&a.body).ok()).flatten()
}

#[test]
fn prometheus_scrapes_the_daemon_over_https_with_a_token() {
    let dir = TempDir::new("prometheus");
    let pki = make_pki(&dir, "daemon");
    let (control, read) = token_files(&dir);
    let telemetry = format!(
        "listen = \"127.0.0.1:0\"\n{}read_token_file = \"{}\"\ncontrol_token_file = \"{}\"\n",
        tls_lines(&pki),
        read.display(),
        control.display()
    );
    let cfg = write_config(&dir, 100_000, 0, &telemetry);
    let mut d = start(&cfg, &dir, &[]);
    let addr = wait_addr(&dir.join("addr"), &mut d, 120);

    // The shipped config, pointed at this daemon and these files, plus a job without the token.
    let shipped = std::fs::read_to_string(repo().join("ops/prometheus/prometheus-https.yml")).unwrap();
    assert!(shipped.contains("scheme: https") && shipped.contains("credentials_file:"), "{shipped}");
    let target = format!("127.0.0.1:{}", addr.port());
    let mut config = shipped
        .replace("/etc/prometheus/uamt-ca.pem", &pki.ca.display().to_string())
        .replace("/etc/prometheus/uamt-read.token", &read.display().to_string())
        .replace("gpu01.example:9184", &target)
        .replace("scrape_interval: 5s", "scrape_interval: 1s");
    config.push_str(&format!(
        "  - job_name: uamt-no-token\n    scrape_interval: 1s\n    scheme: https\n    tls_config:\n      ca_file: {}\n    \
         static_configs:\n      - targets: [\"{target}\"]\n",
        pki.ca.display()
    ));
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    std::fs::copy(repo().join("ops/prometheus/uamt-alerts.yml"), dir.join("uamt-alerts.yml")).unwrap();
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.join("prometheus.yml"))
        .output()
        .expect("run promtool (ops/setup installs Debian's prometheus package)");
    assert!(check.status.success(), "promtool:\n{}", text(&check));

    let prom_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address={prom_addr}"));
    let prom_dir = dir.join("prom");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let mut prom = start_cmd(cmd, &prom_dir, &[]);

    // Both targets reported, ours up and the one without a token down with 401.
    let mut targets = serde_json::Value::Null;
    wait_for("both targets scraped", 90, || {
        if let Some(s) = prom.0.try_wait().unwrap() {
            panic!("prometheus exited ({s}):\n{}", log(&prom_dir));
        }
        let Some(v) = api(prom_addr, "/api/v1/targets") else { return false };
        let active = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let scraped = active.len() == 2 && active.iter().all(|t| t["health"] != "unknown");
        targets = v;
        scraped
    });
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    let job = |name: &str| active.iter().find(|t| t["labels"]["job"] == name).unwrap_or_else(|| panic!("{targets}"));
    assert_eq!(job("uamt")["health"], "up", "{targets}");
    assert_eq!(job("uamt")["scrapeUrl"], format!("https://{target}/metrics"));
    assert_eq!(job("uamt-no-token")["health"], "down", "{targets}");
    assert!(job("uamt-no-token")["lastError"].as_str().unwrap_or_default().contains("401"), "{targets}");

    // A scraped sample, read back.
    let mut value = 0.0;
    wait_for("a scraped uamt_iterations_total above 0", 90, || {
        let Some(v) = api(prom_addr, "/api/v1/query?query=uamt_iterations_total%7Bjob%3D%22uamt%22%7D") else {
            return false;
        };
        value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0);
        value > 0.0
    });
    println!("prometheus: target https://{target}/metrics up; uamt_iterations_total{{job=\"uamt\"}} = {value}");
    println!("prometheus: job without a token: {}", job("uamt-no-token")["lastError"]);
    drop(prom);

    let out = ctl(&[
        "stop",
        "--addr",
        &addr.to_string(),
        "--cacert",
        &pki.ca.display().to_string(),
        "--token-file",
        &control.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_exit(&mut d, 120).success(), "{}", log(&dir));
}
