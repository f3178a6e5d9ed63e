//! V-Net as UA-MT uses it (Milletari et al. 2016, in the form of the reference `vnet.py`):
//! five encoder levels of 1, 2, 3, 3, 3 conv -> BatchNorm -> ReLU units, strided 2x2x2 convs
//! between them, a decoder of transposed convs whose outputs are ADDED to the skips, one
//! Dropout3d on the bottleneck (x5) and on the last decoder features (x9), and a 1x1x1 output conv.
//!
//! Tensor names equal the reference module's `state_dict` keys (`block_one.conv.0.weight`, ...),
//! so weights exported from PyTorch load directly.

use super::layers::{channels_last_input, BatchNorm, Block, BlockKind, Bn, Conv, Initializer};
pub use super::layers::{Init, Normalization};
use super::params::ParamStore;
use crate::{check, recipe, Error, Result};
use tch::{Device, Kind, Tensor};

/// The shape of a V-Net: the config file's `[model]` section.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VNetConfig {
    /// Input channels (1 for MRI).
    pub n_channels: i64,
    /// Output classes (2: background, left atrium).
    pub n_classes: i64,
    /// Channels at the first level; doubled at each of the four downsamplings.
    pub n_filters: i64,
    /// Normalisation after each convolution (`batchnorm` or `none`).
    pub normalization: Normalization,
    /// Dropout3d probability of zeroing a channel of x5 and x9 in training mode (0: no dropout).
    pub dropout_p: f64,
}

impl Default for VNetConfig {
    fn default() -> Self {
        VNetConfig {
            n_channels: recipe::N_CHANNELS,
            n_classes: recipe::N_CLASSES,
            n_filters: recipe::N_FILTERS,
            normalization: Normalization::Batchnorm,
            dropout_p: recipe::DROPOUT_P,
        }
    }
}

impl VNetConfig {
    /// Whether Dropout3d is applied to x5 and x9 in training mode (`dropout_p > 0`).
    pub fn has_dropout(&self) -> bool {
        self.dropout_p > 0.0
    }

    /// Checks every value; errors name the key under `prefix` (`model.n_filters`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::range(&k("n_channels"), self.n_channels, 1, check::limits::N_CHANNELS)?;
        check::range(&k("n_classes"), self.n_classes, 2, check::limits::N_CLASSES)?;
        check::range(&k("n_filters"), self.n_filters, 1, check::limits::N_FILTERS)?;
        check::finite(&k("dropout_p"), self.dropout_p)?;
        if !(0.0..1.0).contains(&self.dropout_p) {
            return Err(Error::invalid(k("dropout_p"), format!("must be in [0, 1), got {}", self.dropout_p)));
        }
        Ok(())
    }
}

/// Channel-dropout masks for one forward pass, already scaled (each entry is 0 or 1/(1-p)).
#[derive(Debug)]
pub struct DropoutMasks {
    /// `[batch, 16 * n_filters, 1, 1, 1]`, applied to the bottleneck.
    pub x5: Tensor,
    /// `[batch, n_filters, 1, 1, 1]`, applied to the last decoder features.
    pub x9: Tensor,
}

impl DropoutMasks {
    /// Fresh masks for a batch of `n` of a net shaped by `config`, from `uniform(shape) -> U[0, 1)`.
    pub fn draw(config: &VNetConfig, n: i64, mut uniform: impl FnMut(&[i64]) -> Tensor) -> Self {
        let keep = 1.0 - config.dropout_p;
        let mut mask = |c: i64| uniform(&[n, c, 1, 1, 1]).lt(keep).to_kind(Kind::Float) / keep;
        let x5 = mask(16 * config.n_filters);
        let x9 = mask(config.n_filters);
        DropoutMasks { x5, x9 }
    }
}

/// The batch statistics (mean, unbiased variance) of one training-mode pass, per BatchNorm layer.
#[derive(Debug)]
pub struct PassStatistics(Vec<(Tensor, Tensor)>);

