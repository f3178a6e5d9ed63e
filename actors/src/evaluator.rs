//! The evaluator stage: evaluates the student on the test split every `eval.every` iterations
//! (the trainer hands over a copy of its weights) and every checkpoint that appears or is
//! replaced in `eval.watch_dir` (hot reload). A file is loaded only once its size and
//! modification time have held still for one poll; a file that cannot be read (truncated,
//! corrupt, wrong shapes) is reported in the log and in `uamt_eval_failures_total` and not retried
//! until it changes. Reports go to `eval.report_dir/<name>/report.{json,csv}`.

use crate::emit;
use crate::queue::{Closed, Rx};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tch::{Device, Tensor};
use uamt::checkpoint::Snapshot;
use uamt::config::Config;
use uamt::data::Dataset;
use uamt::eval::{self, EvalOptions, Report};
use uamt::model::params::read_named;
use uamt::model::VNet;

/// Student weights to evaluate, taken after `iteration` steps.
pub struct EvalRequest {
    /// Steps done when the weights were taken.
    pub iteration: i64,
    /// The student's named tensors (host copies).
    pub weights: Vec<(String, Tensor)>,
}

/// How often the watched folder is looked at.
const POLL: Duration = Duration::from_millis(500);

/// What the evaluator knows of one file in the watched folder.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
}

/// The evaluator's state.
pub struct Evaluator {
    /// Settings (`[eval]`, `[model]`).
    config: Config,
    /// The test split comes from here.
    dataset: Arc<Dataset>,
    /// The network the weights are loaded into.
    model: VNet,
    /// Sliding-window and metric settings.
    opts: EvalOptions,
    /// Files evaluated (or found unreadable) in this state.
    done: HashMap<PathBuf, Seen>,
    /// Files seen once in this state, waiting to hold still.
    pending: HashMap<PathBuf, Seen>,
}

impl Evaluator {
    /// An evaluator for `config` over `dataset`'s test split on `device`.
    pub fn new(config: &Config, dataset: Arc<Dataset>, device: Device) -> Result<Self> {
        let infer = config.eval.window.clone();
        infer.validate("eval")?;
        let mut model = VNet::new(&config.model, device)?;
        model.set_bf16(config.device.precision == uamt::gpu::Precision::Bf16);
        Ok(Evaluator {
            model,
            config: config.clone(),
            dataset,
            opts: EvalOptions { infer, ..EvalOptions::default() },
            done: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    /// Evaluates `weights` (a student state dict) and writes the report under `name`.
    pub fn evaluate(
        &mut self,
        weights: &[(String, Tensor)],
        origin: &Path,
        name: &str,
        source: &'static str,
    ) -> Result<Report> {
        self.model.store().load_named(weights, origin, true)?;
        let mut progress = |e: &eval::CaseEvent| tracing::debug!("{}", e.line());
        let report = eval::evaluate_dataset(
            &self.model,
            None,
            &self.dataset,
            &origin.display().to_string(),
            &self.opts,
            &mut progress,
        )?;
        let dir = self.config.eval.report_dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        report.write_json(&dir.join("report.json"))?;
        report.write_csv(&dir.join("report.csv"))?;
        let s = &report.summary;
        emit::eval_run(source);
        for (metric, stat) in [("dice", &s.dice), ("jaccard", &s.jaccard), ("hd95", &s.hd95), ("asd", &s.asd)] {
            if let Some(mean) = stat.mean {
                emit::eval_score(metric, source, mean);
            }
        }
        tracing::info!(name, source, cases = report.cases.len(), dice = ?s.dice.mean, hd95 = ?s.hd95.mean, report = %dir.display(), "evaluated");
        Ok(report)
    }

    /// The student weights in a checkpoint, or a plain state dict (`.safetensors`, `.npz`, `.ot`).
    fn weights_of(path: &Path) -> Result<Vec<(String, Tensor)>> {
        match Snapshot::read(path) {
            Ok(s) => Ok(s.student),
            Err(ckpt_err) => {
                let named = read_named(path).map_err(|_| ckpt_err)?;
                Ok(named)
            }
        }
    }

    /// Looks at the watched folder once; evaluates files that are new or changed and have held
    /// still since the last look. Returns how many it evaluated.
    pub fn poll(&mut self) -> usize {
        let dir = self.config.eval.watch_dir.clone();
        let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
        let mut n = 0;
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let wanted = [".safetensors", ".npz", ".ot"].iter().any(|s| name.ends_with(s));
            if name.starts_with('.') || !wanted {
                continue; // temporary files of atomic writers, other files
            }
            let Ok(meta) = e.metadata() else { continue };
            let now = Seen { modified: meta.modified().ok(), len: meta.len() };
            if self.done.get(&path) == Some(&now) {
                continue;
            }
            if self.pending.insert(path.clone(), now) != Some(now) {
                continue; // new or still changing: look again next time
            }
            self.pending.remove(&path);
            self.done.insert(path.clone(), now);
            let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s).to_string();
            match Self::weights_of(&path).and_then(|w| self.evaluate(&w, &path, &stem, "watch")) {
                Ok(_) => n += 1,
                Err(e) => {
                    emit::eval_failure();
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot evaluate this checkpoint; waiting for it to change");
                }
            }
        }
        n
    }
}

/// Runs the evaluator until its request queue closes and (when a folder is watched) `stop` is set.
pub fn run(mut ev: Evaluator, requests: Rx<EvalRequest>, stop: Arc<AtomicBool>) -> Result<()> {
    let watching = !ev.config.eval.watch_dir.as_os_str().is_empty();
    let mut open = true;
    loop {
        if open {
            match requests.recv_timeout(POLL) {
                Ok(Some((req, _))) => {
                    let name = format!("iter-{:08}", req.iteration);
                    let origin = PathBuf::from(format!("student after {} iterations", req.iteration));
                    if let Err(e) = ev.evaluate(&req.weights, &origin, &name, "periodic") {
                        emit::eval_failure();
                        tracing::warn!(error = %format!("{e:#}"), iteration = req.iteration, "periodic evaluation failed");
                    }
                }
                Ok(None) => {}
                Err(Closed) => open = false,
            }
        } else {
            std::thread::sleep(POLL);
        }
        if watching {
            ev.poll();
        }
        if !open && (!watching || stop.load(Ordering::SeqCst)) {
            return Ok(());
        }
    }
}
