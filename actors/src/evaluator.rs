//! The evaluation service, a sibling of the training pipeline under the supervisor: it evaluates
//! the student on the test split when the trainer hands over a copy of its weights (every
//! `eval.every` steps) and every checkpoint that appears or is replaced in `eval.watch_dir` (hot
//! reload). It runs as an actix actor on an arbiter (thread) of its own, so a long evaluation
//! blocks nothing else.
//!
//! Isolation: a file or evaluation that fails (truncated, corrupt, wrong shapes, even a panic in
//! libtorch) is logged with the file, counted in `uamt_eval_failures_total`, and not retried
//! until the file changes; later files are evaluated, training never notices. A file is loaded
//! only once its size and modification time have held still for one poll. Reports go to
//! `eval.report_dir/<name>/report.{json,csv}`.
//!
//! It also ranks the unlabelled training cases (`[rank]`) when the trainer hands over a copy of
//! the teacher every `rank.every` steps, writing `rank.dir/ranking.{json,csv}` (replaced
//! atomically); at most one ranking waits or runs at a time, and one that fails is logged and
//! counted (`uamt_rank_failures_total`) like a failed evaluation.

use crate::emit;
use crate::pipeline::spawn::run_caught;
use actix::prelude::*;
use anyhow::{Context as _, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tch::{Device, Tensor};
use uamt::config::Config;
use uamt::data::Dataset;
use uamt::eval::{self, EvalOptions, Report};
use uamt::model::VNet;

/// Student weights to evaluate, taken after `iteration` steps.
pub struct EvalRequest {
    /// Steps done when the weights were taken.
    pub iteration: i64,
    /// The student's named tensors (host copies).
    pub weights: Vec<(String, Tensor)>,
}

/// Weights to rank the unlabelled training cases with, taken after `iteration` steps.
pub struct RankRequest {
    /// Steps done when the weights were taken.
    pub iteration: i64,
    /// The teacher's named tensors (the student's for supervised training), host copies.
    pub weights: Vec<(String, Tensor)>,
    /// Whether `weights` are the teacher's.
    pub teacher: bool,
}

/// How often the watched folder is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// What the evaluator knows of one file in the watched folder.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Seen {
    /// Modification time.
    pub modified: Option<SystemTime>,
    /// Size in bytes.
    pub len: u64,
}

/// The watched folder's bookkeeping: which files are new or changed and have held still.
#[derive(Default, Debug)]
pub struct Watch {
    /// Files evaluated (or found unreadable) in this state.
    done: HashMap<PathBuf, Seen>,
    /// Files seen once in this state, waiting to hold still.
    pending: HashMap<PathBuf, Seen>,
}

impl Watch {
    /// Whether a file name is one the evaluator takes (not a temporary file of an atomic writer).
    /// Checkpoints and state dicts as `.safetensors` or `.npz`; PyTorch's `.pt` and TorchScript
    /// files are for `uamt eval --weights` (read by the same untrusted-file rules).
    pub fn wanted(name: &str) -> bool {
        !name.starts_with('.') && [".safetensors", ".npz"].iter().any(|s| name.ends_with(s))
    }

    /// Given what a look at the folder found, the files to evaluate now: new or changed since
    /// they were last evaluated, and unchanged since the previous look.
    pub fn ready(&mut self, found: impl IntoIterator<Item = (PathBuf, Seen)>) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (path, now) in found {
            if self.done.get(&path) == Some(&now) {
                continue;
            }
            if self.pending.insert(path.clone(), now) != Some(now) {
                continue; // new or still changing: look again next time
            }
            self.pending.remove(&path);
            self.done.insert(path.clone(), now);
            out.push(path);
        }
        out.sort();
        out
    }
}

/// Looks at `dir` once: its wanted files and their size and modification time.
fn look(dir: &Path) -> Vec<(PathBuf, Seen)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| Watch::wanted(&e.file_name().to_string_lossy()))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), Seen { modified: meta.modified().ok(), len: meta.len() }))
        })
        .collect()
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
    /// The watched folder's bookkeeping.
    watch: Watch,
    /// Where results are shown (`/status`).
    board: Option<crate::status::StatusBoard>,
}

