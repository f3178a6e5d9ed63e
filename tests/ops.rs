//! The operator-facing files agree with the code: every metric the Grafana dashboard, the alert
//! rules and the README mention exists, and the README documents every metric.

mod support;

use support::repo;
use uamt::telemetry::{Metric, MetricKind};

fn read(p: &str) -> String {
    std::fs::read_to_string(repo().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Every `uamt_...` token in `text`.
fn metric_tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("uamt_") {
        let s = i + off;
        let mut e = s;
        while e < b.len() && (b[e].is_ascii_lowercase() || b[e].is_ascii_digit() || b[e] == b'_') {
            e += 1;
        }
        let before_ok = s == 0
            || !(b[s - 1].is_ascii_alphanumeric()
                || b[s - 1] == b'_'
                || b[s - 1] == b'/'
                || b[s - 1] == b'.'
                || b[s - 1] == b'-');
        if before_ok {
            out.push(text[s..e].to_string());
        }
        i = e.max(s + 5);
    }
    out
}

fn known(token: &str) -> bool {
    Metric::ALL.iter().any(|m| {
        let n = m.as_str();
        token == n
            || (m.kind() == MetricKind::Histogram
                && ["_bucket", "_sum", "_count"].iter().any(|s| token == format!("{n}{s}")))
    })
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let dash = read("ops/grafana/uamt-dashboard.json");
    let _: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    for file in ["ops/grafana/uamt-dashboard.json", "ops/prometheus/uamt-alerts.yml"] {
        let tokens = metric_tokens(&read(file));
        assert!(!tokens.is_empty(), "{file} mentions no metric");
        for t in tokens {
            assert!(known(&t), "{file} uses `{t}`, which the daemon does not export");
        }
    }
}

#[test]
fn readme_documents_every_metric() {
    let readme = read("README.md");
    for m in Metric::ALL {
        assert!(readme.contains(&format!("`{}`", m.as_str())), "README does not document `{}`", m.as_str());
    }
    for t in metric_tokens(&readme) {
        assert!(known(&t), "README mentions `{t}`, which the daemon does not export");
    }
}

#[test]
fn metric_names_follow_prometheus_conventions() {
    for m in Metric::ALL {
        let n = m.as_str();
        assert!(n.starts_with("uamt_"), "{n}");
        match m.kind() {
            MetricKind::Counter => assert!(n.ends_with("_total"), "counter {n} must end in _total"),
            MetricKind::Histogram => assert!(n.ends_with("_seconds"), "histogram {n} must end in _seconds"),
            MetricKind::Gauge => assert!(!n.ends_with("_total"), "gauge {n} must not end in _total"),
        }
    }
}
