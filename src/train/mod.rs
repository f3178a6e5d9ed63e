//! One full sequential UA-MT iteration: the ground truth that the actor pipeline reproduces.
//!
//! The iteration, for a batch of `labelled_bs` labelled patches followed by unlabelled ones:
//! student forward on all patches; teacher forward on the unlabelled patches plus noise (the
//! consistency target); T more noisy teacher passes whose mean softmax's entropy is the
//! uncertainty; supervised loss on the labelled part; masked softmax-MSE consistency on the
//! unlabelled part; backward; SGD; EMA. All randomness (noise, dropout masks) comes in a
//! [`StepRandom`], drawn from a seed and the iteration, so any thread can draw any part of it.

//!
//! - `config`: the `[method]` and `[optim]` sections and [`StepConfig`];
//! - `random`: [`StepRandom`], the step's noise and dropout;
//! - `teacher`: the teacher's passes and the [`Guidance`] they give;
//! - here: the [`Trainer`] and its step.

mod config;
mod random;
mod teacher;

pub use config::*;
pub use random::*;
pub use teacher::*;

use crate::gpu::Precision;
pub use crate::method::Method;
use crate::method::{self, losses, Sgd};
use crate::model::{Dropout, Init, VNet, VNetConfig};
use crate::rng;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

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
