//! Sliding-window inference of a whole volume, with the semantics of the UA-MT reference's
//! `test_single_case`:
//!
//! 1. along every axis where the volume is SMALLER than the patch, zero-pad it to the patch size,
//!    `(patch - size) // 2` before and the rest after;
//! 2. `n = ceil((padded - patch) / stride) + 1` windows per axis, window `i` starting at
//!    `min(stride * i, padded - patch)`, visited x outermost, z innermost;
//! 3. the softmax of every window is added into a score map and a count map counts the windows
//!    covering each voxel; score / count is the probability map (with [`Blend::Gaussian`], each
//!    window's softmax is weighted by the importance map and the count is the sum of weights);
//! 4. the padding is cropped away and the argmax over classes is the label map.
//!
//! The model runs in eval mode (BatchNorm running statistics, no dropout) without gradients, so
//! batching the windows ([`InferOptions::batch_size`]) does not change the result. An optional
//! largest-connected-component step ([`largest_component`]) follows; the reference has none.

use super::blend::{self, Blend};
use crate::check::{self, limits};
use crate::data::Volume;
use crate::model::{Dropout, DropoutMasks, VNet};
use crate::rng;
use crate::uncertainty::entropy;
use crate::{recipe, Error, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Neighbourhood that connects foreground voxels into components.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    /// Faces only (6 neighbours).
    #[serde(rename = "6")]
    Six,
    /// Faces, edges and corners (26 neighbours): scikit-image's `label` default in 3-D, the
    /// usual choice of the largest-component step in semi-supervised segmentation code.
    #[serde(rename = "26")]
    TwentySix,
}

impl Connectivity {
    /// The neighbour offsets `(dx, dy, dz)`.
    fn offsets(self) -> Vec<[i64; 3]> {
        let mut v = Vec::with_capacity(26);
        for dz in -1..=1i64 {
            for dy in -1..=1i64 {
                for dx in -1..=1i64 {
                    let n = dx.abs() + dy.abs() + dz.abs();
                    if n == 1 || (n > 1 && self == Connectivity::TwentySix) {
                        v.push([dx, dy, dz]);
                    }
                }
            }
        }
        v
    }
}

impl std::str::FromStr for Connectivity {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "6" => Ok(Connectivity::Six),
            "26" => Ok(Connectivity::TwentySix),
            _ => Err(format!("connectivity must be 6 or 26, got `{s}`")),
        }
    }
}

/// How a volume is segmented: window geometry, batching, blending and post-processing. The
/// window keys of the config file's `[eval]` section (`patch`, `stride`, `batch_size`, `blend`,
/// `largest_component`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferOptions {
    /// Window size `[X, Y, Z]`; every side divisible by 16 (the V-Net's four downsamplings).
    pub patch: [usize; 3],
    /// Step between window starts `[X, Y, Z]` (the reference: 18 in x and y, 4 in z); at most
    /// the window per axis, so that every voxel is covered.
    pub stride: [usize; 3],
    /// Windows per forward pass (results do not depend on it; memory does).
    pub batch_size: usize,
    /// Keep only the largest connected foreground component (off in the reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_component: Option<Connectivity>,
    /// How overlapping windows combine: `constant` (the reference's average) or `gaussian`
    /// (nnU-Net's importance weighting, see [`blend`](super::blend)).
    #[serde(skip_serializing_if = "Blend::is_constant")]
    pub blend: Blend,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions {
            patch: recipe::PATCH,
            stride: recipe::STRIDE,
            batch_size: recipe::INFER_BATCH,
            largest_component: None,
            blend: Blend::Constant,
        }
    }
}

impl InferOptions {
    /// Checks every setting; errors name the key under `prefix` (`eval.stride`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::patch(&k("patch"), self.patch, limits::PATCH_SIDE)?;
        if (0..3).any(|i| self.stride[i] == 0 || self.stride[i] > self.patch[i]) {
            return Err(Error::invalid(
                k("stride"),
                format!("every step must be in 1..={} per axis, got {:?}", k("patch"), self.stride),
            ));
        }
        check::range(&k("batch_size"), self.batch_size, 1, limits::BATCH)
    }
}

