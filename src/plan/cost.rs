//! What a planned run costs in time, before it is measured: the V-Net's convolution arithmetic
//! per patch, per training iteration and per evaluation window, and a time model
//! (`seconds = overhead + flops / throughput`) with stated constants. `uamt plan` measures the
//! planned shapes on the machine when it can and scales this model by what it measured.

use crate::config::Config;
use crate::train::Method;

/// 3x3x3 taps of the V-Net's convolutions.
const TAPS: f64 = 27.0;
/// 2x2x2 taps of its strided down- and transposed up-convolutions.
const RESAMPLE_TAPS: f64 = 8.0;
/// Convolutions per encoder level (the recipe's V-Net, as `footprint.rs` counts them).
const ENCODER_CONVS: [f64; 5] = [1.0, 2.0, 3.0, 3.0, 3.0];
/// Convolutions per decoder level, levels 3, 2, 1, 0.
const DECODER_CONVS: [f64; 4] = [3.0, 3.0, 2.0, 1.0];

/// Multiply-adds counted twice (floating-point operations) of one forward pass of one patch of
/// `patch` voxels through a V-Net of `n_filters` and `n_classes` (convolutions only; BatchNorm,
/// ReLU and the sums are memory-bound and left to the time model's overhead).
pub fn forward_flops(patch: [usize; 3], n_filters: i64, n_classes: i64) -> f64 {
    let v = patch.iter().map(|&s| s as f64).product::<f64>();
    let f = n_filters.max(1) as f64;
    let c = |level: usize| f * (1u64 << level) as f64; // channels at a level
    let vox = |level: usize| v / (8u64.pow(level as u32)) as f64; // voxels at a level
    let mut flops = 0.0;
    for (l, &convs) in ENCODER_CONVS.iter().enumerate() {
        // The first convolution of level 0 reads the one input channel.
        let c_in = if l == 0 { 1.0 } else { c(l) };
        flops += 2.0 * TAPS * c_in * c(l) * vox(l);
        flops += 2.0 * TAPS * c(l) * c(l) * vox(l) * (convs - 1.0);
        if l < 4 {
            flops += 2.0 * RESAMPLE_TAPS * c(l) * c(l + 1) * vox(l + 1);
        }
    }
    for (i, &convs) in DECODER_CONVS.iter().enumerate() {
        let l = 3 - i;
        flops += 2.0 * RESAMPLE_TAPS * c(l + 1) * c(l) * vox(l + 1);
        flops += 2.0 * TAPS * c(l) * c(l) * vox(l) * convs;
    }
    flops + 2.0 * f * n_classes.max(1) as f64 * v
}

/// Patch forwards one training iteration of `cfg` costs: the student's forward and backward on
/// every patch (a backward pass costs about two forwards), and the teacher's forwards on the
/// unlabelled patches (UA-MT: the target pass and the T Monte-Carlo passes; Mean Teacher: the
/// target pass; supervised: none).
pub fn forwards_per_iteration(cfg: &Config) -> f64 {
    let lbs = cfg.data.sampler.labelled_bs as f64;
    let ubs = cfg.unlabelled_bs() as f64;
    let teacher = match cfg.method.kind {
        Method::Uamt => (1 + cfg.method.mc_passes.max(1)) as f64 * ubs,
        Method::MeanTeacher => ubs,
        Method::Supervised => 0.0,
    };
    3.0 * (lbs + ubs) + teacher
}

/// Floating-point operations of one training iteration of `cfg`.
pub fn iteration_flops(cfg: &Config) -> f64 {
    forward_flops(cfg.data.loader.patch, cfg.model.n_filters, cfg.model.n_classes) * forwards_per_iteration(cfg)
}

/// Floating-point operations of one evaluation window of `cfg`.
pub fn window_flops(cfg: &Config) -> f64 {
    forward_flops(cfg.eval.window.patch, cfg.model.n_filters, cfg.model.n_classes)
}

/// `seconds = overhead + flops / flops_per_s`, for training iterations and evaluation windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeModel {
    /// Fixed seconds per iteration (batch loading, the optimiser, small kernels, hand-offs).
    pub overhead_s: f64,
    /// Sustained convolution throughput, floating-point operations per second.
    pub flops_per_s: f64,
    /// Where the constants come from, in words (printed with every estimate).
    pub source: &'static str,
}

/// Effective convolution throughput per core of a CPU at 4 filters: ops/la-cpu's UA-MT iteration
/// (48x48x32, 4 filters, batch 2 + 2, T = 8: 11.4 GFLOP) took 0.85 s on the 2-core development
/// VM (AMD EPYC, release build, alone; README, "The left atrium on a CPU"), 14 GFLOP/s on 2 cores.
pub const CPU_FLOPS_PER_CORE: f64 = 7.0e9;
/// Fixed seconds per iteration on a CPU (the demo's 32x32x16 iteration, 2.5 GFLOP, took 0.19 s).
pub const CPU_OVERHEAD_S: f64 = 0.05;
/// Seconds per UA-MT iteration of the recipe's shapes (112x112x80, 16 filters) on a GPU: the one
/// public re-run of the reference code took about 98 minutes for 6000 (uamt-recipe.md; the GPU
/// unnamed). No GPU has run uamt here: a stated estimate, which `uamt plan` replaces by a
/// measurement on the card when it has one.
pub const CUDA_REFERENCE_ITERATION_S: f64 = 98.0 * 60.0 / 6000.0;
/// Assumed fixed seconds per iteration on a GPU (kernel launches, hand-offs).
pub const CUDA_OVERHEAD_S: f64 = 0.03;

