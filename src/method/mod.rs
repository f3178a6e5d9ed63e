//! The math of UA-MT, one small file per concept: losses and uncertainty, ramps and schedules,
//! the EMA teacher update and SGD with checkpointable state.

pub mod ema;
pub mod losses;
pub mod ramps;
pub mod sgd;

pub use crate::uncertainty::{entropy, uncertainty};
pub use ema::{ema_alpha, ema_update, ema_update_tensors};
pub use losses::{cross_entropy, dice_loss, masked_consistency, softmax_mse, supervised_loss};
pub use ramps::{consistency_weight, learning_rate, sigmoid_rampup, threshold};
pub use sgd::Sgd;

/// Which method a step runs (`method.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Uncertainty-aware mean teacher: consistency only where the teacher is certain.
    Uamt,
    /// Mean teacher: consistency everywhere (mask all ones), no Monte-Carlo passes.
    MeanTeacher,
    /// Labelled patches only, no teacher.
    Supervised,
}