impl Evaluator {
    /// An evaluator for `config` over `dataset`'s test split on `device`.
    pub fn new(config: &Config, dataset: Arc<Dataset>, device: Device) -> Result<Self> {
        let infer = config.eval.window.clone();
        infer.validate("eval")?;
        let mut model = VNet::new(&config.model, device)?;
        model.set_bf16(config.device.precision == uamt::gpu::Precision::Bf16);
        model.set_channels_last(config.device.channels_last(config.model.n_filters, device));
        Ok(Evaluator {
            model,
            config: config.clone(),
            dataset,
            opts: EvalOptions { infer, ..EvalOptions::default() },
            watch: Watch::default(),
            board: None,
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
        tracing::info!(name, source, cases = report.cases.len(), dice = s.dice.mean, hd95 = s.hd95.mean, report = %dir.display(), "evaluated");
        if let Some(b) = &self.board {
            b.on_eval(crate::status::EvalStatus::of(name, source, &report));
        }
        Ok(report)
    }

    /// Ranks the unlabelled training cases with the weights of `req` (see `uamt::eval::rank`),
    /// writes `rank.dir/ranking.json` and `ranking.csv` atomically, and reports it (log, metrics,
    /// `/status`).
    pub fn rank(&mut self, req: &RankRequest) -> Result<uamt::eval::Ranking> {
        use uamt::eval::rank::{rank_case, RankOptions, RankSource, Ranking};
        let t0 = std::time::Instant::now();
        let who = if req.teacher { "teacher" } else { "student" };
        let origin = PathBuf::from(format!("{who} after {} iterations", req.iteration));
        self.model.store().load_named(&req.weights, &origin, true)?;
        let rc = self.config.rank.clone();
        let opts = RankOptions { infer: self.opts.infer.clone(), mc: rc.mc(), band: rc.band, picture: false };
        let mut cases = Vec::new();
        for i in self.dataset.unlabelled() {
            let case = &self.dataset.training[i];
            let (ranked, _) = rank_case(&self.model, None, case, &opts)
                .with_context(|| format!("ranking {}", case.image.path().display()))?;
            cases.push(ranked);
        }
        let source = RankSource {
            model: origin.display().to_string(),
            teacher: req.teacher,
            mc_passes: rc.mc_passes,
            mc_seed: rc.seed,
            band_voxels: rc.band,
            iteration: Some(req.iteration),
        };
        let ranking = Ranking::new(rc.score, source, cases);
        std::fs::create_dir_all(&rc.dir).with_context(|| format!("creating rank.dir {}", rc.dir.display()))?;
        let file = rc.dir.join("ranking.json");
        let csv = ranking.to_csv();
        uamt::fsutil::write_atomic(&rc.dir.join("ranking.csv"), |w| w.write_all(csv.as_bytes()))?;
        let json = ranking.to_json() + "\n";
        uamt::fsutil::write_atomic(&file, |w| w.write_all(json.as_bytes()))?;
        let seconds = t0.elapsed().as_secs_f64();
        let scores: Vec<f64> = ranking.cases.iter().filter_map(|c| rc.score.of(&c.scores)).collect();
        emit::rank_done(seconds, &scores, ranking.cases.len() - scores.len());
        let first = ranking.cases.first().map(|c| c.case.as_str()).unwrap_or("-");
        tracing::info!(iteration = req.iteration, model = who, cases = ranking.cases.len(), score = %rc.score, first, seconds, file = %file.display(), "unlabelled cases ranked");
        if let Some(b) = &self.board {
            b.on_rank(crate::status::RankStatus::of(&ranking, rc.top, seconds, &file));
        }
        Ok(ranking)
    }

    /// The student weights in a checkpoint, or a plain state dict (`.safetensors`, `.npz`), read
    /// as an untrusted file: regular files up to the size limit, every tensor checked (see
    /// [`uamt::model::tensorfile`]); the names, shapes and kinds are checked again against the
    /// model before anything is copied.
    fn weights_of(path: &Path) -> Result<Vec<(String, Tensor)>> {
        Ok(uamt::checkpoint::read_student_weights(path)?)
    }

    /// Evaluates one file; any failure (a panic included) is returned as an error.
    pub fn evaluate_file(&mut self, path: &Path) -> Result<Report> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s).to_string();
        run_caught("evaluator", || Self::weights_of(path).and_then(|w| self.evaluate(&w, path, &stem, "watch")))
    }

