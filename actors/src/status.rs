//! The run's state as `GET /status` and `GET /healthz` answer it: [`StatusBoard`], fed by the
//! training loop, the evaluator and the supervisor, and a process-wide registry of queue depths
//! that lets [`crate::queue`] feed the board without anyone passing it around.
//!
//! Nothing here holds a lock across I/O: every method copies numbers in or out under a short lock.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use uamt::eval::Report;
use uamt::train::StepReport;

/// Locks `m`, taking the data even if a panicking thread poisoned it: every value guarded here
/// is a plain record that stays consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening the data, building the model, compiling.
    Starting,
    /// Steps are running.
    Training,
    /// A stop was requested; finishing the current step and writing a checkpoint.
    Stopping,
    /// Training ended normally.
    Finished,
    /// A stage failed; the run is ending or has ended with an error.
    Failed,
}

/// The numbers of the latest step recorded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStatus {
    /// Total loss.
    pub loss: f64,
    /// Supervised loss `0.5 * (ce + dice)`.
    pub supervised: f64,
    /// Masked consistency before weighting.
    pub consistency: f64,
    /// Consistency weight.
    pub weight: f64,
    /// Fraction of unlabelled voxels under the uncertainty threshold.
    pub mask_fraction: f64,
    /// Learning rate.
    pub lr: f64,
    /// Uncertainty threshold in nats; `None` (JSON null) when the method uses no mask.
    pub threshold: Option<f64>,
}

/// One queue's fill, summed over the live queues of that name (the loader workers share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueStatus {
    /// Items waiting.
    pub depth: usize,
    /// Items it can hold.
    pub capacity: usize,
}

/// The latest evaluation's mean scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalStatus {
    /// The report's name (its folder under `eval.report_dir`).
    pub name: String,
    /// What asked for it: `periodic` or `watch`.
    pub source: String,
    /// Mean Dice, when any case defined it.
    pub dice: Option<f64>,
    /// Mean Jaccard.
    pub jaccard: Option<f64>,
    /// Mean 95 % Hausdorff distance, voxels.
    pub hd95: Option<f64>,
    /// Mean average surface distance, voxels.
    pub asd: Option<f64>,
    /// Cases evaluated.
    pub cases: usize,
}

impl EvalStatus {
    /// The status line of `report`, evaluated as `name` for `source`.
    pub fn of(name: &str, source: &str, report: &Report) -> Self {
        let s = &report.summary;
        EvalStatus {
            name: name.to_string(),
            source: source.to_string(),
            dice: s.dice.mean,
            jaccard: s.jaccard.mean,
            hd95: s.hd95.mean,
            asd: s.asd.mean,
            cases: report.cases.len(),
        }
    }
}

/// One case of the latest ranking, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankEntry {
    /// 1 for the most informative.
    pub rank: usize,
    /// The case id.
    pub case: String,
    /// Its score (`null`: undefined, nothing segmented).
    pub score: Option<f64>,
    /// Its predicted foreground volume, millilitres.
    pub volume_ml: f64,
}

/// The latest ranking of the unlabelled training cases (`[rank]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankStatus {
    /// Training iterations done when the weights were taken.
    pub iteration: i64,
    /// The score the ranking follows (`rank.score`).
    pub score: String,
    /// Whose Monte-Carlo passes: `teacher` (or `student` for supervised training).
    pub model: String,
    /// Cases ranked.
    pub cases: usize,
    /// Time it took.
    pub seconds: f64,
    /// The file written (`<rank.dir>/ranking.json`).
    pub file: String,
    /// The first `rank.top` cases.
    pub top: Vec<RankEntry>,
}

impl RankStatus {
    /// The status of `ranking` (its first `top` cases), written to `file` in `seconds`.
    pub fn of(ranking: &uamt::eval::Ranking, top: usize, seconds: f64, file: &std::path::Path) -> Self {
        RankStatus {
            iteration: ranking.source.iteration.unwrap_or(0),
            score: ranking.score.to_string(),
            model: if ranking.source.teacher { "teacher" } else { "student" }.to_string(),
            cases: ranking.cases.len(),
            seconds,
            file: file.display().to_string(),
            top: ranking
                .top(Some(top))
                .iter()
                .map(|c| RankEntry {
                    rank: c.rank,
                    case: c.case.clone(),
                    score: ranking.score.of(&c.scores),
                    volume_ml: c.volume_ml,
                })
                .collect(),
        }
    }
}

