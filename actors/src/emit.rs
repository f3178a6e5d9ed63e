//! Emitting the daemon's metrics: thin typed wrappers over the `metrics` facade, with every name
//! taken from [`uamt::telemetry::Metric`]. Without an installed recorder they cost nothing.

use metrics::{counter, gauge, histogram};
use uamt::telemetry::{Metric, MetricKind};
use uamt::train::StepReport;

/// Registers HELP text for every metric with the installed recorder.
pub fn describe_all() {
    for m in Metric::ALL {
        let (name, help) = (m.as_str(), m.help());
        if matches!(m, Metric::QueueBlockedSeconds | Metric::StageBusySeconds | Metric::StageIdleSeconds) {
            continue; // rendered by render_seconds_totals
        }
        match m.kind() {
            MetricKind::Counter => metrics::describe_counter!(name, help),
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => metrics::describe_histogram!(name, metrics::Unit::Seconds, help),
        }
    }
}

pub fn queue_capacity(queue: &'static str, capacity: usize) {
    gauge!(Metric::QueueCapacity.as_str(), "queue" => queue).set(capacity as f64);
    gauge!(Metric::QueueDepth.as_str(), "queue" => queue).set(0.0);
}

pub fn queue_push(queue: &'static str, depth: usize, blocked: f64) {
    counter!(Metric::QueuePushed.as_str(), "queue" => queue).increment(1);
    gauge!(Metric::QueueDepth.as_str(), "queue" => queue).set(depth as f64);
    queue_blocked(queue, "push", blocked);
}

pub fn queue_pop(queue: &'static str, depth: usize, blocked: f64) {
    counter!(Metric::QueuePopped.as_str(), "queue" => queue).increment(1);
    gauge!(Metric::QueueDepth.as_str(), "queue" => queue).set(depth as f64);
    queue_blocked(queue, "pop", blocked);
}

pub fn queue_blocked(queue: &'static str, side: &'static str, secs: f64) {
    seconds_total(Metric::QueueBlockedSeconds, [("queue", queue), ("side", side)], secs);
}

pub fn stage_busy(stage: &'static str, secs: f64) {
    seconds_total(Metric::StageBusySeconds, [("stage", stage), ("", "")], secs);
}

pub fn stage_idle(stage: &'static str, secs: f64) {
    seconds_total(Metric::StageIdleSeconds, [("stage", stage), ("", "")], secs);
}

