//! Reading named tensors from files that may come from anywhere (a watched folder, a command
//! line): regular files only (a symlink to one is fine; folders, FIFOs, devices and sockets are
//! refused before anything is opened for reading), at most [`MAX_FILE_BYTES`], read into memory
//! once (no memory map that a truncation could turn into a crash). `.safetensors` and `.npz`
//! are parsed here: every kind, shape, byte count and offset is checked before libtorch is handed
//! the bytes, so a hostile file is an error naming it, never a panic or an out-of-bounds read.

use crate::{Error, Result};
use std::io::{Cursor, Read};
use std::path::Path;
use tch::{Kind, Tensor};

/// The largest weights or checkpoint file taken (4 GiB; the recipe's checkpoints are ~110 MB),
/// and the most bytes an `.npz` may decompress to.
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// Named raw tensors, or why a file's content is refused.
type Parsed = std::result::Result<Vec<(String, RawTensor)>, String>;

/// The largest safetensors JSON header taken.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor of a file, not yet handed to libtorch: its kind, shape and bytes are consistent.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Element kind.
    pub kind: Kind,
    /// Dimensions (each fits an `i64`; their product times the element size is `data.len()`).
    pub shape: Vec<i64>,
    /// Little-endian element bytes, row-major.
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The one `i64` it holds (shape `[]` or `[1]`), or why not.
    pub fn as_i64(&self) -> std::result::Result<i64, String> {
        if self.kind != Kind::Int64 || self.data.len() != 8 || self.shape.len() > 1 {
            return Err(format!("is not one int64 (kind {:?}, shape {:?})", self.kind, self.shape));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.data);
        Ok(i64::from_le_bytes(b))
    }

    /// The UTF-8 text it holds as a 1-d `uint8` tensor, or why not.
    pub fn as_text(&self) -> std::result::Result<String, String> {
        if self.kind != Kind::Uint8 || self.shape.len() != 1 {
            return Err(format!("is not 1-d uint8 text (kind {:?}, shape {:?})", self.kind, self.shape));
        }
        String::from_utf8(self.data.clone()).map_err(|_| "is not UTF-8".to_string())
    }

    /// The libtorch tensor (on the CPU).
    pub fn to_tensor(&self) -> std::result::Result<Tensor, String> {
        Tensor::f_from_data_size(&self.data, &self.shape, self.kind).map_err(|e| e.to_string())
    }
}

/// Checks that `path` is (or links to) a regular file of at most [`MAX_FILE_BYTES`], without
/// opening it; returns its size.
pub fn check_regular(path: &Path) -> Result<u64> {
    let len = crate::fsutil::check_regular(path)?;
    if len > MAX_FILE_BYTES {
        return Err(Error::File {
            path: path.to_path_buf(),
            why: format!("{len} bytes, more than the limit of {MAX_FILE_BYTES} bytes: refused"),
        });
    }
    Ok(len)
}

/// Reads a whole file that passes [`check_regular`], through [`crate::fsutil::read_regular`]
/// (checked again on the open handle, so a file swapped for a FIFO or device in between is
/// refused too).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    check_regular(path)?;
    Ok(crate::fsutil::read_regular(path, MAX_FILE_BYTES)?)
}

/// The file's named tensors, checked but not yet in libtorch, in the file's order (sorted by
/// name for `.safetensors`). `.safetensors` or `.npz` by extension.
pub fn read_raw(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let parse: fn(&[u8]) -> Parsed = match ext {
        "safetensors" => parse_safetensors,
        "npz" => parse_npz_caught,
        _ => {
            return Err(Error::File {
                path: path.to_path_buf(),
                why: "not a .safetensors or .npz file (other formats are not read from untrusted places)".into(),
            })
        }
    };
    let bytes = read_bytes(path)?;
    parse(&bytes).map_err(|why| Error::File { path: path.to_path_buf(), why })
}

/// [`read_raw`] made into libtorch tensors (on the CPU).
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    to_tensors(read_raw(path)?, path)
}

/// Raw tensors into libtorch tensors; errors name `origin` and the tensor.
pub fn to_tensors(raw: Vec<(String, RawTensor)>, origin: &Path) -> Result<Vec<(String, Tensor)>> {
    raw.into_iter()
        .map(|(n, r)| {
            let t = r
                .to_tensor()
                .map_err(|why| Error::File { path: origin.to_path_buf(), why: format!("`{n}`: {why}") })?;
            Ok((n, t))
        })
        .collect()
}

