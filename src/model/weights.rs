//! Weights files of any supported format, told apart by their content (the extension only
//! decides which parser explains a file that none recognises): `.safetensors`, `.npz`,
//! PyTorch's `torch.save` of a `state_dict` (`.pt` / `.pth`), TorchScript archives and tch's
//! `.ot` files. All are read as untrusted, by our own parsers (see
//! [`tensorfile`](super::tensorfile) and [`torchfile`](super::torchfile)): no file is handed to
//! libtorch's deserialisers.

use super::tensorfile::{self, RawTensor};
use super::torchfile;
use crate::{Error, Result};
use std::path::Path;

/// A weights file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors: an 8-byte header length, a JSON header, the data.
    Safetensors,
    /// numpy's `.npz`: a zip of `.npy` arrays.
    Npz,
    /// A PyTorch zip archive: `torch.save`, TorchScript, tch's `.ot`.
    Torch,
}

/// The magic number of PyTorch's serialisation before 1.6 (a pickled long after PROTO 2).
const LEGACY_TORCH: [u8; 4] = [0x80, 0x02, 0x8a, 0x0a];

/// The format of a file from its first bytes (the whole file for zip archives), or why none.
pub fn detect(bytes: &[u8]) -> std::result::Result<Format, String> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Ok(if torchfile::is_torch_zip(bytes)? { Format::Torch } else { Format::Npz });
    }
    if bytes.len() > 8 && bytes[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    if bytes.starts_with(&LEGACY_TORCH) {
        return Err("PyTorch's serialisation from before version 1.6 (not a zip archive): load it in PyTorch \
                    and save it again with torch.save"
            .into());
    }
    Err("not a weights file uamt reads (safetensors, .npz, PyTorch's .pt / .pth state_dict, TorchScript, \
         tch's .ot)"
        .into())
}

/// The named tensors of the weights file `path`, checked but not yet in libtorch: regular files
/// up to [`tensorfile::MAX_FILE_BYTES`], read once, format by content.
pub fn read_raw(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let bytes = tensorfile::read_bytes(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let format = match detect(&bytes) {
        Ok(f) => Ok(f),
        // A file that no format recognises is explained by the parser its name asks for (a
        // truncated safetensors file says so).
        Err(why) => match ext.as_deref() {
            Some("safetensors") => Ok(Format::Safetensors),
            Some("npz") => Ok(Format::Npz),
            _ => Err(why),
        },
    };
    let parsed = format.and_then(|f| match f {
        Format::Safetensors => tensorfile::parse_safetensors(&bytes),
        Format::Npz => tensorfile::parse_npz_caught(&bytes),
        Format::Torch => torchfile::parse(&bytes),
    });
    parsed.map_err(|why| Error::File { path: path.to_path_buf(), why })
}
