//! The V-Net's layers: convolutions (their channels-last and fused CPU paths), BatchNorm (its
//! fused training-mode kernel for passes without autograd, and the grouped statistics of the
//! Monte-Carlo passes), the conv -> BatchNorm -> ReLU unit and the blocks the network is built of.
//! `super::vnet` assembles them; nothing here knows the network's shape.

use super::params::{with_layout, ParamStore};
use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Kind, Tensor};

extern "C" {
    pub(super) fn uamt_last_error() -> *const c_char;
    pub(super) fn uamt_bn_relu_(
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
pub(super) struct Initializer {
    pub(super) init: Init,
    /// Tensors drawn so far (the counter of the seeded streams).
    pub(super) drawn: u64,
}

impl Initializer {
    /// Uniform in `[-bound, bound)`, PyTorch's default for convolution weights and biases.
    pub(super) fn uniform(&mut self, shape: &[i64], bound: f64) -> Tensor {
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
pub(super) struct Conv {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) stride: i64,
    pub(super) padding: i64,
    pub(super) transposed: bool,
}

impl Conv {
    /// Registers `prefix.weight` and `prefix.bias`, initialised as PyTorch does by default:
    /// both uniform in +-1/sqrt(fan_in), fan_in taken from the weight's second dimension.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
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
    pub(super) fn view(&self) -> Self {
        Conv {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            stride: self.stride,
            padding: self.padding,
            transposed: self.transposed,
        }
    }

    pub(super) fn forward(&self, x: &Tensor, channels_last: bool) -> Tensor {
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
    pub(super) fn forward_pointwise(&self, x: &Tensor, scale: Option<&Tensor>) -> Tensor {
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
pub(super) fn channels_last_input(x: &Tensor) -> Tensor {
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
pub(super) struct BatchNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) running_mean: Tensor,
    pub(super) running_var: Tensor,
    pub(super) num_batches_tracked: Tensor,
    /// 0.1 (PyTorch's); 1 in a [`VNet::pass_view`], whose buffers then hold the last pass's
    /// batch statistics.
    pub(super) momentum: f64,
}

impl BatchNorm {
    pub(super) fn new(store: &mut ParamStore, prefix: &str, c: i64) -> Self {
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
    /// The same tensors, running statistics included (shallow clones): for eval-mode passes on
    /// another thread.
    pub(super) fn shared(&self) -> Self {
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            num_batches_tracked: self.num_batches_tracked.shallow_clone(),
            momentum: self.momentum,
        }
    }

    pub(super) fn view(&self) -> Self {
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
    pub(super) fn recorded(&self) -> (Tensor, Tensor) {
        (self.running_mean.copy(), self.running_var.copy())
    }

    /// Folds one pass's statistics into the running ones as a training-mode pass does.
    pub(super) fn fold(&self, mean: &Tensor, var: &Tensor) {
        let m = self.momentum;
        let _ = self.running_mean.shallow_clone().g_mul_scalar_(1.0 - m).g_add_(&(mean * m));
        let _ = self.running_var.shallow_clone().g_mul_scalar_(1.0 - m).g_add_(&(var * m));
        let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
    }

    /// Whether [`BatchNorm::train_relu_`] can take `y`: a float32 CPU tensor that needs no
    /// gradient, channels-last or contiguous, in a pass with one intra-op thread (the kernel
    /// has one; libtorch's own would use the others).
    pub(super) fn fusable(y: &Tensor) -> bool {
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
    pub(super) fn train_relu_(&self, y: &Tensor, groups: i64) -> Result<()> {
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
    pub(super) fn forward(&self, x: &Tensor, mode: Bn) -> Tensor {
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
    pub(super) fn forward_grouped(&self, x: &Tensor, groups: i64) -> Tensor {
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
pub(super) enum Bn {
    /// Running statistics.
    Eval,
    /// Batch statistics, running ones updated.
    Train,
    /// Batch statistics per slice of `n` equal slices (see `BatchNorm::forward_grouped`).
    Grouped(i64),
}

/// conv -> [BatchNorm] -> ReLU.
#[derive(Debug)]
pub(super) struct Unit {
    pub(super) conv: Conv,
    pub(super) norm: Option<BatchNorm>,
}

impl Unit {
    /// This unit for eval-mode passes only: with BatchNorm, its running statistics and affine
    /// map folded into the convolution, `w * g / sqrt(v + eps)` per output channel and
    /// `(b - m) * g / sqrt(v + eps) + beta`, so that a pass is convolution and ReLU (one read and
    /// write of the activation less); without BatchNorm, the same weights. Computed in float64,
    /// stored as the convolution's own type.
    pub(super) fn folded(&self, channels_last: bool) -> Unit {
        let Some(bn) = &self.norm else {
            return Unit { conv: self.conv.view(), norm: None };
        };
        let kind = self.conv.weight.kind();
        let scale = tch::no_grad(|| {
            let g = bn.weight.to_kind(Kind::Double);
            let v = bn.running_var.to_kind(Kind::Double);
            g / (v + 1e-5).sqrt()
        });
        let (weight, bias) = tch::no_grad(|| {
            // A convolution's weight is [out, in, k, k, k]; a transposed one's [in, out, k, k, k].
            let axis = if self.conv.transposed { 1 } else { 0 };
            let mut shape = vec![1i64; 5];
            shape[axis] = -1;
            let w = self.conv.weight.to_kind(Kind::Double) * scale.reshape(shape.as_slice());
            let b = (self.conv.bias.to_kind(Kind::Double) - bn.running_mean.to_kind(Kind::Double)) * &scale
                + bn.bias.to_kind(Kind::Double);
            (with_layout(&w.to_kind(kind).contiguous(), channels_last), b.to_kind(kind))
        });
        let conv = Conv {
            weight,
            bias,
            stride: self.conv.stride,
            padding: self.conv.padding,
            transposed: self.conv.transposed,
        };
        Unit { conv, norm: None }
    }

    pub(super) fn forward(&self, x: &Tensor, train: Bn, channels_last: bool) -> Result<Tensor> {
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
pub(super) struct Block {
    pub(super) units: Vec<Unit>,
}

/// What kind of block, to build the reference's layers.
#[derive(Clone, Copy)]
pub(super) enum BlockKind {
    /// `n` 3x3x3 convs, padding 1.
    Conv(usize),
    /// One 2x2x2 conv, stride 2.
    Down,
    /// One 2x2x2 transposed conv, stride 2.
    Up,
}

impl Block {
    pub(super) fn new(
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

    /// This block for eval-mode passes only: each unit's eval-mode BatchNorm folded into its
    /// convolution (new tensors, laid out as `channels_last` says; see [`Unit::folded`]).
    pub(super) fn folded(&self, channels_last: bool) -> Self {
        Block { units: self.units.iter().map(|u| u.folded(channels_last)).collect() }
    }

    /// The same tensors throughout (see [`BatchNorm::shared`]).
    pub(super) fn shared(&self) -> Self {
        Block {
            units: self
                .units
                .iter()
                .map(|u| Unit { conv: u.conv.view(), norm: u.norm.as_ref().map(BatchNorm::shared) })
                .collect(),
        }
    }

    pub(super) fn view(&self) -> Self {
        Block {
            units: self
                .units
                .iter()
                .map(|u| Unit { conv: u.conv.view(), norm: u.norm.as_ref().map(BatchNorm::view) })
                .collect(),
        }
    }

    pub(super) fn forward(&self, x: &Tensor, train: Bn, channels_last: bool) -> Result<Tensor> {
        let mut y = self.units[0].forward(x, train, channels_last)?;
        for u in &self.units[1..] {
            y = u.forward(&y, train, channels_last)?;
        }
        Ok(y)
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
}
