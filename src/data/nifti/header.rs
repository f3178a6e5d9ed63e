//! The NIfTI-1 header: the voxel data types, the intensity scaling, and parsing plus validation
//! of the 348 header bytes (through the `nifti` crate) into a [`Header`] with its geometry chosen
//! the way nibabel chooses it.

use crate::data::error::{DataError, Result};
use crate::data::volume::{bounded_voxel_count, Geometry};
use std::path::Path;

/// Size of a NIfTI-1 header.
pub(super) const HEADER_LEN: usize = 348;
/// Offset of the voxels in the files we write: the header plus the 4-byte extension flag.
pub(super) const DATA_OFFSET: usize = 352;

/// The largest `vox_offset` accepted (64 MiB of header extensions), so that a header can never
/// declare more than `MAX_VOX_OFFSET + MAX_VOXELS * 8` bytes.
const MAX_VOX_OFFSET: f32 = (1u32 << 26) as f32;

/// Voxel data types this module reads (and writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// NIfTI code 2.
    Uint8,
    /// NIfTI code 4.
    Int16,
    /// NIfTI code 512.
    Uint16,
    /// NIfTI code 8.
    Int32,
    /// NIfTI code 16.
    Float32,
    /// NIfTI code 64.
    Float64,
}

impl DType {
    /// The NIfTI `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            DType::Uint8 => 2,
            DType::Int16 => 4,
            DType::Int32 => 8,
            DType::Float32 => 16,
            DType::Float64 => 64,
            DType::Uint16 => 512,
        }
    }

    /// The type for a NIfTI `datatype` code, if supported.
    pub fn from_code(code: i16) -> Option<Self> {
        [DType::Uint8, DType::Int16, DType::Uint16, DType::Int32, DType::Float32, DType::Float64]
            .into_iter()
            .find(|d| d.code() == code)
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            DType::Uint8 => 1,
            DType::Int16 | DType::Uint16 => 2,
            DType::Int32 | DType::Float32 => 4,
            DType::Float64 => 8,
        }
    }

    /// Lowercase name (`uint8`, `float32`, ...), as numpy spells it.
    pub fn name(self) -> &'static str {
        match self {
            DType::Uint8 => "uint8",
            DType::Int16 => "int16",
            DType::Uint16 => "uint16",
            DType::Int32 => "int32",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
        }
    }

    /// Whether the stored values are integers.
    pub fn is_integer(self) -> bool {
        !matches!(self, DType::Float32 | DType::Float64)
    }
}

/// The linear intensity scaling `value = stored * slope + inter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// `scl_slope` (1 when the header has 0 or a non-finite value, as nibabel reads it).
    pub slope: f64,
    /// `scl_inter` (0 when the slope is ignored).
    pub inter: f64,
}

impl Scale {
    /// No scaling.
    pub const IDENTITY: Scale = Scale { slope: 1.0, inter: 0.0 };

    /// Whether this scaling changes nothing.
    pub fn is_identity(&self) -> bool {
        self.slope == 1.0 && self.inter == 0.0
    }
}

/// What a NIfTI header says about a volume, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// `[X, Y, Z]` (`dim[1..=3]`; missing axes are 1).
    pub dims: [usize; 3],
    /// The stored data type.
    pub dtype: DType,
    /// `pixdim[1..=3]`, the voxel size in millimetres.
    pub spacing: [f64; 3],
    /// The voxel-to-world affine: sform if its code is set, else qform, else nibabel's fallback.
    pub geometry: Geometry,
    /// The intensity scaling applied on every read.
    pub scale: Scale,
    /// Whether the file is big-endian.
    pub big_endian: bool,
    /// Byte offset of the first voxel.
    pub vox_offset: usize,
}

/// The geometry a header describes, chosen the way nibabel's `get_best_affine` chooses.
fn header_geometry(h: &nifti::NiftiHeader, path: &Path) -> Result<Geometry> {
    if h.sform_code > 0 {
        let mut affine = [[0.0f64; 4]; 4];
        affine[3][3] = 1.0;
        for (i, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for j in 0..4 {
                affine[i][j] = row[j] as f64;
            }
        }
        Ok(Geometry { affine })
    } else if h.qform_code > 0 {
        let quatern = [h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64];
        let qfac = if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let spacing = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64];
        let offset = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        Geometry::from_qform(quatern, qfac, spacing, offset).ok_or_else(|| {
            let [b, c, d] = quatern;
            DataError::bad(path, format!("invalid qform quaternion ({b}, {c}, {d})"))
        })
    } else {
        // nibabel's Analyze fallback: x flipped, origin at the centre of the volume.
        let mut affine = [[0.0f64; 4]; 4];
        affine[3][3] = 1.0;
        let ndim = (h.dim[0] as usize).clamp(1, 3);
        for (i, row) in affine.iter_mut().take(3).enumerate() {
            let (n, zoom) = if i < ndim { (h.dim[i + 1] as f64, h.pixdim[i + 1] as f64) } else { (1.0, 1.0) };
            let zoom = if i == 0 { -zoom } else { zoom };
            row[i] = zoom;
            row[3] = -(n - 1.0) / 2.0 * zoom;
        }
        Ok(Geometry { affine })
    }
}

