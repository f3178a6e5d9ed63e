//! V-Net as UA-MT uses it (Milletari et al. 2016, in the form of the reference `vnet.py`):
//! five encoder levels of 1, 2, 3, 3, 3 conv -> BatchNorm -> ReLU units, strided 2x2x2 convs
//! between them, a decoder of transposed convs whose outputs are ADDED to the skips, one
//! Dropout3d on the bottleneck (x5) and on the last decoder features (x9), and a 1x1x1 output conv.
//!
//! Tensor names equal the reference module's `state_dict` keys (`block_one.conv.0.weight`, ...),
//! so weights exported from PyTorch load directly.

use super::params::{with_layout, ParamStore};
use crate::{check, recipe, Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn uamt_last_error() -> *const c_char;
    fn uamt_bn_relu_(
        x: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        eps: f64,
        mean_out: *mut c_void,
        var_out: *mut c_void,
    ) -> c_int;
}

/// Which normalisation follows each convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// BatchNorm3d (the recipe's choice).
    Batchnorm,
    /// No normalisation: conv -> ReLU.
    None,
}

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

/// Where initial weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// libtorch's global generator (seed it with `tch::manual_seed`), as PyTorch does. Shared by
    /// all threads: another thread drawing at the same time changes the result.
    Global,
    /// The counter-based generator keyed by this seed: the same weights whatever other threads do.
    Seeded(u64),
}

/// Draws initial tensors in registration order.
struct Initializer {
    init: Init,
    /// Tensors drawn so far (the counter of the seeded streams).
    drawn: u64,
}

impl Initializer {
    /// Uniform in `[-bound, bound)`, PyTorch's default for convolution weights and biases.
    fn uniform(&mut self, shape: &[i64], bound: f64) -> Tensor {
        self.drawn += 1;
        match self.init {
            Init::Global => Tensor::empty(shape, (Kind::Float, Device::Cpu)).uniform_(-bound, bound),
            Init::Seeded(seed) => {
                crate::rng::uniform(crate::rng::key(seed, &[0x1417, self.drawn]), shape, Device::Cpu) * (2.0 * bound)
                    - bound
            }
        }
    }
}

/// A 3-D convolution or transposed convolution with bias.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
    transposed: bool,
}

