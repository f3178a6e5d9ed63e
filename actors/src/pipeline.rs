//! The training pipeline: the sequential UA-MT step cut into stages that run on their own
//! threads and pass tensors through bounded queues, so the teacher's passes overlap the student.
//!
//! ```text
//! loader workers --(per-worker queues, buffers recycled through ringbufs)--> dispatcher
//! dispatcher --[batches]--> student trainer: forward(i) .. wait guidance(i) -> loss -> backward -> SGD
//!            --[unlabelled]--> teacher sampler: 1 + T noisy passes with teacher v(i-1-lag)
//!                               --[teacher]--> uncertainty/mask computer --[guidance]--> student
//! student step i --[params]--> EMA updater: teacher v(i) --[teacher_params]--> teacher sampler
//! ```
//! With `teacher_lag = 0` the result equals the sequential [`Trainer::step`] loop exactly: every
//! stage does the same tensor operations on the same inputs, and all randomness is drawn from
//! (seed, iteration) by whichever thread needs it. Shutdown is by dropping queue ends: when the
//! student stops, every other stage sees its queue close and ends.

use crate::emit;
use crate::evaluator::{self, EvalRequest, Evaluator};
use crate::queue::{bounded, Closed, Rx, Stage, Tx};
use anyhow::{anyhow, Context, Result};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::HeapRb;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};
use uamt::checkpoint::{self, host_copies, host_copy, Snapshot};
use uamt::config::Config;
use uamt::data::{HostBatch, PatchLoader};
use uamt::gpu::{OwnStream, Ready};
use uamt::model::{VNet, VNetConfig};
use uamt::train::{self, Guidance, Method, StepConfig, StepRandom, StepReport, TeacherOutput, Trainer};

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
    /// Set by the supervisor: finish the current step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
    /// Set by the supervisor: write a checkpoint after the current step.
    pub checkpoint_now: Arc<AtomicBool>,
    /// Stop after this many steps of this run even if the config says more (tests, benchmarks).
    pub max_steps: Option<i64>,
    /// Write checkpoints at all (benchmarks switch them off).
    pub checkpoints: bool,
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

/// A student parameter snapshot for the EMA updater; `reply` asks for the new teacher weights.
struct ParamsMsg {
    step: i64,
    params: Vec<Tensor>,
    reply: Option<crossbeam_channel::Sender<(Vec<Tensor>, Ready)>>,
    ready: Ready,
}

/// A teacher weight version: the EMA after student step `step`.
struct VersionMsg {
    step: i64,
    params: Vec<Tensor>,
    ready: Ready,
}

/// The teacher's output plus a copy of its BatchNorm buffers after these passes.
struct TeacherMsg {
    out: TeacherOutput,
    buffers: Vec<Tensor>,
    ready: Ready,
}

/// What the student waits for.
struct GuidanceMsg {
    iter: i64,
    guidance: Guidance,
    buffers: Vec<Tensor>,
    ready: Ready,
}

/// A batch on the device.
struct BatchMsg {
    iter: i64,
    images: Tensor,
    labels: Tensor,
    ready: Ready,
}

/// Waits for all work queued on a CUDA device (outside the training loop only).
fn sync_device(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
}

/// Deep copies (same device) of tensors that keep changing in place.
fn device_copies<'a>(ts: impl Iterator<Item = &'a Tensor>) -> Vec<Tensor> {
    tch::no_grad(|| ts.map(|t| t.detach().copy()).collect())
}