/// Zero padding `(before, after)` of an axis of `size` voxels for a window of `patch`: none
/// unless `size < patch`, then `(patch - size) // 2` before and the rest after.
pub fn padding(size: usize, patch: usize) -> (usize, usize) {
    let pad = patch.saturating_sub(size);
    (pad / 2, pad - pad / 2)
}

/// Window starts along an axis of `padded >= patch` voxels: `ceil((padded - patch) / stride) + 1`
/// windows, the `i`-th at `min(stride * i, padded - patch)`.
pub fn window_starts(padded: usize, patch: usize, stride: usize) -> Vec<usize> {
    let last = padded - patch;
    let n = last.div_ceil(stride) + 1;
    (0..n).map(|i| (stride * i).min(last)).collect()
}

/// Where the windows of one volume go.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPlan {
    /// The volume's `[X, Y, Z]`.
    pub dims: [usize; 3],
    /// Padding before the volume along each axis (the rest of `padded - dims` goes after).
    pub pad_before: [usize; 3],
    /// `[X, Y, Z]` after padding.
    pub padded: [usize; 3],
    /// Window starts per axis, in the padded volume.
    pub starts: [Vec<usize>; 3],
}

impl WindowPlan {
    /// The plan for a volume of `dims` under `opts` (assumed validated).
    pub fn new(dims: [usize; 3], opts: &InferOptions) -> Self {
        let pads = [0, 1, 2].map(|a| padding(dims[a], opts.patch[a]));
        let padded = [0, 1, 2].map(|a| dims[a] + pads[a].0 + pads[a].1);
        let starts = [0, 1, 2].map(|a| window_starts(padded[a], opts.patch[a], opts.stride[a]));
        WindowPlan { dims, pad_before: pads.map(|p| p.0), padded, starts }
    }

    /// Every window's start `[x, y, z]`, in the reference's loop order (x outermost).
    pub fn windows(&self) -> Vec<[usize; 3]> {
        let mut v = Vec::with_capacity(self.starts.iter().map(Vec::len).product());
        for &x in &self.starts[0] {
            for &y in &self.starts[1] {
                for &z in &self.starts[2] {
                    v.push([x, y, z]);
                }
            }
        }
        v
    }

    /// How many windows of size `patch` cover each index of axis `a` of the padded volume.
    fn coverage(&self, a: usize, patch: usize) -> Vec<f32> {
        let mut c = vec![0f32; self.padded[a]];
        for &s in &self.starts[a] {
            c[s..s + patch].iter_mut().for_each(|v| *v += 1.0);
        }
        c
    }

    /// The count map `[X, Y, Z]` of the padded volume: windows covering each voxel. The windows
    /// form a grid, so it is the outer product of the per-axis coverages (exact in float32).
    fn count_map(&self, patch: [usize; 3], device: Device) -> Result<Tensor> {
        let axis = |a: usize, shape: [i64; 3]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&self.coverage(a, patch[a]))?.f_view(shape)?)
        };
        let c = axis(0, [-1, 1, 1])?.f_mul(&axis(1, [1, -1, 1])?)?.f_mul(&axis(2, [1, 1, -1])?)?;
        Ok(c.f_to_device(device)?)
    }
}

/// A segmented volume, on the model's device.
#[derive(Debug)]
pub struct Prediction {
    /// Class probabilities `[C, X, Y, Z]` (float32): the softmax averaged over the windows.
    pub probabilities: Tensor,
    /// Labels `[X, Y, Z]` (int64): the argmax over classes, after the optional largest-component step.
    pub labels: Tensor,
}