impl Conv {
    /// Registers `prefix.weight` and `prefix.bias`, initialised as PyTorch does by default:
    /// both uniform in +-1/sqrt(fan_in), fan_in taken from the weight's second dimension.
    #[allow(clippy::too_many_arguments)]
    fn new(
        store: &mut ParamStore,
        init: &mut Initializer,
        prefix: &str,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        transposed: bool,
    ) -> Self {
        let shape =
            if transposed { [c_in, c_out, kernel, kernel, kernel] } else { [c_out, c_in, kernel, kernel, kernel] };
        let fan_in = (shape[1] * kernel * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = init.uniform(&shape, bound);
        let bias = init.uniform(&[c_out], bound);
        Conv {
            weight: store.add(format!("{prefix}.weight"), weight, true),
            bias: store.add(format!("{prefix}.bias"), bias, true),
            stride,
            padding,
            transposed,
        }
    }

    /// The same tensors (shallow clones).
    fn view(&self) -> Self {
        Conv {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            stride: self.stride,
            padding: self.padding,
            transposed: self.transposed,
        }
    }

    fn forward(&self, x: &Tensor, channels_last: bool) -> Tensor {
        let (s, p) = ([self.stride; 3], [self.padding; 3]);
        // A channels-last weight makes libtorch run the convolution, and so everything after it,
        // channels-last. The weights are normally stored that way already
        // ([`VNet::set_channels_last`]); otherwise the copy is part of the graph, so the
        // gradient still reaches the weight.
        let w = if channels_last { with_layout(&self.weight, true) } else { self.weight.shallow_clone() };
        if self.transposed {
            x.conv_transpose3d(&w, Some(&self.bias), s, p, [0; 3], 1, [1; 3])
        } else {
            x.conv3d(&w, Some(&self.bias), s, p, [1; 3], 1)
        }
    }

    /// A 1x1x1 convolution as one batched matrix product, the output in the default layout
    /// (what the losses and the uncertainty read), whatever `x`'s layout. `scale` (`[N, C, 1, 1,
    /// 1]`, a channel-dropout mask) multiplies `x`'s channels per sample: it is folded into
    /// the weights, so the activations are read once, not scaled and copied first. (libtorch's
    /// own 1x1x1 path on one thread unfolds a channels-last input into a contiguous copy first:
    /// about three times the cost.)
    fn forward_pointwise(&self, x: &Tensor, scale: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let (n, c, k) = (size[0], size[1], self.weight.size()[0]);
        // x as [N, C, voxels]: a view in either layout (channels-last memory is [N, voxels, C]).
        let v = if x.is_contiguous() {
            x.reshape([n, c, -1])
        } else {
            x.permute([0, 2, 3, 4, 1]).reshape([n, -1, c]).transpose(1, 2)
        };
        let w = self.weight.reshape([1, k, c]);
        let w = match scale {
            Some(m) => w * m.reshape([n, 1, c]),
            None => w.expand([n, k, c], false),
        };
        let mut shape = size;
        shape[1] = k;
        self.bias.reshape([1, k, 1]).baddbmm(&w, &v, 1.0, 1.0).view(shape.as_slice())
    }
}

/// The network's input with channels-last strides. With one channel (MRI) and contiguous that is
/// the same memory: a view with the channel's stride set to 1, which libtorch then reads as
/// channels-last (so the first convolution's output, the first skip and everything after it
/// are channels-last too; with the default strides the one-channel input counts as contiguous
/// and the first level runs, and is later copied, in the default layout). Otherwise a copy
/// (none if it is channels-last already).
fn channels_last_input(x: &Tensor) -> Tensor {
    let size = x.size();
    if size.len() == 5 && size[1] == 1 && x.is_contiguous() {
        let s = x.stride();
        x.as_strided(size.as_slice(), [s[0], 1, s[2], s[3], s[4]].as_slice(), None)
    } else {
        with_layout(x, true)
    }
}

/// BatchNorm3d with PyTorch's defaults (momentum 0.1, eps 1e-5, affine, running statistics).
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    /// 0.1 (PyTorch's); 1 in a [`VNet::pass_view`], whose buffers then hold the last pass's
    /// batch statistics.
    momentum: f64,
}

impl BatchNorm {
    fn new(store: &mut ParamStore, prefix: &str, c: i64) -> Self {
        let opts = (Kind::Float, Device::Cpu);
        BatchNorm {
            weight: store.add(format!("{prefix}.weight"), Tensor::ones([c], opts), true),
            bias: store.add(format!("{prefix}.bias"), Tensor::zeros([c], opts), true),
            running_mean: store.add(format!("{prefix}.running_mean"), Tensor::zeros([c], opts), false),
            running_var: store.add(format!("{prefix}.running_var"), Tensor::ones([c], opts), false),
            num_batches_tracked: store.add(
                format!("{prefix}.num_batches_tracked"),
                Tensor::zeros([], (Kind::Int64, Device::Cpu)),
                false,
            ),
            momentum: 0.1,
        }
    }

