//! The training pipeline: the sequential UA-MT step cut into stages that run on their own
//! threads and pass tensors through bounded queues, so the teacher's passes overlap the student.
//! This file holds only the topology; each stage is a type in its own file whose per-item work is
//! a plain method, and [`sequential`] calls the same types in line.
//!
//! ```text
//! loader-0..n ([`loader`]) --[loader-k]--> dispatcher ([`dispatcher`]) --[batches]--> student ([`student`])
//!      ^                                       |                                       |  ^
//!      +--- host buffers (ringbuf) ------------+--[unlabelled]--> teacher ([`teacher`]) |  |
//!                                                                   |  ^ --[params]-----+  |
//!                                                   [teacher] <-----+  |  params (EMA input,
//!                                                      |               |  [`ema`]) and snapshot
//!                                                      v               |  requests
//!                                         mask computer ([`mask`]) --[guidance]--------+
//! ```
//! - The teacher stage is the one owner of the teacher (EMA weights and BatchNorm buffers): it
//!   folds the student's parameters in when an iteration needs that version (the EMA after step
//!   i - 1 - `teacher_lag`) and answers snapshot requests for checkpoints.
//! - With `teacher_lag = 0` the result equals the sequential mode bit for bit: every stage does
//!   the same tensor operations on the same inputs, and all randomness is drawn from
//!   (seed, iteration) by whichever thread needs it.
//! - Shutdown is by dropping queue ends: when the student stops, every other stage sees its queue
//!   close and ends. A stage that fails ends the run; [`spawn::primary`] names the one that
//!   failed first, not the neighbours that stopped because of it.

pub mod dispatcher;
pub mod ema;
pub mod fault;
pub mod loader;
pub mod mask;
pub mod messages;
pub mod sequential;
pub mod spawn;
pub mod student;
pub mod teacher;

use crate::control::Controls;
use crate::evaluator::EvalRequest;
use crate::events::Sink;
use crate::queue::{bounded, Closed};
use anyhow::{anyhow, Result};
use ema::EmaUpdater;
use messages::{Batch, GuidanceMsg, Loaded, TeacherPasses, ToTeacher, Unlabelled};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::HeapRb;
use spawn::{spawn_stage, StageHandle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use student::{CheckpointPlan, Learned, Learner, Student};
use tch::Device;
use uamt::config::Config;
use uamt::data::{HostBatch, PatchLoader};
use uamt::train::{Method, StepReport, Trainer};

/// How the stages are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All stages in line on one thread.
    Sequential,
    /// Each stage on its own thread, connected by bounded queues.
    Pipelined,
}

impl Mode {
    /// The mode for `cfg` on `device`: `device.schedule`, and for `auto` the pipeline where its
    /// overlap pays (a GPU, where the
    /// teacher's kernels fill the gaps of the student's, or a teacher lag, which only the
    /// pipeline's overlap makes worth having), else the sequential loop. On a CPU with
    /// `teacher_lag = 0` the stages take turns anyway, and the hand-offs only cost.
    pub fn auto(cfg: &Config, device: Device) -> Mode {
        use uamt::config::Schedule;
        match cfg.device.schedule {
            Schedule::Sequential => Mode::Sequential,
            Schedule::Pipelined => Mode::Pipelined,
            Schedule::Auto if device.is_cuda() || cfg.method.teacher_lag > 0 => Mode::Pipelined,
            Schedule::Auto => Mode::Sequential,
        }
    }
}

/// What a run needs besides its config.
pub struct Run {
    /// The configuration (its TOML goes into checkpoints).
    pub config: Config,
    /// Where the tensors live.
    pub device: Device,
    /// Cuts the batches.
    pub loader: PatchLoader,
    /// Student, teacher, optimiser and iteration counter (fresh or resumed).
    pub trainer: Trainer,
    /// Sequential or pipelined.
    pub mode: Mode,
    /// Stop and checkpoint requests.
    pub controls: Controls,
    /// Stop after this many steps of this run even if the config says more (tests, benchmarks).
    pub max_steps: Option<i64>,
    /// Write checkpoints at all (benchmarks switch them off).
    pub checkpoints: bool,
    /// Where the training loop's events go.
    pub sinks: Vec<Box<dyn Sink>>,
    /// Takes periodic evaluation requests (false: skipped, the evaluator is busy).
    pub eval: Option<Box<dyn FnMut(EvalRequest) -> bool + Send>>,
    /// Takes the ranking offers of `[rank] every` (see [`student::RankHook`]).
    pub rank: Option<student::RankHook>,
    /// A stage to fail on purpose (lifecycle tests).
    pub fault: Option<fault::Fault>,
    /// A step the student waits before (lifecycle tests).
    pub hold: Option<fault::Hold>,
    /// The run's id, in every checkpoint and its name (`""`: the names of format version 1).
    pub run_id: String,
    /// The other ranks of a data-parallel run (the trainer's `sync` does the step's part).
    pub dist: Option<Arc<uamt::dist::World>>,
}

