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

/// The most voxels a volume read from a file may have (2^30, 4 GiB as float32): every reader
/// checks a header's shape against it (and against the bytes the file holds) before allocating.
/// The 2018 LA volumes have about 2^25.
pub const MAX_VOXELS: usize = 1 << 30;

/// Number of voxels of `dims` as a file's header declares them, refused (naming `path`) when it
/// overflows or exceeds [`MAX_VOXELS`].
pub fn bounded_voxel_count(dims: [usize; 3], path: &std::path::Path) -> Result<usize> {
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match n {
        Some(n) if n <= MAX_VOXELS => Ok(n),
        _ => Err(DataError::bad(path, format!("shape {dims:?} exceeds the limit of {MAX_VOXELS} voxels"))),
    }
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

    /// `Err` (saying what is wrong) unless the affine is finite and non-degenerate: every entry
    /// finite, every voxel size positive, the three axes independent (the determinant at least
    /// 1e-6 of the product of the voxel sizes). A zero pixdim, a NaN or an all-zero sform fail.
    pub fn check(&self) -> std::result::Result<(), String> {
        let a = &self.affine;
        if a.iter().take(3).flatten().any(|v| !v.is_finite()) {
            return Err(format!("its affine has a non-finite entry: {:?}", &a[..3]));
        }
        let s = self.spacing();
        if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(format!("its voxel size {s:?} is not positive in every axis (pixdim 0, or a zero sform)"));
        }
        let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
        if det.abs() < 1e-6 * s[0] * s[1] * s[2] {
            return Err(format!("its affine is degenerate (two axes point the same way): {:?}", &a[..3]));
        }
        Ok(())
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

    /// The geometry of a NIfTI qform: the rotation of the unit quaternion `(b, c, d)` (its `a`
    /// implied), the third column flipped when `qfac` is -1, scaled by `spacing`, translated by
    /// `offset`; `None` when `(b, c, d)` is longer than 1 (beyond rounding).
    pub fn from_qform(quatern: [f64; 3], qfac: f64, spacing: [f64; 3], offset: [f64; 3]) -> Option<Self> {
        let [b, c, d] = quatern;
        let w2 = 1.0 - (b * b + c * c + d * d);
        if w2 < -1e-6 {
            return None;
        }
        let r = quat_to_mat(w2.max(0.0).sqrt(), b, c, d);
        let mut vox = spacing;
        vox[2] *= qfac;
        let mut affine = [[0.0f64; 4]; 4];
        affine[3][3] = 1.0;
        for i in 0..3 {
            for j in 0..3 {
                affine[i][j] = r[i][j] * vox[j];
            }
            affine[i][3] = offset[i];
        }
        Some(Geometry { affine })
    }

    /// The qform quaternion `(b, c, d)` and `qfac` of this affine's rotation (its columns divided
    /// by the spacing), or `None` when the affine is not a rotation (up to a reflection) times a
    /// scaling.
    pub fn qform(&self) -> Option<([f64; 3], f64)> {
        let a = &self.affine;
        let spacing = self.spacing();
        let rot = [0, 1, 2].map(|i| [0, 1, 2].map(|j| if spacing[j] > 0.0 { a[i][j] / spacing[j] } else { 0.0 }));
        mat_to_quat(rot)
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

/// nibabel's quaternion-to-rotation (`quat2mat`) for `(w, x, y, z)`.
fn quat_to_mat(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]]
}

/// The quaternion `(b, c, d)` and `qfac` of an orthonormal rotation (nifti1_io's
/// `nifti_mat44_to_quatern`), or `None` if `r` is not a rotation (up to a reflection).
fn mat_to_quat(mut r: [[f64; 3]; 3]) -> Option<([f64; 3], f64)> {
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = (0..3).map(|k| r[k][i] * r[k][j]).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            if (dot - want).abs() > 1e-4 {
                return None;
            }
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    if det < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let trace1 = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, mut b, mut c, mut d): (f64, f64, f64, f64);
    if trace1 > 0.5 {
        a = 0.5 * trace1.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            (b, c, d) = (-b, -c, -d);
        }
    }
    Some(([b, c, d], qfac))
}

/// The tch kind a label tensor has in a batch (the trainer's cross-entropy wants int64).
pub const LABEL_KIND: Kind = Kind::Int64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_refuse_degenerate_geometry() {
        assert!(Geometry::from_spacing([1.25, 0.9, 1.37]).check().is_ok());
        let rotated = Geometry::from_qform([0.0, 0.0, 0.6], 1.0, [1.3, 0.9, 1.6], [5.0, -3.0, 1.0]).unwrap();
        assert!(rotated.check().is_ok());
        assert!(Geometry::from_spacing([1.25, 0.0, 1.37]).check().unwrap_err().contains("not positive"));
        assert!(Geometry::from_spacing([1.0, f64::NAN, 1.0]).check().unwrap_err().contains("non-finite"));
        let mut zero = Geometry::from_spacing([1.0; 3]);
        zero.affine = [[0.0; 4]; 4];
        assert!(zero.check().is_err());
        let mut flat = Geometry::from_spacing([1.0; 3]);
        flat.affine[0][1] = 1.0;
        flat.affine[1][1] = 0.0; // the y axis now points along x
        assert!(flat.check().unwrap_err().contains("degenerate"));
    }

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
    fn should_round_trip_rotations_through_quaternions() {
        let (s, c) = (0.6f64, 0.8f64);
        let r = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]];
        let ([b, cq, d], qfac) = mat_to_quat(r).unwrap();
        let a = (1.0 - (b * b + cq * cq + d * d)).max(0.0).sqrt();
        let m = quat_to_mat(a, b, cq, d);
        for i in 0..3 {
            for j in 0..3 {
                let want = if j == 2 { r[i][j] * qfac } else { r[i][j] };
                assert!((m[i][j] - want).abs() < 1e-9, "{m:?} vs {r:?}");
            }
        }
        assert!(mat_to_quat([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).is_none());
    }

    #[test]
    fn should_rebuild_an_affine_from_its_qform() {
        let (s, c) = (0.6f64, 0.8f64);
        let mut g = Geometry::from_spacing([0.5, 1.0, 2.0]);
        let r = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]];
        for i in 0..3 {
            for j in 0..3 {
                g.affine[i][j] = r[i][j] * [0.5, 1.0, 2.0][j];
            }
            g.affine[i][3] = [3.0, -4.0, 5.0][i];
        }
        let (q, qfac) = g.qform().unwrap();
        let back = Geometry::from_qform(q, qfac, g.spacing(), [3.0, -4.0, 5.0]).unwrap();
        for i in 0..4 {
            for j in 0..4 {
                assert!((back.affine[i][j] - g.affine[i][j]).abs() < 1e-9, "{back:?} vs {g:?}");
            }
        }
        assert!(Geometry::from_qform([0.9, 0.9, 0.0], 1.0, [1.0; 3], [0.0; 3]).is_none());
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