    /// The same affine weights with buffers of its own that record each pass's statistics.
    fn view(&self) -> Self {
        let opts = (Kind::Float, self.running_mean.device());
        let c = self.running_mean.size()[0];
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            running_mean: Tensor::zeros([c], opts),
            running_var: Tensor::ones([c], opts),
            num_batches_tracked: Tensor::zeros([], (Kind::Int64, opts.1)),
            momentum: 1.0,
        }
    }

    /// Copies of the batch mean and (unbiased) variance of a view's last training-mode pass.
    fn recorded(&self) -> (Tensor, Tensor) {
        (self.running_mean.copy(), self.running_var.copy())
    }

    /// Folds one pass's statistics into the running ones as a training-mode pass does.
    fn fold(&self, mean: &Tensor, var: &Tensor) {
        let m = self.momentum;
        let _ = self.running_mean.shallow_clone().g_mul_scalar_(1.0 - m).g_add_(&(mean * m));
        let _ = self.running_var.shallow_clone().g_mul_scalar_(1.0 - m).g_add_(&(var * m));
        let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
    }

    /// Whether [`BatchNorm::train_relu_`] can take `y`: a float32 CPU tensor that needs no
    /// gradient, channels-last or contiguous, in a pass with one intra-op thread (the kernel
    /// has one; libtorch's own would use the others).
    fn fusable(y: &Tensor) -> bool {
        y.device() == Device::Cpu
            && y.kind() == Kind::Float
            && !y.requires_grad()
            && y.dim() == 5
            && tch::get_num_threads() == 1
            && (y.is_contiguous() || y.permute([0, 2, 3, 4, 1]).is_contiguous())
    }

    /// Training-mode BatchNorm then ReLU, in place, on `y`'s `groups` equal batch slices (1:
    /// the whole batch), each normalised with its own batch statistics, the running statistics
    /// (and `num_batches_tracked`) updated once per slice in order, as that many passes would.
    /// One fused kernel (`src/shim/uamt_kernels.cpp`): the activations are read twice and
    /// written once instead of read four times and written twice. Only where
    /// [`BatchNorm::fusable`].
    fn train_relu_(&self, y: &Tensor, groups: i64) -> Result<()> {
        let (n, c) = (y.size()[0] / groups, self.weight.size()[0]);
        let opts = (Kind::Float, Device::Cpu);
        for g in 0..groups {
            let part = y.narrow(0, g * n, n);
            let (mean, var) = (Tensor::empty([c], opts), Tensor::empty([c], opts));
            // SAFETY: live tensor handles (at::Tensor*); the kernel checks kinds, devices and
            // strides, writes `part`'s data (a slice of `y`, which needs no gradient), `mean`
            // and `var`, and throws (caught in the shim) on anything else.
            let rc = unsafe {
                uamt_bn_relu_(
                    part.as_ptr() as *mut c_void,
                    self.weight.as_ptr() as *mut c_void,
                    self.bias.as_ptr() as *mut c_void,
                    1e-5,
                    mean.as_ptr() as *mut c_void,
                    var.as_ptr() as *mut c_void,
                )
            };
            if rc != 0 {
                // SAFETY: the shim keeps a NUL-terminated thread-local message.
                let msg = unsafe { CStr::from_ptr(uamt_last_error()) }.to_string_lossy().into_owned();
                return Err(Error::Torch(tch::TchError::Torch(format!("batchnorm + relu: {msg}"))));
            }
            tch::no_grad(|| self.fold(&mean, &var));
        }
        Ok(())
    }

    /// Training mode normalises with the batch's statistics and updates the running ones.
    fn forward(&self, x: &Tensor, mode: Bn) -> Tensor {
        let train = match mode {
            Bn::Eval => false,
            Bn::Train => true,
            Bn::Grouped(g) => return self.forward_grouped(x, g),
        };
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        let cudnn = x.device().is_cuda();
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            self.momentum,
            1e-5,
            cudnn,
        )
    }
}

impl BatchNorm {
    /// Training mode on `x`'s `groups` equal batch slices as if each were its own forward pass,
    /// in order: each slice is normalised with its own statistics, and the running statistics
    /// (and `num_batches_tracked`) are updated once per slice, exactly as `groups` successive
    /// passes would. The slices sit side by side as channels, so libtorch's own kernel computes
    /// the per-slice statistics.
    fn forward_grouped(&self, x: &Tensor, groups: i64) -> Tensor {
        let size = x.size();
        let (c, n) = (size[1], size[0] / groups);
        let side_by_side = x.reshape([groups, n, c, -1]).transpose(0, 1).reshape([n, groups * c, -1]);
        let (w, b) = (self.weight.repeat([groups]), self.bias.repeat([groups]));
        let (eps, momentum) = (1e-5, self.momentum);
        let (y, mean, invstd) =
            side_by_side.native_batch_norm(Some(&w), Some(&b), None::<&Tensor>, None::<&Tensor>, true, momentum, eps);
        tch::no_grad(|| {
            let count = (n * side_by_side.size()[2]) as f64;
            let var = (invstd.pow_tensor_scalar(-2.0) - eps) * (count / (count - 1.0).max(1.0));
            let (mean, var) = (mean.reshape([groups, c]), var.reshape([groups, c]));
            for g in 0..groups {
                let _ =
                    self.running_mean.shallow_clone().g_mul_scalar_(1.0 - momentum).g_add_(&(mean.get(g) * momentum));
                let _ = self.running_var.shallow_clone().g_mul_scalar_(1.0 - momentum).g_add_(&(var.get(g) * momentum));
            }
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(groups);
        });
        y.reshape([n, groups, c, -1]).transpose(0, 1).reshape(size.as_slice())
    }
}

