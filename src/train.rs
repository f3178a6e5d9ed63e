//! One full sequential UA-MT iteration: the ground truth that the actor pipeline reproduces.
//!
//! The iteration, for a batch of `labelled_bs` labelled patches followed by unlabelled ones:
//! student forward on all patches; teacher forward on the unlabelled patches plus noise (the
//! consistency target); T more noisy teacher passes whose mean softmax's entropy is the
//! uncertainty; supervised loss on the labelled part; masked softmax-MSE consistency on the
//! unlabelled part; backward; SGD; EMA. All randomness (noise, dropout masks) comes in a
//! [`StepRandom`], drawn from a seed and the iteration, so any thread can draw any part of it.

use crate::gpu::Precision;
pub use crate::method::Method;
use crate::method::{self, losses, Sgd};
use crate::model::{Dropout, DropoutMasks, Init, VNet, VNetConfig};
use crate::rng;
use crate::{check, recipe, Error, Result};
use tch::{Device, Kind, Tensor};

/// The method and its hyper-parameters: the config file's `[method]` section.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// `uamt`, `mean_teacher` or `supervised`.
    pub kind: Method,
    /// Monte-Carlo teacher passes T for the uncertainty.
    pub mc_passes: i64,
    /// Copies of the unlabelled patches per teacher forward (the reference: 2, so T=8 is 4 forwards
    /// of batch 4). BatchNorm statistics are taken over each forward's batch.
    pub mc_repeats: i64,
    /// Run the `mc_passes / mc_repeats` Monte-Carlo forwards as one batched forward with
    /// BatchNorm statistics still taken per original forward (see [`VNet::forward_grouped`]):
    /// the same logits and running statistics as the reference's separate forwards, fewer and
    /// bigger kernels (default off).
    pub mc_batched: bool,
    /// Standard deviation of the teacher's input noise.
    pub noise_std: f64,
    /// The noise is clamped to +-this.
    pub noise_clip: f64,
    /// Maximum consistency weight.
    pub consistency: f64,
    /// The consistency ramp counts in units of this many iterations.
    pub consistency_interval: i64,
    /// Length of the consistency ramp-up, in those units.
    pub consistency_rampup: f64,
    /// EMA decay ceiling.
    pub ema_decay: f64,
    /// For the actor pipeline (the sequential [`Trainer`] ignores it). 0: the teacher of
    /// iteration i is the EMA after step i-1 (the reference, exact); 1: one step older, so its
    /// passes overlap the whole student step.
    pub teacher_lag: i64,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            kind: Method::Uamt,
            mc_passes: recipe::MC_PASSES,
            mc_repeats: recipe::MC_REPEATS,
            mc_batched: false,
            noise_std: recipe::NOISE_STD,
            noise_clip: recipe::NOISE_CLIP,
            consistency: recipe::CONSISTENCY,
            consistency_interval: recipe::CONSISTENCY_INTERVAL,
            consistency_rampup: recipe::CONSISTENCY_RAMPUP,
            ema_decay: recipe::EMA_DECAY,
            teacher_lag: 0,
        }
    }
}

impl MethodConfig {
    /// Longest teacher lag the pipeline accepts.
    pub const MAX_TEACHER_LAG: i64 = 4;

    /// Checks every value; errors name the key under `prefix` (`method.mc_passes`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        if self.kind == Method::Uamt {
            check::range(&k("mc_repeats"), self.mc_repeats, 1, check::limits::MC_PASSES)?;
            check::range(&k("mc_passes"), self.mc_passes, 1, check::limits::MC_PASSES)?;
            if self.mc_passes % self.mc_repeats != 0 {
                return Err(Error::invalid(
                    k("mc_passes"),
                    format!(
                        "must be a positive multiple of {} ({}), got {}",
                        k("mc_repeats"),
                        self.mc_repeats,
                        self.mc_passes
                    ),
                ));
            }
        }
        check::at_least_f(&k("noise_std"), self.noise_std, 0.0)?;
        check::at_least_f(&k("noise_clip"), self.noise_clip, 0.0)?;
        check::at_least_f(&k("consistency"), self.consistency, 0.0)?;
        check::range(&k("consistency_interval"), self.consistency_interval, 1, i64::MAX)?;
        check::at_least_f(&k("consistency_rampup"), self.consistency_rampup, 0.0)?;
        check::within(&k("ema_decay"), self.ema_decay, 0.0, 1.0)?;
        check::range(&k("teacher_lag"), self.teacher_lag, 0, Self::MAX_TEACHER_LAG)?;
        Ok(())
    }
}