/// The stage whose failure ends the run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageFailure {
    /// Stage name (`loader`, `teacher`, `evaluator`, ...).
    pub stage: String,
    /// The error, as its message chain.
    pub cause: String,
}

/// What `GET /status` answers: a copy of the board taken under its lock.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Where the run is.
    pub phase: Phase,
    /// Iterations completed (the last recorded step's 0-based index plus one).
    pub iteration: i64,
    /// Target iteration count (`optim.iterations`).
    pub end: i64,
    /// The latest recorded step, once there is one.
    pub step: Option<StepStatus>,
    /// Iterations per second, as the caller of [`StatusBoard::on_step`] measured it.
    pub it_per_s: Option<f64>,
    /// Seconds left at that rate.
    pub eta_s: Option<f64>,
    /// Seconds since the latest recorded step.
    pub seconds_since_step: Option<f64>,
    /// Seconds since the board was made (about the process's age).
    pub uptime_s: f64,
    /// Depth and capacity by queue name.
    pub queues: BTreeMap<String, QueueStatus>,
    /// The latest finished evaluation.
    pub last_eval: Option<EvalStatus>,
    /// Evaluations finished.
    pub evals_done: u64,
    /// Evaluations that failed (an unreadable or corrupt checkpoint).
    pub evals_failed: u64,
    /// The latest ranking of the unlabelled training cases (`[rank]`).
    pub last_rank: Option<RankStatus>,
    /// Rankings finished.
    pub ranks_done: u64,
    /// Rankings that failed.
    pub ranks_failed: u64,
    /// The first stage that failed, if any.
    pub failed_stage: Option<StageFailure>,
    /// Whether `GET /healthz` answers 200.
    pub healthy: bool,
    /// Why it does not, when it does not.
    pub unhealthy: Option<String>,
    /// Whether a checkpoint was asked for (`POST /checkpoint`, SIGUSR1) and not yet written: it
    /// follows the current step, and further requests until then add nothing. Filled in by the
    /// HTTP server from the run's controls (the board does not hold them).
    pub checkpoint_pending: bool,
}

/// The board's record, behind its mutex.
struct Board {
    /// Where the run is.
    phase: Phase,
    /// When the phase last became [`Phase::Training`] (a stall is counted from then at the latest).
    training_since: Option<Instant>,
    /// Iterations completed.
    iteration: i64,
    /// Target iterations.
    end: i64,
    /// The latest step.
    step: Option<StepStatus>,
    /// When it was recorded.
    step_at: Option<Instant>,
    /// Rate at the latest step.
    it_per_s: Option<f64>,
    /// ETA at the latest step.
    eta_s: Option<f64>,
    /// Queues reported through [`StatusBoard::on_queue`] (they override the registry's).
    queues: BTreeMap<String, QueueStatus>,
    /// Latest evaluation.
    last_eval: Option<EvalStatus>,
    /// Evaluations finished.
    evals_done: u64,
    /// Evaluations failed.
    evals_failed: u64,
    /// Latest ranking.
    last_rank: Option<RankStatus>,
    /// Rankings finished.
    ranks_done: u64,
    /// Rankings failed.
    ranks_failed: u64,
    /// First failed stage.
    failed: Option<StageFailure>,
}

/// What the run reports about itself, shared (cheap clones of one `Arc`) between the daemon's
/// threads and the HTTP server. Health: unhealthy once a stage failed, or when the phase is
/// [`Phase::Training`] and no step was recorded for `stall_after`.
#[derive(Clone)]
pub struct StatusBoard {
    /// The record.
    board: Arc<Mutex<Board>>,
    /// How long training may go without a recorded step before it counts as stalled.
    stall_after: Duration,
    /// When the board was made.
    created: Instant,
}

