//! Writing named tensors as a PyTorch-native `state_dict` file, the format `torch.save` writes and
//! `torch.load(path, weights_only=True)` reads: a zip archive (stored, not compressed) holding
//! `archive/data.pkl` (a pickle, protocol 2, of an `OrderedDict` of tensors, each rebuilt by
//! `torch._utils._rebuild_tensor_v2` from a persistent storage id), one record per storage
//! (`archive/data/<n>`, raw little-endian bytes, aligned to 64 bytes as torch aligns them),
//! `archive/byteorder` and `archive/version`.
//!
//! Only what a V-Net's `state_dict` holds is supported: float32, float64 and int64 tensors of any
//! shape (0-d included), written contiguous.

use crate::{Error, Result};
use std::io::{Seek, Write};
use std::path::Path;
use tch::{Kind, Tensor};

/// Pickle opcodes (protocol 2) this writer uses.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// A pickle being written.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, o: u8) -> &mut Self {
        self.0.push(o);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(op::GLOBAL);
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        match i32::try_from(v) {
            Ok(small) => {
                self.0.push(op::BININT);
                self.0.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                // LONG1: little-endian two's complement, here always 8 bytes.
                self.0.push(op::LONG1);
                self.0.push(8);
                self.0.extend_from_slice(&v.to_le_bytes());
            }
        }
        self
    }
    fn tuple_of(&mut self, vs: &[i64]) -> &mut Self {
        if vs.is_empty() {
            return self.op(op::EMPTY_TUPLE);
        }
        self.op(op::MARK);
        for &v in vs {
            self.int(v);
        }
        self.op(op::TUPLE)
    }
    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(op::EMPTY_TUPLE).op(op::REDUCE)
    }
}

/// The storage class and the element size for a tensor kind.
fn storage_of(kind: Kind) -> Option<(&'static str, usize)> {
    match kind {
        Kind::Float => Some(("FloatStorage", 4)),
        Kind::Double => Some(("DoubleStorage", 8)),
        Kind::Int64 => Some(("LongStorage", 8)),
        _ => None,
    }
}

/// Contiguous strides of `size`.
fn strides(size: &[i64]) -> Vec<i64> {
    let mut s = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * size[i + 1].max(1);
    }
    s
}

/// Writes `named` as a `torch.save`d `OrderedDict` to `w`; `path` names the file in errors.
pub fn write_state_dict<W: Write + Seek>(named: &[(String, Tensor)], w: W, path: &Path) -> Result<()> {
    let bad = |why: String| Error::File { path: path.to_path_buf(), why };
    let zerr = |e: zip::result::ZipError| bad(format!("cannot write the archive: {e}"));
    let ioerr = |e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
    let mut p = Pickle::default();
    p.op(op::PROTO).0.push(2);
    p.ordered_dict().op(op::MARK);
    let mut storages = Vec::with_capacity(named.len());
    for (key, (name, t)) in named.iter().enumerate() {
        let kind = t.kind();
        let (class, elem) = storage_of(kind)
            .ok_or_else(|| bad(format!("tensor `{name}` is {kind:?}; only float32, float64, int64")))?;
        let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
        let size = t.size();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * elem];
        t.f_copy_data_u8(&mut bytes, numel)?;
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2").op(op::MARK);
        // The storage: persistent id ('storage', torch.<Class>, '<key>', 'cpu', numel).
        p.op(op::MARK).str("storage").global("torch", class).str(&key.to_string()).str("cpu").int(numel as i64);
        p.op(op::TUPLE).op(op::BINPERSID);
        p.int(0).tuple_of(&size).tuple_of(&strides(&size)).op(op::NEWFALSE).ordered_dict();
        p.op(op::TUPLE).op(op::REDUCE);
        storages.push(bytes);
    }
    p.op(op::SETITEMS).op(op::STOP);

    let mut z = zip::ZipWriter::new(w);
    let stored = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(storages.iter().map(Vec::len).sum::<usize>() > u32::MAX as usize / 2);
    z.start_file("archive/data.pkl", stored).map_err(zerr)?;
    z.write_all(&p.0).map_err(ioerr)?;
    z.start_file("archive/byteorder", stored).map_err(zerr)?;
    z.write_all(b"little").map_err(ioerr)?;
    for (key, bytes) in storages.iter().enumerate() {
        z.start_file_aligned(format!("archive/data/{key}"), stored, 64).map_err(zerr)?;
        z.write_all(bytes).map_err(ioerr)?;
    }
    z.start_file("archive/version", stored).map_err(zerr)?;
    z.write_all(b"3\n").map_err(ioerr)?;
    z.finish().map_err(zerr)?.flush().map_err(ioerr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_contiguous() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert!(strides(&[]).is_empty());
    }

    #[test]
    fn an_unsupported_kind_is_refused_naming_the_tensor() {
        let named = vec![("w".to_string(), Tensor::from_slice(&[1u8, 2]))];
        let err = write_state_dict(&named, std::io::Cursor::new(Vec::new()), Path::new("x.pt")).unwrap_err();
        assert!(err.to_string().contains("`w`") && err.to_string().contains("x.pt"), "{err}");
    }

    #[test]
    fn the_archive_holds_the_records_torch_reads() {
        let named = vec![
            ("a.weight".to_string(), Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.]).view([2, 3])),
            ("a.num_batches_tracked".to_string(), Tensor::from_slice(&[7i64]).view([])),
        ];
        let mut buf = std::io::Cursor::new(Vec::new());
        write_state_dict(&named, &mut buf, Path::new("x.pt")).unwrap();
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(buf.into_inner())).unwrap();
        let names: Vec<String> = z.file_names().map(String::from).collect();
        for want in ["archive/data.pkl", "archive/byteorder", "archive/data/0", "archive/data/1", "archive/version"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut z.by_name("archive/data/0").unwrap(), &mut data).unwrap();
        assert_eq!(data.len(), 24);
        assert_eq!(&data[4..8], &2f32.to_le_bytes());
        let f = z.by_name("archive/data/1").unwrap();
        assert_eq!(f.data_start() % 64, 0, "storages are 64-byte aligned");
    }
}