/// Optimiser, schedule, length and seed: the config file's `[optim]` section.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Total iterations (the threshold ramps up over them).
    pub iterations: i64,
    /// Initial learning rate.
    pub base_lr: f64,
    /// The learning rate is multiplied by `lr_gamma` every `lr_step` iterations.
    pub lr_step: i64,
    /// Factor of each learning-rate drop.
    pub lr_gamma: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// Seed of initialisation, sampling, augmentation, noise and dropout (the daemon's; the
    /// [`Trainer`] takes its seed as an argument).
    pub seed: u64,
    /// What a step whose loss or gradients are not finite does: `stop` (the default; the run
    /// ends with an error naming the iteration, found when the losses are read back, at no cost
    /// per step) or `skip` (no SGD update for that step, counted; costs one device sync per step
    /// for the check before the update).
    pub on_nonfinite: NonFinite,
}

/// The `optim.on_nonfinite` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    /// End the run with an error naming the iteration.
    #[default]
    Stop,
    /// Skip the step's SGD update and count it.
    Skip,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            iterations: recipe::ITERATIONS,
            base_lr: recipe::BASE_LR,
            lr_step: recipe::LR_STEP,
            lr_gamma: recipe::LR_GAMMA,
            momentum: recipe::MOMENTUM,
            weight_decay: recipe::WEIGHT_DECAY,
            seed: recipe::SEED,
            on_nonfinite: NonFinite::Stop,
        }
    }
}

impl OptimConfig {
    /// Checks every value; errors name the key under `prefix` (`optim.base_lr`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::range(&k("iterations"), self.iterations, 1, i64::MAX)?;
        check::positive_f(&k("base_lr"), self.base_lr)?;
        check::range(&k("lr_step"), self.lr_step, 1, i64::MAX)?;
        check::positive_f(&k("lr_gamma"), self.lr_gamma)?;
        check::at_least_f(&k("momentum"), self.momentum, 0.0)?;
        check::at_least_f(&k("weight_decay"), self.weight_decay, 0.0)?;
        Ok(())
    }
}

/// Everything one step needs: the `[method]` and `[optim]` sections and the labelled batch size
/// (`data.labelled_bs`). The defaults are the recipe's.
#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    /// The method and its hyper-parameters.
    pub method: MethodConfig,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Labelled patches at the head of each batch.
    pub labelled_bs: i64,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            method: MethodConfig::default(),
            optim: OptimConfig::default(),
            labelled_bs: recipe::LABELLED_BS as i64,
        }
    }
}

impl StepConfig {
    /// The recipe's step for `kind`.
    pub fn of(kind: Method) -> Self {
        StepConfig { method: MethodConfig { kind, ..MethodConfig::default() }, ..StepConfig::default() }
    }

    /// Checks ranges; the error names the offending field (`method.ema_decay`, `labelled_bs`).
    pub fn validate(&self) -> Result<()> {
        self.method.validate("method")?;
        self.optim.validate("optim")?;
        check::range("labelled_bs", self.labelled_bs, 1, check::limits::BATCH as i64)
    }
}

/// Randomness of one network pass: additive input noise and dropout masks.
#[derive(Debug)]
pub struct PassRandom {
    /// Added to the input (already scaled and clamped); `None` for the student.
    pub noise: Option<Tensor>,
    /// Dropout3d masks for x5 and x9.
    pub dropout: DropoutMasks,
}

/// All randomness of one iteration.
#[derive(Debug)]
pub struct StepRandom {
    /// The student's dropout.
    pub student: PassRandom,
    /// The teacher's single noisy pass that gives the consistency target.
    pub teacher: Option<PassRandom>,
    /// The Monte-Carlo passes, `mc_passes / mc_repeats` of them, each on `mc_repeats` copies.
    pub mc: Vec<PassRandom>,
}

/// Stream identifiers under a (seed, iteration) key.
const STREAM_STUDENT: u64 = 0;
const STREAM_TEACHER: u64 = 1;
const STREAM_MC: u64 = 2;

impl StepRandom {
    /// The student's part for iteration `iter`: depends only on (seed, iter, batch size).
    pub fn draw_student(net: &VNetConfig, device: Device, seed: u64, iter: i64, batch: i64) -> PassRandom {
        draw_pass(net, device, rng::key(seed, &[iter as u64, STREAM_STUDENT]), batch, None)
    }

