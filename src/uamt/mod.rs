//! The math of UA-MT, one small file per concept: losses and uncertainty, ramps and schedules,
//! the EMA teacher update, SGD with checkpointable state, and counter-based random numbers.

pub mod ema;
pub mod losses;
pub mod ramps;
pub mod rng;
pub mod sgd;

pub use ema::{ema_alpha, ema_update, ema_update_tensors};
pub use losses::{cross_entropy, dice_loss, masked_consistency, softmax_mse, supervised_loss, uncertainty};
pub use ramps::{consistency_weight, learning_rate, sigmoid_rampup, threshold};
pub use sgd::Sgd;
