//! A named, ordered store of a model's tensors: trainable parameters and buffers (BatchNorm
//! running statistics), named like the reference PyTorch module's `state_dict` keys. The order
//! is the module's registration order, i.e. the order of PyTorch's `.parameters()`.

use crate::{Error, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One named tensor of a model.
#[derive(Debug)]
pub struct Param {
    /// The `state_dict` key, e.g. `block_one.conv.0.weight`.
    pub name: String,
    /// The tensor itself; layers hold shallow clones of it, so in-place updates are seen by both.
    pub tensor: Tensor,
    /// Whether the optimiser updates it (parameters) or the forward pass does (buffers).
    pub trainable: bool,
}

/// The tensors of one model, in registration order.
#[derive(Debug)]
pub struct ParamStore {
    /// All tensors, parameters and buffers interleaved as the module registers them.
    entries: Vec<Param>,
    /// Where every tensor lives.
    device: Device,
}

impl ParamStore {
    /// An empty store whose tensors will live on `device`.
    pub fn new(device: Device) -> Self {
        ParamStore { entries: Vec::new(), device }
    }

    /// The device every tensor lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Registers `tensor` under `name` and returns a shallow clone for the layer to hold.
    /// Trainable tensors are made leaves that require gradients.
    pub fn add(&mut self, name: String, tensor: Tensor, trainable: bool) -> Tensor {
        let tensor = tensor.to_device(self.device).detach();
        let tensor = if trainable { tensor.set_requires_grad(true) } else { tensor };
        let handle = tensor.shallow_clone();
        self.entries.push(Param { name, tensor, trainable });
        handle
    }

    /// Every tensor, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.entries.iter()
    }

    /// The trainable parameters, in the order of PyTorch's `.parameters()`.
    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.entries.iter().filter(|p| p.trainable)
    }

    /// The buffers (not trained by the optimiser).
    pub fn buffers(&self) -> impl Iterator<Item = &Param> {
        self.entries.iter().filter(|p| !p.trainable)
    }

    /// The tensor registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|p| p.name == name).map(|p| &p.tensor)
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> i64 {
        self.trainable().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Stores every 5-D trainable tensor (the convolution weights) channels-last (`true`: the
    /// channels' dimension fastest) or in libtorch's default strides, values unchanged. The
    /// tensors are re-pointed in place, so the layers' shallow clones follow. With the weights
    /// channels-last, a channels-last forward pass reads them as they are instead of copying
    /// every weight on every pass (and its backward pass copying every gradient back).
    pub fn set_channels_last(&self, on: bool) {
        for p in self.trainable().filter(|p| p.tensor.dim() == 5) {
            let mut t = p.tensor.shallow_clone();
            let data = with_layout(&t.detach(), on);
            tch::no_grad(|| t.set_data(&data));
        }
    }

    /// Shallow clones of every tensor with its name (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.entries.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    /// Checks that `named` fits the store: every tensor of the store present with the same shape
    /// and a compatible kind (floating for floating, integer for integer); extra names are
    /// errors unless `allow_extra`. Nothing is copied; `origin` names the source in errors.
    pub fn check_named(&self, named: &[(String, Tensor)], origin: &Path, allow_extra: bool) -> Result<()> {
        let file_err = |why: String| Error::File { path: origin.to_path_buf(), why };
        if !allow_extra {
            if let Some((name, _)) = named.iter().find(|(n, _)| self.get(n).is_none()) {
                return Err(file_err(format!("unexpected tensor `{name}`")));
            }
        }
        for p in &self.entries {
            let src = named
                .iter()
                .find(|(n, _)| *n == p.name)
                .map(|(_, t)| t)
                .ok_or_else(|| file_err(format!("missing tensor `{}`", p.name)))?;
            check_fits(&p.name, src, &p.tensor).map_err(file_err)?;
        }
        Ok(())
    }

    /// Copies values in place from `named` by name, after [`ParamStore::check_named`] accepted
    /// all of them (a refused file leaves the store untouched).
    pub fn load_named(&self, named: &[(String, Tensor)], origin: &Path, allow_extra: bool) -> Result<()> {
        self.check_named(named, origin, allow_extra)?;
        for p in &self.entries {
            if let Some((_, src)) = named.iter().find(|(n, _)| *n == p.name) {
                let src = src.f_to_device(self.device)?.f_to_kind(p.tensor.kind())?;
                tch::no_grad(|| p.tensor.shallow_clone().f_copy_(&src))?;
            }
        }
        Ok(())
    }
}

/// A 5-D tensor `[N, C, D, H, W]` with channels-last strides (`true`) or the default ones, the
/// same values: `t` itself when it already has them, else a copy.
pub fn with_layout(t: &Tensor, channels_last: bool) -> Tensor {
    let cl = t.permute([0, 2, 3, 4, 1]);
    match (channels_last, t.is_contiguous()) {
        (true, _) if cl.is_contiguous() => t.shallow_clone(),
        (true, _) => cl.contiguous().permute([0, 4, 1, 2, 3]),
        (false, true) => t.shallow_clone(),
        (false, false) => t.contiguous(),
    }
}

/// Whether `kind` is a floating-point kind.
fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Whether `kind` is an integer kind.
fn is_int(kind: Kind) -> bool {
    matches!(kind, Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8)
}

/// Why `src` cannot be copied into `dst` (tensor `name`): a different shape or an incompatible
/// kind (floating and integer kinds do not mix; booleans and complex numbers are refused).
pub fn check_fits(name: &str, src: &Tensor, dst: &Tensor) -> std::result::Result<(), String> {
    if src.size() != dst.size() {
        return Err(format!("tensor `{name}` has shape {:?}, the model expects {:?}", src.size(), dst.size()));
    }
    let (s, d) = (src.kind(), dst.kind());
    if !((is_float(s) && is_float(d)) || (is_int(s) && is_int(d))) {
        return Err(format!("tensor `{name}` is {s:?}, the model expects {d:?}"));
    }
    Ok(())
}

/// Reads named tensors from a weights file of any format [`weights::read_raw`](super::weights::read_raw)
/// recognises by its content (`.safetensors`, `.npz`, PyTorch's `state_dict` `.pt` / `.pth`,
/// TorchScript, tch's `.ot`): regular files up to the size limit, parsed by our own code with
/// every shape, offset and length checked before libtorch sees the bytes.
pub fn read_named(path: &Path) -> Result<Vec<(String, Tensor)>> {
    super::tensorfile::to_tensors(super::weights::read_raw(path)?, path)
}