    /// The teacher's parts (target pass and Monte-Carlo passes) for iteration `iter`, for
    /// unlabelled patches of `unl_shape` `[u, C, X, Y, Z]`.
    pub fn draw_teacher(
        net: &VNetConfig,
        device: Device,
        cfg: &StepConfig,
        seed: u64,
        iter: i64,
        unl_shape: &[i64],
    ) -> (Option<PassRandom>, Vec<PassRandom>) {
        if cfg.method.kind == Method::Supervised {
            return (None, Vec::new());
        }
        let noise = |k: u64, n: i64| {
            let mut shape = unl_shape.to_vec();
            shape[0] = n;
            let z = rng::normal(rng::key(k, &[0]), &shape, device) * cfg.method.noise_std;
            (z.clamp(-cfg.method.noise_clip, cfg.method.noise_clip), n)
        };
        let u = unl_shape[0];
        let teacher = draw_pass(net, device, rng::key(seed, &[iter as u64, STREAM_TEACHER]), u, Some(&noise));
        let mc = if cfg.method.kind == Method::Uamt {
            (0..cfg.method.mc_passes / cfg.method.mc_repeats)
                .map(|k| {
                    draw_pass(
                        net,
                        device,
                        rng::key(seed, &[iter as u64, STREAM_MC, k as u64]),
                        u * cfg.method.mc_repeats,
                        Some(&noise),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        (Some(teacher), mc)
    }

    /// Everything for iteration `iter` on a batch of `images_shape` `[b, C, X, Y, Z]`.
    pub fn draw(
        net: &VNetConfig,
        device: Device,
        cfg: &StepConfig,
        seed: u64,
        iter: i64,
        images_shape: &[i64],
    ) -> StepRandom {
        let student_batch = if cfg.method.kind == Method::Supervised { cfg.labelled_bs } else { images_shape[0] };
        let student = Self::draw_student(net, device, seed, iter, student_batch);
        let mut unl = images_shape.to_vec();
        unl[0] -= cfg.labelled_bs;
        let (teacher, mc) = Self::draw_teacher(net, device, cfg, seed, iter, &unl);
        StepRandom { student, teacher, mc }
    }
}

type NoiseFn<'a> = dyn Fn(u64, i64) -> (Tensor, i64) + 'a;

fn draw_pass(net: &VNetConfig, device: Device, key: u64, batch: i64, noise: Option<&NoiseFn<'_>>) -> PassRandom {
    let mut sub = 1u64;
    let dropout = DropoutMasks::draw(net, batch, |shape| {
        sub += 1;
        rng::uniform(rng::key(key, &[sub]), shape, device)
    });
    PassRandom { noise: noise.map(|f| f(rng::key(key, &[0]), batch).0), dropout }
}

/// What the teacher hands the student for one iteration.
#[derive(Debug)]
pub struct Guidance {
    /// Logits of the single noisy pass on the unlabelled patches `[u, C, X, Y, Z]`.
    pub target: Tensor,
    /// Voxels where consistency counts `[u, 1, X, Y, Z]` (float 0/1).
    pub mask: Tensor,
    /// Entropy of the mean Monte-Carlo softmax `[u, 1, X, Y, Z]` (UA-MT only).
    pub uncertainty: Option<Tensor>,
    /// The threshold the mask was cut at (UA-MT), in nats.
    pub threshold: f64,
}

/// The teacher's raw output for one iteration, before the uncertainty is computed.
#[derive(Debug)]
pub struct TeacherOutput {
    /// The iteration it is for.
    pub iter: i64,
    /// Logits of the single noisy pass on the unlabelled patches `[u, C, X, Y, Z]`.
    pub target: Tensor,
    /// Logits of the Monte-Carlo passes `[T * u, C, X, Y, Z]`, pass-major (UA-MT only).
    pub mc: Option<Tensor>,
}

/// How many threads run a teacher's passes at once, and libtorch's intra-op threads on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassWorkers {
    /// Passes running at once (1: one after another on the calling thread).
    pub workers: usize,
    /// Intra-op threads of each worker (the calling thread's are restored afterwards).
    pub threads: usize,
}

impl PassWorkers {
    /// One pass at a time on the calling thread, with its threads.
    pub const ONE: PassWorkers = PassWorkers { workers: 1, threads: 0 };
}

/// One teacher pass for a worker: its input, the noise to add, its dropout masks.
struct PassTask {
    index: usize,
    input: Tensor,
    noise: Option<Tensor>,
    masks: DropoutMasks,
}

impl PassTask {
    fn new(index: usize, input: &Tensor, r: &PassRandom) -> Self {
        let masks = DropoutMasks { x5: r.dropout.x5.shallow_clone(), x9: r.dropout.x9.shallow_clone() };
        PassTask { index, input: input.shallow_clone(), noise: r.noise.as_ref().map(Tensor::shallow_clone), masks }
    }
}

/// The passes of `tasks` on `workers.workers` threads (the calling one among them), each on a
/// [`VNet::pass_view`] of `teacher`, claimed in order; the batch statistics are folded into
/// `teacher` afterwards in the passes' order. Logits in the tasks' order.
fn passes_at_once(teacher: &VNet, tasks: Vec<PassTask>, workers: PassWorkers) -> Result<Vec<Tensor>> {
    let n = tasks.len();
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(tasks));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let work = |view: VNet, done: std::sync::mpsc::Sender<_>| {
        tch::no_grad(|| loop {
            // A poisoned queue (a worker panicked holding it) ends the work; the panic surfaces at
            // the end of the scope.
            let Some(t) = queue.lock().ok().and_then(|mut q| q.pop_front()) else { break };
            let x = match &t.noise {
                Some(z) => &t.input + z,
                None => t.input.shallow_clone(),
            };
            let r = view.forward_with(&x, true, Dropout::Masks(&t.masks)).map(|y| (y, view.pass_statistics()));
            let failed = r.is_err();
            let _ = done.send((t.index, r));
            if failed {
                break;
            }
        })
    };
    let before = tch::get_num_threads();
    let threads = workers.threads.max(1) as i32;
    std::thread::scope(|s| {
        for _ in 1..workers.workers.min(n) {
            let (view, done) = (teacher.pass_view(), done_tx.clone());
            s.spawn(move || {
                tch::set_num_threads(threads);
                work(view, done)
            });
        }
        tch::set_num_threads(threads);
        work(teacher.pass_view(), done_tx);
    });
    tch::set_num_threads(before);
    let mut out: Vec<Option<(Tensor, crate::model::PassStatistics)>> = (0..n).map(|_| None).collect();
    for (i, r) in done_rx.iter() {
        out[i] = Some(r?);
    }
    let mut logits = Vec::with_capacity(n);
    for (i, r) in out.into_iter().enumerate() {
        let (y, stats) = r.ok_or_else(|| Error::invalid("teacher", format!("pass {i} did not run")))?;
        teacher.fold_pass(&stats)?;
        logits.push(y);
    }
    Ok(logits)
}

/// The teacher's passes for one iteration: the noisy target pass and, for UA-MT, the T
/// Monte-Carlo passes. Runs under no_grad; the teacher stays in train mode (dropout on,
/// BatchNorm on batch statistics, running statistics updated), as in the reference.
pub fn teacher_passes(
    teacher: &VNet,
    cfg: &StepConfig,
    iter: i64,
    unlabelled: &Tensor,
    teacher_rnd: &PassRandom,
    mc_rnd: &[PassRandom],
) -> Result<TeacherOutput> {
    teacher_passes_on(teacher, cfg, iter, unlabelled, teacher_rnd, mc_rnd, PassWorkers::ONE)
}

/// [`teacher_passes`] with the passes (the target pass and each Monte-Carlo forward) shared by
/// `workers` threads, each with its own intra-op threads: on a CPU with a few cores, whole passes
/// side by side use the cores better than one small pass's kernels split across them. The logits
/// are those of the same passes one after another on one thread with `workers.threads` intra-op
/// threads; the BatchNorm running statistics agree with them to float rounding (see
/// [`VNet::pass_view`]). One worker, or the batched Monte-Carlo forward: [`teacher_passes`].
#[allow(clippy::too_many_arguments)]
pub fn teacher_passes_on(
    teacher: &VNet,
    cfg: &StepConfig,
    iter: i64,
    unlabelled: &Tensor,
    teacher_rnd: &PassRandom,
    mc_rnd: &[PassRandom],
    workers: PassWorkers,
) -> Result<TeacherOutput> {
    // The Monte-Carlo forwards UA-MT makes (none for the other methods), and their randomness.
    let expect =
        if cfg.method.kind == Method::Uamt { (cfg.method.mc_passes / cfg.method.mc_repeats) as usize } else { 0 };
    if mc_rnd.len() != expect {
        return Err(Error::invalid(
            "mc_passes",
            format!("{} Monte-Carlo pass randoms given, {expect} expected", mc_rnd.len()),
        ));
    }
    let parallel = workers.workers > 1 && !(cfg.method.mc_batched && mc_rnd.len() > 1);
    if parallel {
        let mut tasks = vec![PassTask::new(0, unlabelled, teacher_rnd)];
        if expect > 0 {
            let repeated = tch::no_grad(|| unlabelled.repeat([cfg.method.mc_repeats, 1, 1, 1, 1]));
            tasks.extend(mc_rnd.iter().enumerate().map(|(k, r)| PassTask::new(k + 1, &repeated, r)));
        }
        let mut logits = passes_at_once(teacher, tasks, workers)?;
        let target = logits.remove(0);
        let mc = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
        return Ok(TeacherOutput { iter, target, mc });
    }
    tch::no_grad(|| {
        let noisy = |x: &Tensor, r: &PassRandom| match &r.noise {
            Some(n) => x + n,
            None => x.shallow_clone(),
        };
        let target =
            teacher.forward_with(&noisy(unlabelled, teacher_rnd), true, Dropout::Masks(&teacher_rnd.dropout))?;
        if expect == 0 {
            return Ok(TeacherOutput { iter, target, mc: None });
        }
        let repeated = unlabelled.repeat([cfg.method.mc_repeats, 1, 1, 1, 1]);
        if cfg.method.mc_batched && mc_rnd.len() > 1 {
            let inputs: Vec<Tensor> = mc_rnd.iter().map(|r| noisy(&repeated, r)).collect();
            let masks = DropoutMasks {
                x5: Tensor::cat(&mc_rnd.iter().map(|r| r.dropout.x5.shallow_clone()).collect::<Vec<_>>(), 0),
                x9: Tensor::cat(&mc_rnd.iter().map(|r| r.dropout.x9.shallow_clone()).collect::<Vec<_>>(), 0),
            };
            let mc = teacher.forward_grouped(&Tensor::cat(&inputs, 0), mc_rnd.len() as i64, &masks)?;
            return Ok(TeacherOutput { iter, target, mc: Some(mc) });
        }
        let logits = mc_rnd
            .iter()
            .map(|r| teacher.forward_with(&noisy(&repeated, r), true, Dropout::Masks(&r.dropout)))
            .collect::<Result<Vec<_>>>()?;
        Ok(TeacherOutput { iter, target, mc: Some(Tensor::cat(&logits, 0)) })
    })
}

/// Uncertainty, threshold and mask from the teacher's output (the uncertainty/mask computer's
/// work). Mean Teacher gets a mask of ones.
pub fn guidance(out: TeacherOutput, cfg: &StepConfig, n_classes: i64) -> Guidance {
    tch::no_grad(|| match out.mc {
        Some(mc) => {
            let u = crate::uncertainty::uncertainty(&mc, cfg.method.mc_passes);
            let threshold = method::threshold(out.iter, cfg.optim.iterations, n_classes);
            let mask = u.lt(threshold).to_kind(Kind::Float);
            Guidance { target: out.target, mask, uncertainty: Some(u), threshold }
        }
        None => {
            let mask = Tensor::ones_like(&out.target.narrow(1, 0, 1));
            Guidance { target: out.target, mask, uncertainty: None, threshold: f64::INFINITY }
        }
    })
}

/// The teacher's whole work for one iteration: [`teacher_passes`] then [`guidance`].
pub fn teacher_guidance(
    teacher: &VNet,
    cfg: &StepConfig,
    iter: i64,
    unlabelled: &Tensor,
    teacher_rnd: &PassRandom,
    mc_rnd: &[PassRandom],
) -> Result<Guidance> {
    let out = teacher_passes(teacher, cfg, iter, unlabelled, teacher_rnd, mc_rnd)?;
    Ok(guidance(out, cfg, teacher.config().n_classes))
}

/// The numbers one step produced, still on the device (reading them synchronises).
#[derive(Debug)]
pub struct StepStats {
    /// The iteration this step ran as (0-based).
    pub iter: i64,
    /// Total loss.
    pub loss: Tensor,
    /// `0.5 * (ce + dice)`.
    pub supervised: Tensor,
    /// Cross-entropy.
    pub ce: Tensor,
    /// Dice loss.
    pub dice: Tensor,
    /// Masked consistency before weighting (0 for supervised).
    pub consistency: Tensor,
    /// Fraction of unlabelled voxels under the threshold (1 for mean teacher, 0 for supervised).
    pub mask_fraction: Tensor,
    /// Consistency weight used.
    pub weight: f64,
    /// Uncertainty threshold used (infinite without a mask).
    pub threshold: f64,
    /// Learning rate used.
    pub lr: f64,
    /// The step's loss or gradients were not finite and its SGD update was skipped
    /// (`optim.on_nonfinite = "skip"` only; with `stop` nothing is checked here).
    pub skipped: bool,
}

/// [`StepStats`] read back to the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub iter: i64,
    pub loss: f64,
    pub supervised: f64,
    pub ce: f64,
    pub dice: f64,
    pub consistency: f64,
    pub mask_fraction: f64,
    pub weight: f64,
    pub threshold: f64,
    pub lr: f64,
}

impl StepStats {
    /// The six device scalars (loss, supervised, ce, dice, consistency, mask fraction) as one
    /// float64 tensor `[6]`, still on the device.
    pub fn scalars(&self) -> Tensor {
        let device = self.loss.device();
        let parts: Vec<Tensor> =
            [&self.loss, &self.supervised, &self.ce, &self.dice, &self.consistency, &self.mask_fraction]
                .iter()
                .map(|t| t.detach().to_kind(Kind::Double).to_device(device).reshape([1]))
                .collect();
        Tensor::cat(&parts, 0)
    }

