//! The student: [`Student`] does one step's work (forward, then loss, backward and SGD once the
//! teacher's guidance is there); [`Learner`] is the loop around it that both modes share: it owns
//! the iteration, the read-back of the step's numbers, the periodic evaluation requests, the
//! checkpoint policy and stopping, and reports what happens as [`Event`]s. Where the batches and
//! the guidance come from is an [`Upstream`]: queues from other threads (the pipeline) or the
//! same stage types called in line (the sequential mode).

use super::messages::{Batch, Named};
use crate::control::Controls;
use crate::evaluator::{EvalRequest, RankRequest};
use crate::events::{Event, Sink};
use crate::queue::Stage;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Tensor};
use uamt::checkpoint::{self, host_copies, Snapshot};
use uamt::train::{Guidance, Method, StepRandom, StepReport, StepStats, Trainer};

/// The student network, its optimiser and iteration counter (the teacher lives elsewhere).
pub struct Student {
    /// The trainer with its teacher taken out.
    tr: Trainer,
    /// The run's seed (stored in checkpoints).
    seed: u64,
    /// The seed of the step randomness: dropout masks of iteration i come from (draw_seed, i).
    /// The run's seed for one process; mixed with the rank in a data-parallel run.
    draw_seed: u64,
    /// Hand the live parameter tensors to the EMA instead of copies: right when the student
    /// cannot change them before the teacher has folded them in (`teacher_lag = 0`).
    share_params: bool,
}

impl Student {
    /// Takes `tr` (whose teacher must already be taken out).
    pub fn new(tr: Trainer, seed: u64, draw_seed: u64, share_params: bool) -> Result<Self> {
        if tr.teacher.is_some() {
            return Err(anyhow!("the student stage does not own the teacher"));
        }
        Ok(Student { tr, seed, draw_seed, share_params })
    }

    /// Steps done; the next step runs as this iteration.
    pub fn iter(&self) -> i64 {
        self.tr.iter
    }

    /// Whether the method has a teacher.
    pub fn with_teacher(&self) -> bool {
        self.tr.cfg.method.kind != Method::Supervised
    }

    /// The forward pass of the next step on `batch` (checked against the method's batch layout).
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        if batch.iter != self.tr.iter {
            return Err(anyhow!("the batch for iteration {} arrived at {}", batch.iter, self.tr.iter));
        }
        self.tr.check(&batch.images, &batch.labels)?;
        let b = if self.with_teacher() { batch.images.size()[0] } else { self.tr.cfg.labelled_bs };
        let rnd = StepRandom::draw_student(
            self.tr.student.config(),
            self.tr.student.device(),
            self.draw_seed,
            self.tr.iter,
            b,
        );
        Ok(self.tr.student_forward(&batch.images, &rnd)?)
    }

    /// Loss, backward and SGD given the forward's `logits` and the teacher's guidance.
    pub fn finish(&mut self, logits: &Tensor, labels: &Tensor, guidance: Option<&Guidance>) -> Result<StepStats> {
        if self.with_teacher() != guidance.is_some() {
            return Err(anyhow!(
                "guidance {} for method {:?}",
                guidance.map_or("missing", |_| "given"),
                self.tr.cfg.method
            ));
        }
        Ok(self.tr.student_finish(logits, labels, guidance)?)
    }

    /// The trainable parameters for the EMA (see `share_params`).
    pub fn params(&self) -> Vec<Tensor> {
        let live = self.tr.student.store().trainable().map(|p| &p.tensor);
        if self.share_params {
            live.map(|t| t.shallow_clone()).collect()
        } else {
            tch::no_grad(|| live.map(|t| t.detach().copy()).collect())
        }
    }

    /// Host copies of the student's tensors and momentum buffers.
    pub fn snapshot(&self) -> (Named, Named) {
        (host_copies(&self.tr.student.store().named_tensors()), host_copies(self.tr.opt.buffers()))
    }

    /// The trainer back (teacher still absent).
    pub fn into_trainer(self) -> Trainer {
        self.tr
    }
}

/// Where a step's inputs come from and where the student's parameters go.
pub trait Upstream {
    /// Iteration `iter`'s batch, ready to use on the calling thread's stream.
    fn batch(&mut self, iter: i64) -> Result<Batch>;
    /// Iteration `iter`'s guidance (`None` for supervised training).
    fn guidance(&mut self, iter: i64) -> Result<Option<Guidance>>;
    /// The student's parameters after step `step`, for the EMA.
    fn publish(&mut self, step: i64, params: Vec<Tensor>) -> Result<()>;
    /// The teacher's state for a checkpoint after student step `last_step` (`None` without a
    /// teacher).
    fn snapshot(&mut self, last_step: i64) -> Result<Option<Named>>;
}