/// Where a training-mode forward pass takes its dropout from.
#[derive(Debug, Clone, Copy)]
pub enum Dropout<'a> {
    /// Drawn from libtorch's global generator (as `nn.Dropout3d` does).
    Random,
    /// Given explicitly: reproducible whichever thread runs the pass.
    Masks(&'a DropoutMasks),
}

/// The V-Net. Owns its [`ParamStore`]; layers hold shallow clones of the store's tensors.
#[derive(Debug)]
pub struct VNet {
    config: VNetConfig,
    store: ParamStore,
    enc: [Block; 5],
    down: [Block; 4],
    up: [Block; 4],
    dec: [Block; 4],
    out_conv: Conv,
    /// Run forward passes under bfloat16 autocast (logits come back as float32).
    bf16: bool,
    /// Run the convolutions channels-last (see [`VNet::set_channels_last`]).
    channels_last: bool,
    /// BatchNorm folded into the convolutions: eval-mode passes only
    /// ([`VNet::folded_for_inference`]).
    folded: bool,
}

impl VNet {
    /// Builds a V-Net on `device`, initialised from libtorch's global generator as PyTorch's
    /// default initialisation does (seed it with `tch::manual_seed` for a reproducible start).
    pub fn new(config: &VNetConfig, device: Device) -> Result<Self> {
        Self::with_init(config, device, Init::Global)
    }

    /// Builds a V-Net with PyTorch's default initialisation drawn as `init` says.
    pub fn with_init(config: &VNetConfig, device: Device, init: Init) -> Result<Self> {
        config.validate("model")?;
        let mut s = ParamStore::new(device);
        let mut init = Initializer { init, drawn: 0 };
        let (nf, norm) = (config.n_filters, config.normalization);
        let mut b = |s: &mut ParamStore, name: &str, kind, i, o| Block::new(s, &mut init, name, kind, i, o, norm);
        // Registration order equals the reference module's, so `.parameters()` orders agree.
        let e1 = b(&mut s, "block_one", BlockKind::Conv(1), config.n_channels, nf);
        let d1 = b(&mut s, "block_one_dw", BlockKind::Down, nf, 2 * nf);
        let e2 = b(&mut s, "block_two", BlockKind::Conv(2), 2 * nf, 2 * nf);
        let d2 = b(&mut s, "block_two_dw", BlockKind::Down, 2 * nf, 4 * nf);
        let e3 = b(&mut s, "block_three", BlockKind::Conv(3), 4 * nf, 4 * nf);
        let d3 = b(&mut s, "block_three_dw", BlockKind::Down, 4 * nf, 8 * nf);
        let e4 = b(&mut s, "block_four", BlockKind::Conv(3), 8 * nf, 8 * nf);
        let d4 = b(&mut s, "block_four_dw", BlockKind::Down, 8 * nf, 16 * nf);
        let e5 = b(&mut s, "block_five", BlockKind::Conv(3), 16 * nf, 16 * nf);
        let u5 = b(&mut s, "block_five_up", BlockKind::Up, 16 * nf, 8 * nf);
        let c6 = b(&mut s, "block_six", BlockKind::Conv(3), 8 * nf, 8 * nf);
        let u6 = b(&mut s, "block_six_up", BlockKind::Up, 8 * nf, 4 * nf);
        let c7 = b(&mut s, "block_seven", BlockKind::Conv(3), 4 * nf, 4 * nf);
        let u7 = b(&mut s, "block_seven_up", BlockKind::Up, 4 * nf, 2 * nf);
        let c8 = b(&mut s, "block_eight", BlockKind::Conv(2), 2 * nf, 2 * nf);
        let u8 = b(&mut s, "block_eight_up", BlockKind::Up, 2 * nf, nf);
        let c9 = b(&mut s, "block_nine", BlockKind::Conv(1), nf, nf);
        let out_conv = Conv::new(&mut s, &mut init, "out_conv", nf, config.n_classes, 1, 1, 0, false);
        Ok(VNet {
            config: config.clone(),
            store: s,
            enc: [e1, e2, e3, e4, e5],
            down: [d1, d2, d3, d4],
            up: [u5, u6, u7, u8],
            dec: [c6, c7, c8, c9],
            out_conv,
            bf16: false,
            channels_last: false,
            folded: false,
        })
    }