/// Element kind and size of a safetensors dtype name.
fn safetensors_kind(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "BOOL" => Kind::Bool,
        "U8" => Kind::Uint8,
        "I8" => Kind::Int8,
        "I16" => Kind::Int16,
        "I32" => Kind::Int,
        "I64" => Kind::Int64,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        _ => return None,
    })
}

/// Bytes of a tensor of `shape` and element size `elt`, if every dimension fits an `i64` and
/// the total fits the size limit.
fn nbytes(shape: &[u64], elt: usize) -> Option<u64> {
    if shape.iter().any(|&d| d > i64::MAX as u64) {
        return None;
    }
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    n.checked_mul(elt as u64).filter(|&b| b <= MAX_FILE_BYTES)
}

/// Parses a whole `.safetensors` file: an 8-byte little-endian header length, a JSON header
/// `{name: {dtype, shape, data_offsets: [begin, end]}}`, then the data.
pub fn parse_safetensors(bytes: &[u8]) -> Parsed {
    if bytes.len() < 8 {
        return Err(format!("not a safetensors file: {} bytes, shorter than its header length", bytes.len()));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n > (bytes.len() - 8) as u64 {
        return Err(format!("not a safetensors file (truncated?): header of {n} bytes in a file of {}", bytes.len()));
    }
    let header = &bytes[8..8 + n as usize];
    let data = &bytes[8 + n as usize..];
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("not a safetensors file: header: {e}"))?;
    let mut out = Vec::with_capacity(json.len());
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| format!("tensor `{name}`: {why}");
        let dtype = info.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| bad("no dtype"))?;
        let kind = safetensors_kind(dtype).ok_or_else(|| bad(&format!("unsupported dtype {dtype}")))?;
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        let need =
            nbytes(&shape, kind.elt_size_in_bytes()).ok_or_else(|| bad(&format!("shape {shape:?} too large")))?;
        if begin > end || end > data.len() as u64 {
            return Err(bad(&format!(
                "data [{begin}, {end}) outside the file's {} data bytes (truncated?)",
                data.len()
            )));
        }
        if end - begin != need {
            return Err(bad(&format!("{} data bytes for shape {shape:?} of {dtype}, which needs {need}", end - begin)));
        }
        let shape = shape.iter().map(|&d| d as i64).collect();
        out.push((name, RawTensor { kind, shape, data: data[begin as usize..end as usize].to_vec() }));
    }
    Ok(out)
}

/// [`parse_npz`] with any panic inside the zip reader turned into an error.
pub fn parse_npz_caught(bytes: &[u8]) -> Parsed {
    std::panic::catch_unwind(|| parse_npz(bytes))
        .unwrap_or_else(|_| Err("not a readable .npz (the zip reader failed on it)".to_string()))
}

/// Parses an `.npz` (a zip of `.npy` files, stored or deflated); at most [`MAX_FILE_BYTES`]
/// decompressed in all.
pub fn parse_npz(bytes: &[u8]) -> Parsed {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a readable .npz: {e}"))?;
    let mut budget = MAX_FILE_BYTES;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("not a readable .npz: entry {i}: {e}"))?;
        let name = entry.name().to_string();
        let mut content = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut content)
            .map_err(|e| format!("not a readable .npz: `{name}`: {e}"))?;
        if content.len() as u64 > budget {
            return Err(format!("`{name}`: decompresses past the limit of {MAX_FILE_BYTES} bytes"));
        }
        budget -= content.len() as u64;
        let tensor = parse_npy(&content).map_err(|why| format!("`{name}`: {why}"))?;
        out.push((name.strip_suffix(".npy").unwrap_or(&name).to_string(), tensor));
    }
    Ok(out)
}

/// Parses one `.npy` (versions 1 to 3, little-endian or single-byte kinds, C order).
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<RawTensor, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not an .npy array".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "the .npy header is not text")?;
    let dict = NpyHeader::parse(header)?;
    if dict.fortran_order {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let kind = npy_kind(&dict.descr).ok_or_else(|| format!("unsupported dtype `{}`", dict.descr))?;
    let data = &bytes[end..];
    let need =
        nbytes(&dict.shape, kind.elt_size_in_bytes()).ok_or_else(|| format!("shape {:?} too large", dict.shape))?;
    if data.len() as u64 != need {
        return Err(format!(
            "{} data bytes for shape {:?} of `{}`, which needs {need}",
            data.len(),
            dict.shape,
            dict.descr
        ));
    }
    Ok(RawTensor { kind, shape: dict.shape.iter().map(|&d| d as i64).collect(), data: data.to_vec() })
}

