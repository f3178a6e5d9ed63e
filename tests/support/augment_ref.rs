//! The recipe's augmentation done step by step as the reference does it (numpy's `rot90`,
//! `flip`, `pad`, then a crop), on whole volumes. Slow on purpose: the yardstick that the fast
//! [`uamt::data::augment::extract`] is held to.

use uamt::data::augment::{rotated_dims, Augment};
use uamt::data::Volume;

/// `np.rot90(v, k)` in the (x, y) plane (from x towards y).
pub fn rot90<T: Copy + Default>(v: &Volume<T>, k: u8) -> Volume<T> {
    let [w, h, d] = v.dims;
    let dims = rotated_dims(v.dims, k % 4);
    let mut out = Volume::zeros(dims);
    for z in 0..d {
        for b in 0..dims[1] {
            for a in 0..dims[0] {
                let (sx, sy) = match k % 4 {
                    0 => (a, b),
                    1 => (b, h - 1 - a),
                    2 => (w - 1 - a, h - 1 - b),
                    _ => (w - 1 - b, a),
                };
                let o = out.index(a, b, z);
                out.data[o] = v.data[v.index(sx, sy, z)];
            }
        }
    }
    out
}

/// `np.flip(v, axis)` for axis 0, 1 or 2.
pub fn flip<T: Copy + Default>(v: &Volume<T>, axis: usize) -> Volume<T> {
    let [w, h, d] = v.dims;
    let mut out = Volume::zeros(v.dims);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let (sx, sy, sz) = match axis {
                    0 => (w - 1 - x, y, z),
                    1 => (x, h - 1 - y, z),
                    _ => (x, y, d - 1 - z),
                };
                let o = out.index(x, y, z);
                out.data[o] = v.data[v.index(sx, sy, sz)];
            }
        }
    }
    out
}

/// `np.pad(v, [(p, p) for p in pad], constant 0)`.
pub fn pad<T: Copy + Default>(v: &Volume<T>, pad: [usize; 3]) -> Volume<T> {
    let dims = [0, 1, 2].map(|i| v.dims[i] + 2 * pad[i]);
    let mut out = Volume::zeros(dims);
    for z in 0..v.dims[2] {
        for y in 0..v.dims[1] {
            for x in 0..v.dims[0] {
                let o = out.index(x + pad[0], y + pad[1], z + pad[2]);
                out.data[o] = v.data[v.index(x, y, z)];
            }
        }
    }
    out
}

/// `v[o0:o0+s0, o1:o1+s1, o2:o2+s2]`; an error naming the box if it leaves the volume.
pub fn crop<T: Copy + Default>(v: &Volume<T>, offset: [usize; 3], size: [usize; 3]) -> Result<Volume<T>, String> {
    if (0..3).any(|i| offset[i] + size[i] > v.dims[i]) {
        return Err(format!("crop box at {offset:?} of {size:?} leaves a volume of {:?}", v.dims));
    }
    let mut out = Volume::zeros(size);
    for z in 0..size[2] {
        for y in 0..size[1] {
            for x in 0..size[0] {
                let o = out.index(x, y, z);
                out.data[o] = v.data[v.index(x + offset[0], y + offset[1], z + offset[2])];
            }
        }
    }
    Ok(out)
}

/// The augmentation `aug` done as the reference does it (rotate, flip, pad, crop to `patch`),
/// returning an x-fastest volume.
pub fn augment_reference<T: Copy + Default>(
    v: &Volume<T>,
    aug: &Augment,
    patch: [usize; 3],
) -> Result<Volume<T>, String> {
    let mut r = rot90(v, aug.k);
    if let Some(axis) = aug.flip {
        r = flip(&r, axis as usize);
    }
    crop(&pad(&r, aug.pad), aug.offset, patch)
}