impl StatusBoard {
    /// A board in [`Phase::Starting`] for a run to `end` iterations.
    pub fn new(end: i64, stall_after: Duration) -> Self {
        StatusBoard {
            board: Arc::new(Mutex::new(Board {
                phase: Phase::Starting,
                training_since: None,
                iteration: 0,
                end,
                step: None,
                step_at: None,
                it_per_s: None,
                eta_s: None,
                queues: BTreeMap::new(),
                last_eval: None,
                evals_done: 0,
                evals_failed: 0,
                last_rank: None,
                ranks_done: 0,
                ranks_failed: 0,
                failed: None,
            })),
            stall_after,
            created: Instant::now(),
        }
    }

    /// How long training may go without a step before it is unhealthy.
    pub fn stall_after(&self) -> Duration {
        self.stall_after
    }

    /// Moves the run to `phase`. Entering [`Phase::Training`] restarts the stall clock.
    pub fn set_phase(&self, phase: Phase) {
        let mut b = lock(&self.board);
        if phase == Phase::Training && b.phase != Phase::Training {
            b.training_since = Some(Instant::now());
        }
        b.phase = phase;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        lock(&self.board).phase
    }

    /// A stop was requested: [`Phase::Starting`] and [`Phase::Training`] become
    /// [`Phase::Stopping`]; a finished or failed run stays as it is.
    pub fn on_stop_requested(&self) {
        let mut b = lock(&self.board);
        if matches!(b.phase, Phase::Starting | Phase::Training) {
            b.phase = Phase::Stopping;
        }
    }

    /// Sets the iterations completed without a step report (after a resume, before the first step).
    pub fn set_iteration(&self, iteration: i64) {
        lock(&self.board).iteration = iteration;
    }

    /// Sets the target iteration count.
    pub fn set_end(&self, end: i64) {
        lock(&self.board).end = end;
    }

    /// Seconds per step at the last measured rate, if there is one.
    pub fn seconds_per_step(&self) -> Option<f64> {
        lock(&self.board).it_per_s.filter(|r| *r > 0.0).map(|r| 1.0 / r)
    }

    /// Records a step read back from the device, with the rate and ETA the caller measured.
    /// Non-finite rates and ETAs are recorded as unknown.
    pub fn on_step(&self, report: &StepReport, it_per_s: f64, eta_s: f64) {
        let step = StepStatus {
            loss: report.loss,
            supervised: report.supervised,
            consistency: report.consistency,
            weight: report.weight,
            mask_fraction: report.mask_fraction,
            lr: report.lr,
            threshold: report.threshold.is_finite().then_some(report.threshold),
        };
        let mut b = lock(&self.board);
        b.iteration = report.iter + 1;
        b.step = Some(step);
        b.step_at = Some(Instant::now());
        b.it_per_s = it_per_s.is_finite().then_some(it_per_s);
        b.eta_s = eta_s.is_finite().then_some(eta_s);
    }

    /// Records a queue's depth and capacity by hand; it overrides what the queue registry says
    /// about a queue of the same name. Queues made with [`crate::queue::bounded`] need no call.
    pub fn on_queue(&self, name: &str, depth: usize, capacity: usize) {
        lock(&self.board).queues.insert(name.to_string(), QueueStatus { depth, capacity });
    }

    /// Records a finished evaluation.
    pub fn on_eval(&self, eval: EvalStatus) {
        let mut b = lock(&self.board);
        b.evals_done += 1;
        b.last_eval = Some(eval);
    }

    /// Counts an evaluation that failed.
    pub fn on_eval_failure(&self) {
        lock(&self.board).evals_failed += 1;
    }

    /// Records a finished ranking.
    pub fn on_rank(&self, rank: RankStatus) {
        let mut b = lock(&self.board);
        b.ranks_done += 1;
        b.last_rank = Some(rank);
    }

    /// Counts a ranking that failed.
    pub fn on_rank_failure(&self) {
        lock(&self.board).ranks_failed += 1;
    }