    /// The number of trainable parameters a V-Net of `config` has, computed without building it
    /// (for the memory estimate of a config that may be too big to build). Saturating.
    pub fn parameter_count(config: &VNetConfig) -> u64 {
        let nf = config.n_filters.max(0) as u64;
        let norm = if config.normalization == Normalization::Batchnorm { 2 } else { 0 };
        // (convs, c_in, c_out, kernel volume) per block, in registration order.
        let conv = |n: u64, c_in: u64, c_out: u64, k: u64| {
            let first = c_in.saturating_mul(c_out).saturating_mul(k) + c_out + norm * c_out;
            let rest = c_out.saturating_mul(c_out).saturating_mul(k) + c_out + norm * c_out;
            first.saturating_add((n.saturating_sub(1)).saturating_mul(rest))
        };
        let c = config.n_channels.max(0) as u64;
        let blocks = [
            conv(1, c, nf, 27),
            conv(1, nf, 2 * nf, 8),
            conv(2, 2 * nf, 2 * nf, 27),
            conv(1, 2 * nf, 4 * nf, 8),
            conv(3, 4 * nf, 4 * nf, 27),
            conv(1, 4 * nf, 8 * nf, 8),
            conv(3, 8 * nf, 8 * nf, 27),
            conv(1, 8 * nf, 16 * nf, 8),
            conv(3, 16 * nf, 16 * nf, 27),
            conv(1, 16 * nf, 8 * nf, 8),
            conv(3, 8 * nf, 8 * nf, 27),
            conv(1, 8 * nf, 4 * nf, 8),
            conv(3, 4 * nf, 4 * nf, 27),
            conv(1, 4 * nf, 2 * nf, 8),
            conv(2, 2 * nf, 2 * nf, 27),
            conv(1, 2 * nf, nf, 8),
            conv(1, nf, nf, 27),
        ];
        let out = nf.saturating_mul(config.n_classes.max(0) as u64) + config.n_classes.max(0) as u64;
        blocks.iter().fold(out, |a, &b| a.saturating_add(b))
    }

