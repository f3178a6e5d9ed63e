//! NIfTI-1 volumes: `.nii` files memory-mapped and read in place, `.nii.gz` decompressed once
//! into a cache of `.nii` files (or into memory) and then read the same way; writing float32 and
//! integer volumes with a given affine, atomically ([`crate::fsutil`]).
//!
//! The header is parsed by the `nifti` crate; the voxels are decoded here, straight from the
//! mapped bytes, with `scl_slope`/`scl_inter` applied the way nibabel applies them (in f64).

use super::error::{DataError, IoAt, Result};
use super::volume::{voxel_count, Geometry, Volume};
use memmap2::Mmap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Size of a NIfTI-1 header.
const HEADER_LEN: usize = 348;
/// Offset of the voxels in the files we write: the header plus the 4-byte extension flag.
const DATA_OFFSET: usize = 352;

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

/// Where `.nii.gz` files are decompressed to before they are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GzCache {
    /// Into `.nii` files in this folder (created on demand), reused while the source's path,
    /// size and modification time are unchanged.
    Dir(PathBuf),
    /// Into memory, for one-off reads such as `uamt info`.
    Memory,
}

/// The voxel bytes of an opened file.
#[derive(Debug)]
enum Bytes {
    /// A read-only mapping of a `.nii` file.
    Mapped(Mmap),
    /// A decompressed `.nii.gz` held in memory.
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened NIfTI volume whose voxels stay in the mapped file and are decoded on access.
#[derive(Debug)]
pub struct NiftiVolume {
    /// The file the caller named (the `.nii.gz`, not its cached copy), for error messages.
    path: PathBuf,
    /// The validated header.
    header: Header,
    /// The whole file's bytes (header included).
    bytes: Bytes,
}

/// Conversion from a decoded voxel value (f64, scaling applied) into an output element.
pub trait FromVoxel: Copy + Default {
    /// The element for `v`; integer targets saturate and map NaN to 0.
    fn from_f64(v: f64) -> Self;
}

macro_rules! from_voxel {
    ($($t:ty),*) => {$(
        impl FromVoxel for $t {
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    )*};
}
from_voxel!(f32, f64, u8, i64);

/// Decodes `out.len()` voxels at element indices `start, start + step, ...` from `raw`.
/// `None` if an index falls outside `raw`.
pub(crate) fn decode_line<T: FromVoxel>(
    raw: &[u8],
    dtype: DType,
    big_endian: bool,
    scale: Scale,
    start: usize,
    step: isize,
    out: &mut [T],
) -> Option<()> {
    macro_rules! walk {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            let read = |b: &[u8]| -> Option<f64> {
                let b: [u8; N] = b.try_into().ok()?;
                Some((if big_endian { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }) as f64)
            };
            let identity = scale.is_identity();
            let (slope, inter) = (scale.slope, scale.inter);
            if step == 1 {
                let end = start.checked_add(out.len())?.checked_mul(N)?;
                let chunk = raw.get(start.checked_mul(N)?..end)?;
                for (o, b) in out.iter_mut().zip(chunk.chunks_exact(N)) {
                    let v = read(b)?;
                    *o = T::from_f64(if identity { v } else { v * slope + inter });
                }
            } else {
                let mut e = start as isize;
                for o in out.iter_mut() {
                    let i = usize::try_from(e).ok()?.checked_mul(N)?;
                    let v = read(raw.get(i..i + N)?)?;
                    *o = T::from_f64(if identity { v } else { v * slope + inter });
                    e += step;
                }
            }
        }};
    }
    match dtype {
        DType::Uint8 => walk!(u8),
        DType::Int16 => walk!(i16),
        DType::Uint16 => walk!(u16),
        DType::Int32 => walk!(i32),
        DType::Float32 => walk!(f32),
        DType::Float64 => walk!(f64),
    }
    Some(())
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

/// The geometry a header describes, chosen the way nibabel's `get_best_affine` chooses.
fn header_geometry(h: &nifti::NiftiHeader, path: &Path) -> Result<Geometry> {
    let mut affine = [[0.0f64; 4]; 4];
    affine[3][3] = 1.0;
    if h.sform_code > 0 {
        for (i, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for j in 0..4 {
                affine[i][j] = row[j] as f64;
            }
        }
    } else if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let w2 = 1.0 - (b * b + c * c + d * d);
        if w2 < -1e-6 {
            return Err(DataError::bad(path, format!("invalid qform quaternion ({b}, {c}, {d})")));
        }
        let r = quat_to_mat(w2.max(0.0).sqrt(), b, c, d);
        let qfac = if h.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let mut vox = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64];
        vox[2] *= qfac;
        for i in 0..3 {
            for j in 0..3 {
                affine[i][j] = r[i][j] * vox[j];
            }
        }
        affine[0][3] = h.quatern_x as f64;
        affine[1][3] = h.quatern_y as f64;
        affine[2][3] = h.quatern_z as f64;
    } else {
        // nibabel's Analyze fallback: x flipped, origin at the centre of the volume.
        let ndim = (h.dim[0] as usize).clamp(1, 3);
        for (i, row) in affine.iter_mut().take(3).enumerate() {
            let (n, zoom) = if i < ndim { (h.dim[i + 1] as f64, h.pixdim[i + 1] as f64) } else { (1.0, 1.0) };
            let zoom = if i == 0 { -zoom } else { zoom };
            row[i] = zoom;
            row[3] = -(n - 1.0) / 2.0 * zoom;
        }
    }
    Ok(Geometry { affine })
}

