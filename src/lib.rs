//! # uamt: uncertainty-aware mean teacher for semi-supervised 3D segmentation
//!
//! The core library: everything here is plain, single-threaded and testable without an actor
//! framework. The daemon in `actors/` wires these pieces into a pipeline.
//!
//! # Layout
//! - [`model`]: the V-Net as UA-MT uses it, with parameter names equal to the reference
//!   PyTorch module's `state_dict` keys, and the named parameter store it lives in.
//! - [`rng`]: the ground floor's seeded random numbers: one SplitMix64, stream keys, the
//!   counter-based tensor generator that makes every pass reproducible by construction and the
//!   host generator for sampling, augmentation and synthetic data.
//! - [`uncertainty`]: entropy and the Monte-Carlo uncertainty, used by the method and evaluation.
//! - [`method`]: the method's math: losses, ramps, EMA, SGD, learning-rate schedule.
//! - [`train`]: one full sequential UA-MT iteration ([`train::Trainer::step`]), the ground truth
//!   that the actor pipeline must reproduce.
//! - [`config`]: the daemon's TOML configuration; [`checkpoint`]: atomic checkpoints and resume;
//!   [`memory`]: what a command may allocate; [`footprint`]: what a config or a window needs;
//!   [`telemetry`]: the names of every exported metric.
//! - [`fsutil`]: every touch of a user's file: regular files only, atomic writes, outputs apart
//!   from inputs, `.uamt-written` markers for `--force`, staging removed on error and interrupt.
//! - [`data`]: volumes, datasets, importers, synthetic data, augmentation and batches.
//! - [`eval`]: sliding-window inference, Monte-Carlo uncertainty maps, metrics and reports.
//! - [`error`]: the library's typed errors; [`check`]: key-named value checks the configs share.
//! - [`recipe`]: the recipe's numbers, which every default reads.
//! - [`plan`]: `uamt plan`'s rules: from a dataset's fingerprint and a machine to a config.
//! - [`gpu`]: bf16 autocast, TF32 and CUDA streams through a small C++ shim over libtorch.

pub mod alloc;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod footprint;
pub mod fsutil;
pub mod gpu;
pub mod memory;
pub mod method;
pub mod model;
pub mod plan;
pub mod recipe;
pub mod rng;
pub mod telemetry;
pub mod train;
pub mod uncertainty;

pub use error::{Error, Result};