    /// The BatchNorm layers in registration order (the store's order of their buffers).
    fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut blocks: Vec<&Block> = Vec::with_capacity(17);
        for level in 0..5 {
            blocks.push(&self.enc[level]);
            if level < 4 {
                blocks.push(&self.down[level]);
            }
        }
        for (up, dec) in self.up.iter().zip(&self.dec) {
            blocks.push(up);
            blocks.push(dec);
        }
        blocks.iter().flat_map(|b| b.units.iter().filter_map(|u| u.norm.as_ref())).collect()
    }

    /// A network for training-mode passes on another thread: the same weights (shallow clones,
    /// so EMA updates are seen), but BatchNorm buffers of its own that record each pass's batch
    /// statistics instead of updating the running ones. The owner folds them in afterwards,
    /// in the order the passes would have run ([`VNet::fold_pass`]), so passes can run at once
    /// and the running statistics still end as if they had run one after another (to float
    /// rounding: the fold rounds the batch statistics to float32 first).
    pub fn pass_view(&self) -> VNet {
        self.rebuilt(Block::view, false)
    }

    /// This network for eval-mode passes on another thread (a `VNet` is `Send`, not `Sync`):
    /// the very same tensors, running statistics included, and the same settings (folded or not).
    /// Training-mode passes through it would update the shared running statistics, so it refuses
    /// them as a folded network does.
    pub fn eval_view(&self) -> VNet {
        self.rebuilt(Block::shared, true)
    }

    /// A network of this one's shape and settings, without a parameter store, whose blocks are
    /// `block` of this one's and whose output convolution is a view of this one's.
    fn rebuilt(&self, block: impl Fn(&Block) -> Block, folded: bool) -> VNet {
        let f = |blocks: &[Block]| blocks.iter().map(&block).collect::<Vec<_>>();
        let arr4 = |b: Vec<Block>| -> [Block; 4] { b.try_into().unwrap_or_else(|_| unreachable!("four blocks")) };
        let enc: [Block; 5] = f(&self.enc).try_into().unwrap_or_else(|_| unreachable!("five blocks"));
        VNet {
            config: self.config.clone(),
            store: ParamStore::new(self.device()),
            enc,
            down: arr4(f(&self.down)),
            up: arr4(f(&self.up)),
            dec: arr4(f(&self.dec)),
            out_conv: self.out_conv.view(),
            bf16: self.bf16,
            channels_last: self.channels_last,
            folded,
        }
    }

    /// This network for eval-mode passes only (`forward_with(.., false, ..)`, `forward_mc`), with
    /// every eval-mode BatchNorm folded into the convolution before it: a pass is then
    /// convolution, bias and ReLU per unit. Its own tensors (later training of `self` is not
    /// seen) and no parameter store; training-mode passes through it would skip BatchNorm, so it
    /// refuses them. Logits equal the unfolded network's to float rounding.
    pub fn folded_for_inference(&self) -> VNet {
        let cl = self.channels_last;
        self.rebuilt(|b| b.folded(cl), true)
    }

    /// The batch statistics of a [`VNet::pass_view`]'s last training-mode pass, per BatchNorm
    /// layer (copies).
    pub fn pass_statistics(&self) -> PassStatistics {
        PassStatistics(self.batch_norms().iter().map(|bn| bn.recorded()).collect())
    }

    /// Folds one pass's statistics (from a view of this network) into the running statistics,
    /// as that pass in training mode would have.
    pub fn fold_pass(&self, stats: &PassStatistics) -> Result<()> {
        let norms = self.batch_norms();
        if norms.len() != stats.0.len() {
            return Err(Error::invalid("batchnorm", format!("{} layers, {} statistics", norms.len(), stats.0.len())));
        }
        tch::no_grad(|| norms.iter().zip(&stats.0).for_each(|(bn, (m, v))| bn.fold(m, v)));
        Ok(())
    }

    /// Runs every forward pass under bfloat16 autocast (convolutions in bf16 on the tensor cores,
    /// BatchNorm and the losses in float32: the logits are returned as float32), or not.
    pub fn set_bf16(&mut self, on: bool) {
        self.bf16 = on;
    }

    /// Runs the activations channels-last (`[N, C, D, H, W]` stored with C fastest) or in
    /// libtorch's default layout, and stores the convolution weights the same way (their
    /// values, shapes and names do not change: checkpoints are written in the default layout,
    /// see [`crate::checkpoint::host_copy`]). Views made afterwards share the restrided
    /// weights. On a CPU oneDNN's channels-last kernels are faster from about 8 filters up and
    /// slower below; the numbers agree to float rounding.
    pub fn set_channels_last(&mut self, on: bool) {
        self.channels_last = on;
        self.store.set_channels_last(on);
    }

    /// Whether the activations run channels-last.
    pub fn channels_last(&self) -> bool {
        self.channels_last
    }

    /// Whether forward passes run under bfloat16 autocast.
    pub fn bf16(&self) -> bool {
        self.bf16
    }

    /// The network's shape.
    pub fn config(&self) -> &VNetConfig {
        &self.config
    }

    /// The named parameters and buffers.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// Checks that `x` is `[batch, n_channels, X, Y, Z]` with every side divisible by 16, and
    /// that `masks` (if any) fit it.
    pub fn check_input(&self, x: &Tensor, masks: Option<&DropoutMasks>) -> Result<()> {
        let size = x.size();
        let ok =
            size.len() == 5 && size[1] == self.config.n_channels && size[2..].iter().all(|s| *s > 0 && s % 16 == 0);
        if !ok {
            return Err(Error::shape(
                "v-net input",
                format!("[batch, {}, X, Y, Z] with X, Y, Z divisible by 16", self.config.n_channels),
                size,
            ));
        }
        if let Some(m) = masks {
            let nf = self.config.n_filters;
            for (what, t, c) in [("dropout mask x5", &m.x5, 16 * nf), ("dropout mask x9", &m.x9, nf)] {
                if t.size() != [size[0], c, 1, 1, 1] {
                    return Err(Error::shape(what, format!("[{}, {c}, 1, 1, 1]", size[0]), t.size()));
                }
            }
        }
        Ok(())
    }

    /// Logits `[batch, n_classes, X, Y, Z]`. In training mode BatchNorm uses batch statistics
    /// (and updates the running ones) and, if the net has dropout, channels are dropped as
    /// `dropout` says; in eval mode neither.
    pub fn forward_with(&self, x: &Tensor, train: bool, dropout: Dropout<'_>) -> Result<Tensor> {
        self.forward_modes(x, if train { Bn::Train } else { Bn::Eval }, train.then_some(dropout))
    }

    /// A training-mode forward pass of `groups` passes batched into one: `x` is their inputs
    /// concatenated along the batch (equal parts, in order) and `masks` their dropout masks
    /// likewise. The logits equal those of the passes run one after another (concatenated), and
    /// the BatchNorm running statistics end as they would: each part is normalised with its own
    /// batch statistics, as the reference's separate forward passes are.
    pub fn forward_grouped(&self, x: &Tensor, groups: i64, masks: &DropoutMasks) -> Result<Tensor> {
        let b = x.size().first().copied().unwrap_or(0);
        if groups < 1 || b % groups != 0 {
            return Err(Error::shape("grouped v-net input", format!("a batch divisible by {groups} groups"), x.size()));
        }
        let bn = if groups == 1 { Bn::Train } else { Bn::Grouped(groups) };
        self.forward_modes(x, bn, Some(Dropout::Masks(masks)))
    }

    /// Logits of a Monte-Carlo pass for uncertainty at inference: BatchNorm in eval mode (running
    /// statistics, so windows batched together do not see each other) and the channel dropout of
    /// `masks` (when the net has dropout).
    pub fn forward_mc(&self, x: &Tensor, masks: &DropoutMasks) -> Result<Tensor> {
        self.forward_modes(x, Bn::Eval, Some(Dropout::Masks(masks)))
    }

    /// The forward pass with BatchNorm's mode (`bn_train`) and dropout (`None`: off) chosen apart.
    fn forward_modes(&self, x: &Tensor, bn_train: Bn, dropout: Option<Dropout<'_>>) -> Result<Tensor> {
        if self.folded && bn_train != Bn::Eval {
            return Err(Error::invalid(
                "model",
                "an inference network (BatchNorm folded into its convolutions, or an eval view) runs eval-mode passes only",
            ));
        }
        let masks = match dropout {
            Some(Dropout::Masks(m)) => Some(m),
            _ => None,
        };
        self.check_input(x, masks)?;
        let _autocast = if self.bf16 { Some(crate::gpu::Autocast::bf16(x.device())?) } else { None };
        let train = bn_train;
        let drop = |t: Tensor, pick: fn(&DropoutMasks) -> &Tensor| -> Tensor {
            if !self.config.has_dropout() {
                return t;
            }
            match dropout {
                None => t,
                Some(Dropout::Random) => t.feature_dropout(self.config.dropout_p, true),
                Some(Dropout::Masks(m)) => t * pick(m),
            }
        };
        // Encoder: x1 [b, nf, X, Y, Z] ... x5 [b, 16nf, X/16, Y/16, Z/16].
        let mut skips = Vec::with_capacity(4);
        let cl = self.channels_last;
        let mut h = if cl { channels_last_input(x) } else { x.shallow_clone() };
        for (level, block) in self.enc.iter().enumerate() {
            h = block.forward(&h, train, cl)?;
            if level < 4 {
                let next = self.down[level].forward(&h, train, cl)?;
                skips.push(h);
                h = next;
            }
        }
        let mut h = drop(h, |m| &m.x5);
        // Decoder: upsample, add the skip of the same level, convolve.
        for (up, dec) in self.up.iter().zip(&self.dec) {
            let skip = skips.pop().expect("four skips for four upsamplings");
            let mut u = up.forward(&h, train, cl)?;
            // Without autograd (the teacher, inference) the skip is added in place: one
            // full-size activation less at the peak of a window's pass.
            let joined = if u.requires_grad() {
                u + skip
            } else {
                let _ = u.f_add_(&skip)?;
                u
            };
            h = dec.forward(&joined, train, cl)?;
        }
        // x9 [b, nf, X, Y, Z], then the 1x1x1 output convolution. A pass without autograd (the
        // teacher's, inference) runs it as one matrix product with the dropout mask folded in;
        // with autograd it stays libtorch's convolution, whose float32 bias gradient the
        // golden tests hold equal to PyTorch's (the matrix product's differs by 3e-5 of the
        // largest gradient, being closer to the exact value).
        let logits = match dropout {
            Some(Dropout::Masks(m)) if !h.requires_grad() && self.config.has_dropout() => {
                self.out_conv.forward_pointwise(&h, Some(&m.x9))
            }
            _ if !h.requires_grad() => self.out_conv.forward_pointwise(&drop(h, |m| &m.x9), None),
            _ => {
                let logits = self.out_conv.forward(&drop(h, |m| &m.x9), cl);
                // The losses and the uncertainty reduce over classes: the default layout.
                if cl {
                    logits.contiguous()
                } else {
                    logits
                }
            }
        };
        Ok(if self.bf16 { logits.to_kind(Kind::Float) } else { logits })
    }
}