    /// The report from the values [`StepStats::scalars`] read back.
    fn report_from(&self, v: &[f64]) -> StepReport {
        StepReport {
            iter: self.iter,
            loss: v[0],
            supervised: v[1],
            ce: v[2],
            dice: v[3],
            consistency: v[4],
            mask_fraction: v[5],
            weight: self.weight,
            threshold: self.threshold,
            lr: self.lr,
        }
    }

    /// Reads the numbers of many steps back with a single device-to-host copy (one wait for
    /// the device instead of six per step).
    pub fn read_back(stats: &[StepStats]) -> Result<Vec<StepReport>> {
        if stats.is_empty() {
            return Ok(Vec::new());
        }
        let all =
            Tensor::f_stack(&stats.iter().map(StepStats::scalars).collect::<Vec<_>>(), 0)?.f_to_device(Device::Cpu)?;
        let v = Vec::<f64>::try_from(all.reshape([-1]))?;
        Ok(stats.iter().zip(v.chunks(6)).map(|(s, v)| s.report_from(v)).collect())
    }

    /// Copies the scalars to the host.
    pub fn report(&self) -> StepReport {
        let v: Vec<f64> = [&self.loss, &self.supervised, &self.ce, &self.dice, &self.consistency, &self.mask_fraction]
            .iter()
            .map(|t| t.double_value(&[]))
            .collect();
        self.report_from(&v)
    }
}

/// The student, the teacher, the optimiser and the iteration counter.
#[derive(Debug)]
pub struct Trainer {
    /// The network being trained.
    pub student: VNet,
    /// The EMA of the student (absent for supervised training).
    pub teacher: Option<VNet>,
    /// SGD and its momentum buffers.
    pub opt: Sgd,
    /// Steps done so far; the next step runs as this iteration.
    pub iter: i64,
    /// Hyper-parameters.
    pub cfg: StepConfig,
    /// Data-parallel training (`crate::dist::GradSync`): buffers from rank 0 before each forward
    /// pass, gradients averaged over the ranks after each backward pass (absent for a single
    /// process).
    pub sync: Option<Box<dyn GradientHook>>,
}

/// What a layer around the step (data-parallel training) does at its three points, without the
/// step knowing of processes: before the student's forward pass, around its backward pass, and
/// the stop the ranks agreed on.
pub trait GradientHook: Send + std::fmt::Debug {
    /// Before each student forward pass (e.g. BatchNorm buffers from rank 0).
    fn before_forward(&self, store: &crate::model::ParamStore) -> Result<()>;
    /// Just before the backward pass.
    fn before_backward(&mut self) -> Result<()>;
    /// After the backward pass: the gradients as the update should use them.
    fn after_backward(&mut self, store: &crate::model::ParamStore) -> Result<()>;
    /// Whether the ranks agreed to stop after the last step.
    fn agreed_stop(&self) -> bool;
}

impl Trainer {
    /// Sets the numeric precision of every forward pass, student's and teacher's (see
    /// [`Precision`]): bf16 autocast on the networks; TF32 process-wide on CUDA.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let bf16 = precision == Precision::Bf16;
        self.student.set_bf16(bf16);
        if let Some(t) = &mut self.teacher {
            t.set_bf16(bf16);
        }
        if precision == Precision::Tf32 && self.student.device().is_cuda() {
            crate::gpu::set_tf32(true)?;
        }
        Ok(())
    }