    /// Looks at the watched folder once; evaluates files that are new or changed and have held
    /// still since the last look, each on its own: one that fails is logged and counted and the
    /// others are still evaluated. Returns (evaluated, failed).
    pub fn poll(&mut self) -> (usize, usize) {
        let found = look(&self.config.eval.watch_dir);
        let (mut ok, mut failed) = (0, 0);
        for path in self.watch.ready(found) {
            match self.evaluate_file(&path) {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    emit::eval_failure();
                    if let Some(b) = &self.board {
                        b.on_eval_failure();
                    }
                    tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cannot evaluate this file; waiting for it to change");
                }
            }
        }
        (ok, failed)
    }
}

/// Counters the service shares with whoever holds its handle.
#[derive(Default, Debug)]
pub struct EvalCounters {
    /// Evaluations finished.
    pub done: AtomicU64,
    /// Evaluations that failed.
    pub failed: AtomicU64,
    /// A periodic request is queued or running (at most one: weights are big).
    pub busy: AtomicBool,
    /// A ranking request is queued or running (at most one).
    pub rank_busy: AtomicBool,
}

/// The evaluation service actor.
pub struct EvalService {
    /// The evaluator; `None` once the service is told to finish.
    evaluator: Evaluator,
    /// Shared counters.
    counters: Arc<EvalCounters>,
    /// Whether a folder is watched.
    watching: bool,
    /// Where results are shown (`/status`).
    board: Option<crate::status::StatusBoard>,
}

impl Actor for EvalService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.watching {
            ctx.run_interval(POLL, |act, _| {
                let (ok, failed) = act.evaluator.poll();
                act.counters.done.fetch_add(ok as u64, Ordering::SeqCst);
                act.counters.failed.fetch_add(failed as u64, Ordering::SeqCst);
            });
        }
    }
}

/// Evaluate the student weights of a periodic request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EvaluateWeights(pub EvalRequest);

impl Handler<EvaluateWeights> for EvalService {
    type Result = ();
    fn handle(&mut self, msg: EvaluateWeights, _: &mut Self::Context) {
        let req = msg.0;
        let name = format!("iter-{:08}", req.iteration);
        let origin = PathBuf::from(format!("student after {} iterations", req.iteration));
        let r = run_caught("evaluator", || self.evaluator.evaluate(&req.weights, &origin, &name, "periodic"));
        self.counters.busy.store(false, Ordering::SeqCst);
        match r {
            Ok(_) => {
                self.counters.done.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::SeqCst);
                emit::eval_failure();
                if let Some(b) = &self.board {
                    b.on_eval_failure();
                }
                tracing::warn!(error = %format!("{e:#}"), iteration = req.iteration, "periodic evaluation failed");
            }
        }
    }
}

/// Rank the unlabelled training cases with the weights of a request.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RankWeights(pub RankRequest);

impl Handler<RankWeights> for EvalService {
    type Result = ();
    fn handle(&mut self, msg: RankWeights, _: &mut Self::Context) {
        let req = msg.0;
        let r = run_caught("evaluator", || self.evaluator.rank(&req));
        self.counters.rank_busy.store(false, Ordering::SeqCst);
        if let Err(e) = r {
            emit::rank_failure();
            if let Some(b) = &self.board {
                b.on_rank_failure();
            }
            tracing::warn!(error = %format!("{e:#}"), iteration = req.iteration, "ranking the unlabelled cases failed");
        }
    }
}

/// Evaluate one file now (the result is the error text on failure).
#[derive(Message)]
#[rtype(result = "std::result::Result<(), String>")]
pub struct EvaluateFile(pub PathBuf);

