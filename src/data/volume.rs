//! The in-memory volume type and its geometry. Axis order: shape `[X, Y, Z]`, stored with x
//! fastest (NIfTI's and NRRD's on-disk order, Fortran order in numpy terms), so voxel
//! `(x, y, z)` sits at `x + X * (y + Y * z)`. UA-MT's HDF5 arrays (`image[x][y][z]` in numpy C
//! order) and tch tensors of shape `[X, Y, Z]` (C order, z fastest) are converted explicitly.

use super::error::{DataError, Result};
use tch::{Kind, Tensor};

/// A 3-D array of voxels, x fastest. Invariant: `data.len()` is the product of `dims`; the
/// constructors ([`Volume::new`], [`Volume::zeros`], [`Volume::from_c_order`]) check it.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    /// `[X, Y, Z]`.
    pub dims: [usize; 3],
    /// `X * Y * Z` voxels, x fastest.
    pub data: Vec<T>,
}

/// Number of voxels of `dims`, or an error naming `what` if it overflows.
pub fn voxel_count(dims: [usize; 3], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::invalid(what, format!("shape {dims:?} overflows")))
}

impl<T: Copy + Default> Volume<T> {
    /// A volume of `dims` filled with `T::default()`.
    pub fn zeros(dims: [usize; 3]) -> Self {
        Volume { dims, data: vec![T::default(); dims[0] * dims[1] * dims[2]] }
    }

    /// Wraps `data` (x fastest) after checking its length against `dims`.
    pub fn new(dims: [usize; 3], data: Vec<T>) -> Result<Self> {
        let n = voxel_count(dims, "volume shape")?;
        if data.len() != n {
            return Err(DataError::invalid("volume", format!("shape {dims:?} needs {n} voxels, got {}", data.len())));
        }
        Ok(Volume { dims, data })
    }

    /// Builds a volume from numpy C-order data of shape `[X, Y, Z]` (z fastest), as h5py and
    /// UA-MT's HDF5 files hold it.
    pub fn from_c_order(dims: [usize; 3], c: &[T]) -> Result<Self> {
        let n = voxel_count(dims, "volume shape")?;
        if c.len() != n {
            return Err(DataError::invalid("volume", format!("shape {dims:?} needs {n} voxels, got {}", c.len())));
        }
        let [nx, ny, nz] = dims;
        let mut data = Vec::with_capacity(n);
        for z in 0..nz {
            for y in 0..ny {
                data.extend((0..nx).map(|x| c[(x * ny + y) * nz + z]));
            }
        }
        Ok(Volume { dims, data })
    }

    /// The voxels in numpy C order of shape `[X, Y, Z]` (z fastest), the layout of a tch tensor
    /// of that shape.
    pub fn to_c_order(&self) -> Vec<T> {
        let [nx, ny, nz] = self.dims;
        let mut c = Vec::with_capacity(self.data.len());
        for x in 0..nx {
            for y in 0..ny {
                c.extend((0..nz).map(|z| self.data[x + nx * (y + ny * z)]));
            }
        }
        c
    }

    /// Linear index of `(x, y, z)`; the caller keeps the coordinates in range.
    #[inline]
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.dims[0] * (y + self.dims[1] * z)
    }

    /// The voxel at `(x, y, z)`, or `None` outside the volume.
    pub fn get(&self, x: usize, y: usize, z: usize) -> Option<T> {
        if x < self.dims[0] && y < self.dims[1] && z < self.dims[2] {
            self.data.get(self.index(x, y, z)).copied()
        } else {
            None
        }
    }

    /// Applies `f` to every voxel.
    pub fn map<U: Copy + Default>(&self, f: impl Fn(T) -> U) -> Volume<U> {
        Volume { dims: self.dims, data: self.data.iter().map(|&v| f(v)).collect() }
    }
}

/// Element types that can become a tch tensor.
pub trait TensorElement: tch::kind::Element + Copy + Default {}
impl TensorElement for f32 {}
impl TensorElement for f64 {}
impl TensorElement for u8 {}
impl TensorElement for i16 {}
impl TensorElement for i32 {}
impl TensorElement for i64 {}