    /// Runs both networks' activations channels-last or not (see [`VNet::set_channels_last`]),
    /// the momentum buffers stored like the weights.
    pub fn set_channels_last(&mut self, on: bool) {
        self.student.set_channels_last(on);
        self.opt.set_channels_last(on);
        if let Some(t) = &mut self.teacher {
            t.set_channels_last(on);
        }
    }

    /// A student and (unless supervised) a separately initialised teacher, as the reference
    /// builds two models; the first EMA update copies the student into the teacher.
    pub fn new(net: &VNetConfig, cfg: StepConfig, device: Device) -> Result<Self> {
        Self::with_init(net, cfg, device, None)
    }

    /// Like [`Trainer::new`] but with weights drawn from `seed` by the counter-based generator:
    /// the same start whatever other threads do with libtorch's global generator.
    pub fn seeded(net: &VNetConfig, cfg: StepConfig, device: Device, seed: u64) -> Result<Self> {
        Self::with_init(net, cfg, device, Some(seed))
    }

    fn with_init(net: &VNetConfig, cfg: StepConfig, device: Device, seed: Option<u64>) -> Result<Self> {
        cfg.validate()?;
        let init = |k: u64| seed.map_or(Init::Global, |s| Init::Seeded(rng::key(s, &[k])));
        let student = VNet::with_init(net, device, init(0))?;
        let teacher = match cfg.method.kind {
            Method::Supervised => None,
            _ => Some(VNet::with_init(net, device, init(1))?),
        };
        let opt = Sgd::new(student.store(), cfg.optim.momentum, cfg.optim.weight_decay);
        Ok(Trainer { student, teacher, opt, iter: 0, cfg, sync: None })
    }