/// Parses and validates the header at the start of `bytes`.
fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
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
    } else if offset.fract() == 0.0 && offset >= HEADER_LEN as f32 && offset < 1e12 {
        offset as usize
    } else {
        return Err(DataError::bad(path, format!("invalid vox_offset {offset}")));
    };
    let need = voxel_count(dims, "nifti dims")?
        .checked_mul(dtype.size())
        .and_then(|n| n.checked_add(vox_offset))
        .ok_or_else(|| DataError::bad(path, format!("shape {dims:?} too large")))?;
    if bytes.len() < need {
        return Err(DataError::bad(
            path,
            format!(
                "truncated: the header promises {need} bytes ({dims:?} {} from offset {vox_offset}), the file has {}",
                dtype.name(),
                bytes.len()
            ),
        ));
    }
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
    Ok(Header { dims, dtype, spacing, geometry, scale, big_endian, vox_offset })
}

/// A stable 64-bit FNV-1a hash, for cache file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether `path` names a gzip-compressed NIfTI file.
pub fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

/// `path`'s name without `.nii` / `.nii.gz`.
pub fn stem(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for ext in [".nii.gz", ".nii"] {
        if name.len() > ext.len() && name.to_ascii_lowercase().ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    name
}

/// Decompresses the whole gzip file `gz`, naming it in any error.
fn gunzip(gz: &Path, mut sink: impl Write) -> Result<()> {
    let file = File::open(gz).at(gz)?;
    let mut dec = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DataError::bad(gz, format!("truncated or corrupt gzip stream: {e}"))),
        };
        sink.write_all(&buf[..n])
            .map_err(|e| DataError::bad(gz, format!("cannot store the decompressed copy: {e}")))?;
    }
}

/// The cached `.nii` copy of `gz` in `dir`, decompressing it first if needed.
fn cached_copy(gz: &Path, dir: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(gz).at(gz)?;
    let canonical = fs::canonicalize(gz).at(gz)?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = fnv1a(&[canonical.to_string_lossy().as_bytes(), &meta.len().to_le_bytes(), &mtime.to_le_bytes()]);
    let name = format!("{}-{key:016x}.nii", stem(gz));
    let target = dir.join(&name);
    if target.is_file() {
        return Ok(target);
    }
    fs::create_dir_all(dir).at(dir)?;
    crate::fsutil::replace_atomic(&target, |tmp| {
        let mut w = BufWriter::new(File::create(tmp).at(tmp)?);
        gunzip(gz, &mut w)?;
        w.flush().at(tmp)
    })?;
    Ok(target)
}