impl<T: TensorElement> Volume<T> {
    /// A CPU tensor of shape `[X, Y, Z]` (contiguous, C order): `t[x][y][z] == self.get(x, y, z)`.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let [x, y, z] = self.dims.map(|d| d as i64);
        let t = Tensor::f_from_slice(&self.data)?.f_view([z, y, x])?.f_permute([2, 1, 0])?.f_contiguous()?;
        Ok(t)
    }

    /// A volume from a tensor of shape `[X, Y, Z]` (any layout, any device), converted to `T`.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let size = t.size();
        let dims = match size.as_slice() {
            &[x, y, z] if x >= 0 && y >= 0 && z >= 0 => [x as usize, y as usize, z as usize],
            _ => return Err(DataError::invalid("tensor", format!("expected shape [X, Y, Z], got {size:?}"))),
        };
        let flat =
            t.f_to_device(tch::Device::Cpu)?.f_to_kind(T::KIND)?.f_permute([2, 1, 0])?.f_contiguous()?.f_view([-1])?;
        let data = Vec::<T>::try_from(&flat)?;
        Volume::new(dims, data)
    }
}

/// Voxel spacing and the voxel-to-world (RAS+, millimetres) affine of a volume, as NIfTI keeps them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Row-major 4x4 affine: world = affine * [x, y, z, 1].
    pub affine: [[f64; 4]; 4],
}

impl Geometry {
    /// An axis-aligned geometry with the given spacing and the origin at voxel (0, 0, 0).
    pub fn from_spacing(spacing: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for (i, s) in spacing.iter().enumerate() {
            affine[i][i] = *s;
        }
        affine[3][3] = 1.0;
        Geometry { affine }
    }

    /// Voxel size along each axis: the lengths of the affine's first three columns.
    pub fn spacing(&self) -> [f64; 3] {
        [0, 1, 2].map(|j| (0..3).map(|i| self.affine[i][j] * self.affine[i][j]).sum::<f64>().sqrt())
    }

    /// The same geometry for the sub-volume starting at voxel `origin`.
    pub fn cropped(&self, origin: [usize; 3]) -> Self {
        let mut g = *self;
        for i in 0..3 {
            g.affine[i][3] += (0..3).map(|j| self.affine[i][j] * origin[j] as f64).sum::<f64>();
        }
        g
    }

    /// Axis codes (`"RAS"`, `"LPS"`, ...): for each voxel axis, the world direction it points
    /// to most (R/L for world x, A/P for y, S/I for z), each world axis used once, like
    /// nibabel's `aff2axcodes` for non-oblique affines. `?` for a degenerate axis.
    pub fn orientation(&self) -> String {
        let mut used = [false; 3];
        let mut codes = ['?'; 3];
        // Assign the voxel axis / world axis pairs in order of decreasing magnitude.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::with_capacity(9);
        for j in 0..3 {
            for i in 0..3 {
                pairs.push((self.affine[i][j].abs(), i, j));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut done = [false; 3];
        for (mag, i, j) in pairs {
            if mag <= 0.0 || !mag.is_finite() || used[i] || done[j] {
                continue;
            }
            used[i] = true;
            done[j] = true;
            let positive = self.affine[i][j] > 0.0;
            codes[j] = match (i, positive) {
                (0, true) => 'R',
                (0, false) => 'L',
                (1, true) => 'A',
                (1, false) => 'P',
                (_, true) => 'S',
                (_, false) => 'I',
            };
        }
        codes.iter().collect()
    }
}

/// The tch kind a label tensor has in a batch (the trainer's cross-entropy wants int64).
pub const LABEL_KIND: Kind = Kind::Int64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_round_trip_c_order() {
        let dims = [3, 2, 4];
        let c: Vec<u16> = (0..24).collect();
        let v = Volume::from_c_order(dims, &c).unwrap();
        // numpy: c[x][y][z] = (x*2 + y)*4 + z
        assert_eq!(v.get(2, 1, 3), Some(((2 * 2 + 1) * 4 + 3) as u16));
        assert_eq!(v.to_c_order(), c);
    }

    #[test]
    fn should_index_tensor_as_x_y_z() {
        let v = Volume::new([2, 3, 4], (0..24).map(|i| i as f32).collect()).unwrap();
        let t = v.to_tensor().unwrap();
        assert_eq!(t.size(), vec![2, 3, 4]);
        assert_eq!(t.double_value(&[1, 2, 3]), v.get(1, 2, 3).unwrap() as f64);
        assert_eq!(Volume::<f32>::from_tensor(&t).unwrap(), v);
    }

    #[test]
    fn should_name_orientation_codes() {
        assert_eq!(Geometry::from_spacing([1.0, 1.0, 2.0]).orientation(), "RAS");
        let mut g = Geometry::from_spacing([1.0, 1.0, 1.0]);
        g.affine[0][0] = -1.0;
        g.affine[1][1] = -1.0;
        assert_eq!(g.orientation(), "LPS");
        assert_eq!(g.spacing(), [1.0, 1.0, 1.0]);
    }
}