    /// Draws this iteration's randomness for a batch of `images_shape`.
    pub fn draw_random(&self, seed: u64, images_shape: &[i64]) -> StepRandom {
        StepRandom::draw(self.student.config(), self.student.device(), &self.cfg, seed, self.iter, images_shape)
    }

    /// Checks a batch: images `[b, C, X, Y, Z]`, labels `[labelled_bs, X, Y, Z]` int64.
    fn check_batch(&self, images: &Tensor, labels: &Tensor) -> Result<()> {
        let (is, ls) = (images.size(), labels.size());
        let l = self.cfg.labelled_bs;
        let need_unl = self.cfg.method.kind != Method::Supervised;
        if is.len() != 5 || is[0] < l + need_unl as i64 {
            return Err(Error::shape("batch images", format!("[b >= {}, C, X, Y, Z]", l + need_unl as i64), is));
        }
        if ls.len() != 4 || ls[0] != l || ls[1..] != is[2..] {
            return Err(Error::shape("batch labels", format!("[{l}, {}, {}, {}]", is[2], is[3], is[4]), ls));
        }
        if labels.kind() != Kind::Int64 {
            return Err(Error::shape("batch labels kind", "int64", labels.kind()));
        }
        Ok(())
    }

    /// One sequential iteration. `images` holds `labelled_bs` labelled patches then the unlabelled
    /// ones; `labels` the labelled patches' classes.
    pub fn step(&mut self, images: &Tensor, labels: &Tensor, rnd: &StepRandom) -> Result<StepStats> {
        self.check_batch(images, labels)?;
        let logits = self.student_forward(images, &rnd.student)?;
        let guidance = match (&self.teacher, self.cfg.method.kind) {
            (Some(teacher), m) if m != Method::Supervised => {
                let unl = self.unlabelled(images);
                let t =
                    rnd.teacher.as_ref().ok_or_else(|| Error::invalid("random", "teacher pass randomness missing"))?;
                Some(teacher_guidance(teacher, &self.cfg, self.iter, &unl, t, &rnd.mc)?)
            }
            _ => None,
        };
        let stats = self.student_finish(&logits, labels, guidance.as_ref())?;
        if let Some(teacher) = &self.teacher {
            method::ema_update(teacher.store(), self.student.store(), stats.iter, self.cfg.method.ema_decay)?;
        }
        Ok(stats)
    }