impl NiftiVolume {
    /// Opens `path` (`.nii` mapped, `.nii.gz` through `cache`) and validates its header and size.
    pub fn open(path: impl AsRef<Path>, cache: &GzCache) -> Result<Self> {
        let path = path.as_ref();
        let bytes = match (is_gz(path), cache) {
            (false, _) => map_file(path)?,
            (true, GzCache::Dir(dir)) => map_file(&cached_copy(path, dir)?)?,
            (true, GzCache::Memory) => {
                let mut v = Vec::new();
                gunzip(path, &mut v)?;
                Bytes::Owned(v)
            }
        };
        let header = parse_header(bytes.as_slice(), path)?;
        Ok(NiftiVolume { path: path.to_path_buf(), header, bytes })
    }

    /// The file this volume was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// `[X, Y, Z]`.
    pub fn dims(&self) -> [usize; 3] {
        self.header.dims
    }

    /// The number of voxels.
    pub fn len(&self) -> usize {
        self.header.dims.iter().product()
    }

    /// Whether the volume has no voxels (never, for a validated header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes the voxels at linear (x-fastest) indices `start + i * step` into `out[i]`,
    /// scaling applied, straight from the mapped bytes.
    pub fn read_line<T: FromVoxel>(&self, start: usize, step: isize, out: &mut [T]) -> Result<()> {
        let h = &self.header;
        let raw = self.bytes.as_slice().get(h.vox_offset..).unwrap_or_default();
        decode_line(raw, h.dtype, h.big_endian, h.scale, start, step, out).ok_or_else(|| {
            DataError::bad(
                &self.path,
                format!("voxel read out of range (start {start}, step {step}, {} voxels)", out.len()),
            )
        })
    }

    /// The whole volume decoded to `T` (a copy; samplers read patches with [`Self::read_line`]).
    pub fn read<T: FromVoxel>(&self) -> Result<Volume<T>> {
        let mut data = vec![T::default(); self.len()];
        self.read_line(0, 1, &mut data)?;
        Volume::new(self.dims(), data)
    }

    /// The whole volume as float32 intensities.
    pub fn read_f32(&self) -> Result<Volume<f32>> {
        self.read()
    }

    /// The whole volume as class labels; every value must be an integer in 0..=255.
    pub fn read_labels(&self) -> Result<Volume<u8>> {
        let v: Volume<f64> = self.read()?;
        if let Some((i, bad)) =
            v.data.iter().enumerate().find(|(_, &x)| !(x.fract() == 0.0 && (0.0..=255.0).contains(&x)))
        {
            return Err(DataError::bad(
                &self.path,
                format!("label value {bad} at voxel {i} is not an integer in 0..=255"),
            ));
        }
        Ok(v.map(|x| x as u8))
    }
}

/// Maps `path` read-only.
fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len();
    if len == 0 {
        return Err(DataError::bad(path, "empty file"));
    }
    // SAFETY: the mapping is read-only and private to this process. Our writers never modify a
    // file in place (they write a new file and rename it over the old one, which leaves existing
    // mappings on the old inode intact); a foreign process truncating the file while mapped is
    // outside what this program can defend against, as with every mmap-based reader.
    let map = unsafe { Mmap::map(&file) }.at(path)?;
    Ok(Bytes::Mapped(map))
}

