//! What `uamt info` reports about a volume file (NIfTI, NRRD or a UA-MT HDF5 case): shape, data
//! type, spacing, orientation, intensity statistics and, for integer volumes, label counts.

use super::error::{DataError, Result};
use super::h5::open_h5;
use super::nifti::{DType, GzCache, NiftiVolume};
use super::nrrd::read_nrrd;
use super::volume::Geometry;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Most distinct values for which label counts are reported.
pub const MAX_LABELS: usize = 64;

/// The description of one volume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeInfo {
    /// The file (and `:dataset` for HDF5).
    pub file: String,
    /// `[X, Y, Z]`.
    pub shape: [usize; 3],
    /// Stored data type (numpy spelling).
    pub dtype: String,
    /// Voxel size in millimetres (`null` where the file has none).
    pub spacing: Option<[f64; 3]>,
    /// Axis codes such as `RAS` (`null` where the file has no geometry).
    pub orientation: Option<String>,
    /// Smallest finite value (scaling applied).
    pub min: f64,
    /// Largest finite value.
    pub max: f64,
    /// Mean of the finite values.
    pub mean: f64,
    /// Population standard deviation of the finite values.
    pub std: f64,
    /// NaN or infinite voxels.
    pub non_finite: u64,
    /// Voxels per value, for integer volumes with at most [`MAX_LABELS`] distinct values.
    pub labels: Option<BTreeMap<i64, u64>>,
}

/// Running statistics over values fed in chunks.
#[derive(Debug, Clone)]
struct Accumulator {
    n: u64,
    min: f64,
    max: f64,
    mean: f64,
    m2: f64,
    non_finite: u64,
    labels: Option<BTreeMap<i64, u64>>,
}

impl Accumulator {
    fn new(integer: bool) -> Self {
        Accumulator {
            n: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            mean: 0.0,
            m2: 0.0,
            non_finite: 0,
            labels: integer.then(BTreeMap::new),
        }
    }

    fn push(&mut self, chunk: &[f64]) {
        // Chan et al.'s parallel update of (n, mean, M2) per chunk keeps the result exact enough
        // for tens of millions of voxels.
        let (mut n, mut sum) = (0u64, 0.0);
        for &v in chunk {
            if v.is_finite() {
                n += 1;
                sum += v;
                self.min = self.min.min(v);
                self.max = self.max.max(v);
            } else {
                self.non_finite += 1;
            }
        }
        if n == 0 {
            return;
        }
        let cmean = sum / n as f64;
        let cm2: f64 = chunk.iter().filter(|v| v.is_finite()).map(|v| (v - cmean) * (v - cmean)).sum();
        let total = self.n + n;
        let delta = cmean - self.mean;
        self.mean += delta * n as f64 / total as f64;
        self.m2 += cm2 + delta * delta * self.n as f64 * n as f64 / total as f64;
        self.n = total;
        if let Some(labels) = &mut self.labels {
            for &v in chunk {
                if v.is_finite() && v.fract() == 0.0 {
                    *labels.entry(v as i64).or_insert(0) += 1;
                }
            }
            if labels.len() > MAX_LABELS {
                self.labels = None;
            }
        }
    }

    fn finish(
        self,
        file: String,
        shape: [usize; 3],
        dtype: &str,
        geometry: Option<(&Geometry, [f64; 3])>,
    ) -> VolumeInfo {
        let empty = self.n == 0;
        VolumeInfo {
            file,
            shape,
            dtype: dtype.into(),
            spacing: geometry.map(|g| g.1),
            orientation: geometry.map(|g| g.0.orientation()),
            min: if empty { f64::NAN } else { self.min },
            max: if empty { f64::NAN } else { self.max },
            mean: if empty { f64::NAN } else { self.mean },
            std: if empty { f64::NAN } else { (self.m2 / self.n as f64).sqrt() },
            non_finite: self.non_finite,
            labels: self.labels,
        }
    }
}

const CHUNK: usize = 1 << 16;