    /// The unlabelled part of a batch.
    pub fn unlabelled(&self, images: &Tensor) -> Tensor {
        let l = self.cfg.labelled_bs;
        images.narrow(0, l, images.size()[0] - l)
    }

    /// The student's forward pass (train mode) on the patches its method trains on.
    pub fn student_forward(&self, images: &Tensor, rnd: &PassRandom) -> Result<Tensor> {
        let inputs = if self.cfg.method.kind == Method::Supervised {
            images.narrow(0, 0, self.cfg.labelled_bs)
        } else {
            images.shallow_clone()
        };
        if let Some(sync) = &self.sync {
            sync.before_forward(self.student.store())?;
        }
        self.student.forward_with(&inputs, true, Dropout::Masks(&rnd.dropout)) // [b, C, X, Y, Z]
    }

    /// The rest of the student's step given its logits and the teacher's guidance: losses,
    /// backward, SGD, counter. The EMA update is the caller's (it may run elsewhere).
    pub fn student_finish(
        &mut self,
        logits: &Tensor,
        labels: &Tensor,
        guidance: Option<&Guidance>,
    ) -> Result<StepStats> {
        let cfg = &self.cfg;
        let (iter, l) = (self.iter, cfg.labelled_bs);
        let sup = losses::supervised_loss(&logits.narrow(0, 0, l), labels);
        let weight = method::consistency_weight(
            iter,
            cfg.method.consistency,
            cfg.method.consistency_interval,
            cfg.method.consistency_rampup,
        );
        let (loss, consistency, mask_fraction, threshold) = match guidance {
            Some(g) => {
                let b = logits.size()[0];
                let dist = losses::softmax_mse(&logits.narrow(0, l, b - l), &g.target);
                let cons = losses::masked_consistency(&dist, &g.mask);
                (&sup.loss + &cons * weight, cons.detach(), g.mask.mean(Kind::Float), g.threshold)
            }
            None => {
                let zero = Tensor::zeros([], (Kind::Float, logits.device()));
                (sup.loss.shallow_clone(), zero.shallow_clone(), zero, f64::INFINITY)
            }
        };
        let lr = method::learning_rate(iter, cfg.optim.base_lr, cfg.optim.lr_step, cfg.optim.lr_gamma);
        Sgd::zero_grad(self.student.store());
        if let Some(sync) = &mut self.sync {
            sync.before_backward()?;
        }
        loss.f_backward()?;
        if let Some(sync) = &mut self.sync {
            // Every rank skips or steps alike: the finiteness check below sees the same means.
            sync.after_backward(self.student.store())?;
        }
        let skipped = cfg.optim.on_nonfinite == NonFinite::Skip && !self.loss_and_grads_finite(&loss)?;
        if !skipped {
            self.opt.step(self.student.store(), lr)?;
        }
        self.iter += 1;
        Ok(StepStats {
            iter,
            loss: loss.detach(),
            supervised: sup.loss.detach(),
            ce: sup.ce.detach(),
            dice: sup.dice.detach(),
            consistency,
            mask_fraction,
            weight: if guidance.is_some() { weight } else { 0.0 },
            threshold,
            lr,
            skipped,
        })
    }

    /// Whether the loss and every gradient are finite (one read-back: a device sync).
    fn loss_and_grads_finite(&self, loss: &Tensor) -> Result<bool> {
        tch::no_grad(|| {
            let mut all = loss.f_isfinite()?.f_all()?;
            for p in self.student.store().trainable() {
                let g = p.tensor.grad();
                if g.defined() {
                    all = all.f_logical_and(&g.f_isfinite()?.f_all()?)?;
                }
            }
            Ok(all.f_int64_value(&[])? == 1)
        })
    }

    /// Whether the ranks agreed to stop after the last step: `None` for a single process, where
    /// the caller's own stop switch decides.
    pub fn stop_agreed(&self) -> Option<bool> {
        self.sync.as_ref().map(|s| s.agreed_stop())
    }

    /// Public form of the batch check, for pipelines that call the halves themselves.
    pub fn check(&self, images: &Tensor, labels: &Tensor) -> Result<()> {
        self.check_batch(images, labels)
    }
}