impl Run {
    /// A run of `config` with nothing attached: no sinks, no evaluation, checkpoints as
    /// configured, the automatic mode.
    pub fn new(config: Config, device: Device, loader: PatchLoader, trainer: Trainer) -> Self {
        let mode = Mode::auto(&config, device);
        Run {
            config,
            device,
            loader,
            trainer,
            mode,
            controls: Controls::default(),
            max_steps: None,
            checkpoints: true,
            sinks: Vec::new(),
            eval: None,
            rank: None,
            fault: None,
            hold: None,
            run_id: String::new(),
            dist: None,
        }
    }
}

/// How a run ended.
pub struct Outcome {
    /// The trainer after the last step (the teacher is put back in).
    pub trainer: Trainer,
    /// One report per step of this run.
    pub reports: Vec<StepReport>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether it stopped early on request.
    pub stopped: bool,
    /// Wall time of the training loop.
    pub seconds: f64,
}

/// `loader-<w>`: a metric label per worker (at most 64 workers, the config's bound).
fn loader_name(w: usize) -> &'static str {
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| (0..64).map(|w| &*Box::leak(format!("loader-{w}").into_boxed_str())).collect());
    names.get(w).copied().unwrap_or("loader")
}

/// Waits for all work queued on a CUDA device (outside the training loop only).
fn sync_device(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// Runs training from the trainer's iteration to the configured number of iterations (or until
/// stopped), checkpointing as configured.
pub fn run(mut run: Run) -> Result<Outcome> {
    let cfg = &run.config;
    let start = run.trainer.iter;
    let end = match run.max_steps {
        Some(n) => (start + n).min(cfg.optim.iterations),
        None => cfg.optim.iterations,
    };
    let lag = cfg.method.teacher_lag;
    let with_teacher = run.trainer.cfg.method.kind != Method::Supervised;
    if run.device.is_cuda() {
        // Fixed shapes: let cuDNN pick the fastest convolution algorithms once.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    // On CUDA every pipeline stage queues its work on a stream of its own; messages carrying
    // device tensors carry a `Ready` event that the receiving stage's stream waits on.
    uamt::gpu::enable_streams(run.mode == Mode::Pipelined && run.device.is_cuda() && cfg.device.streams);
    // Weights made or restored on the default stream must be complete before a stage's own
    // stream (which does not wait for the default one) reads them.
    sync_device(run.device);
    let teacher = run.trainer.teacher.take();
    if with_teacher != teacher.is_some() {
        return Err(anyhow!(
            "method {:?} with{} a teacher",
            run.trainer.cfg.method,
            if with_teacher { "out" } else { "" }
        ));
    }
    let teacher = teacher.map(|net| {
        let mut t = teacher::TeacherState::new(net, start - 1, EmaUpdater { decay: run.trainer.cfg.method.ema_decay });
        t.check = run.dist.as_ref().map(|w| (w.checks.clone(), w.cfg.check_every));
        t
    });
    let draw_seed = run.dist.as_ref().map_or(cfg.optim.seed, |w| w.launch.draw_seed(cfg.optim.seed));
    let sampler = teacher::TeacherSampler::new(
        run.trainer.cfg.clone(),
        run.trainer.student.config().clone(),
        draw_seed,
        lag,
        run.device,
        cfg.device.pass_workers(run.mode == Mode::Pipelined && with_teacher && lag > 0),
    );
    let mask = mask::MaskComputer::new(run.trainer.cfg.clone(), run.trainer.student.config().n_classes);
    let dispatcher = dispatcher::Dispatcher::new(run.device, run.trainer.cfg.labelled_bs, with_teacher);
    let learner = Learner {
        student: Student::new(run.trainer, cfg.optim.seed, draw_seed, lag == 0)?,
        end,
        device: run.device,
        checkpoints: CheckpointPlan {
            enabled: run.checkpoints,
            dir: cfg.checkpoint.dir.clone(),
            every: cfg.checkpoint.every,
            keep: cfg.checkpoint.keep,
            config_toml: cfg.to_toml(),
            run_id: run.run_id.clone(),
        },
        log_every: cfg.telemetry.log_every,
        readback_every: cfg.telemetry.readback_interval(run.device),
        eval_every: cfg.eval.every,
        eval: run.eval.take(),
        rank_every: if run.rank.is_some() { cfg.rank.every } else { 0 },
        rank: run.rank.take(),
        controls: run.controls.clone(),
        sinks: std::mem::take(&mut run.sinks),
        fault: run.fault.clone(),
        hold: run.hold.clone(),
    };
    let t0 = Instant::now();
    let (learned, teacher) = match run.mode {
        Mode::Sequential => {
            spawn::set_threads(cfg.device.stage_threads(false));
            let mut inline = sequential::InLine {
                loader: loader::LoaderWorker::new(run.loader.clone(), 0, 1),
                host: None,
                dispatcher,
                teacher: teacher.map(|state| sequential::TeacherSide { state, sampler, mask }),
                unlabelled: None,
                device: run.device,
                fault: run.fault.clone(),
            };
            let stage = crate::queue::Stage { name: "student" };
            let learned = spawn::run_caught("student", || learner.run(&mut inline, &stage))?;
            let teacher = match inline.teacher {
                Some(mut t) => {
                    t.state.finish()?;
                    Some(t.state.into_net())
                }
                None => None,
            };
            (learned, teacher)
        }
        Mode::Pipelined => {
            let wiring = Wiring { config: &run.config, device: run.device, loader: &run.loader, fault: &run.fault };
            pipelined(wiring, learner, dispatcher, teacher.map(|t| (t, sampler, mask)), start, end)?
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let Learned { student, reports, last_checkpoint, stopped } = learned;
    let mut trainer = student.into_trainer();
    trainer.teacher = teacher;
    Ok(Outcome { trainer, reports, last_checkpoint, stopped, seconds })
}

/// The teacher's three parts.
type TeacherParts = (teacher::TeacherState, teacher::TeacherSampler, mask::MaskComputer);

/// What the wiring reads from the run.
struct Wiring<'a> {
    /// Queue capacities, threads, lag.
    config: &'a Config,
    /// Where the tensors live.
    device: Device,
    /// Cuts the batches (cloned per worker).
    loader: &'a PatchLoader,
    /// A stage to fail on purpose.
    fault: &'a Option<fault::Fault>,
}

/// Wires the stages with bounded queues, runs them, and joins them.
fn pipelined(
    run: Wiring<'_>,
    learner: Learner,
    mut dispatcher: dispatcher::Dispatcher,
    teacher: Option<TeacherParts>,
    start: i64,
    end: i64,
) -> Result<(Learned, Option<uamt::model::VNet>)> {
    let (cfg, device) = (&run.config, run.device);
    let q = &cfg.queues;
    let lag = cfg.method.teacher_lag;
    let threads = cfg.device.stage_threads(teacher.is_some() && lag > 0);
    let mut handles: Vec<StageHandle<()>> = Vec::new();

    // loader workers -> dispatcher, host buffers recycled through a ring per worker
    let workers = q.loader_workers.max(1);
    let per_worker = (q.batches / workers).max(1);
    let (mut from_workers, mut recycle) = (Vec::new(), Vec::new());
    for w in 0..workers {
        let name = loader_name(w);
        let (tx, rx) = bounded::<Loaded>(name, per_worker);
        let (give, mut take) = HeapRb::<HostBatch>::new(per_worker + 2).split();
        let worker = loader::LoaderWorker::new(run.loader.clone(), w, workers);
        from_workers.push(rx);
        recycle.push(give);
        handles.push(spawn_stage(name, 1, Device::Cpu, move |ctx| {
            for i in worker.iterations(start, end) {
                let host = take.try_pop().unwrap_or_default();
                let item = ctx.stage.busy(|| worker.process(i, host));
                match tx.send(item) {
                    Ok(b) => ctx.stage.idle(b),
                    Err(Closed) => break,
                }
                ctx.stage.done();
            }
            Ok(())
        })?);
    }

    // dispatcher -> student (whole batch) and teacher (unlabelled part)
    let (batch_tx, batch_rx) = bounded::<Batch>("batches", q.batches);
    let (unl_tx, unl_rx) = bounded::<Unlabelled>("unlabelled", q.batches);
    let with_teacher = teacher.is_some();
    let fault = run.fault.clone();
    handles.push(spawn_stage("dispatcher", 1, device, move |ctx| {
        for i in start..end {
            fault::check(&fault, "dispatcher", i);
            let w = ((i - start) % workers as i64) as usize;
            let Ok(((got, item), b)) = from_workers[w].recv() else { break };
            ctx.stage.idle(b);
            if got != i {
                return Err(anyhow!("loader worker {w} sent iteration {got} for {i}"));
            }
            let (batch, unl) = ctx.stage.busy(|| match &item {
                Ok(host) => dispatcher.process(i, Ok(host)),
                Err(why) => dispatcher.process(i, Err(why)),
            })?;
            if let Ok(host) = item {
                let _ = recycle[w].try_push(host);
            }
            if let Some(u) = unl {
                match unl_tx.send(u) {
                    Ok(b) => ctx.stage.idle(b),
                    Err(Closed) => break,
                }
            }
            match batch_tx.send(batch) {
                Ok(b) => ctx.stage.idle(b),
                Err(Closed) => break,
            }
            ctx.stage.done();
        }
        Ok(())
    })?);
    let mut unl_rx = Some(unl_rx);
    if !with_teacher {
        drop(unl_rx.take());
    }

    // teacher (EMA + passes) -> mask computer -> student
    let mut teacher_handle: Option<StageHandle<uamt::model::VNet>> = None;
    let (mut guid_rx, mut to_teacher_tx) = (None, None);
    if let Some((state, sampler, mask)) = teacher {
        let (to_tx, to_rx) = bounded::<ToTeacher>("params", q.params);
        let (pass_tx, pass_rx) = bounded::<TeacherPasses>("teacher", q.teacher);
        let (g_tx, g_rx) = bounded::<GuidanceMsg>("guidance", q.guidance);
        let fault = run.fault.clone();
        let unl_rx = unl_rx.take().ok_or_else(|| anyhow!("the unlabelled queue is gone"))?;
        teacher_handle = Some(spawn_stage("teacher", threads, device, move |ctx| {
            teacher::run(ctx, state, sampler, unl_rx, to_rx, pass_tx, &fault)
        })?);
        handles.push(spawn_stage("mask", threads, device, move |ctx| {
            while let Ok((m, b)) = pass_rx.recv() {
                ctx.stage.idle(b);
                let TeacherPasses { out, ready } = m;
                ready.wait(ctx.device, [&out.target].into_iter().chain(&out.mc))?;
                let iter = out.iter;
                let guidance = ctx.stage.busy(|| mask.process(TeacherPasses { out, ready: Default::default() }));
                let msg = GuidanceMsg { iter, guidance, ready: uamt::gpu::Ready::now(ctx.device)? };
                match g_tx.send(msg) {
                    Ok(b) => ctx.stage.idle(b),
                    Err(Closed) => break,
                }
                ctx.stage.done();
            }
            Ok(())
        })?);
        guid_rx = Some(g_rx);
        to_teacher_tx = Some(to_tx);
    }

    // the student, on a stage thread of its own
    let student = spawn_stage("student", threads, device, move |ctx| {
        let mut queues = student::Queues {
            batches: batch_rx,
            guidance: guid_rx,
            teacher: to_teacher_tx,
            stage: crate::queue::Stage { name: "student" },
            device: ctx.device,
        };
        learner.run(&mut queues, &ctx.stage)
        // Its queue ends drop here: every other stage winds down.
    })?;
    let learned = student.join();
    let mut errors = spawn::join_all(handles);
    let net = match teacher_handle.map(StageHandle::join).transpose() {
        Ok(net) => net,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    match learned {
        Ok(l) if errors.is_empty() => Ok((l, net)),
        Ok(_) => Err(spawn::primary(errors).expect("non-empty")),
        Err(e) => {
            errors.insert(0, e);
            Err(spawn::primary(errors).expect("non-empty"))
        }
    }
}