/// Describes a NIfTI file (`.nii` mapped, `.nii.gz` decompressed in memory).
pub fn describe_nifti(path: &Path) -> Result<VolumeInfo> {
    let v = NiftiVolume::open(path, &GzCache::Memory)?;
    let h = v.header();
    let mut acc =
        Accumulator::new(h.dtype.is_integer() && h.scale.slope.fract() == 0.0 && h.scale.inter.fract() == 0.0);
    let mut buf = vec![0f64; CHUNK];
    let n = v.len();
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        v.read_line(start, 1, &mut buf[..len])?;
        acc.push(&buf[..len]);
        start += len;
    }
    Ok(acc.finish(path.display().to_string(), h.dims, h.dtype.name(), Some((&h.geometry, h.spacing))))
}

fn describe_values(
    file: String,
    shape: [usize; 3],
    dtype: DType,
    values: impl Iterator<Item = f64>,
    geometry: Option<(&Geometry, [f64; 3])>,
) -> VolumeInfo {
    let mut acc = Accumulator::new(dtype.is_integer());
    let mut buf = Vec::with_capacity(CHUNK);
    for v in values {
        buf.push(v);
        if buf.len() == CHUNK {
            acc.push(&buf);
            buf.clear();
        }
    }
    acc.push(&buf);
    acc.finish(file, shape, dtype.name(), geometry)
}

/// Describes every 3-D numeric dataset of an HDF5 file (UA-MT's `image` and `label`).
pub fn describe_h5(path: &Path) -> Result<Vec<VolumeInfo>> {
    let file = open_h5(path)?;
    let datasets = file.datasets().map_err(|e| DataError::bad(path, format!("cannot list datasets: {e}")))?;
    let mut out = Vec::new();
    for ds in datasets {
        let name = ds.name().trim_start_matches('/').to_string();
        if ds.ndim() != 3 {
            continue;
        }
        let desc = ds
            .dtype()
            .and_then(|t| t.to_descriptor())
            .map_err(|e| DataError::bad(path, format!("dataset `{name}`: {e}")))?;
        use hdf5::types::{FloatSize, IntSize, TypeDescriptor as T};
        let dtype = match desc {
            T::Unsigned(IntSize::U1) => DType::Uint8,
            T::Integer(IntSize::U2) => DType::Int16,
            T::Unsigned(IntSize::U2) => DType::Uint16,
            T::Integer(_) | T::Unsigned(_) => DType::Int32,
            T::Float(FloatSize::U8) => DType::Float64,
            T::Float(_) => DType::Float32,
            _ => continue,
        };
        let shape = ds.shape();
        let dims = [shape[0], shape[1], shape[2]];
        let values: Vec<f64> =
            ds.read_raw().map_err(|e| DataError::bad(path, format!("cannot read dataset `{name}`: {e}")))?;
        out.push(describe_values(format!("{}:{name}", path.display()), dims, dtype, values.into_iter(), None));
    }
    if out.is_empty() {
        return Err(DataError::bad(path, "no 3-D numeric dataset"));
    }
    Ok(out)
}

/// Describes a NRRD file.
pub fn describe_nrrd(path: &Path) -> Result<VolumeInfo> {
    let v = read_nrrd(path)?;
    let spacing = v.geometry.spacing();
    Ok(describe_values(
        path.display().to_string(),
        v.volume.dims,
        v.dtype,
        v.volume.data.iter().map(|&x| x as f64),
        Some((&v.geometry, spacing)),
    ))
}

/// Describes a volume file by its extension: `.nii`, `.nii.gz`, `.nrrd`, `.h5`/`.hdf5`.
pub fn describe(path: &Path) -> Result<Vec<VolumeInfo>> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        Ok(vec![describe_nifti(path)?])
    } else if name.ends_with(".nrrd") {
        Ok(vec![describe_nrrd(path)?])
    } else if name.ends_with(".h5") || name.ends_with(".hdf5") {
        describe_h5(path)
    } else {
        Err(DataError::bad(path, "unknown file type (expected .nii, .nii.gz, .nrrd, .h5)"))
    }
}