impl tch::nn::ModuleT for VNet {
    /// Panics on an input of the wrong shape; use [`VNet::forward_with`] where data decides shapes.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_with(xs, train, Dropout::Random).expect("v-net input of the wrong shape")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest absolute difference.
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// BatchNorm folded into the convolutions: the eval-mode and Monte-Carlo logits of the
    /// unfolded network to float rounding, in both layouts; training-mode passes refused.
    #[test]
    fn folded_batchnorm_gives_the_same_logits() {
        for channels_last in [false, true] {
            let config = VNetConfig { n_filters: 8, ..Default::default() };
            let mut net = VNet::with_init(&config, Device::Cpu, Init::Seeded(4)).unwrap();
            tch::no_grad(|| {
                for (name, t) in net.store().named_tensors() {
                    if t.kind() != Kind::Float {
                        continue; // num_batches_tracked
                    }
                    let r = Tensor::rand_like(&t);
                    match name.rsplit('.').next() {
                        Some("running_var") => t.shallow_clone().copy_(&(r + 0.2)),
                        Some("running_mean") => t.shallow_clone().copy_(&(r - 0.5)),
                        Some("weight") if t.dim() == 1 => t.shallow_clone().copy_(&(r + 0.5)),
                        Some("bias") if t.dim() == 1 => t.shallow_clone().copy_(&(r * 0.2)),
                        _ => {}
                    }
                }
            });
            net.set_channels_last(channels_last);
            let folded = net.folded_for_inference();
            let x = Tensor::randn([2, 1, 32, 32, 16], (Kind::Float, Device::Cpu));
            let masks = DropoutMasks::draw(&config, 2, |s| Tensor::rand(s, (Kind::Float, Device::Cpu)));
            for (what, want, got) in [
                (
                    "eval",
                    tch::no_grad(|| net.forward_with(&x, false, Dropout::Random)).unwrap(),
                    tch::no_grad(|| folded.forward_with(&x, false, Dropout::Random)).unwrap(),
                ),
                (
                    "monte carlo",
                    tch::no_grad(|| net.forward_mc(&x, &masks)).unwrap(),
                    tch::no_grad(|| folded.forward_mc(&x, &masks)).unwrap(),
                ),
            ] {
                let scale = f64::try_from(want.abs().max()).unwrap();
                let rel = max_diff(&want, &got) / scale;
                assert!(rel < 1e-5, "{what}, channels_last {channels_last}: {rel:e} of {scale}");
            }
            let err = folded.forward_with(&x, true, Dropout::Random).unwrap_err().to_string();
            assert!(err.contains("eval-mode passes only"), "{err}");
        }
    }

