//! The math of UA-MT, one small file per concept: losses and uncertainty, ramps and schedules,
//! the EMA teacher update and SGD with checkpointable state.

pub mod ema;
pub mod losses;
pub mod ramps;
pub mod sgd;

pub use ema::{ema_alpha, ema_update, ema_update_tensors};
pub use losses::{cross_entropy, dice_loss, entropy, masked_consistency, softmax_mse, supervised_loss, uncertainty};
pub use ramps::{consistency_weight, learning_rate, sigmoid_rampup, threshold};
pub use sgd::Sgd;