    /// Records that `stage` failed with `cause` and moves the run to [`Phase::Failed`]. The first
    /// failure is kept: later ones are usually its consequences (closed queues).
    pub fn stage_failed(&self, stage: &str, cause: &str) {
        let mut b = lock(&self.board);
        if b.failed.is_none() {
            b.failed = Some(StageFailure { stage: stage.to_string(), cause: cause.to_string() });
        }
        b.phase = Phase::Failed;
    }

    /// `Ok` when healthy, else why not.
    pub fn health(&self) -> Result<(), String> {
        let b = lock(&self.board);
        self.health_of(&b, Instant::now())
    }

    fn health_of(&self, b: &Board, now: Instant) -> Result<(), String> {
        if let Some(f) = &b.failed {
            return Err(format!("stage {} failed: {}", f.stage, f.cause));
        }
        if b.phase == Phase::Failed {
            return Err("the run failed".into());
        }
        if b.phase == Phase::Training {
            let since = match (b.step_at, b.training_since) {
                (Some(s), Some(t)) => s.max(t),
                (s, t) => s.or(t).unwrap_or(self.created),
            };
            let quiet = now.saturating_duration_since(since);
            if quiet > self.stall_after {
                return Err(format!(
                    "stalled: no step recorded for {:.0} s (limit {:.0} s)",
                    quiet.as_secs_f64(),
                    self.stall_after.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// A copy of everything on the board, with the live queues from the registry.
    pub fn snapshot(&self) -> Status {
        let mut queues = queue_depths();
        let now = Instant::now();
        let b = lock(&self.board);
        for (name, q) in &b.queues {
            queues.insert(name.clone(), *q);
        }
        let health = self.health_of(&b, now);
        Status {
            phase: b.phase,
            iteration: b.iteration,
            end: b.end,
            step: b.step,
            it_per_s: b.it_per_s,
            eta_s: b.eta_s,
            seconds_since_step: b.step_at.map(|t| now.saturating_duration_since(t).as_secs_f64()),
            uptime_s: now.saturating_duration_since(self.created).as_secs_f64(),
            queues,
            last_eval: b.last_eval.clone(),
            evals_done: b.evals_done,
            evals_failed: b.evals_failed,
            last_rank: b.last_rank.clone(),
            ranks_done: b.ranks_done,
            ranks_failed: b.ranks_failed,
            failed_stage: b.failed.clone(),
            healthy: health.is_ok(),
            unhealthy: health.err(),
            checkpoint_pending: false,
        }
    }
}

/// One live queue's fill, shared by its two ends and the registry. Made by [`register_queue`];
/// it leaves the registry when both ends are dropped.
#[derive(Debug)]
pub struct QueueGauge {
    /// Queue name.
    name: &'static str,
    /// Capacity.
    capacity: usize,
    /// Items waiting, as of the latest push or pop.
    depth: AtomicUsize,
}

impl QueueGauge {
    /// Records the queue's depth after a push or pop.
    pub fn set_depth(&self, depth: usize) {
        self.depth.store(depth, Ordering::Relaxed);
    }

    /// The queue's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Every queue made in this process and not yet dropped (weakly held: the registry keeps no
/// queue alive).
static QUEUES: Mutex<Vec<Weak<QueueGauge>>> = Mutex::new(Vec::new());

/// Adds a queue called `name` holding `capacity` items to the registry; keep the returned gauge
/// with the queue and set its depth on every push and pop.
pub fn register_queue(name: &'static str, capacity: usize) -> Arc<QueueGauge> {
    let gauge = Arc::new(QueueGauge { name, capacity, depth: AtomicUsize::new(0) });
    let mut all = lock(&QUEUES);
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&gauge));
    gauge
}

/// Depth and capacity of the live queues by name (queues sharing a name are summed).
pub fn queue_depths() -> BTreeMap<String, QueueStatus> {
    let mut out: BTreeMap<String, QueueStatus> = BTreeMap::new();
    let mut all = lock(&QUEUES);
    all.retain(|w| w.strong_count() > 0);
    for g in all.iter().filter_map(Weak::upgrade) {
        let q = out.entry(g.name.to_string()).or_default();
        q.depth += g.depth.load(Ordering::Relaxed);
        q.capacity += g.capacity;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(iter: i64) -> StepReport {
        StepReport {
            iter,
            loss: 0.5,
            supervised: 0.4,
            ce: 0.3,
            dice: 0.5,
            consistency: 0.01,
            mask_fraction: 0.7,
            weight: 0.1,
            threshold: f64::INFINITY,
            lr: 0.01,
        }
    }

    #[test]
    fn board_records_rankings_with_their_top_cases() {
        use uamt::eval::rank::{CaseScores, RankSource, RankedCase, Ranking, Score};
        let case = |id: &str, bald_fg: Option<f64>| RankedCase {
            rank: 0,
            case: id.into(),
            source: id.into(),
            scores: CaseScores { bald_fg, ..CaseScores::default() },
            volume_ml: 2.5,
            voxels: 8,
            foreground_voxels: 1,
            region_voxels: 2,
            dims: [2, 2, 2],
            network_dims: [2, 2, 2],
        };
        let source = RankSource {
            model: "teacher after 10 iterations".into(),
            teacher: true,
            mc_passes: 8,
            mc_seed: 0,
            band_voxels: 3.0,
            iteration: Some(10),
        };
        let r = Ranking::new(Score::BaldFg, source, vec![case("a", Some(0.1)), case("b", None), case("c", Some(0.3))]);
        let b = StatusBoard::new(100, Duration::from_secs(3600));
        b.on_rank(RankStatus::of(&r, 2, 1.5, std::path::Path::new("rank/ranking.json")));
        b.on_rank_failure();
        let s = b.snapshot();
        let last = s.last_rank.unwrap();
        assert_eq!(
            (last.iteration, last.cases, last.model.as_str(), last.score.as_str()),
            (10, 3, "teacher", "bald_fg")
        );
        let top: Vec<(usize, &str, Option<f64>)> =
            last.top.iter().map(|e| (e.rank, e.case.as_str(), e.score)).collect();
        assert_eq!(top, [(1, "c", Some(0.3)), (2, "a", Some(0.1))]);
        assert_eq!((s.ranks_done, s.ranks_failed), (1, 1));
    }

    #[test]
    fn board_records_steps_and_failures() {
        let b = StatusBoard::new(100, Duration::from_secs(3600));
        b.set_phase(Phase::Training);
        b.on_step(&report(9), 2.0, f64::NAN);
        let s = b.snapshot();
        assert_eq!((s.iteration, s.end, s.phase), (10, 100, Phase::Training));
        assert_eq!(s.step.unwrap().threshold, None);
        assert_eq!((s.it_per_s, s.eta_s), (Some(2.0), None));
        assert!(s.healthy);
        b.stage_failed("teacher", "out of memory");
        b.stage_failed("student", "queue closed");
        let s = b.snapshot();
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.failed_stage.unwrap().stage, "teacher");
        assert!(b.health().unwrap_err().contains("out of memory"));
    }

    #[test]
    fn stall_counts_only_while_training() {
        let b = StatusBoard::new(10, Duration::ZERO);
        let t = Instant::now() + Duration::from_secs(1);
        assert!(b.health_of(&lock(&b.board), t).is_ok(), "starting is not a stall");
        b.set_phase(Phase::Training);
        assert!(b.health_of(&lock(&b.board), t).unwrap_err().contains("stalled"));
        b.set_phase(Phase::Finished);
        assert!(b.health_of(&lock(&b.board), t).is_ok());
    }

    #[test]
    fn registry_sums_live_queues_and_forgets_dropped_ones() {
        let a = register_queue("control-test-q", 4);
        let b = register_queue("control-test-q", 2);
        a.set_depth(3);
        b.set_depth(1);
        assert_eq!(queue_depths()["control-test-q"], QueueStatus { depth: 4, capacity: 6 });
        drop(a);
        assert_eq!(queue_depths()["control-test-q"], QueueStatus { depth: 1, capacity: 2 });
        drop(b);
        assert!(!queue_depths().contains_key("control-test-q"));
    }
}
