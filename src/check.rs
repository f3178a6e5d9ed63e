//! Key-named value checks shared by every component's `validate(prefix)`: each takes the full key
//! (`method.noise_std`) and returns [`Error::Invalid`] naming it.

use crate::{Error, Result};
use std::fmt::Display;

/// `prefix.name`, or `name` alone when `prefix` is empty.
pub fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Refuses NaN and infinities.
pub fn finite(key: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("must be a finite number, got {v}")))
    }
}

/// A finite `v` with `lo <= v <= hi`.
pub fn within(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    finite(key, v)?;
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("must be in [{lo}, {hi}], got {v}")))
    }
}

/// A finite `v >= lo`.
pub fn at_least_f(key: &str, v: f64, lo: f64) -> Result<()> {
    within(key, v, lo, f64::MAX)
}

/// A finite `v > 0`.
pub fn positive_f(key: &str, v: f64) -> Result<()> {
    finite(key, v)?;
    if v > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("must be > 0, got {v}")))
    }
}

/// An integer with `lo <= v <= hi`.
pub fn range<T: PartialOrd + Display + Copy>(key: &str, v: T, lo: T, hi: T) -> Result<()> {
    if lo <= v && v <= hi {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("must be in {lo}..={hi}, got {v}")))
    }
}

/// Every side of `size` in `1..=hi`.
pub fn sides(key: &str, size: [usize; 3], hi: usize) -> Result<()> {
    if size.iter().all(|s| (1..=hi).contains(s)) {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("every side must be in 1..={hi}, got {size:?}")))
    }
}

/// Every side of `size` in `1..=hi` and divisible by 16 (the V-Net's four downsamplings).
pub fn patch(key: &str, size: [usize; 3], hi: usize) -> Result<()> {
    if size.iter().all(|s| (1..=hi).contains(s) && s % 16 == 0) {
        Ok(())
    } else {
        Err(Error::invalid(key, format!("every side must be a positive multiple of 16 up to {hi}, got {size:?}")))
    }
}

/// Upper bounds on sizes, so that a hostile config is refused rather than exhausting memory.
pub mod limits {
    /// Longest side of a training patch or sliding window.
    pub const PATCH_SIDE: usize = 1024;
    /// Longest side of a synthetic volume.
    pub const SYNTH_SIDE: usize = 1024;
    /// Synthetic cases (training plus test).
    pub const SYNTH_CASES: usize = 100_000;
    /// Channels at the V-Net's first level.
    pub const N_FILTERS: i64 = 256;
    /// Input channels.
    pub const N_CHANNELS: i64 = 64;
    /// Output classes.
    pub const N_CLASSES: i64 = 256;
    /// Monte-Carlo passes.
    pub const MC_PASSES: i64 = 64;
    /// Patches of one kind per batch; windows per forward pass.
    pub const BATCH: usize = 1024;
    /// Capacity of every bounded queue.
    pub const QUEUE: usize = 4096;
    /// Loader worker threads.
    pub const LOADER_WORKERS: usize = 64;
    /// libtorch threads per stage.
    pub const THREADS: usize = 256;
}