impl Prediction {
    /// The prediction of averaged class probabilities `[C, X, Y, Z]`: their argmax, then the
    /// optional largest-component step.
    pub fn of(probabilities: Tensor, largest: Option<Connectivity>) -> Result<Self> {
        let mut labels = probabilities.f_argmax(0, false)?;
        if let Some(conn) = largest {
            let kept = largest_component(&Volume::<u8>::from_tensor(&labels)?, conn);
            labels = kept.to_tensor()?.f_to_kind(Kind::Int64)?.f_to_device(probabilities.device())?;
        }
        Ok(Prediction { probabilities, labels })
    }

    /// The foreground probability `[X, Y, Z]` (class 1).
    pub fn foreground(&self) -> Tensor {
        self.probabilities.get(1)
    }

    /// Entropy of the averaged class probabilities `[X, Y, Z]`, `-sum_c p_c ln(p_c + 1e-6)`
    /// (the recipe's uncertainty formula, here of the deterministic sliding-window average).
    pub fn entropy(&self) -> Tensor {
        entropy(&self.probabilities, 0, false)
    }

    /// The labels as a CPU volume.
    pub fn label_volume(&self) -> Result<Volume<u8>> {
        Ok(Volume::from_tensor(&self.labels)?)
    }

    /// The labels in a grid of shape `dims` covering the same field of view: the class
    /// probabilities resampled there (trilinear), their argmax, then the optional
    /// largest-component step. [`Prediction::label_volume`] when `dims` is the prediction's own.
    pub fn labels_in(&self, dims: [usize; 3], largest: Option<Connectivity>) -> Result<Volume<u8>> {
        let own = self.labels.size();
        if own.iter().zip(dims).all(|(&a, b)| a as usize == b) {
            return self.label_volume();
        }
        let classes = self.probabilities.size()[0];
        let probs: Vec<Volume<f32>> =
            (0..classes).map(|c| Volume::<f32>::from_tensor(&self.probabilities.get(c))).collect::<Result<_, _>>()?;
        let (_, labels) = crate::data::preprocessing::labels_in_grid(&probs, dims)?;
        Ok(match largest {
            Some(conn) => largest_component(&labels, conn),
            None => labels,
        })
    }
}

/// Segments `image` (`[X, Y, Z]`, any device, any float kind) with `model` by sliding window.
pub fn sliding_window(model: &VNet, image: &Tensor, opts: &InferOptions) -> Result<Prediction> {
    let classes = model.config().n_classes;
    let probabilities = window_average(&[model], image, opts, classes, &|nets, x, _| deterministic_probs(nets[0], x))?;
    Prediction::of(probabilities, opts.largest_component)
}

/// The class probabilities `[b, C, px, py, pz]` of a batch of windows in eval mode (no dropout).
pub(crate) fn deterministic_probs(model: &VNet, x: &Tensor) -> Result<Tensor> {
    Ok(model.forward_with(x, false, Dropout::Random)?.f_softmax(1, Kind::Float)?)
}

/// How the Monte-Carlo uncertainty of a model is estimated at inference: the recipe's teacher
/// passes (input noise `clamp(N(0, noise_std^2), -noise_clip, noise_clip)` and channel dropout),
/// with BatchNorm in eval mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McOptions {
    /// Passes per window (the recipe's T = 8).
    pub passes: usize,
    /// Standard deviation of the Gaussian input noise (0.1).
    pub noise_std: f64,
    /// The noise is clamped to `[-noise_clip, noise_clip]` (0.2).
    pub noise_clip: f64,
    /// Noise and dropout masks come from the counter-based generator keyed by this seed, the
    /// window's index and the pass: the map does not depend on batching or on other threads.
    pub seed: u64,
}

impl Default for McOptions {
    fn default() -> Self {
        McOptions {
            passes: recipe::MC_PASSES as usize,
            noise_std: recipe::NOISE_STD,
            noise_clip: recipe::NOISE_CLIP,
            seed: 0,
        }
    }
}

impl McOptions {
    /// Checks every setting; errors name the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::range(&k("passes"), self.passes, 1, limits::MC_PASSES as usize)?;
        check::at_least_f(&k("noise_std"), self.noise_std, 0.0)?;
        check::at_least_f(&k("noise_clip"), self.noise_clip, 0.0)
    }
}