/// Where checkpoints go and how often.
#[derive(Debug, Clone)]
pub struct CheckpointPlan {
    /// Write checkpoints at all (benchmarks do not).
    pub enabled: bool,
    /// The folder.
    pub dir: PathBuf,
    /// Every this many steps (0: only at the end and when asked).
    pub every: i64,
    /// How many of the newest to keep.
    pub keep: usize,
    /// The run's config as TOML, stored in each checkpoint.
    pub config_toml: String,
    /// The run's id, stored in each checkpoint and its name; retention prunes only its files.
    pub run_id: String,
}

/// The state to checkpoint holds a NaN or an infinity: the run cannot go on (whatever
/// `optim.on_nonfinite` says), and the older checkpoints stay the newest.
#[derive(Debug)]
pub struct NonFiniteState(pub String);

impl std::fmt::Display for NonFiniteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFiniteState {}

/// How a learner's run ended.
pub struct Learned {
    /// The student after its last step.
    pub student: Student,
    /// One report per step.
    pub reports: Vec<StepReport>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether it stopped early on request.
    pub stopped: bool,
}

/// Takes a ranking offer after `iteration` steps: called with a function that copies the weights
/// to rank with (the teacher's, or the student's without a teacher), which it calls only when it
/// takes the offer; false when the offer was declined (the ranking before is still running).
pub type RankHook = Box<dyn FnMut(i64, &mut dyn FnMut() -> Result<RankRequest>) -> bool + Send>;

/// The loop around the student's steps.
pub struct Learner {
    /// The student.
    pub student: Student,
    /// Stop after the step that reaches this iteration.
    pub end: i64,
    /// Where the tensors live (read-back policy).
    pub device: Device,
    /// Checkpoint settings.
    pub checkpoints: CheckpointPlan,
    /// Progress every this many steps.
    pub log_every: i64,
    /// Read the step's numbers back every this many steps (one copy for all of them).
    pub readback_every: i64,
    /// Request a periodic evaluation every this many steps (0: never).
    pub eval_every: i64,
    /// Takes a periodic evaluation request; false when it had to be skipped.
    pub eval: Option<Box<dyn FnMut(EvalRequest) -> bool + Send>>,
    /// Offer a ranking of the unlabelled cases every this many steps (0: never).
    pub rank_every: i64,
    /// Takes a ranking offer (see [`RankHook`]).
    pub rank: Option<RankHook>,
    /// Stop and checkpoint requests.
    pub controls: Controls,
    /// Where the events go.
    pub sinks: Vec<Box<dyn Sink>>,
    /// A stage to fail on purpose (lifecycle tests).
    pub fault: Option<super::fault::Fault>,
    /// A step to wait before (lifecycle tests).
    pub hold: Option<super::fault::Hold>,
}

impl Learner {
    fn emit(&mut self, e: Event<'_>) {
        for s in &mut self.sinks {
            s.on(&e);
        }
    }