impl TimeModel {
    /// The stated estimate for a CPU of `cores` cores.
    pub fn cpu(cores: usize) -> Self {
        TimeModel {
            overhead_s: CPU_OVERHEAD_S,
            flops_per_s: CPU_FLOPS_PER_CORE * cores.max(1) as f64,
            source: "estimated from ops/la-cpu's measured 0.85 s per 48x48x32 UA-MT iteration on 2 cores",
        }
    }

    /// The stated estimate for a CUDA GPU.
    pub fn cuda() -> Self {
        let recipe = iteration_flops(&Config::default());
        TimeModel {
            overhead_s: CUDA_OVERHEAD_S,
            flops_per_s: recipe / (CUDA_REFERENCE_ITERATION_S - CUDA_OVERHEAD_S),
            source: "estimated from a public re-run of the reference: 6000 iterations of 112x112x80 in 98 min on a GPU",
        }
    }

    /// Seconds per training iteration of `cfg`.
    pub fn iteration_s(&self, cfg: &Config) -> f64 {
        self.overhead_s + iteration_flops(cfg) / self.flops_per_s
    }

    /// Seconds per evaluation window of `cfg` (batches of `eval.batch_size` share the overhead).
    pub fn window_s(&self, cfg: &Config) -> f64 {
        self.overhead_s / cfg.eval.window.batch_size.max(1) as f64 + window_flops(cfg) / self.flops_per_s
    }

    /// This model with its arithmetic slowed (or sped up) so that `cfg`'s iteration takes
    /// `measured_s`: what a measurement of one shape says about the others.
    pub fn calibrated(&self, cfg: &Config, measured_s: f64) -> Self {
        let flops = iteration_flops(cfg);
        let arithmetic = (measured_s - self.overhead_s).max(measured_s * 0.1);
        TimeModel {
            overhead_s: self.overhead_s.min(measured_s * 0.9),
            flops_per_s: flops / arithmetic.max(1e-9),
            source: "scaled to the measured iteration",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_s_network_costs_what_its_convolutions_count() {
        // 16 filters on 112x112x80: the first two levels dominate; about 0.1 TFLOP per forward.
        let f = forward_flops([112, 112, 80], 16, 2);
        assert!((5e10..2e11).contains(&f), "{f:e}");
        // Twice the filters: about four times the arithmetic; twice the voxels: twice.
        let wide = forward_flops([112, 112, 80], 32, 2);
        assert!((3.8..4.1).contains(&(wide / f)), "{}", wide / f);
        let long = forward_flops([112, 112, 160], 16, 2);
        assert!((long / f - 2.0).abs() < 1e-9);
    }

    #[test]
    fn an_iteration_counts_the_student_s_and_the_teacher_s_passes() {
        let mut cfg = Config::default();
        assert_eq!(forwards_per_iteration(&cfg), 3.0 * 4.0 + 9.0 * 2.0);
        cfg.method.kind = Method::MeanTeacher;
        assert_eq!(forwards_per_iteration(&cfg), 12.0 + 2.0);
        cfg.method.kind = Method::Supervised;
        assert_eq!(forwards_per_iteration(&cfg), 3.0 * 2.0);
    }

    #[test]
    fn the_stated_estimates_reproduce_the_timings_they_come_from() {
        // The recipe's shapes on a GPU: 98 minutes for 6000 iterations.
        assert!((TimeModel::cuda().iteration_s(&Config::default()) - 0.98).abs() < 1e-9);
        // ops/la-cpu's UA-MT on 2 cores: 0.85 s per iteration, within 5 %.
        let mut la_cpu = Config::default();
        la_cpu.data.loader.patch = [48, 48, 32];
        la_cpu.model.n_filters = 4;
        let t = TimeModel::cpu(2).iteration_s(&la_cpu);
        assert!((t / 0.85 - 1.0).abs() < 0.05, "{t}");
    }

    #[test]
    fn a_calibrated_model_reproduces_the_measurement_and_scales_with_the_arithmetic() {
        let cfg = Config::demo();
        let m = TimeModel::cpu(2).calibrated(&cfg, 0.8);
        assert!((m.iteration_s(&cfg) - 0.8).abs() < 1e-9);
        let mut bigger = cfg.clone();
        bigger.data.loader.patch[2] *= 2;
        let t = m.iteration_s(&bigger);
        assert!(t > 0.8 && t < 1.6, "{t}");
        // A measurement faster than the overhead alone still gives a positive throughput.
        let fast = TimeModel::cpu(2).calibrated(&cfg, 0.01);
        assert!(fast.flops_per_s > 0.0 && (fast.iteration_s(&cfg) - 0.01).abs() < 1e-9);
    }
}