/// The Monte-Carlo uncertainty map `[X, Y, Z]` of `model` on `image`: in every window, the mean
/// softmax of `mc.passes` noisy passes with dropout, averaged over overlapping windows like
/// [`sliding_window`]'s probabilities, and the entropy `-sum_c p_c ln(p_c + 1e-6)` of that mean
/// (the recipe's uncertainty, i.e. what UA-MT's teacher would report on this volume).
pub fn mc_uncertainty(model: &VNet, image: &Tensor, opts: &InferOptions, mc: &McOptions) -> Result<Tensor> {
    mc.validate("uncertainty")?;
    let classes = model.config().n_classes;
    let mean = window_average(&[model], image, opts, classes, &|nets, x, first| {
        let mut sum: Option<Tensor> = None;
        for t in 0..mc.passes as u64 {
            let p = mc_pass_probs(nets[0], x, first, t, mc)?;
            sum = Some(match sum {
                None => p,
                Some(s) => s.f_add(&p)?,
            });
        }
        Ok(sum.expect("passes >= 1").f_div_scalar(mc.passes as f64)?)
    })?;
    Ok(entropy(&mean, 0, false))
}

/// The class probabilities `[b, C, px, py, pz]` of Monte-Carlo pass `t` over a batch of windows
/// `x` whose first is window `first` of the plan: input noise and dropout masks drawn from one
/// generator stream per (window, pass), so the numbers do not depend on the batching.
pub(crate) fn mc_pass_probs(model: &VNet, x: &Tensor, first: usize, t: u64, mc: &McOptions) -> Result<Tensor> {
    let b = x.size()[0];
    let device = model.device();
    let per_window = |what: u64, shape: &[i64]| -> Tensor {
        let parts: Vec<Tensor> = (0..b)
            .map(|k| rng::uniform(rng::key(mc.seed, &[what, first as u64 + k as u64, t]), &shape[1..], device))
            .collect();
        Tensor::stack(&parts, 0)
    };
    let noise = {
        let parts: Vec<Tensor> = (0..b)
            .map(|k| rng::normal(rng::key(mc.seed, &[1, first as u64 + k as u64, t]), &x.size()[1..], device))
            .collect();
        (Tensor::f_stack(&parts, 0)? * mc.noise_std).f_clamp(-mc.noise_clip, mc.noise_clip)?
    };
    let mut mask_no = 1u64;
    let masks = DropoutMasks::draw(model.config(), b, |shape| {
        mask_no += 1;
        per_window(mask_no, shape)
    });
    Ok(model.forward_mc(&x.f_add(&noise)?, &masks)?.f_softmax(1, Kind::Float)?)
}

/// Per-window maps: `probs(nets, x, first)` maps a batch of windows `[b, 1, px, py, pz]` (`first`:
/// the index of its first window in the plan's order) to `[b, channels, px, py, pz]` (class
/// probabilities, or anything else averaged the same way) with `nets` (the models given to
/// [`window_average`], or eval views of them on a worker thread).
pub(crate) type WindowProbs<'a> = dyn Fn(&[&VNet], &Tensor, usize) -> Result<Tensor> + Sync + 'a;

/// How the windows of one volume are computed on the CPU: `workers` threads at once, each running
/// its own windows with `threads` intra-op threads (one window per pass each with two workers of
/// one thread on a 2-core machine), or the calling thread alone (`workers == 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowWorkers {
    /// Threads computing windows at once.
    pub workers: usize,
    /// libtorch intra-op threads of each.
    pub threads: usize,
    /// Windows per forward pass of each.
    pub batch: usize,
}

