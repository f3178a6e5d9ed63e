//! The step's hyper-parameters: the config file's `[method]` and `[optim]` sections and what one
//! step needs of them ([`StepConfig`]).

use crate::method::Method;
use crate::{check, recipe, Error, Result};

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