/// Counters of seconds. The `metrics` facade counts in integers, so fractional-second counters
/// live here and [`render_seconds_totals`] appends them to the exporter's text.
static SECONDS: std::sync::Mutex<std::collections::BTreeMap<SecondsKey, f64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A seconds counter's metric name and its two label pairs (`("", "")` when there is one label).
type SecondsKey = (&'static str, [(&'static str, &'static str); 2]);

fn seconds_total(metric: Metric, labels: [(&'static str, &'static str); 2], secs: f64) {
    let mut map = SECONDS.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry((metric.as_str(), labels)).or_insert(0.0) += secs;
}

/// The seconds counters in Prometheus text format, HELP and TYPE included.
/// Labels on every series of this process (set once, with the recorder).
static GLOBAL_LABELS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Puts `labels` on the seconds counters too (the recorder puts them on its own series).
pub fn set_global_labels(labels: &[(&str, String)]) {
    let _ = GLOBAL_LABELS.set(labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect());
}

pub fn render_seconds_totals() -> String {
    use std::fmt::Write;
    let map = SECONDS.lock().unwrap_or_else(|e| e.into_inner());
    let global = GLOBAL_LABELS.get().cloned().unwrap_or_default();
    let mut out = String::new();
    for m in [Metric::QueueBlockedSeconds, Metric::StageBusySeconds, Metric::StageIdleSeconds] {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", m.as_str(), m.help(), m.as_str());
        for ((name, labels), v) in map.iter().filter(|((n, _), _)| *n == m.as_str()) {
            let mut l: Vec<String> =
                labels.iter().filter(|(k, _)| !k.is_empty()).map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            l.extend(global.iter().cloned());
            let _ = writeln!(out, "{name}{{{}}} {v}", l.join(","));
        }
    }
    out
}

pub fn stage_item(stage: &'static str) {
    counter!(Metric::StageItems.as_str(), "stage" => stage).increment(1);
}

/// One finished iteration.
pub fn iteration(r: &StepReport, seconds: f64) {
    counter!(Metric::Iterations.as_str()).increment(1);
    histogram!(Metric::IterationSeconds.as_str()).record(seconds);
    for (term, v) in [
        ("total", r.loss),
        ("supervised", r.supervised),
        ("ce", r.ce),
        ("dice", r.dice),
        ("consistency", r.consistency),
    ] {
        gauge!(Metric::Loss.as_str(), "term" => term).set(v);
    }
    gauge!(Metric::ConsistencyWeight.as_str()).set(r.weight);
    if r.threshold.is_finite() {
        gauge!(Metric::Threshold.as_str()).set(r.threshold);
    }
    gauge!(Metric::MaskFraction.as_str()).set(r.mask_fraction);
    gauge!(Metric::LearningRate.as_str()).set(r.lr);
}

pub fn it_per_second(v: f64) {
    gauge!(Metric::ItPerSecond.as_str()).set(v);
}

pub fn checkpoint(ok: bool, seconds: f64) {
    if ok {
        counter!(Metric::CheckpointWrites.as_str()).increment(1);
        histogram!(Metric::CheckpointSeconds.as_str()).record(seconds);
    } else {
        counter!(Metric::CheckpointFailures.as_str()).increment(1);
    }
}

pub fn skipped_step() {
    counter!(Metric::SkippedSteps.as_str()).increment(1);
}

pub fn skipped_case() {
    counter!(Metric::SkippedCases.as_str()).increment(1);
}

pub fn eval_run(source: &'static str) {
    counter!(Metric::EvalRuns.as_str(), "source" => source).increment(1);
}

pub fn eval_failure() {
    counter!(Metric::EvalFailures.as_str()).increment(1);
}

pub fn eval_score(metric: &'static str, checkpoint: &'static str, v: f64) {
    gauge!(Metric::EvalScore.as_str(), "metric" => metric, "checkpoint" => checkpoint).set(v);
}

/// One finished ranking of the unlabelled cases: its duration and a summary of its scores (no
/// case id ever becomes a label). `scores` are the defined ones; `undefined` counts the others.
pub fn rank_done(seconds: f64, scores: &[f64], undefined: usize) {
    counter!(Metric::RankRuns.as_str()).increment(1);
    histogram!(Metric::RankSeconds.as_str()).record(seconds);
    gauge!(Metric::RankCases.as_str(), "score" => "defined").set(scores.len() as f64);
    gauge!(Metric::RankCases.as_str(), "score" => "undefined").set(undefined as f64);
    if let Some(s) = ScoreSummary::of(scores) {
        for (stat, v) in [("min", s.min), ("median", s.median), ("max", s.max), ("mean", s.mean)] {
            gauge!(Metric::RankScore.as_str(), "stat" => stat).set(v);
        }
    }
}

pub fn rank_failure() {
    counter!(Metric::RankFailures.as_str()).increment(1);
}

/// Minimum, median (the mean of the middle two for an even count), maximum and mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreSummary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub mean: f64,
}

impl ScoreSummary {
    /// The summary of `v`; `None` when it is empty.
    pub fn of(v: &[f64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { 0.5 * (s[n / 2 - 1] + s[n / 2]) };
        Some(ScoreSummary { min: s[0], median, max: s[n - 1], mean: s.iter().sum::<f64>() / n as f64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_summary_is_min_median_max_mean() {
        assert_eq!(ScoreSummary::of(&[]), None);
        let s = ScoreSummary::of(&[0.3, 0.1, 0.4, 0.2]).unwrap();
        assert_eq!((s.min, s.max), (0.1, 0.4));
        assert!((s.median - 0.25).abs() < 1e-12 && (s.mean - 0.25).abs() < 1e-12);
        assert_eq!(ScoreSummary::of(&[0.5, 0.1, 0.2]).unwrap().median, 0.2);
    }
}