impl WindowWorkers {
    /// The split for `windows` windows of a batch of `batch` on `device` with the calling
    /// thread's `threads` intra-op threads: on the CPU, as many workers as threads, at most one
    /// per window of a batch (so that no more windows are in memory at once than a batch of the
    /// calling thread would hold) and at most one per window; the batch shared among them.
    /// One worker (the calling thread, as it is) on a GPU or with one thread. The environment
    /// variable `UAMT_INFER_WORKERS`, where set to a number, caps the workers (1: the calling
    /// thread alone, with all its threads).
    pub fn new(device: Device, threads: usize, batch: usize, windows: usize) -> Self {
        let most = std::env::var("UAMT_INFER_WORKERS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(usize::MAX);
        let workers = threads.min(batch).min(windows).min(most).max(1);
        if device != Device::Cpu || workers < 2 {
            return WindowWorkers { workers: 1, threads, batch };
        }
        WindowWorkers { workers, threads: (threads / workers).max(1), batch: (batch / workers).max(1) }
    }
}

/// The sliding-window average of per-window maps ([`WindowProbs`]) of `models` (at least one; the
/// first one's device). Returns `[channels, X, Y, Z]`, padding cropped away. On the CPU the windows are computed by several threads at once
/// ([`WindowWorkers`]): one single-threaded pass per core keeps every core busy where one pass on
/// all cores waits at the many synchronisation points of its kernels. The score volume is summed
/// in the plan's window order whatever thread computed a window, so the result does not depend
/// on the split or on timing.
pub(crate) fn window_average(
    models: &[&VNet],
    image: &Tensor,
    opts: &InferOptions,
    channels: i64,
    probs: &WindowProbs<'_>,
) -> Result<Tensor> {
    let model = *models.first().ok_or_else(|| Error::invalid("inference", "no model"))?;
    opts.validate("")?;
    let size = image.size();
    let dims = match size.as_slice() {
        &[x, y, z] if x > 0 && y > 0 && z > 0 => [x as usize, y as usize, z as usize],
        _ => return Err(Error::shape("image", "[X, Y, Z] with every side positive", size)),
    };
    let plan = WindowPlan::new(dims, opts);
    let device = model.device();
    let [px, py, pz] = opts.patch.map(|p| p as i64);
    let i64s = |v: [usize; 3]| v.map(|s| s as i64);
    let (d, before, padded) = (i64s(dims), i64s(plan.pad_before), i64s(plan.padded));
    tch::no_grad(|| -> Result<Tensor> {
        let img = image.f_to_device(device)?.f_to_kind(Kind::Float)?;
        let img = if plan.padded == dims {
            img
        } else {
            let p = Tensor::f_zeros(padded, (Kind::Float, device))?;
            p.f_narrow(0, before[0], d[0])?
                .f_narrow(1, before[1], d[1])?
                .f_narrow(2, before[2], d[2])?
                .f_copy_(&img)?;
            p
        };
        let weight = blend::window_weight(opts.blend, opts.patch, device)?;
        let mut score = Tensor::f_zeros([channels, padded[0], padded[1], padded[2]], (Kind::Float, device))?;
        let window = |t: &Tensor, dim0: i64, s: &[usize; 3]| -> Result<Tensor> {
            Ok(t.f_narrow(dim0, s[0] as i64, px)?.f_narrow(dim0 + 1, s[1] as i64, py)?.f_narrow(
                dim0 + 2,
                s[2] as i64,
                pz,
            )?)
        };
        let windows = plan.windows();
        let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
        let split = WindowWorkers::new(device, threads, opts.batch_size, windows.len());
        let chunks: Vec<&[[usize; 3]]> = windows.chunks(split.batch).collect();
        let batch_input = |img: &Tensor, chunk: &[[usize; 3]]| -> Result<Tensor> {
            let patches = chunk.iter().map(|s| window(img, 0, s)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::f_stack(&patches, 0)?.f_unsqueeze(1)?) // [b, 1, px, py, pz]
        };
        let add = |chunk: &[[usize; 3]], y: &Tensor| -> Result<()> {
            let y = match &weight {
                Some(w) => y.f_mul(w)?, // [px, py, pz] broadcast
                None => y.shallow_clone(),
            };
            for (k, s) in chunk.iter().enumerate() {
                let _ = window(&score, 1, s)?.f_add_(&y.f_get(k as i64)?)?; // y: [b, C, px, py, pz]
            }
            Ok(())
        };
        if split.workers == 1 {
            for (n, chunk) in chunks.iter().enumerate() {
                add(chunk, &probs(models, &batch_input(&img, chunk)?, n * split.batch)?)?;
            }
        } else {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let failed = std::sync::atomic::AtomicBool::new(false);
            let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, Result<Tensor>)>();
            let before = tch::get_num_threads();
            let summed = std::thread::scope(|scope| -> Result<()> {
                let done_rx = done_rx; // dropped on an early return: the workers' sends then fail
                for _ in 0..split.workers {
                    let views: Vec<VNet> = models.iter().map(|m| m.eval_view()).collect();
                    let (img, done) = (img.shallow_clone(), done_tx.clone());
                    let (next, failed, chunks) = (&next, &failed, &chunks);
                    scope.spawn(move || {
                        tch::set_num_threads(split.threads as i32);
                        let nets: Vec<&VNet> = views.iter().collect();
                        tch::no_grad(|| loop {
                            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if n >= chunks.len() || failed.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            let y = batch_input(&img, chunks[n]).and_then(|x| probs(&nets, &x, n * split.batch));
                            if done.send((n, y)).is_err() {
                                break;
                            }
                        })
                    });
                }
                drop(done_tx);
                // The calling thread sums, in window order, on one thread (the cores are busy).
                tch::set_num_threads(1);
                let mut waiting = std::collections::BTreeMap::new();
                let mut due = 0;
                for (n, y) in done_rx.iter() {
                    let stop = |e| {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        e
                    };
                    waiting.insert(n, y.map_err(stop)?);
                    while let Some(y) = waiting.remove(&due) {
                        add(chunks[due], &y).map_err(stop)?;
                        due += 1;
                    }
                }
                if due != chunks.len() {
                    return Err(Error::invalid("inference", format!("{} of {} window batches ran", due, chunks.len())));
                }
                Ok(())
            });
            tch::set_num_threads(before);
            summed?;
        }
        // In place: the score volume becomes the probabilities (no second volume of them).
        let count = match &weight {
            Some(w) => blend::weight_sum(&windows, plan.padded, w)?,
            None => plan.count_map(opts.patch, device)?,
        };
        let _ = score.f_div_(&count.f_unsqueeze(0)?)?;
        if plan.padded == dims {
            return Ok(score);
        }
        Ok(score
            .f_narrow(1, before[0], d[0])?
            .f_narrow(2, before[1], d[1])?
            .f_narrow(3, before[2], d[2])?
            .f_contiguous()?)
    })
}