    /// Channels-last weights: restrided in place (views follow), saved in the default strides,
    /// values unchanged, and back.
    #[test]
    fn weights_follow_the_layout() {
        let config = VNetConfig { n_filters: 4, ..Default::default() };
        let mut net = VNet::with_init(&config, Device::Cpu, Init::Seeded(2)).unwrap();
        let before: Vec<Tensor> = net.store().trainable().map(|p| p.tensor.detach().copy()).collect();
        let view = net.pass_view();
        net.set_channels_last(true);
        let w = net.store().get("block_two.conv.0.weight").unwrap();
        assert!(!w.is_contiguous() && w.permute([0, 2, 3, 4, 1]).is_contiguous(), "channels-last strides");
        assert_eq!(view.enc[1].units[0].conv.weight.stride(), w.stride(), "layers share the restrided tensor");
        let saved = crate::checkpoint::host_copy(w);
        assert!(saved.is_contiguous(), "checkpoints get the default strides");
        for (p, b) in net.store().trainable().zip(&before) {
            assert_eq!(max_diff(&p.tensor.detach(), b), 0.0, "{} changed", p.name);
            assert!(p.tensor.requires_grad(), "{} still trainable", p.name);
        }
        net.set_channels_last(false);
        assert!(net.store().trainable().all(|p| p.tensor.is_contiguous()), "back to the default strides");
    }

