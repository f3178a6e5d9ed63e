//! How much memory a configuration needs, estimated before anything is allocated, so that a
//! config that cannot fit is refused at start with the amount it needs instead of dying in the
//! allocator (or in the kernel's OOM killer) minutes later.
//!
//! The estimate walks the V-Net the recipe defines (encoder levels of 1, 2, 3, 3, 3 convolutions
//! with 1, 2, 4, 8, 16 x `n_filters` channels, each level a factor of 8 fewer voxels; a decoder of
//! 3, 3, 2, 1 convolutions) and counts, per patch, the float tensors autograd keeps for the
//! backward pass (a convolution's output, its normalisation's output and its ReLU's output;
//! residual sums, up/down-sampling, dropout masks), plus the gradients that live at once during
//! the backward pass. The teacher's Monte-Carlo forwards keep no graph: their peak is a few
//! full-resolution tensors and the encoder's skip connections per patch, plus the stacked
//! predictions. Parameters count four times (weights, gradients, momentum, the teacher's copy).
//! Queued batches and the evaluator's sliding window are added; libtorch's own code and buffers
//! are a fixed allowance. It is an upper-side estimate: `tests` checks it against the peak
//! resident memory of a real run.

use crate::config::Config;
use crate::train::Method;

/// Bytes of one float32.
const F32: u64 = 4;
pub use crate::memory::RUNTIME_BYTES;

/// Convolutions per encoder level (the recipe's V-Net).
const ENCODER_CONVS: [u64; 5] = [1, 2, 3, 3, 3];
/// Convolutions per decoder level, from the deepest up (levels 3, 2, 1, 0).
const DECODER_CONVS: [u64; 4] = [3, 3, 2, 1];

/// One part of the estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// What it is, in words a user recognises.
    pub what: String,
    /// Bytes.
    pub bytes: u64,
}

/// The memory a configuration needs, by part.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// The parts, biggest first.
    pub parts: Vec<Part>,
}

