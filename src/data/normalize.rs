//! Per-case intensity normalisation, as recorded in a dataset's `preprocessing.json` so that
//! training (at import) and prediction (on raw images) apply the same.

use super::error::{DataError, Result};
use super::volume::Volume;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How a case's intensities are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Z-score with the mean and population standard deviation of the whole volume, computed
    /// before any crop: the LA reference's scheme (`la_heart_processing.py`).
    #[default]
    Volume,
    /// Z-score with the mean and standard deviation of the non-zero voxels (the body, for MRI
    /// with a zero background); zero voxels stay at the background value the z-score gives 0.
    Foreground,
    /// Intensities kept as they are.
    None,
}

impl Normalization {
    /// Parses `volume` (alias `reference`), `foreground` or `none`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "volume" | "reference" => Ok(Normalization::Volume),
            "foreground" => Ok(Normalization::Foreground),
            "none" => Ok(Normalization::None),
            _ => Err(format!("`{s}`: give volume (= reference), foreground or none")),
        }
    }
}

/// The statistics a normalisation used on one case.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Mean subtracted.
    pub mean: f64,
    /// Standard deviation divided by.
    pub std: f64,
}

/// Mean and population standard deviation of the voxels `keep` selects; `None` if none.
fn moments(v: &Volume<f32>, keep: impl Fn(f32) -> bool) -> Option<Stats> {
    let (mut n, mut sum) = (0usize, 0.0f64);
    for &x in v.data.iter().filter(|&&x| keep(x)) {
        n += 1;
        sum += x as f64;
    }
    if n == 0 {
        return None;
    }
    let mean = sum / n as f64;
    let var = v.data.iter().filter(|&&x| keep(x)).map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    Some(Stats { mean, std: var.sqrt() })
}

/// Normalises `image` in place the way `how` says; `path` names the image in errors (NaN or
/// infinite voxels, a constant image, no foreground). Returns the statistics used.
pub fn normalize(image: &mut Volume<f32>, how: Normalization, path: &Path) -> Result<Stats> {
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        return Err(DataError::bad(path, format!("NaN or infinite voxels (first at index {i})")));
    }
    let stats = match how {
        Normalization::None => return Ok(Stats { mean: 0.0, std: 1.0 }),
        Normalization::Volume => moments(image, |_| true),
        Normalization::Foreground => moments(image, |x| x != 0.0),
    }
    .ok_or_else(|| DataError::bad(path, "no non-zero voxels to normalise over"))?;
    if stats.std <= 0.0 || stats.std.is_nan() {
        return Err(DataError::bad(path, "the image is constant over the normalised region (standard deviation 0)"));
    }
    for x in &mut image.data {
        *x = ((*x as f64 - stats.mean) / stats.std) as f32;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_zscore_has_zero_mean_unit_std() {
        let mut v = Volume::new([4, 1, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let s = normalize(&mut v, Normalization::Volume, Path::new("x")).unwrap();
        assert!((s.mean - 2.5).abs() < 1e-12);
        let m = moments(&v, |_| true).unwrap();
        assert!(m.mean.abs() < 1e-6 && (m.std - 1.0).abs() < 1e-6);
    }

    #[test]
    fn foreground_zscore_ignores_zeros_and_constant_is_refused() {
        let mut v = Volume::new([4, 1, 1], vec![0.0, 2.0, 4.0, 0.0]).unwrap();
        let s = normalize(&mut v, Normalization::Foreground, Path::new("x")).unwrap();
        assert_eq!((s.mean, s.std), (3.0, 1.0));
        let mut c = Volume::new([2, 1, 1], vec![5.0, 5.0]).unwrap();
        assert!(normalize(&mut c, Normalization::Volume, Path::new("x")).is_err());
    }
}