/// Element types that can be written to a NIfTI file.
pub trait NiftiElement: Copy + Default {
    /// The data type written.
    const DTYPE: DType;
    /// Appends the little-endian bytes of `self`.
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! nifti_element {
    ($t:ty, $d:expr) => {
        impl NiftiElement for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
nifti_element!(u8, DType::Uint8);
nifti_element!(i16, DType::Int16);
nifti_element!(u16, DType::Uint16);
nifti_element!(i32, DType::Int32);
nifti_element!(f32, DType::Float32);
nifti_element!(f64, DType::Float64);

/// The 352 bytes (header plus an empty extension flag) of a little-endian NIfTI-1 file.
fn header_bytes(dims: [usize; 3], dtype: DType, geometry: &Geometry) -> Result<Vec<u8>> {
    let mut b = vec![0u8; DATA_OFFSET];
    let put_i16 = |b: &mut Vec<u8>, at: usize, v: i16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |b: &mut Vec<u8>, at: usize, v: f32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b[0..4].copy_from_slice(&(HEADER_LEN as i32).to_le_bytes());
    b[38] = b'r'; // "regular", as the spec's writers set it
    put_i16(&mut b, 40, 3);
    for (i, &d) in dims.iter().enumerate() {
        let d = i16::try_from(d)
            .map_err(|_| DataError::invalid("nifti dims", format!("axis {i} of {dims:?} exceeds 32767")))?;
        put_i16(&mut b, 42 + 2 * i, d);
    }
    for i in 3..7 {
        put_i16(&mut b, 42 + 2 * i, 1);
    }
    put_i16(&mut b, 70, dtype.code());
    put_i16(&mut b, 72, (dtype.size() * 8) as i16);
    let a = &geometry.affine;
    let spacing = geometry.spacing();
    let rot = [0, 1, 2].map(|i| [0, 1, 2].map(|j| if spacing[j] > 0.0 { a[i][j] / spacing[j] } else { 0.0 }));
    let quat = mat_to_quat(rot);
    put_f32(&mut b, 76, quat.map_or(1.0, |q| q.1 as f32));
    for (i, s) in spacing.iter().enumerate() {
        put_f32(&mut b, 80 + 4 * i, *s as f32);
    }
    for i in 3..7 {
        put_f32(&mut b, 80 + 4 * i, 1.0);
    }
    put_f32(&mut b, 108, DATA_OFFSET as f32);
    put_f32(&mut b, 112, 1.0); // scl_slope
    b[123] = 2 | 8; // xyzt_units: mm, s
    let descrip = b"uamt";
    b[148..148 + descrip.len()].copy_from_slice(descrip);
    if let Some(([qb, qc, qd], _)) = quat {
        put_i16(&mut b, 252, 1); // qform_code: scanner
        for (i, v) in [qb, qc, qd, a[0][3], a[1][3], a[2][3]].iter().enumerate() {
            put_f32(&mut b, 256 + 4 * i, *v as f32);
        }
    }
    put_i16(&mut b, 254, 1); // sform_code: scanner
    for (i, row) in a.iter().take(3).enumerate() {
        for (j, v) in row.iter().enumerate() {
            put_f32(&mut b, 280 + 16 * i + 4 * j, *v as f32);
        }
    }
    b[344..348].copy_from_slice(nifti::header::MAGIC_CODE_NIP1);
    Ok(b)
}

/// Writes `vol` to `path` as NIfTI-1 (gzip-compressed if the name ends in `.gz`) with the
/// affine of `geometry` (as sform, and as qform when it is a rotation times a scaling),
/// `pixdim` set to the affine's column lengths, no intensity scaling. Atomic.
pub fn write_nifti<T: NiftiElement>(path: impl AsRef<Path>, vol: &Volume<T>, geometry: &Geometry) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = header_bytes(vol.dims, T::DTYPE, geometry)?;
    bytes.reserve(vol.data.len() * T::DTYPE.size());
    for &v in &vol.data {
        v.put(&mut bytes);
    }
    crate::fsutil::write_atomic(path, |w| {
        if is_gz(path) {
            let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::default());
            enc.write_all(&bytes)?;
            enc.finish()?;
            Ok(())
        } else {
            w.write_all(&bytes)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_decode_strided_big_endian_scaled() {
        let raw: Vec<u8> = [1i16, -2, 3, -4].iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut out = [0f32; 2];
        decode_line(&raw, DType::Int16, true, Scale { slope: 2.0, inter: 1.0 }, 3, -2, &mut out).unwrap();
        assert_eq!(out, [-7.0, -3.0]);
        assert!(decode_line(&raw, DType::Int16, true, Scale::IDENTITY, 3, 1, &mut out).is_none());
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
}