impl Handler<EvaluateFile> for EvalService {
    type Result = std::result::Result<(), String>;
    fn handle(&mut self, msg: EvaluateFile, _: &mut Self::Context) -> Self::Result {
        match self.evaluator.evaluate_file(&msg.0) {
            Ok(_) => {
                self.counters.done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::SeqCst);
                emit::eval_failure();
                Err(format!("{e:#}"))
            }
        }
    }
}

/// Finish: answered once every request queued before it is done; then the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Finish;

impl Handler<Finish> for EvalService {
    type Result = ();
    fn handle(&mut self, _: Finish, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// A handle on a running evaluation service.
#[derive(Clone)]
pub struct EvalHandle {
    /// The actor.
    pub addr: Addr<EvalService>,
    /// Its counters.
    pub counters: Arc<EvalCounters>,
    /// Its arbiter (thread), stopped after the actor.
    arbiter: ArbiterHandle,
}

impl EvalHandle {
    /// Starts the service on an arbiter of its own (call from inside an actix system).
    pub fn start(mut evaluator: Evaluator, board: Option<crate::status::StatusBoard>) -> Result<Self> {
        evaluator.board = board.clone();
        let arbiter = Arbiter::new().handle();
        let counters = Arc::new(EvalCounters::default());
        let watching = !evaluator.config.eval.watch_dir.as_os_str().is_empty();
        let c = counters.clone();
        let addr =
            EvalService::start_in_arbiter(&arbiter, move |_| EvalService { evaluator, counters: c, watching, board });
        Ok(EvalHandle { addr, counters, arbiter })
    }

    /// Offers a periodic request; false (the request dropped) while the previous one is still
    /// queued or running, so at most one copy of the weights waits.
    pub fn offer(&self, req: EvalRequest) -> bool {
        if self.counters.busy.swap(true, Ordering::SeqCst) {
            return false;
        }
        if self.addr.try_send(EvaluateWeights(req)).is_err() {
            self.counters.busy.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Offers a ranking at `iteration`: false (nothing taken) while the previous one is still
    /// queued or running; otherwise `take` copies the weights (only then, so a busy service costs
    /// training no copy) and the request is queued. A `take` that fails is logged, and false.
    pub fn offer_rank(&self, iteration: i64, take: &mut dyn FnMut() -> Result<RankRequest>) -> bool {
        if self.counters.rank_busy.swap(true, Ordering::SeqCst) {
            return false;
        }
        let req = match take() {
            Ok(r) => r,
            Err(e) => {
                self.counters.rank_busy.store(false, Ordering::SeqCst);
                tracing::warn!(iteration, error = %format!("{e:#}"), "cannot copy the weights to rank with");
                return false;
            }
        };
        if self.addr.try_send(RankWeights(req)).is_err() {
            self.counters.rank_busy.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Stops the service's thread (after the actor has stopped or been abandoned).
    pub fn stop_thread(&self) {
        self.arbiter.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_taken_once_it_holds_still_and_again_when_it_changes() {
        let mut w = Watch::default();
        let a = PathBuf::from("a.safetensors");
        let s1 = Seen { modified: None, len: 10 };
        let s2 = Seen { modified: None, len: 20 };
        assert!(w.ready([(a.clone(), s1)]).is_empty(), "first sight: wait");
        assert!(w.ready([(a.clone(), s2)]).is_empty(), "still growing: wait");
        assert_eq!(w.ready([(a.clone(), s2)]), vec![a.clone()], "held still: take it");
        assert!(w.ready([(a.clone(), s2)]).is_empty(), "done: not again");
        let s3 = Seen { modified: None, len: 30 };
        assert!(w.ready([(a.clone(), s3)]).is_empty());
        assert_eq!(w.ready([(a.clone(), s3)]), vec![a], "replaced: take it again");
    }

    #[test]
    fn temporary_and_foreign_files_are_ignored() {
        assert!(Watch::wanted("ckpt-00000010.safetensors"));
        assert!(!Watch::wanted(".ckpt-00000010.safetensors.tmp-42"));
        assert!(!Watch::wanted("notes.txt"));
        assert!(!Watch::wanted("model.ot"), "TorchScript is not read from a watched folder");
    }
}