/// Runs training from `run.trainer.iter` to the configured number of iterations (or until
/// stopped), checkpointing as configured.
pub fn run(mut run: Run) -> Result<Outcome> {
    let cfg = run.config.clone();
    let step_cfg = run.trainer.cfg.clone();
    let net_cfg = run.trainer.student.config().clone();
    let seed = cfg.optim.seed;
    let start = run.trainer.iter;
    let end = match run.max_steps {
        Some(n) => (start + n).min(cfg.optim.iterations),
        None => cfg.optim.iterations,
    };
    let q = &cfg.queues;
    let with_teacher = step_cfg.method.kind != Method::Supervised;
    let lag = cfg.method.teacher_lag;
    let threads = cfg.device.stage_threads(with_teacher && lag > 0);
    if run.device.is_cuda() {
        // Fixed shapes: let cuDNN pick the fastest convolution algorithms once.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    // On CUDA every stage below queues its work on a stream of its own; messages carrying device
    // tensors carry a `Ready` event that the receiving stage's stream waits on.
    uamt::gpu::enable_streams(run.device.is_cuda() && cfg.device.streams);
    // Weights made or restored on the default stream must be complete before a stage's own
    // stream (which does not wait for the default one) reads them.
    sync_device(run.device);

    // ---- data plane: loader workers -> dispatcher -> student (and teacher)
    let workers = q.loader_workers;
    let per_worker = (q.batches / workers).max(1);
    let mut worker_rx = Vec::new();
    let mut recycle = Vec::new();
    let mut handles: Vec<std::thread::JoinHandle<Result<()>>> = Vec::new();
    for w in 0..workers {
        let (tx, rx) = bounded::<(i64, Result<HostBatch, String>)>("loader", per_worker);
        let (give, mut take) = HeapRb::<HostBatch>::new(per_worker + 2).split();
        let loader = run.loader.clone();
        worker_rx.push(rx);
        recycle.push(give);
        handles.push(spawn(&format!("loader-{w}"), move || {
            let stage = Stage { name: "loader" };
            let mut i = start + w as i64;
            while i < end {
                let mut host = take.try_pop().unwrap_or_default();
                let filled = stage.busy(|| loader.fill(i as u64, &mut host));
                let item = match filled {
                    Ok(()) => Ok(host),
                    Err(e) => Err(e.to_string()),
                };
                match tx.send((i, item)) {
                    Ok(b) => stage.idle(b),
                    Err(Closed) => break,
                }
                stage.done();
                i += workers as i64;
            }
            Ok(())
        }));
    }
    let (batch_tx, batch_rx) = bounded::<BatchMsg>("batches", q.batches);
    let (unl_tx, unl_rx) = bounded::<(i64, Tensor, Ready)>("unlabelled", q.batches);
    let labelled_bs = step_cfg.labelled_bs;
    let device = run.device;
    handles.push(spawn("dispatcher", move || {
        let _stream = OwnStream::new(device)?;
        let stage = Stage { name: "dispatcher" };
        let mut last_good: Option<(Tensor, Tensor)> = None;
        for i in start..end {
            let w = ((i - start) % workers as i64) as usize;
            let Ok(((got, item), b)) = worker_rx[w].recv() else { break };
            stage.idle(b);
            debug_assert_eq!(got, i);
            let tensors = stage.busy(|| -> Result<(Tensor, Tensor)> {
                match item {
                    Ok(host) => {
                        let (im, lb) = host.to_tensors()?;
                        let _ = recycle[w].try_push(host);
                        let t = (im.to_device(device), lb.to_device(device));
                        last_good = Some((t.0.shallow_clone(), t.1.shallow_clone()));
                        Ok(t)
                    }
                    Err(why) => {
                        emit::skipped_case();
                        tracing::warn!(iteration = i, error = %why, "batch unreadable; reusing the previous batch");
                        last_good
                            .as_ref()
                            .map(|(a, b)| (a.shallow_clone(), b.shallow_clone()))
                            .ok_or_else(|| anyhow!("the first batch is unreadable: {why}"))
                    }
                }
            })?;
            let (images, labels) = tensors;
            if with_teacher {
                let unl = images.narrow(0, labelled_bs, images.size()[0] - labelled_bs);
                if unl_tx.send((i, unl, Ready::now(device)?)).map(|b| stage.idle(b)).is_err() {
                    break;
                }
            }
            match batch_tx.send(BatchMsg { iter: i, images, labels, ready: Ready::now(device)? }) {
                Ok(b) => stage.idle(b),
                Err(Closed) => break,
            }
            stage.done();
        }
        Ok(())
    }));

    // ---- teacher side: sampler -> uncertainty/mask computer; EMA updater
    let teacher_names: Vec<(String, bool)> = run
        .trainer
        .teacher
        .as_ref()
        .map(|t| t.store().iter().map(|p| (p.name.clone(), p.trainable)).collect())
        .unwrap_or_default();
    let (guid_tx, guid_rx) = bounded::<GuidanceMsg>("guidance", q.guidance);
    let (params_tx, params_rx) = bounded::<ParamsMsg>("params", q.params);
    let mut teacher_handle = None;
    if with_teacher {
        let teacher = run.trainer.teacher.take().ok_or_else(|| anyhow!("method needs a teacher"))?;
        let (ver_tx, ver_rx) = bounded::<VersionMsg>("teacher_params", q.teacher_params);
        let (tout_tx, tout_rx) = bounded::<TeacherMsg>("teacher", q.teacher);
        // EMA updater: owns the EMA weights, publishes each version.
        let mut ema = device_copies(teacher.store().trainable().map(|p| &p.tensor));
        sync_device(run.device); // the copies above, before the EMA thread's stream reads them
        let decay = step_cfg.method.ema_decay;
        handles.push(spawn("ema", move || {
            set_threads(threads);
            let _stream = OwnStream::new(device)?;
            let stage = Stage { name: "ema" };
            while let Ok((msg, b)) = params_rx.recv() {
                stage.idle(b);
                msg.ready.wait(device, &msg.params)?;
                let version = stage.busy(|| -> Result<Vec<Tensor>> {
                    uamt::uamt::ema_update_tensors(&ema, &msg.params, msg.step, decay)?;
                    Ok(device_copies(ema.iter()))
                })?;
                if let Some(reply) = msg.reply {
                    let _ = reply.send((device_copies(version.iter()), Ready::now(device)?));
                }
                if ver_tx.send(VersionMsg { step: msg.step, params: version, ready: Ready::now(device)? }).is_err() {
                    break;
                }
                stage.done();
            }
            drop(std::mem::take(&mut ema));
            Ok(())
        }));
        // Teacher sampler: owns the teacher network (and its BatchNorm buffers).
        let (sc, nc) = (step_cfg.clone(), net_cfg.clone());
        teacher_handle = Some(std::thread::Builder::new().name("teacher".into()).spawn(move || -> Result<VNet> {
            set_threads(threads);
            let _stream = OwnStream::new(device)?;
            let stage = Stage { name: "teacher" };
            let mut have = start - 1; // the teacher we hold is the EMA after step start-1
            fn apply(teacher: &VNet, v: VersionMsg, have: &mut i64) -> Result<()> {
                v.ready.wait(teacher.device(), &v.params)?;
                tch::no_grad(|| {
                    for (p, src) in teacher.store().trainable().zip(&v.params) {
                        p.tensor.shallow_clone().copy_(src);
                    }
                });
                *have = v.step;
                Ok(())
            }
            while let Ok(((i, unl, ready), b)) = unl_rx.recv() {
                stage.idle(b);
                ready.wait(device, [&unl])?;
                let need = i - 1 - lag;
                while have < need {
                    match ver_rx.recv() {
                        Ok((v, b)) => {
                            stage.idle(b);
                            apply(&teacher, v, &mut have)?;
                        }
                        Err(Closed) => return Ok(teacher),
                    }
                }
                let msg = stage.busy(|| -> Result<TeacherMsg> {
                    let (t, mc) = StepRandom::draw_teacher(&nc, device, &sc, seed, i, &unl.size());
                    let t = t.ok_or_else(|| anyhow!("teacher randomness missing"))?;
                    let out = train::teacher_passes(&teacher, &sc, i, &unl, &t, &mc)?;
                    let buffers = device_copies(teacher.store().buffers().map(|p| &p.tensor));
                    Ok(TeacherMsg { out, buffers, ready: Ready::now(device)? })
                })?;
                if tout_tx.send(msg).map(|b| stage.idle(b)).is_err() {
                    break;
                }
                stage.done();
            }
            // Catch up with the versions still on their way, so the teacher handed back is the
            // EMA after the last student step.
            drop(tout_tx);
            while let Ok((v, _)) = ver_rx.recv() {
                apply(&teacher, v, &mut have)?;
            }
            Ok(teacher)
        })?);
        // Uncertainty/mask computer.
        let (sc, n_classes) = (step_cfg.clone(), net_cfg.n_classes);
        handles.push(spawn("mask", move || {
            set_threads(threads);
            let _stream = OwnStream::new(device)?;
            let stage = Stage { name: "mask" };
            while let Ok((m, b)) = tout_rx.recv() {
                stage.idle(b);
                m.ready.wait(device, [&m.out.target].into_iter().chain(&m.out.mc).chain(&m.buffers))?;
                let iter = m.out.iter;
                let guidance = stage.busy(|| train::guidance(m.out, &sc, n_classes));
                let ready = Ready::now(device)?;
                if guid_tx
                    .send(GuidanceMsg { iter, guidance, buffers: m.buffers, ready })
                    .map(|b| stage.idle(b))
                    .is_err()
                {
                    break;
                }
                stage.done();
            }
            Ok(())
        }));
    } else {
        drop((guid_tx, params_rx, unl_rx));
    }

    // ---- evaluator: periodic and hot-reload evaluation
    let (eval_tx, eval_rx) = bounded::<EvalRequest>("eval", 1);
    let eval_wanted = cfg.eval.every > 0 || !cfg.eval.watch_dir.as_os_str().is_empty();
    if eval_wanted {
        let ev = Evaluator::new(&cfg, run.loader.dataset().clone(), run.device)?;
        let stop = run.stop.clone();
        handles.push(spawn("evaluator", move || {
            set_threads(threads);
            let _stream = OwnStream::new(device)?;
            evaluator::run(ev, eval_rx, stop)
        }));
    } else {
        drop(eval_rx);
    }

    // ---- the student trainer, on this thread
    set_threads(threads);
    let student_stream = OwnStream::new(device)?;
    let t0 = Instant::now();
    let result = student_loop(
        &mut run,
        &cfg,
        &net_cfg,
        &step_cfg,
        StudentQueues { batch_rx, guid_rx, params_tx, eval_tx: eval_wanted.then_some(eval_tx) },
        start,
        end,
        &teacher_names,
    );
    // Its queue ends are dropped by now: every other stage winds down.
    drop(student_stream); // waits for the student's last work, back to the default stream
    let seconds = t0.elapsed().as_secs_f64();
    if !cfg.eval.watch_dir.as_os_str().is_empty() && !run.stop.load(Ordering::SeqCst) {
        tracing::info!(dir = %cfg.eval.watch_dir.display(), "training finished; still evaluating checkpoints dropped into the watched folder until SIGTERM");
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(anyhow!("a pipeline stage panicked")),
        }
    }
    if let Some(h) = teacher_handle {
        match h.join() {
            Ok(Ok(t)) => run.trainer.teacher = Some(t),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push(anyhow!("the teacher stage panicked")),
        }
    }
    let (reports, last_checkpoint, stopped) = result?;
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(Outcome { trainer: run.trainer, reports, last_checkpoint, stopped, seconds })
}

