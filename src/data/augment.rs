//! The recipe's training augmentation: rot90 by k in the (x, y) plane, a flip along x or y,
//! then a random crop with the reference's zero-padding rule. [`extract`] cuts the augmented
//! patch straight out of a (mapped) volume without materialising the rotated volume; the tests
//! hold it to numpy and to a plain step-by-step version (rotate, flip, pad, crop) of their own.
//!
//! Reference semantics (numpy, on arrays indexed `[x][y][z]`): `np.rot90(v, k)` (axes 0, 1),
//! `np.flip(v, axis)` with axis 0 or 1, then if ANY axis of the rotated shape is `<= patch`,
//! every axis is padded on both sides by `max((patch - size) // 2 + 3, 0)` (Python floor
//! division, so an axis up to 4 voxels longer than the patch is padded too), and the crop start
//! is drawn from `0..(padded - patch)`, exclusive, as `np.random.randint` draws it.

use super::error::{DataError, Result};
use super::nifti::{FromVoxel, NiftiVolume};
use super::volume::Volume;
use crate::rng::Rng;

/// Anything a patch can be read from: a mapped NIfTI file or an in-memory volume.
pub trait VoxelSource {
    /// `[X, Y, Z]`.
    fn dims(&self) -> [usize; 3];
    /// `out[i]` = the voxel at linear (x-fastest) index `start + i * step`.
    fn read_line<T: FromVoxel>(&self, start: usize, step: isize, out: &mut [T]) -> Result<()>;
}

impl VoxelSource for NiftiVolume {
    fn dims(&self) -> [usize; 3] {
        NiftiVolume::dims(self)
    }
    fn read_line<T: FromVoxel>(&self, start: usize, step: isize, out: &mut [T]) -> Result<()> {
        NiftiVolume::read_line(self, start, step, out)
    }
}

impl<V: Copy + Default + Into<f64>> VoxelSource for Volume<V> {
    fn dims(&self) -> [usize; 3] {
        self.dims
    }
    fn read_line<T: FromVoxel>(&self, start: usize, step: isize, out: &mut [T]) -> Result<()> {
        let mut e = start as isize;
        for o in out.iter_mut() {
            let v = usize::try_from(e).ok().and_then(|i| self.data.get(i)).ok_or_else(|| {
                DataError::invalid("volume read", format!("index {e} outside a volume of {:?}", self.dims))
            })?;
            *o = T::from_f64((*v).into());
            e += step;
        }
        Ok(())
    }
}

/// The shape after `np.rot90(v, k)`: x and y swap for odd `k`.
pub fn rotated_dims(dims: [usize; 3], k: u8) -> [usize; 3] {
    if k % 2 == 1 {
        [dims[1], dims[0], dims[2]]
    } else {
        dims
    }
}

/// The reference's zero padding per side before the crop (see the module docs).
pub fn crop_padding(dims: [usize; 3], patch: [usize; 3]) -> [usize; 3] {
    if (0..3).all(|i| dims[i] > patch[i]) {
        return [0; 3];
    }
    [0, 1, 2].map(|i| {
        let p = (patch[i] as i64 - dims[i] as i64).div_euclid(2) + 3;
        p.max(0) as usize
    })
}

/// One patch's augmentation: everything needed to cut it, drawn once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Quarter turns in the (x, y) plane, 0..=3 (`np.rot90(v, k)`).
    pub k: u8,
    /// Axis flipped after the rotation: `Some(0)` x, `Some(1)` y, `None` no flip.
    pub flip: Option<u8>,
    /// Zero padding per side, in the rotated volume's axes.
    pub pad: [usize; 3],
    /// Crop start in the padded, rotated volume.
    pub offset: [usize; 3],
}

impl Augment {
    /// Draws an augmentation for a volume of `dims` in the reference's order (k, flip axis, then
    /// the crop start per axis); without `rot_flip` only the crop is random.
    pub fn draw(rng: &mut Rng, dims: [usize; 3], patch: [usize; 3], rot_flip: bool) -> Self {
        let (k, flip) = if rot_flip { (rng.below(4) as u8, Some(rng.below(2) as u8)) } else { (0, None) };
        let r = rotated_dims(dims, k);
        let pad = crop_padding(r, patch);
        let offset = [0, 1, 2].map(|i| rng.below((r[i] + 2 * pad[i]).saturating_sub(patch[i]) as u64) as usize);
        Augment { k, flip, pad, offset }
    }

    /// No rotation, no flip, no padding: a plain crop at `offset`.
    pub fn crop_at(offset: [usize; 3]) -> Self {
        Augment { k: 0, flip: None, pad: [0; 3], offset }
    }
}

/// Cuts the augmented patch of shape `patch` out of `src` into `out`, in C order
/// (`out[(i * PY + j) * PZ + l]` is patch voxel `(i, j, l)`, the layout of a tch tensor of shape
/// `[PX, PY, PZ]`). Voxels from the padding are 0.
pub fn extract<S: VoxelSource, T: FromVoxel>(src: &S, aug: &Augment, patch: [usize; 3], out: &mut [T]) -> Result<()> {
    let [w, h, d] = src.dims();
    let [px, py, pz] = patch;
    if out.len() != px * py * pz {
        return Err(DataError::invalid("patch buffer", format!("{} elements for a patch of {patch:?}", out.len())));
    }
    if aug.k > 3 || aug.flip.is_some_and(|f| f > 1) {
        return Err(DataError::invalid("augment", format!("k {} / flip {:?} out of range", aug.k, aug.flip)));
    }
    let [rw, rh, _] = rotated_dims([w, h, d], aug.k);
    let (w, h, d) = (w as isize, h as isize, d as isize);
    let shift = [0, 1, 2].map(|i| aug.offset[i] as isize - aug.pad[i] as isize);
    // The z range of the patch that falls inside the volume is the same for every line.
    let l0 = (-shift[2]).clamp(0, pz as isize) as usize;
    let l1 = (d - shift[2]).clamp(l0 as isize, pz as isize) as usize;
    let z0 = l0 as isize + shift[2];
    for j in 0..py {
        for i in 0..px {
            let line = &mut out[(i * py + j) * pz..(i * py + j + 1) * pz];
            let (mut a, mut b) = (i as isize + shift[0], j as isize + shift[1]);
            let inside = (0..rw as isize).contains(&a) && (0..rh as isize).contains(&b) && l1 > l0;
            if !inside {
                line.fill(T::default());
                continue;
            }
            match aug.flip {
                Some(0) => a = rw as isize - 1 - a,
                Some(_) => b = rh as isize - 1 - b,
                None => {}
            }
            let (sx, sy) = match aug.k {
                0 => (a, b),
                1 => (b, h - 1 - a),
                2 => (w - 1 - a, h - 1 - b),
                _ => (w - 1 - b, a),
            };
            line[..l0].fill(T::default());
            line[l1..].fill(T::default());
            let start = (sx + w * (sy + h * z0)) as usize;
            src.read_line(start, w * h, &mut line[l0..l1])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_pad_like_the_reference() {
        let p = [112, 112, 80];
        assert_eq!(crop_padding([200, 150, 88], p), [0, 0, 0]);
        // z = 80 triggers; x = 113 is padded too ((112 - 113) // 2 + 3 = 2), y = 200 is not.
        assert_eq!(crop_padding([113, 200, 80], p), [2, 0, 3]);
        assert_eq!(crop_padding([100, 120, 60], p), [9, 0, 13]);
    }
}