    /// Runs steps until `end` or a stop request, then writes the final checkpoint.
    pub fn run(mut self, up: &mut dyn Upstream, stage: &Stage) -> Result<Learned> {
        let start = self.student.iter();
        let mut reports = Vec::new();
        let mut pending: Vec<(StepStats, f64)> = Vec::new();
        let mut last_checkpoint: Option<(i64, PathBuf)> = None;
        let (mut log_t, mut log_i) = (Instant::now(), start);
        let mut stopped = false;
        while self.student.iter() < self.end {
            // Data-parallel ranks stop on the vote taken with the last step's gradients, so all
            // stop after the same step; a single process on its own switch.
            if self.student.tr.stop_agreed().unwrap_or_else(|| self.controls.stop_requested()) {
                stopped = true;
                break;
            }
            let i = self.student.iter();
            super::fault::hold(&self.hold, i, || self.controls.stop_requested());
            let t_iter = Instant::now();
            let batch = match up.batch(i) {
                Ok(b) => b,
                Err(e) => {
                    // The student's state is sound: keep it if the teacher can still answer.
                    self.read_back(&mut pending, &mut reports)?;
                    if self.checkpoints.enabled && i > start && last_checkpoint.as_ref().map(|c| c.0) != Some(i) {
                        let _ = self.write_checkpoint(up);
                    }
                    return Err(e);
                }
            };
            super::fault::check(&self.fault, "student", i);
            let logits = stage.busy(|| self.student.forward(&batch))?;
            let guidance = up.guidance(i)?;
            let stats = stage.busy(|| self.student.finish(&logits, &batch.labels, guidance.as_ref()))?;
            if self.student.with_teacher() {
                let params = stage.busy(|| self.student.params());
                up.publish(i, params)?;
            }
            let done = i + 1;
            let want_ckpt = self.checkpoints.enabled
                && checkpoint::should_write(
                    done,
                    self.end,
                    self.checkpoints.every,
                    self.controls.take_checkpoint_request(),
                );
            pending.push((stats, t_iter.elapsed().as_secs_f64()));
            let log_now = done % self.log_every == 0 || done == self.end;
            if log_now || pending.len() as i64 >= self.readback_every || want_ckpt || self.controls.stop_requested() {
                self.read_back(&mut pending, &mut reports)?;
            }
            stage.done();
            if log_now {
                if let Some(report) = reports.last().copied() {
                    let it_per_s = (done - log_i) as f64 / log_t.elapsed().as_secs_f64().max(1e-9);
                    let eta_s = (self.end - done) as f64 / it_per_s.max(1e-9);
                    self.emit(Event::Progress { report: &report, done, end: self.end, it_per_s, eta_s });
                }
                (log_t, log_i) = (Instant::now(), done);
            }
            if self.eval_every > 0 && done % self.eval_every == 0 {
                if let Some(eval) = &mut self.eval {
                    let weights = host_copies(&self.student.tr.student.store().named_tensors());
                    if !eval(EvalRequest { iteration: done, weights }) {
                        self.emit(Event::EvalSkipped { iteration: done });
                    }
                }
            }
            if self.rank_every > 0 && done % self.rank_every == 0 {
                if let Some(rank) = &mut self.rank {
                    let student = &self.student;
                    let mut take = || -> Result<RankRequest> {
                        Ok(match up.snapshot(done - 1)? {
                            Some(weights) => RankRequest { iteration: done, weights, teacher: true },
                            None => RankRequest { iteration: done, weights: student.snapshot().0, teacher: false },
                        })
                    };
                    if !rank(done, &mut take) {
                        self.emit(Event::RankSkipped { iteration: done });
                    }
                }
            }
            if want_ckpt {
                match self.write_checkpoint(up) {
                    Ok(path) => last_checkpoint = Some((done, path)),
                    Err(e) if e.is::<NonFiniteState>() => return Err(e),
                    Err(e) if done == self.end => return Err(e.context("the final checkpoint failed")),
                    Err(_) => {} // reported as an event; the previous ones are intact
                }
            }
        }
        self.read_back(&mut pending, &mut reports)?;
        stopped |= self.controls.stop_requested();
        let done = self.student.iter();
        if self.checkpoints.enabled && checkpoint::needs_final(done, start, last_checkpoint.as_ref().map(|c| c.0)) {
            let path = self.write_checkpoint(up).map_err(|e| e.context("the final checkpoint failed"))?;
            last_checkpoint = Some((done, path));
        }
        Ok(Learned { student: self.student, reports, last_checkpoint: last_checkpoint.map(|c| c.1), stopped })
    }

    /// Reads the pending steps' numbers back in one copy and reports them. A non-finite loss
    /// of a step that was not skipped (`optim.on_nonfinite = "stop"`) ends the run here, before
    /// any later checkpoint, with an error naming the iteration.
    fn read_back(&mut self, pending: &mut Vec<(StepStats, f64)>, reports: &mut Vec<StepReport>) -> Result<()> {
        let (stats, seconds): (Vec<StepStats>, Vec<f64>) = pending.drain(..).unzip();
        let skipped: Vec<bool> = stats.iter().map(|s| s.skipped).collect();
        for ((r, seconds), skipped) in StepStats::read_back(&stats)?.into_iter().zip(seconds).zip(skipped) {
            if skipped {
                self.emit(Event::StepSkipped { iteration: r.iter, loss: r.loss });
            } else if !r.loss.is_finite() {
                return Err(anyhow!(
                    "the loss of iteration {} is {} (optim.on_nonfinite = \"stop\"): training stopped; \
                     the checkpoints written before it are kept",
                    r.iter,
                    r.loss
                ));
            }
            self.emit(Event::Step { report: &r, seconds });
            reports.push(r);
        }
        Ok(())
    }

