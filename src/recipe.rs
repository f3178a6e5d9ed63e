//! The recipe's numbers in one place (UA-MT on the left atrium, Yu et al. 2019): every default of
//! the configs and every CLI default that means "as the recipe does" reads them from here.

/// Training patch and sliding-window size `[X, Y, Z]`.
pub const PATCH: [usize; 3] = [112, 112, 80];
/// Sliding-window step `[X, Y, Z]` at evaluation.
pub const STRIDE: [usize; 3] = [18, 18, 4];
/// Windows per forward pass at evaluation (not a recipe number: results do not depend on it).
pub const INFER_BATCH: usize = 4;

/// Input channels of the V-Net (one MRI channel).
pub const N_CHANNELS: i64 = 1;
/// Output classes (background, left atrium).
pub const N_CLASSES: i64 = 2;
/// Channels at the V-Net's first level.
pub const N_FILTERS: i64 = 16;
/// Dropout3d probability on the bottleneck and the last decoder features.
pub const DROPOUT_P: f64 = 0.5;

/// Labelled patches at the head of each batch.
pub const LABELLED_BS: usize = 2;
/// Unlabelled patches after them.
pub const UNLABELLED_BS: usize = 2;

/// Monte-Carlo teacher passes T for the uncertainty.
pub const MC_PASSES: i64 = 8;
/// Copies of the unlabelled patches per teacher forward (T = 8 as 4 forwards of 2 copies).
pub const MC_REPEATS: i64 = 2;
/// Standard deviation of the teacher's Gaussian input noise.
pub const NOISE_STD: f64 = 0.1;
/// The teacher's input noise is clamped to +-this.
pub const NOISE_CLIP: f64 = 0.2;
/// Maximum consistency weight.
pub const CONSISTENCY: f64 = 0.1;
/// The consistency ramp counts in units of this many iterations.
pub const CONSISTENCY_INTERVAL: i64 = 150;
/// Length of the consistency ramp-up, in those units.
pub const CONSISTENCY_RAMPUP: f64 = 40.0;
/// EMA decay ceiling of the teacher.
pub const EMA_DECAY: f64 = 0.99;

/// Training iterations.
pub const ITERATIONS: i64 = 6000;
/// Initial learning rate.
pub const BASE_LR: f64 = 0.01;
/// The learning rate drops every this many iterations.
pub const LR_STEP: i64 = 2500;
/// ... by this factor.
pub const LR_GAMMA: f64 = 0.1;
/// SGD momentum.
pub const MOMENTUM: f64 = 0.9;
/// SGD weight decay.
pub const WEIGHT_DECAY: f64 = 1e-4;
/// Seed of initialisation, sampling, augmentation, noise and dropout.
pub const SEED: u64 = 1337;
