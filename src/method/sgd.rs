//! SGD with momentum and weight decay, as `torch.optim.SGD` (dampening 0, no Nesterov), with its
//! state (one momentum buffer per parameter, named after it) open for checkpoints.

use crate::model::ParamStore;
use crate::{Error, Result};
use tch::Tensor;

/// The optimiser and its state.
#[derive(Debug)]
pub struct Sgd {
    /// Momentum factor (0.9 in the recipe).
    pub momentum: f64,
    /// L2 penalty added to the gradient (1e-4 in the recipe).
    pub weight_decay: f64,
    /// One buffer per trainable parameter, in the store's order, named like it.
    buffers: Vec<(String, Tensor)>,
}

impl Sgd {
    /// Zeroed momentum buffers for every trainable parameter of `params`. A zero buffer gives
    /// exactly PyTorch's first step (which starts the buffer at the gradient): 0.9 * 0 + g = g.
    pub fn new(params: &ParamStore, momentum: f64, weight_decay: f64) -> Self {
        let buffers = params.trainable().map(|p| (p.name.clone(), p.tensor.detach().zeros_like())).collect();
        Sgd { momentum, weight_decay, buffers }
    }

    /// Stores the 5-D momentum buffers channels-last or not, as the parameters they follow
    /// (see [`ParamStore::set_channels_last`]): the update then runs over matching strides.
    pub fn set_channels_last(&mut self, on: bool) {
        for (_, buf) in self.buffers.iter_mut().filter(|(_, b)| b.dim() == 5) {
            *buf = crate::model::params::with_layout(buf, on);
        }
    }

    /// The momentum buffers, named after their parameters.
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// One update with learning rate `lr` from the gradients held by `params`:
    /// `d = g + wd * p; buf = momentum * buf + d; p -= lr * buf`. Parameters without a gradient
    /// are left alone, as in PyTorch.
    pub fn step(&mut self, params: &ParamStore, lr: f64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (p, (name, buf)) in params.trainable().zip(self.buffers.iter_mut()) {
                if &p.name != name {
                    return Err(Error::invalid(
                        "optimizer",
                        format!("state for `{name}` does not match parameter `{}`", p.name),
                    ));
                }
                let g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 { g + &p.tensor * self.weight_decay } else { g };
                let _ = buf.f_mul_scalar_(self.momentum)?;
                let _ = buf.f_add_(&d)?;
                let _ = p.tensor.shallow_clone().f_sub_(&(&*buf * lr))?;
            }
            Ok(())
        })
    }

    /// Clears the gradients of `params` before the next backward pass.
    pub fn zero_grad(params: &ParamStore) {
        for p in params.trainable() {
            p.tensor.shallow_clone().zero_grad();
        }
    }

    /// Replaces the momentum buffers from named tensors (a checkpoint); every buffer must be there.
    pub fn load_named(&mut self, named: &[(String, Tensor)], origin: &std::path::Path) -> Result<()> {
        for (name, buf) in self.buffers.iter_mut() {
            let src = named.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| Error::File {
                path: origin.to_path_buf(),
                why: format!("missing momentum buffer `{name}`"),
            })?;
            if src.size() != buf.size() {
                return Err(Error::File {
                    path: origin.to_path_buf(),
                    why: format!("momentum buffer `{name}` has shape {:?}, expected {:?}", src.size(), buf.size()),
                });
            }
            tch::no_grad(|| buf.f_copy_(&src.to_device(buf.device())))?;
        }
        Ok(())
    }
}