    /// A whole training-mode pass without autograd (fused) against one with it (libtorch's
    /// operators), in both layouts: logits and BatchNorm statistics.
    #[test]
    fn pass_without_autograd_matches_pass_with_it() {
        tch::set_num_threads(1);
        for channels_last in [false, true] {
            let config = VNetConfig { n_filters: 4, ..Default::default() };
            let mut a = VNet::with_init(&config, Device::Cpu, Init::Seeded(5)).unwrap();
            let mut b = VNet::with_init(&config, Device::Cpu, Init::Seeded(5)).unwrap();
            a.set_channels_last(channels_last);
            b.set_channels_last(channels_last);
            let x = Tensor::randn([2, 1, 32, 32, 16], (Kind::Float, Device::Cpu));
            let masks = DropoutMasks::draw(&config, 2, |s| Tensor::rand(s, (Kind::Float, Device::Cpu)));
            let with_grad = a.forward_with(&x, true, Dropout::Masks(&masks)).unwrap();
            assert!(with_grad.requires_grad());
            let without = tch::no_grad(|| b.forward_with(&x, true, Dropout::Masks(&masks))).unwrap();
            let scale = with_grad.abs().max().double_value(&[]);
            let err = max_diff(&with_grad.detach(), &without) / scale;
            // Two float32 roundings of the same network (sums in double against float, the
            // output convolution as a matrix product): 1.2e-5 measured.
            assert!(err < 5e-5, "channels_last {channels_last}: logits off by {err:.2e} of their scale");
            for (p, q) in a.store().buffers().zip(b.store().buffers()) {
                let err = max_diff(&p.tensor.to_kind(Kind::Double), &q.tensor.to_kind(Kind::Double));
                assert!(err < 1e-4, "channels_last {channels_last}: {} off by {err:.2e}", p.name);
            }
        }
    }
}