/// Keeps the largest connected component of the foreground (non-zero labels) under `conn` and
/// sets every other voxel to 0. Ties go to the component met first in scan order (x fastest).
pub fn largest_component(labels: &Volume<u8>, conn: Connectivity) -> Volume<u8> {
    let [nx, ny, nz] = labels.dims;
    let offsets = conn.offsets();
    let mut comp = vec![0u32; labels.data.len()];
    let (mut best, mut best_size, mut next) = (0u32, 0usize, 0u32);
    let mut stack = Vec::new();
    for seed in 0..labels.data.len() {
        if labels.data[seed] == 0 || comp[seed] != 0 {
            continue;
        }
        next += 1;
        comp[seed] = next;
        stack.push(seed);
        let mut size = 0usize;
        while let Some(i) = stack.pop() {
            size += 1;
            let p = [(i % nx) as i64, ((i / nx) % ny) as i64, (i / (nx * ny)) as i64];
            for o in &offsets {
                let q = [p[0] + o[0], p[1] + o[1], p[2] + o[2]];
                if q[0] < 0 || q[1] < 0 || q[2] < 0 || q[0] >= nx as i64 || q[1] >= ny as i64 || q[2] >= nz as i64 {
                    continue;
                }
                let j = q[0] as usize + nx * (q[1] as usize + ny * q[2] as usize);
                if labels.data[j] != 0 && comp[j] == 0 {
                    comp[j] = next;
                    stack.push(j);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    let data = labels.data.iter().zip(&comp).map(|(&l, &c)| if c == best && best != 0 { l } else { 0 }).collect();
    Volume { dims: labels.dims, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_pad_only_axes_smaller_than_the_patch() {
        assert_eq!(padding(100, 112), (6, 6));
        assert_eq!(padding(101, 112), (5, 6));
        assert_eq!(padding(112, 112), (0, 0));
        assert_eq!(padding(130, 112), (0, 0));
    }

    #[test]
    fn should_place_windows_like_the_reference() {
        // ceil((130 - 112) / 18) + 1 = 2 windows: 0 and 18.
        assert_eq!(window_starts(130, 112, 18), vec![0, 18]);
        // ceil(19 / 18) + 1 = 3: 0, 18, min(36, 19) = 19.
        assert_eq!(window_starts(131, 112, 18), vec![0, 18, 19]);
        assert_eq!(window_starts(112, 112, 18), vec![0]);
    }

    #[test]
    fn window_workers_share_the_cores_and_the_batch_on_a_cpu_only() {
        let w = |threads, batch, windows| WindowWorkers::new(Device::Cpu, threads, batch, windows);
        assert_eq!(w(2, 4, 24), WindowWorkers { workers: 2, threads: 1, batch: 2 });
        // No more windows in memory at once than one batch: at most `batch` workers.
        assert_eq!(w(16, 4, 24), WindowWorkers { workers: 4, threads: 4, batch: 1 });
        assert_eq!(w(8, 2, 24), WindowWorkers { workers: 2, threads: 4, batch: 1 });
        // One thread, one window per batch, or one window: the calling thread alone.
        assert_eq!(w(1, 4, 24).workers, 1);
        assert_eq!(w(2, 1, 24).workers, 1);
        assert_eq!(w(2, 4, 1).workers, 1);
        assert_eq!(WindowWorkers::new(Device::Cuda(0), 8, 4, 24).workers, 1);
    }

    #[test]
    fn windows_on_several_workers_sum_to_the_calling_thread_s_result_bit_for_bit() {
        // With one intra-op thread the calling thread runs every window itself; with two, two
        // workers of one thread each run them: every window is computed alike and the score is
        // summed in the same order, so probabilities and labels are the same bits. Monte-Carlo
        // maps too (their noise is keyed by the window, not the thread).
        let cfg = crate::model::VNetConfig { n_filters: 4, ..Default::default() };
        tch::manual_seed(3);
        let model = VNet::new(&cfg, Device::Cpu).unwrap().folded_for_inference();
        let teacher = VNet::new(&cfg, Device::Cpu).unwrap();
        let image = Tensor::randn([40, 36, 20], (Kind::Float, Device::Cpu));
        let opts = InferOptions { patch: [32, 32, 16], stride: [4, 4, 2], batch_size: 4, ..Default::default() };
        let mc = McOptions { passes: 2, ..Default::default() };
        let run = |threads: i32| {
            let before = tch::get_num_threads();
            tch::set_num_threads(threads);
            let p = sliding_window(&model, &image, &opts).unwrap();
            let u = mc_uncertainty(&teacher, &image, &opts, &mc).unwrap();
            tch::set_num_threads(before);
            (p, u)
        };
        assert_eq!(WindowWorkers::new(Device::Cpu, 2, 4, 12).workers, 2, "the second run splits");
        let ((one, u1), (two, u2)) = (run(1), run(2));
        assert!(one.probabilities.equal(&two.probabilities), "probabilities differ");
        assert!(one.labels.equal(&two.labels), "labels differ");
        assert!(u1.equal(&u2), "Monte-Carlo maps differ");
        let sum = one.probabilities.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        assert!(sum.allclose(&Tensor::ones_like(&sum), 1e-5, 1e-6, false), "a probability map");
    }
}