    /// Snapshots student and teacher, writes the checkpoint, prunes old ones.
    fn write_checkpoint(&mut self, up: &mut dyn Upstream) -> Result<PathBuf> {
        let t = Instant::now();
        let iteration = self.student.iter();
        let written = (|| -> Result<PathBuf> {
            let teacher = up.snapshot(iteration - 1)?;
            let (student, momentum) = self.student.snapshot();
            let c = &self.checkpoints;
            let snap = Snapshot {
                iteration,
                seed: self.student.seed,
                run_id: c.run_id.clone(),
                config: c.config_toml.clone(),
                student,
                teacher,
                momentum,
            };
            if let Some(name) = snap.non_finite() {
                return Err(NonFiniteState(format!(
                    "after iteration {}, `{name}` holds a NaN or an infinity: training stopped, no checkpoint written \
                     (the older ones are kept)",
                    iteration - 1
                ))
                .into());
            }
            let path = snap.write_atomic(&c.dir)?;
            for old in checkpoint::prune(&c.dir, c.keep, &c.run_id) {
                tracing::debug!(path = %old.display(), "old checkpoint removed");
            }
            Ok(path)
        })();
        match &written {
            Ok(path) => self.emit(Event::Checkpoint { path, iteration, seconds: t.elapsed().as_secs_f64() }),
            Err(e) => self.emit(Event::CheckpointFailed { iteration, error: &format!("{e:#}") }),
        }
        written
    }
}

/// The student's queue ends in the pipeline.
pub struct Queues {
    /// Batches from the dispatcher.
    pub batches: crate::queue::Rx<Batch>,
    /// Guidance from the mask computer (absent for supervised training).
    pub guidance: Option<crate::queue::Rx<super::messages::GuidanceMsg>>,
    /// Parameters and snapshot requests to the teacher (absent for supervised training).
    pub teacher: Option<crate::queue::Tx<super::messages::ToTeacher>>,
    /// The student's telemetry (time blocked on the queues counts as idle).
    pub stage: Stage,
    /// The student's device.
    pub device: Device,
}

impl Upstream for Queues {
    fn batch(&mut self, iter: i64) -> Result<Batch> {
        use super::spawn::PeerStopped;
        let (mut b, blocked) = self.batches.recv().map_err(|_| PeerStopped("the data loader"))?;
        self.stage.idle(blocked);
        if b.iter != iter {
            return Err(anyhow!("the batch for iteration {} arrived at {iter}", b.iter));
        }
        std::mem::take(&mut b.ready).wait(self.device, [&b.images, &b.labels])?;
        Ok(b)
    }

    fn guidance(&mut self, iter: i64) -> Result<Option<Guidance>> {
        use super::spawn::PeerStopped;
        let Some(rx) = &self.guidance else { return Ok(None) };
        let (g, blocked) = rx.recv().map_err(|_| PeerStopped("the teacher"))?;
        self.stage.idle(blocked);
        if g.iter != iter {
            return Err(anyhow!("guidance for iteration {} arrived at {iter}", g.iter));
        }
        let gd = &g.guidance;
        g.ready.wait(self.device, [&gd.target, &gd.mask].into_iter().chain(&gd.uncertainty))?;
        Ok(Some(g.guidance))
    }

    fn publish(&mut self, step: i64, params: Vec<Tensor>) -> Result<()> {
        use super::messages::ToTeacher;
        let Some(tx) = &self.teacher else { return Ok(()) };
        let ready = uamt::gpu::Ready::now(self.device)?;
        let blocked =
            tx.send(ToTeacher::Params { step, params, ready }).map_err(|_| super::spawn::PeerStopped("the teacher"))?;
        self.stage.idle(blocked);
        Ok(())
    }

    fn snapshot(&mut self, last_step: i64) -> Result<Option<Named>> {
        use super::messages::ToTeacher;
        let Some(tx) = &self.teacher else { return Ok(None) };
        let (reply, answer) = crossbeam_channel::bounded(1);
        tx.send(ToTeacher::Snapshot { last_step, reply }).map_err(|_| super::spawn::PeerStopped("the teacher"))?;
        let named = answer.recv().map_err(|_| super::spawn::PeerStopped("the teacher"))?.map_err(|e| anyhow!(e))?;
        Ok(Some(named))
    }
}
