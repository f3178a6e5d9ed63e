//! The teacher's side of a step: its noisy passes (run side by side on a CPU), the Monte-Carlo
//! uncertainty and the consistency mask the student is given ([`Guidance`]).

use super::config::StepConfig;
use super::random::PassRandom;
use crate::method;
use crate::method::Method;
use crate::model::{Dropout, DropoutMasks, VNet};
use crate::{Error, Result};
use tch::{Kind, Tensor};

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