/// Floats autograd keeps per voxel of a training patch, in units of `n_filters` (saturating).
fn activations_per_voxel_per_filter() -> f64 {
    // Per convolution: its output, the normalisation's output, the ReLU's output.
    let per_conv = 3.0;
    let mut units = 0.0;
    for (level, &convs) in ENCODER_CONVS.iter().enumerate() {
        let scale = (2f64).powi(level as i32) / (8f64).powi(level as i32); // channels x voxels
        units += scale * (per_conv * convs as f64 + 1.0); // + the residual sum
        if level < 4 {
            let down = (2f64).powi(level as i32 + 1) / (8f64).powi(level as i32 + 1);
            units += per_conv * down; // strided convolution, normalisation, ReLU
        }
    }
    for (i, &convs) in DECODER_CONVS.iter().enumerate() {
        let level = 3 - i as i32;
        let scale = (2f64).powi(level) / (8f64).powi(level);
        units += scale * (per_conv + 1.0); // transposed convolution block + the skip sum
        units += scale * per_conv * convs as f64;
    }
    // Dropout at the bottom and before the output: a mask and an output each.
    units += 2.0 * (16.0 / 4096.0) + 2.0;
    // The backward pass holds the gradient of the current tensor and of its input at once, at the
    // widest level: two more full-resolution tensors.
    units + 2.0
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Footprint {
    /// The estimate for `cfg` (its shapes as validated; saturating arithmetic, never a panic).
    pub fn of(cfg: &Config) -> Self {
        let [x, y, z] = cfg.data.loader.patch;
        let voxels = (x as u64).saturating_mul(y as u64).saturating_mul(z as u64);
        let f = cfg.model.n_filters.max(1) as u64;
        let classes = cfg.model.n_classes.max(1) as u64;
        let lbs = cfg.data.sampler.labelled_bs as u64;
        let ubs = cfg.unlabelled_bs() as u64;
        let batch = lbs + ubs;
        let patch_desc = format!("{x}x{y}x{z}");
        let mut parts = Vec::new();

        let per_patch =
            (activations_per_voxel_per_filter() * (f * voxels) as f64 + (classes * voxels * 3) as f64) as u64;
        parts.push(Part {
            what: format!("student activations ({batch} patches of {patch_desc}, {f} filters)"),
            bytes: per_patch.saturating_mul(batch).saturating_mul(F32),
        });

        if cfg.method.kind != Method::Supervised {
            let repeats = cfg.method.mc_repeats.max(1) as u64;
            let passes = cfg.method.mc_passes.max(1) as u64;
            let forwards = if cfg.method.kind == Method::Uamt { passes / repeats.max(1) } else { 1 }.max(1);
            let per_forward = if cfg.method.mc_batched && cfg.method.kind == Method::Uamt { forwards } else { 1 };
            let teacher_batch = ubs * if cfg.method.kind == Method::Uamt { repeats } else { 1 } * per_forward;
            // Passes run side by side (`device.pass_workers`) each hold their own.
            let at_once = if cfg.method.mc_batched {
                1
            } else {
                cfg.device.pass_workers(false).workers.min(1 + forwards as usize)
            } as u64;
            let teacher_batch = teacher_batch * at_once;
            // Forward only: input, output and normalisation scratch at full resolution, plus the
            // skip connections kept for the decoder (1 + 2/8 + 4/64 + 8/512 of f channels).
            let live = (5.3 * (f * voxels) as f64) as u64;
            let preds = if cfg.method.kind == Method::Uamt { passes * ubs * classes * voxels } else { 0 };
            parts.push(Part {
                what: format!("teacher passes ({teacher_batch} patches per forward)"),
                bytes: (live.saturating_mul(teacher_batch).saturating_add(preds)).saturating_mul(F32),
            });
        }

        let p = crate::model::VNet::parameter_count(&cfg.model);
        let copies = if cfg.method.kind == Method::Supervised { 3 } else { 4 };
        parts.push(Part {
            what: format!(
                "parameters ({p} x {copies}: weights, gradients, momentum{})",
                if copies == 4 { ", teacher" } else { "" }
            ),
            bytes: p.saturating_mul(copies).saturating_mul(F32),
        });

        // Batches waiting in the queues (the loader's and the pipeline's): image + label per patch.
        let queued = (cfg.queues.batches + cfg.queues.loader_workers + 2) as u64;
        parts.push(Part {
            what: format!("queued batches ({queued} of {batch} patches)"),
            bytes: queued.saturating_mul(batch).saturating_mul(voxels).saturating_mul(F32 + 8),
        });

        if cfg.eval.every > 0 || !cfg.eval.watch_dir.as_os_str().is_empty() {
            let [ex, ey, ez] = cfg.eval.window.patch;
            let ev = (ex as u64).saturating_mul(ey as u64).saturating_mul(ez as u64);
            let eb = cfg.eval.window.batch_size.max(1) as u64;
            parts.push(Part {
                what: format!("evaluation window ({eb} of {ex}x{ey}x{ez})"),
                bytes: ((5.3 * (f * ev) as f64) as u64).saturating_mul(eb).saturating_mul(F32),
            });
        }
        parts.push(Part { what: "libtorch and the daemon".into(), bytes: RUNTIME_BYTES });
        parts.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        Footprint { parts }
    }

    /// The whole estimate in bytes.
    pub fn total(&self) -> u64 {
        self.parts.iter().fold(0u64, |s, p| s.saturating_add(p.bytes))
    }

    /// "about 3.2 GiB: student activations (...) 2.1 GiB, ..." (the three biggest parts).
    pub fn describe(&self) -> String {
        let top: Vec<String> = self.parts.iter().take(3).map(|p| format!("{} {}", p.what, gib(p.bytes))).collect();
        format!("about {} ({})", gib(self.total()), top.join(", "))
    }

    /// `Err` (naming the keys to change) when the estimate exceeds `available` bytes.
    pub fn check(&self, available: u64, where_: &str) -> crate::Result<()> {
        if self.total() <= available {
            return Ok(());
        }
        Err(crate::Error::invalid(
            "data.patch",
            format!(
                "this configuration needs {} but {where_} has {} available; reduce data.patch, model.n_filters, \
                 data.labelled_bs / data.unlabelled_bs or queues.batches",
                self.describe(),
                gib(available)
            ),
        ))
    }
}

/// The peak memory of segmenting one volume by sliding window (`predict`, `eval`): the windows'
/// activations (`batch` windows of `patch`, forward only, as the evaluation window above), and the
/// volume-sized buffers: the input image, its copy on the network's grid (padded to the patch),
/// the class probabilities and window counts accumulated there, the probabilities and label map
/// back on the input's grid, the probability and uncertainty maps, the Monte-Carlo accumulators,
/// and what the calibration metrics sort (4 bytes and a flag per voxel: one more map).
pub fn inference_bytes(
    n_filters: i64,
    n_classes: i64,
    patch: [usize; 3],
    batch: usize,
    input_dims: [usize; 3],
    network_dims: [usize; 3],
    mc_passes: usize,
) -> u64 {
    let prod = |d: [usize; 3]| d.iter().fold(1u64, |p, &v| p.saturating_mul(v as u64));
    let padded = [0, 1, 2].map(|a| network_dims[a].max(patch[a]));
    let (window, grid, input) = (prod(patch), prod(padded), prod(input_dims));
    let f = n_filters.max(1) as u64;
    let c = n_classes.max(1) as u64;
    let activations = ((5.3 * (f.saturating_mul(window)) as f64) as u64)
        .saturating_add(2 * c * window)
        .saturating_mul(batch.max(1) as u64);
    let mc = if mc_passes > 0 { 2 + c } else { 0 };
    let on_grid = grid.saturating_mul(1 + c + 1 + mc);
    let on_input = input.saturating_mul(1 + c + 4);
    activations.saturating_add(on_grid).saturating_add(on_input).saturating_mul(F32).saturating_add(RUNTIME_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_s_full_protocol_needs_gigabytes_and_a_tiny_one_little() {
        let full = Footprint::of(&Config::default());
        let total = full.total() as f64 / (1u64 << 30) as f64;
        // 4 patches of 112x112x80 with 16 filters: the published runs used an 11 GB GPU.
        assert!((3.0..11.0).contains(&total), "{}", full.describe());
        let demo = Footprint::of(&Config::demo());
        assert!(demo.total() - RUNTIME_BYTES < 1 << 30, "{}", demo.describe());
        assert!(demo.total() >= RUNTIME_BYTES);
    }

    #[test]
    fn an_impossible_config_is_refused_naming_what_to_change() {
        let mut cfg = Config::default();
        cfg.data.loader.patch = [1024, 1024, 1024];
        cfg.model.n_filters = 256;
        let f = Footprint::of(&cfg);
        let err = f.check(24 << 30, "this machine").unwrap_err().to_string();
        assert!(err.contains("data.patch") && err.contains("model.n_filters"), "{err}");
        assert!(err.contains("needs about") && err.contains("GiB"), "{err}");
        assert!(f.check(u64::MAX, "a big machine").is_ok());
    }

    #[test]
    fn more_filters_or_bigger_patches_need_more() {
        let base = Config::default();
        let mut wider = base.clone();
        wider.model.n_filters *= 2;
        let mut bigger = base.clone();
        bigger.data.loader.patch[2] *= 2;
        let t = Footprint::of(&base).total();
        assert!(Footprint::of(&wider).total() > t && Footprint::of(&bigger).total() > t);
    }

    #[test]
    fn the_parameter_count_is_the_built_model_s() {
        for (nf, classes, norm) in
            [(4, 2, crate::model::Normalization::Batchnorm), (6, 3, crate::model::Normalization::None)]
        {
            let config = crate::model::VNetConfig {
                n_filters: nf,
                n_classes: classes,
                normalization: norm,
                ..Default::default()
            };
            let model = crate::model::VNet::new(&config, tch::Device::Cpu).unwrap();
            assert_eq!(
                crate::model::VNet::parameter_count(&config),
                model.store().num_trainable() as u64,
                "{config:?}"
            );
        }
    }

    #[test]
    fn inference_grows_with_the_window_and_the_volume() {
        let base = inference_bytes(16, 2, [112, 112, 80], 4, [176, 132, 88], [176, 132, 88], 0);
        assert!(base > RUNTIME_BYTES && base < RUNTIME_BYTES + (8u64 << 30), "{base}");
        assert!(inference_bytes(16, 2, [112, 112, 80], 8, [176, 132, 88], [176, 132, 88], 0) > base);
        assert!(inference_bytes(16, 2, [112, 112, 80], 4, [176, 132, 88], [176, 132, 88], 8) > base);
        // A huge window on a small image: the padded grid and the activations dominate.
        let huge = inference_bytes(16, 2, [1024, 1024, 1024], 4, [40, 40, 24], [40, 40, 24], 0);
        assert!(huge > 1u64 << 40, "{huge}");
    }
}