/// How BatchNorm runs in a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bn {
    /// Running statistics.
    Eval,
    /// Batch statistics, running ones updated.
    Train,
    /// Batch statistics per slice of `n` equal slices (see `BatchNorm::forward_grouped`).
    Grouped(i64),
}

/// conv -> [BatchNorm] -> ReLU.
#[derive(Debug)]
struct Unit {
    conv: Conv,
    norm: Option<BatchNorm>,
}

impl Unit {
    fn forward(&self, x: &Tensor, train: Bn, channels_last: bool) -> Result<Tensor> {
        let y = self.conv.forward(x, channels_last);
        let groups = match train {
            Bn::Train => 1,
            Bn::Grouped(g) => g,
            Bn::Eval => 0,
        };
        if let Some(bn) = self.norm.as_ref().filter(|_| groups > 0 && BatchNorm::fusable(&y)) {
            bn.train_relu_(&y, groups)?;
            return Ok(y);
        }
        let mut y = match &self.norm {
            Some(bn) => bn.forward(&y, train),
            None => y,
        };
        // In place, as the reference's `nn.ReLU(inplace=True)`: neither BatchNorm's nor the
        // convolution's backward needs its output, and ReLU's own backward needs only its result.
        Ok(y.relu_())
    }
}

/// A `nn.Sequential` of units under `<name>.conv.<index>`.
#[derive(Debug)]
struct Block {
    units: Vec<Unit>,
}

/// What kind of block, to build the reference's layers.
#[derive(Clone, Copy)]
enum BlockKind {
    /// `n` 3x3x3 convs, padding 1.
    Conv(usize),
    /// One 2x2x2 conv, stride 2.
    Down,
    /// One 2x2x2 transposed conv, stride 2.
    Up,
}