/// Parses and validates the header at the start of `bytes`, and checks that `bytes` holds every
/// voxel it declares.
pub(super) fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let (header, need) = parse_declared(bytes, path)?;
    if bytes.len() < need {
        return Err(DataError::bad(
            path,
            format!(
                "truncated: the header promises {need} bytes ({:?} {} from offset {}), the file has {}",
                header.dims,
                header.dtype.name(),
                header.vox_offset,
                bytes.len()
            ),
        ));
    }
    Ok(header)
}

/// Parses and validates the header at the start of `bytes` (only its first 348 bytes are
/// needed) and returns it with the file length it declares (`vox_offset` plus the voxels),
/// which is at most `vox_offset + MAX_VOXELS * 8`.
pub(super) fn parse_declared(bytes: &[u8], path: &Path) -> Result<(Header, usize)> {
    let head = bytes.get(..HEADER_LEN).ok_or_else(|| {
        DataError::bad(path, format!("truncated: {} bytes, shorter than a NIfTI-1 header (348)", bytes.len()))
    })?;
    let h =
        nifti::NiftiHeader::from_reader(head).map_err(|e| DataError::bad(path, format!("not a NIfTI-1 file: {e}")))?;
    if h.sizeof_hdr != HEADER_LEN as i32 {
        return Err(DataError::bad(path, format!("not a NIfTI-1 file: sizeof_hdr is {}, not 348", h.sizeof_hdr)));
    }
    if &h.magic != nifti::header::MAGIC_CODE_NIP1 {
        return Err(DataError::bad(path, "separate .hdr/.img pairs are not supported, only single-file .nii"));
    }
    let ndim = h.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(DataError::bad(path, format!("dim[0] is {}, not 1..7", h.dim[0] as i16)));
    }
    let mut dims = [1usize; 3];
    for i in 1..=ndim {
        let d = h.dim[i] as i16;
        if d < 1 {
            return Err(DataError::bad(path, format!("dim[{i}] is {d}, not positive")));
        }
        if i <= 3 {
            dims[i - 1] = d as usize;
        } else if d != 1 {
            return Err(DataError::bad(path, format!("{ndim}-D volume (dim[{i}] = {d}) not supported, only 3-D")));
        }
    }
    let dtype = DType::from_code(h.datatype).ok_or_else(|| {
        DataError::bad(
            path,
            format!(
                "unsupported data type code {} (supported: uint8, int16, uint16, int32, float32, float64)",
                h.datatype
            ),
        )
    })?;
    let offset = h.vox_offset;
    let vox_offset = if offset == 0.0 {
        DATA_OFFSET
    } else if offset.fract() == 0.0 && offset >= HEADER_LEN as f32 && offset < MAX_VOX_OFFSET {
        offset as usize
    } else {
        return Err(DataError::bad(path, format!("invalid vox_offset {offset}")));
    };
    let need = bounded_voxel_count(dims, path)?
        .checked_mul(dtype.size())
        .and_then(|n| n.checked_add(vox_offset))
        .ok_or_else(|| DataError::bad(path, format!("shape {dims:?} too large")))?;
    let (slope, inter) = (h.scl_slope as f64, h.scl_inter as f64);
    let scale = if slope == 0.0 || !slope.is_finite() {
        Scale::IDENTITY
    } else if !inter.is_finite() {
        return Err(DataError::bad(path, format!("valid scl_slope {slope} but invalid scl_inter {inter}")));
    } else {
        Scale { slope, inter }
    };
    let geometry = header_geometry(&h, path)?;
    let spacing = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64];
    let big_endian = h.endianness == nifti::Endianness::Big;
    Ok((Header { dims, dtype, spacing, geometry, scale, big_endian, vox_offset }, need))
}