fn spawn(name: &str, f: impl FnOnce() -> Result<()> + Send + 'static) -> std::thread::JoinHandle<Result<()>> {
    std::thread::Builder::new().name(name.to_string()).spawn(f).expect("spawn a pipeline thread")
}

/// The student's queue ends (dropped when its loop ends).
struct StudentQueues {
    batch_rx: Rx<BatchMsg>,
    guid_rx: Rx<GuidanceMsg>,
    params_tx: Tx<ParamsMsg>,
    eval_tx: Option<Tx<EvalRequest>>,
}

type LoopResult = Result<(Vec<StepReport>, Option<PathBuf>, bool)>;

#[allow(clippy::too_many_arguments)]
fn student_loop(
    run: &mut Run,
    cfg: &Config,
    net_cfg: &VNetConfig,
    step_cfg: &StepConfig,
    qs: StudentQueues,
    start: i64,
    end: i64,
    teacher_names: &[(String, bool)],
) -> LoopResult {
    let StudentQueues { batch_rx, guid_rx, params_tx, eval_tx } = qs;
    let stage = Stage { name: "student" };
    let seed = cfg.optim.seed;
    let config_toml = cfg.to_toml();
    let mut reports = Vec::new();
    let mut last_checkpoint = None;
    let mut stopped = false;
    let mut last_teacher_buffers: Option<Vec<Tensor>> = None;
    let log_every = cfg.telemetry.log_every;
    let mut log_t = Instant::now();
    let mut log_i = start;
    let device = run.device;
    let readback_every = cfg.telemetry.readback_interval(device);
    let mut pending = Vec::new();
    let tr = &mut run.trainer;
    let with_teacher = step_cfg.method.kind != Method::Supervised;
    for i in start..end {
        if run.stop.load(Ordering::SeqCst) {
            stopped = true;
            break;
        }
        let t_iter = Instant::now();
        let (mut batch, b) = batch_rx.recv().map_err(|_| anyhow!("the data loader stopped"))?;
        stage.idle(b);
        if batch.iter != i {
            return Err(anyhow!("batch for iteration {} arrived at {i}", batch.iter));
        }
        std::mem::take(&mut batch.ready).wait(device, [&batch.images, &batch.labels])?;
        tr.check(&batch.images, &batch.labels)?;
        let student_batch = if with_teacher { batch.images.size()[0] } else { step_cfg.labelled_bs };
        let logits = stage.busy(|| {
            let rnd = StepRandom::draw_student(net_cfg, run.device, seed, i, student_batch);
            tr.student_forward(&batch.images, &rnd)
        })?;
        let guidance = if with_teacher {
            let (mut g, b) = guid_rx.recv().map_err(|_| anyhow!("the teacher stopped"))?;
            stage.idle(b);
            if g.iter != i {
                return Err(anyhow!("guidance for iteration {} arrived at {i}", g.iter));
            }
            let gd = &g.guidance;
            std::mem::take(&mut g.ready)
                .wait(device, [&gd.target, &gd.mask].into_iter().chain(&gd.uncertainty).chain(&g.buffers))?;
            last_teacher_buffers = Some(g.buffers);
            Some(g.guidance)
        } else {
            None
        };
        let stats = stage.busy(|| tr.student_finish(&logits, &batch.labels, guidance.as_ref()))?;
        let want_ckpt = run.checkpoints
            && ((cfg.checkpoint.every > 0 && (i + 1) % cfg.checkpoint.every == 0)
                || i + 1 == end
                || run.checkpoint_now.swap(false, Ordering::SeqCst)
                || run.stop.load(Ordering::SeqCst));
        let mut teacher_params = None;
        if with_teacher {
            let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
            let params = stage.busy(|| device_copies(tr.student.store().trainable().map(|p| &p.tensor)));
            let msg = ParamsMsg { step: i, params, reply: want_ckpt.then_some(reply_tx), ready: Ready::now(device)? };
            params_tx.send(msg).map_err(|_| anyhow!("the EMA updater stopped"))?;
            if want_ckpt {
                let (params, ready) = reply_rx.recv().map_err(|_| anyhow!("the EMA updater stopped"))?;
                ready.wait(device, &params)?;
                teacher_params = Some(params);
            }
        }
        // The step's numbers stay on the device until a read-back (one copy for many steps).
        pending.push((stats, t_iter.elapsed().as_secs_f64()));
        let log_now = (i + 1) % log_every == 0 || i + 1 == end;
        if log_now || pending.len() as i64 >= readback_every || want_ckpt || run.stop.load(Ordering::SeqCst) {
            read_back(&mut pending, &mut reports)?;
        }
        stage.done();
        if log_now {
            let report = *reports.last().expect("read back above");
            let rate = (i + 1 - log_i) as f64 / log_t.elapsed().as_secs_f64().max(1e-9);
            emit::it_per_second(rate);
            let eta = (end - i - 1) as f64 / rate.max(1e-9);
            tracing::info!(
                iteration = i + 1,
                of = end,
                loss = format!("{:.4}", report.loss),
                supervised = format!("{:.4}", report.supervised),
                consistency = format!("{:.5}", report.consistency),
                weight = format!("{:.4}", report.weight),
                mask = format!("{:.3}", report.mask_fraction),
                lr = report.lr,
                it_per_s = format!("{rate:.2}"),
                eta_s = format!("{eta:.0}"),
                "training"
            );
            log_t = Instant::now();
            log_i = i + 1;
        }
        if let Some(tx) = &eval_tx {
            if cfg.eval.every > 0 && (i + 1) % cfg.eval.every == 0 {
                let req = EvalRequest { iteration: tr.iter, weights: host_copies(&tr.student.store().named_tensors()) };
                if !tx.try_send(req).unwrap_or(false) {
                    tracing::info!(
                        iteration = tr.iter,
                        "the evaluator is still busy; skipping this periodic evaluation"
                    );
                }
            }
        }
        if want_ckpt {
            let teacher = match (teacher_params, &last_teacher_buffers) {
                (Some(params), Some(buffers)) => Some(assemble(teacher_names, &params, buffers)?),
                _ => None,
            };
            let snap = Snapshot {
                iteration: tr.iter,
                seed,
                config: config_toml.clone(),
                student: host_copies(&tr.student.store().named_tensors()),
                teacher,
                momentum: host_copies(tr.opt.buffers()),
            };
            let t = Instant::now();
            match snap.write_atomic(&cfg.checkpoint.dir) {
                Ok(path) => {
                    emit::checkpoint(true, t.elapsed().as_secs_f64());
                    tracing::info!(path = %path.display(), iteration = tr.iter, "checkpoint written");
                    for old in checkpoint::prune(&cfg.checkpoint.dir, cfg.checkpoint.keep) {
                        tracing::debug!(path = %old.display(), "old checkpoint removed");
                    }
                    last_checkpoint = Some(path);
                }
                Err(e) => {
                    emit::checkpoint(false, 0.0);
                    tracing::error!(error = %e, "checkpoint failed; the previous ones are intact");
                }
            }
        }
    }
    read_back(&mut pending, &mut reports)?;
    if run.stop.load(Ordering::SeqCst) {
        stopped = true;
    }
    Ok((reports, last_checkpoint, stopped))
}

/// Reads the pending steps' numbers back in one copy and publishes them (metrics, reports).
fn read_back(pending: &mut Vec<(train::StepStats, f64)>, reports: &mut Vec<StepReport>) -> Result<()> {
    let (stats, seconds): (Vec<train::StepStats>, Vec<f64>) = pending.drain(..).unzip();
    for (r, seconds) in train::StepStats::read_back(&stats)?.into_iter().zip(seconds) {
        emit::iteration(&r, seconds);
        reports.push(r);
    }
    Ok(())
}

/// The teacher's named tensors in store order from its trainable weights and its buffers.
fn assemble(names: &[(String, bool)], params: &[Tensor], buffers: &[Tensor]) -> Result<Vec<(String, Tensor)>> {
    let (mut p, mut b) = (params.iter(), buffers.iter());
    names
        .iter()
        .map(|(n, trainable)| {
            let t = if *trainable { p.next() } else { b.next() };
            t.map(|t| (n.clone(), host_copy(t))).context("teacher tensors do not match its names")
        })
        .collect()
}
