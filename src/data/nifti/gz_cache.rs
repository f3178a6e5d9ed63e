//! `.nii.gz` files: decompressed whole, either into memory or once into a cache folder of `.nii`
//! copies keyed by the source's path, size and modification time, then mapped like any `.nii`.

use super::header::{parse_declared, HEADER_LEN};
use super::names::stem;
use crate::data::error::{DataError, IoAt, Result};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Where `.nii.gz` files are decompressed to before they are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GzCache {
    /// Into `.nii` files in this folder (created on demand), reused while the source's path,
    /// size and modification time are unchanged.
    Dir(PathBuf),
    /// Into memory, for one-off reads such as `uamt info`.
    Memory,
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

/// Decompresses the gzip file `gz` into `sink`, naming it in any error. The output is bounded
/// by what the NIfTI header at its start declares (`vox_offset` plus the voxels, itself capped by
/// [`crate::data::volume::MAX_VOXELS`]): decompression stops there, and a stream that goes on
/// past it (a gzip bomb, or trailing garbage) is refused without being decompressed further.
pub(super) fn gunzip(gz: &Path, mut sink: impl Write) -> Result<()> {
    let file = crate::fsutil::open_regular(gz)?;
    let mut dec = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
    let corrupt = |e: std::io::Error| DataError::bad(gz, format!("truncated or corrupt gzip stream: {e}"));
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut dec).take(HEADER_LEN as u64).read_to_end(&mut head).map_err(corrupt)?;
    let (_, declared) = parse_declared(&head, gz)?;
    let store = |e: std::io::Error| DataError::bad(gz, format!("cannot store the decompressed copy: {e}"));
    sink.write_all(&head).map_err(store)?;
    let mut left = declared.saturating_sub(head.len());
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len());
        let n = match dec.read(&mut buf[..want]) {
            Ok(0) => break, // short: the header check on the copy reports the truncation
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        sink.write_all(&buf[..n]).map_err(store)?;
        left -= n;
    }
    if left == 0 {
        let mut extra = [0u8; 1];
        loop {
            match dec.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(DataError::bad(
                        gz,
                        format!("decompresses to more than the {declared} bytes its header declares; refused"),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(e)),
            }
        }
    }
    Ok(())
}

/// The cached `.nii` copy of `gz` in `dir`, decompressing it first if needed.
pub(super) fn cached_copy(gz: &Path, dir: &Path) -> Result<PathBuf> {
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
