//! Per-case intensity normalisation, as recorded in a dataset's `preprocessing.json` so that
//! training (at import) and prediction (on raw images) apply the same.

use super::error::{DataError, Result};
use super::parallel;
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

/// Mean and population standard deviation of the voxels `keep` selects (`None` if none), on
/// `threads` threads; the same bits for any thread count (sums over fixed blocks, see
/// [`parallel`]).
pub fn moments(data: &[f32], keep: impl Fn(f32) -> bool + Sync, threads: usize) -> Option<Stats> {
    let parts = parallel::per_block(data, threads, |b| {
        b.iter().filter(|&&x| keep(x)).fold((0usize, 0.0f64), |(n, s), &x| (n + 1, s + x as f64))
    });
    let (n, sum) = parts.iter().fold((0usize, 0.0f64), |(n, s), &(m, t)| (n + m, s + t));
    if n == 0 {
        return None;
    }
    let mean = sum / n as f64;
    let squares = parallel::per_block(data, threads, |b| {
        b.iter().filter(|&&x| keep(x)).map(|&x| (x as f64 - mean).powi(2)).sum::<f64>()
    });
    let var = squares.iter().sum::<f64>() / n as f64;
    Some(Stats { mean, std: var.sqrt() })
}

/// Normalises `image` in place the way `how` says, on every core (see [`normalize_with`]).
pub fn normalize(image: &mut Volume<f32>, how: Normalization, path: &Path) -> Result<Stats> {
    normalize_with(image, how, path, parallel::threads())
}

/// Normalises `image` in place the way `how` says, on `threads` threads (the result does not
/// depend on how many); `path` names the image in errors (NaN or infinite voxels, a constant
/// image, no foreground). Returns the statistics used.
pub fn normalize_with(image: &mut Volume<f32>, how: Normalization, path: &Path, threads: usize) -> Result<Stats> {
    let first_bad = parallel::per_block(&image.data, threads, |b| b.iter().position(|v| !v.is_finite()));
    if let Some((k, i)) = first_bad.iter().enumerate().find_map(|(k, i)| i.map(|i| (k, i))) {
        let i = k * parallel::BLOCK + i;
        return Err(DataError::bad(path, format!("NaN or infinite voxels (first at index {i})")));
    }
    let stats = match how {
        Normalization::None => return Ok(Stats { mean: 0.0, std: 1.0 }),
        Normalization::Volume => moments(&image.data, |_| true, threads),
        Normalization::Foreground => moments(&image.data, |x| x != 0.0, threads),
    }
    .ok_or_else(|| DataError::bad(path, "no non-zero voxels to normalise over"))?;
    if stats.std <= 0.0 || stats.std.is_nan() {
        return Err(DataError::bad(path, "the image is constant over the normalised region (standard deviation 0)"));
    }
    parallel::for_each_chunk(&mut image.data, parallel::BLOCK, threads, |_, part| {
        for x in part {
            *x = ((*x as f64 - stats.mean) / stats.std) as f32;
        }
    });
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
        let m = moments(&v.data, |_| true, 1).unwrap();
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

    #[test]
    fn more_threads_give_the_same_bits() {
        let n = 5 * super::parallel::BLOCK + 123;
        let data: Vec<f32> =
            (0..n).map(|i| if i % 5 == 0 { 0.0 } else { ((i * 2654435761) % 4093) as f32 * 0.37 }).collect();
        for how in [Normalization::Volume, Normalization::Foreground] {
            let mut one = Volume::new([n, 1, 1], data.clone()).unwrap();
            let s1 = normalize_with(&mut one, how, Path::new("x"), 1).unwrap();
            for t in [2, 4, 7] {
                let mut many = Volume::new([n, 1, 1], data.clone()).unwrap();
                let st = normalize_with(&mut many, how, Path::new("x"), t).unwrap();
                assert_eq!(
                    (st.mean.to_bits(), st.std.to_bits()),
                    (s1.mean.to_bits(), s1.std.to_bits()),
                    "{how:?}, {t}"
                );
                assert!(one.data.iter().zip(&many.data).all(|(a, b)| a.to_bits() == b.to_bits()), "{how:?}, {t}");
            }
        }
        let mut bad = data.clone();
        bad[3 * super::parallel::BLOCK + 9] = f32::NAN;
        bad[4 * super::parallel::BLOCK] = f32::INFINITY;
        let e = normalize_with(&mut Volume::new([n, 1, 1], bad).unwrap(), Normalization::Volume, Path::new("x"), 4);
        assert!(e.unwrap_err().to_string().contains(&format!("index {}", 3 * super::parallel::BLOCK + 9)));
    }
}
