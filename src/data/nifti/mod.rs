//! NIfTI-1 volumes: `.nii` files memory-mapped and read in place, `.nii.gz` decompressed once
//! into a cache of `.nii` files (or into memory) and then read the same way; writing float32 and
//! integer volumes with a given affine, atomically ([`crate::fsutil`]).
//!
//! The header is parsed by the `nifti` crate; the voxels are decoded here, straight from the
//! mapped bytes, with `scl_slope`/`scl_inter` applied the way nibabel applies them (in f64).
//!
//! - `header`: data types, scaling, header parsing and validation;
//! - `decode`: voxels decoded from the mapped bytes;
//! - `gz_cache`: `.nii.gz` decompression into memory or a cache folder;
//! - `write`: atomic writing.

mod decode;
mod gz_cache;
mod header;
mod names;
mod write;

pub(crate) use decode::decode_line;
pub use decode::FromVoxel;
pub use gz_cache::GzCache;
pub use header::{DType, Header, Scale};
pub use names::{is_gz, stem};
pub use write::{write_nifti, NiftiElement};

use super::error::{DataError, IoAt, Result};
use super::volume::Volume;
use header::parse_header;
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// The voxel bytes of an opened file.
#[derive(Debug)]
enum Bytes {
    /// A read-only mapping of a `.nii` file (for a `.nii.gz`, of its cached copy), with that
    /// file's path.
    Mapped(Mmap, PathBuf),
    /// A decompressed `.nii.gz` held in memory.
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m, _) => m,
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

impl NiftiVolume {
    /// Opens `path` (`.nii` mapped, `.nii.gz` through `cache`) and validates its header and size.
    pub fn open(path: impl AsRef<Path>, cache: &GzCache) -> Result<Self> {
        let path = path.as_ref();
        let bytes = match (is_gz(path), cache) {
            (false, _) => map_file(path)?,
            (true, GzCache::Dir(dir)) => map_file(&gz_cache::cached_copy(path, dir)?)?,
            (true, GzCache::Memory) => {
                let mut v = Vec::new();
                gz_cache::gunzip(path, &mut v)?;
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

    /// Checks that the mapped file still has the length it had when it was mapped, so that a
    /// file truncated (or grown) in place since is reported as an error naming it instead of
    /// killing the process with SIGBUS on the next read. Datasets must be replaced by rename,
    /// never edited in place; this catches the common accident, not a truncation racing a read.
    pub fn check_unchanged(&self) -> Result<()> {
        let Bytes::Mapped(map, file) = &self.bytes else { return Ok(()) };
        let now = std::fs::metadata(file).at(file)?.len();
        if now != map.len() as u64 {
            return Err(DataError::bad(
                file,
                format!(
                    "changed in place while mapped: {} bytes when opened, {now} now (replace dataset files by \
                     rename, never edit them in place)",
                    map.len()
                ),
            ));
        }
        Ok(())
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

    /// The whole volume as class labels; every value must be an integer in 0..=255. Decoded a
    /// z-slice at a time (one byte per voxel at most, never a whole-volume float copy).
    pub fn read_labels(&self) -> Result<Volume<u8>> {
        let [nx, ny, nz] = self.dims();
        let slice = nx * ny;
        let mut buf = vec![0f64; slice];
        let mut out = Vec::with_capacity(self.len());
        for z in 0..nz {
            self.read_line(z * slice, 1, &mut buf)?;
            if let Some((i, bad)) =
                buf.iter().enumerate().find(|(_, &x)| !(x.fract() == 0.0 && (0.0..=255.0).contains(&x)))
            {
                return Err(DataError::bad(
                    &self.path,
                    format!(
                        "label value {bad} at voxel ({}, {}, {z}) is not an integer in 0..=255",
                        i % nx.max(1),
                        i / nx.max(1)
                    ),
                ));
            }
            out.extend(buf.iter().map(|&x| x as u8));
        }
        Volume::new(self.dims(), out)
    }
}

/// The header of the NIfTI file `path` alone (of a `.nii.gz`, only the first bytes are
/// decompressed): what a command plans with (memory, geometry) before it reads any voxel.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let file = crate::fsutil::open_regular(path)?;
    let mut head = Vec::with_capacity(header::HEADER_LEN);
    let limit = header::HEADER_LEN as u64;
    let read = if is_gz(path) {
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).take(limit).read_to_end(&mut head)
    } else {
        file.take(limit).read_to_end(&mut head)
    };
    read.map_err(|e| DataError::bad(path, format!("cannot read the header: {e}")))?;
    Ok(header::parse_declared(&head, path)?.0)
}

/// Maps `path` read-only (a regular file only: see [`crate::fsutil::open_regular`]).
fn map_file(path: &Path) -> Result<Bytes> {
    let file = crate::fsutil::open_regular(path)?;
    let len = file.metadata().at(path)?.len();
    if len == 0 {
        return Err(DataError::bad(path, "empty file"));
    }
    // SAFETY: the mapping is read-only and private to this process. Our writers never modify a
    // file in place (they write a new file and rename it over the old one, which leaves existing
    // mappings on the old inode intact); a foreign process truncating the file while mapped is
    // outside what this program can prevent: readers call `check_unchanged` first, and a
    // truncation racing a read ends the process through the SIGBUS handler (`super::sigbus`).
    let map = unsafe { Mmap::map(&file) }.at(path)?;
    Ok(Bytes::Mapped(map, path.to_path_buf()))
}