impl Block {
    fn new(
        store: &mut ParamStore,
        init: &mut Initializer,
        name: &str,
        kind: BlockKind,
        c_in: i64,
        c_out: i64,
        norm: Normalization,
    ) -> Self {
        // Each unit occupies conv, [bn,] relu slots in the reference's nn.Sequential.
        let slots = if norm == Normalization::Batchnorm { 3 } else { 2 };
        let (n, kernel, stride, padding, transposed) = match kind {
            BlockKind::Conv(n) => (n, 3, 1, 1, false),
            BlockKind::Down => (1, 2, 2, 0, false),
            BlockKind::Up => (1, 2, 2, 0, true),
        };
        let units = (0..n)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                let conv = Conv::new(
                    store,
                    init,
                    &format!("{name}.conv.{}", i * slots),
                    c,
                    c_out,
                    kernel,
                    stride,
                    padding,
                    transposed,
                );
                let norm = (norm == Normalization::Batchnorm)
                    .then(|| BatchNorm::new(store, &format!("{name}.conv.{}", i * slots + 1), c_out));
                Unit { conv, norm }
            })
            .collect();
        Block { units }
    }

    fn view(&self) -> Self {
        Block {
            units: self
                .units
                .iter()
                .map(|u| Unit { conv: u.conv.view(), norm: u.norm.as_ref().map(BatchNorm::view) })
                .collect(),
        }
    }

    fn forward(&self, x: &Tensor, train: Bn, channels_last: bool) -> Result<Tensor> {
        let mut y = self.units[0].forward(x, train, channels_last)?;
        for u in &self.units[1..] {
            y = u.forward(&y, train, channels_last)?;
        }
        Ok(y)
    }
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
        let v = |blocks: &[Block]| blocks.iter().map(Block::view).collect::<Vec<_>>();
        let arr4 = |b: Vec<Block>| -> [Block; 4] { b.try_into().unwrap_or_else(|_| unreachable!("four blocks")) };
        let enc: [Block; 5] = v(&self.enc).try_into().unwrap_or_else(|_| unreachable!("five blocks"));
        VNet {
            config: self.config.clone(),
            store: ParamStore::new(self.device()),
            enc,
            down: arr4(v(&self.down)),
            up: arr4(v(&self.up)),
            dec: arr4(v(&self.dec)),
            out_conv: self.out_conv.view(),
            bf16: self.bf16,
            channels_last: self.channels_last,
        }
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
            h = dec.forward(&(up.forward(&h, train, cl)? + skip), train, cl)?;
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

    /// A BatchNorm layer of `c` channels with affine weights and running statistics not at
    /// their defaults.
    fn layer(c: i64) -> BatchNorm {
        let mut store = ParamStore::new(Device::Cpu);
        let bn = BatchNorm::new(&mut store, "bn", c);
        tch::no_grad(|| {
            bn.weight.shallow_clone().copy_(&(Tensor::rand([c], (Kind::Float, Device::Cpu)) + 0.5));
            bn.bias.shallow_clone().copy_(&(Tensor::randn([c], (Kind::Float, Device::Cpu)) * 0.1));
            bn.running_mean.shallow_clone().copy_(&Tensor::randn([c], (Kind::Float, Device::Cpu)));
        });
        bn
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The fused kernel against libtorch's three operators, for each layout and a grouped
    /// batch: outputs, running statistics and the batch counter.
    #[test]
    fn fused_batchnorm_relu_matches_libtorch() {
        tch::set_num_threads(1);
        tch::manual_seed(3);
        for (channels_last, groups) in [(false, 1), (true, 1), (true, 2), (false, 3)] {
            let (ours, theirs) = (layer(5), layer(5));
            tch::no_grad(|| {
                for (a, b) in [(&theirs.weight, &ours.weight), (&theirs.bias, &ours.bias)] {
                    a.shallow_clone().copy_(b);
                }
                theirs.running_mean.shallow_clone().copy_(&ours.running_mean);
            });
            // Values far from zero mean, as after a convolution with a bias.
            let x = Tensor::randn([6, 5, 8, 6, 4], (Kind::Float, Device::Cpu)) * 3.0 + 2.0;
            let x = if channels_last { with_layout(&x, true) } else { x };
            let what = format!("channels_last {channels_last}, {groups} groups");
            assert!(BatchNorm::fusable(&x), "{what}: the kernel should take it");
            let want = tch::no_grad(|| {
                let n = 6 / groups;
                let parts: Vec<Tensor> =
                    (0..groups).map(|g| theirs.forward(&x.narrow(0, g * n, n), Bn::Train).relu()).collect();
                Tensor::cat(&parts, 0)
            });
            let got = x.copy();
            ours.train_relu_(&got, groups).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{what}: output off by {}", max_diff(&got, &want));
            assert_eq!(got.stride(), x.stride(), "{what}: layout kept");
            for (a, b, name) in
                [(&ours.running_mean, &theirs.running_mean, "mean"), (&ours.running_var, &theirs.running_var, "var")]
            {
                assert!(max_diff(a, b) < 1e-5, "{what}: running {name} off by {}", max_diff(a, b));
            }
            assert_eq!(
                ours.num_batches_tracked.int64_value(&[]),
                theirs.num_batches_tracked.int64_value(&[]),
                "{what}: batches tracked"
            );
        }
    }

    /// What the kernel refuses goes to libtorch: tensors that need a gradient, several intra-op
    /// threads, other kinds, other strides.
    #[test]
    fn fused_batchnorm_relu_only_where_it_applies() {
        tch::set_num_threads(1);
        let x = Tensor::randn([2, 3, 4, 4, 4], (Kind::Float, Device::Cpu));
        assert!(BatchNorm::fusable(&x));
        assert!(!BatchNorm::fusable(&x.shallow_clone().set_requires_grad(true)));
        assert!(!BatchNorm::fusable(&x.to_kind(Kind::Double)));
        assert!(!BatchNorm::fusable(&x.transpose(2, 3)));
        tch::set_num_threads(2);
        assert!(!BatchNorm::fusable(&x));
        tch::set_num_threads(1);
        // And a refusal inside the kernel is an error, not a crash.
        let bn = layer(4);
        let err = bn.train_relu_(&x, 1).unwrap_err().to_string();
        assert!(err.contains("batchnorm + relu"), "{err}");
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