/// Kind of a numpy `descr` (little-endian or byte-sized only).
fn npy_kind(descr: &str) -> Option<Kind> {
    Some(match descr {
        "|b1" => Kind::Bool,
        "|u1" => Kind::Uint8,
        "|i1" => Kind::Int8,
        "<i2" => Kind::Int16,
        "<i4" => Kind::Int,
        "<i8" => Kind::Int64,
        "<f2" => Kind::Half,
        "<f4" => Kind::Float,
        "<f8" => Kind::Double,
        _ => return None,
    })
}

/// The three keys of an `.npy` header.
#[derive(Debug, PartialEq)]
struct NpyHeader {
    /// The dtype string, e.g. `<f4`.
    descr: String,
    /// Column-major data.
    fortran_order: bool,
    /// Dimensions.
    shape: Vec<u64>,
}

impl NpyHeader {
    /// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` (the Python literal
    /// numpy writes); anything else is an error.
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unreadable .npy header `{}`", text.trim().chars().take(200).collect::<String>());
        let body = text.trim().strip_prefix('{').and_then(|t| t.strip_suffix('}')).ok_or_else(bad)?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        let mut rest = body.trim_start();
        while !rest.is_empty() {
            let (key, after) = quoted(rest).ok_or_else(bad)?;
            let after = after.trim_start().strip_prefix(':').ok_or_else(bad)?.trim_start();
            let after = match key {
                "descr" => {
                    let (v, a) = quoted(after).ok_or_else(bad)?;
                    descr = Some(v.to_string());
                    a
                }
                "fortran_order" => {
                    let (v, a) = if let Some(a) = after.strip_prefix("False") {
                        (false, a)
                    } else {
                        (true, after.strip_prefix("True").ok_or_else(bad)?)
                    };
                    fortran = Some(v);
                    a
                }
                "shape" => {
                    let inner = after.strip_prefix('(').ok_or_else(bad)?;
                    let close = inner.find(')').ok_or_else(bad)?;
                    let dims = inner[..close]
                        .split(',')
                        .map(str::trim)
                        .filter(|d| !d.is_empty())
                        .map(|d| d.trim_end_matches('L').parse::<u64>().map_err(|_| bad()))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    shape = Some(dims);
                    &inner[close + 1..]
                }
                _ => return Err(bad()),
            };
            let after = after.trim_start();
            rest = match after.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if after.is_empty() => after,
                None => return Err(bad()),
            };
        }
        Ok(NpyHeader {
            descr: descr.ok_or_else(bad)?,
            fortran_order: fortran.unwrap_or(false),
            shape: shape.ok_or_else(bad)?,
        })
    }
}

/// A single-quoted string at the start of `s` and what follows it.
fn quoted(s: &str) -> Option<(&str, &str)> {
    let s = s.strip_prefix('\'')?;
    let end = s.find('\'')?;
    Some((&s[..end], &s[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_headers_parse_strictly() {
        let h = NpyHeader::parse("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }   \n").unwrap();
        assert_eq!(h, NpyHeader { descr: "<f4".into(), fortran_order: false, shape: vec![2, 3] });
        let h = NpyHeader::parse("{'descr': '<i8', 'fortran_order': False, 'shape': (), }").unwrap();
        assert!(h.shape.is_empty());
        assert_eq!(NpyHeader::parse("{'descr': '<f4', 'shape': (5,)}").unwrap().shape, vec![5]);
        for bad in ["", "{}", "{'descr': '<f4'}", "{'shape': (-1,), 'descr': '<f4'}", "{'x': 1}", "[1]"] {
            assert!(NpyHeader::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn safetensors_offsets_and_shapes_are_checked() {
        let file = |header: &str, data: &[u8]| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(data);
            b
        };
        let ok = file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert_eq!(parse_safetensors(&ok).unwrap()[0].1.shape, vec![2]);
        for (header, data) in [
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4),
            (r#"{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}"#, 0),
            (r#"{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#, 8),
            (r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#, 8),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8),
            (r#"not json"#, 0),
        ] {
            assert!(parse_safetensors(&file(header, &vec![0; data])).is_err(), "{header} with {data} bytes accepted");
        }
        assert!(parse_safetensors(&[1, 2, 3]).is_err());
        assert!(parse_safetensors(&u64::MAX.to_le_bytes()).is_err());
    }

    #[test]
    fn npz_garbage_is_an_error() {
        assert!(parse_npz_caught(b"PK\x03\x04garbage").is_err());
        assert!(parse_npz_caught(&[0u8; 100]).is_err());
    }
}
