//! How the sliding window combines overlapping windows (`[eval] blend`, `--blend`): every window
//! counted alike (`constant`, the UA-MT reference's average), or weighted by a Gaussian
//! importance map that trusts a window's centre more than its border (`gaussian`, as nnU-Net and
//! MONAI's `mode="gaussian"` do).
//!
//! The Gaussian map of a window of `p = [px, py, pz]` voxels is nnU-Net's: a unit impulse at
//! voxel `p / 2` (integer division) blurred by a Gaussian of `sigma = p / 8` per axis, divided by
//! its maximum, i.e. `w(i, j, k) = exp(-(i - px/2)^2 / (2 sx^2)) * exp(-(j - py/2)^2 / (2 sy^2))
//! * exp(-(k - pz/2)^2 / (2 sz^2))` (1 at the centre; computed in float64, stored as float32),
//! with any weight that is 0 in float32 raised to the smallest non-zero one, so that every voxel
//! of every window counts. The blended probability of a voxel is `sum_w w * p_w / sum_w w` over
//! the windows `w` covering it: the classes still sum to 1.

use crate::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How overlapping windows are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Blend {
    /// Every window alike: the plain average (the reference's numbers).
    #[default]
    Constant,
    /// Weighted by the Gaussian importance map ([`importance_map`]).
    Gaussian,
}

impl Blend {
    /// Whether this is the default (left out of a written config).
    pub fn is_constant(&self) -> bool {
        *self == Blend::Constant
    }
}

impl TryFrom<String> for Blend {
    type Error = String;
    /// The config's `blend = "..."`; an unknown name is refused naming the key.
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse().map_err(|e| format!("blend {e}"))
    }
}

impl std::str::FromStr for Blend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Blend::Constant),
            "gaussian" => Ok(Blend::Gaussian),
            _ => Err(format!("`{s}`: give constant or gaussian")),
        }
    }
}

/// The Gaussian importance map of a window of `patch` voxels, `[px][py][pz]` in row-major order
/// (z fastest, as the window's tensor `[px, py, pz]`): see the module's documentation.
pub fn importance_map(patch: [usize; 3]) -> Vec<f32> {
    gaussian_map(patch, 1.0 / 8.0)
}

/// The importance map with `sigma = scale * patch` per axis. At `scale = 1/8` no weight
/// underflows float32 (the farthest voxel lies 4 sigma out per axis: `exp(-24)` in all), so the
/// raising of zeros only acts at smaller scales.
fn gaussian_map(patch: [usize; 3], scale: f64) -> Vec<f32> {
    let axis = |p: usize| -> Vec<f64> {
        let (centre, sigma) = ((p / 2) as f64, p as f64 * scale);
        (0..p).map(|i| (-((i as f64 - centre).powi(2)) / (2.0 * sigma * sigma)).exp()).collect()
    };
    let [gx, gy, gz] = patch.map(axis);
    let mut w = Vec::with_capacity(patch.iter().product());
    for &x in &gx {
        for &y in &gy {
            w.extend(gz.iter().map(|&z| x * y * z));
        }
    }
    let max = w.iter().cloned().fold(0.0f64, f64::max);
    let mut w: Vec<f32> = w.into_iter().map(|v| (v / max) as f32).collect();
    let smallest = w.iter().cloned().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
    w.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = smallest);
    w
}

/// The weight of every voxel of a window `[px, py, pz]` on `device` under `blend`; `None` for
/// [`Blend::Constant`] (every window counts once).
pub fn window_weight(blend: Blend, patch: [usize; 3], device: Device) -> Result<Option<Tensor>> {
    match blend {
        Blend::Constant => Ok(None),
        Blend::Gaussian => {
            let shape = patch.map(|p| p as i64);
            Ok(Some(Tensor::f_from_slice(&importance_map(patch))?.f_view(shape)?.f_to_device(device)?))
        }
    }
}

/// The sum of the window weights `weight` (`[px, py, pz]`) at every voxel of a padded volume of
/// `padded` voxels covered by windows starting at `starts`: the denominator of the blend.
pub fn weight_sum(starts: &[[usize; 3]], padded: [usize; 3], weight: &Tensor) -> Result<Tensor> {
    let size = weight.size();
    let sum = Tensor::f_zeros(padded.map(|p| p as i64), (Kind::Float, weight.device()))?;
    for s in starts {
        let _ = sum
            .f_narrow(0, s[0] as i64, size[0])?
            .f_narrow(1, s[1] as i64, size[1])?
            .f_narrow(2, s[2] as i64, size[2])?
            .f_add_(weight)?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_peaks_at_the_centre_and_never_reaches_zero() {
        let p = [32, 16, 16];
        let w = importance_map(p);
        assert_eq!(w.len(), 32 * 16 * 16);
        let at = |x: usize, y: usize, z: usize| w[(x * 16 + y) * 16 + z];
        assert_eq!(at(16, 8, 8), 1.0);
        assert!(w.iter().all(|&v| v > 0.0 && v <= 1.0));
        // The corner: exp(-8) per axis (distance p/2 = 4 sigma), about 3.9e-11 in all.
        let corner = (-24.0f64).exp() as f32;
        assert!((at(0, 0, 0) - corner).abs() <= 1e-6 * corner, "{} vs {corner}", at(0, 0, 0));
        // Symmetric about the centre where both sides exist.
        assert_eq!(at(15, 8, 8), at(17, 8, 8));
    }

    #[test]
    fn zeros_are_raised_to_the_smallest_weight() {
        // sigma = 1/32 of 64: exp(-128) per axis underflows float32 at the corners.
        let w = gaussian_map([64, 64, 64], 1.0 / 32.0);
        let min = w.iter().cloned().fold(f32::INFINITY, f32::min);
        assert!(min > 0.0);
        assert!(w.iter().filter(|&&v| v == min).count() > 1, "several corners share the clamped weight");
    }

    #[test]
    fn blend_names_parse() {
        assert_eq!("gaussian".parse::<Blend>().unwrap(), Blend::Gaussian);
        assert_eq!("constant".parse::<Blend>().unwrap(), Blend::Constant);
        assert!("mean".parse::<Blend>().unwrap_err().contains("gaussian"));
    }
}
