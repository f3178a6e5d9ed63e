//! A small NRRD reader for the 2018 LA challenge files (`lgemri.nrrd`, `laendo.nrrd`): 3-D,
//! attached or single detached data file, `raw` and `gzip` encodings, the NIfTI set of data
//! types, `space directions` / `spacings` and `space origin` turned into a RAS affine.

use super::error::{DataError, IoAt, Result};
use super::nifti::{decode_line, DType, Scale};
use super::volume::{bounded_voxel_count, Geometry, Volume};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A decoded NRRD volume.
#[derive(Debug, Clone, PartialEq)]
pub struct NrrdVolume {
    /// The voxels as float32, x fastest (NRRD's first axis is the fastest, like NIfTI's).
    pub volume: Volume<f32>,
    /// The stored data type.
    pub dtype: DType,
    /// Voxel-to-world (RAS) affine from `space directions` or `spacings` (identity if neither).
    pub geometry: Geometry,
}

/// The NRRD type names of the supported data types.
fn parse_type(t: &str) -> Option<DType> {
    Some(match t {
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => DType::Uint8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => DType::Int16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => DType::Uint16,
        "int" | "signed int" | "int32" | "int32_t" => DType::Int32,
        "float" => DType::Float32,
        "double" => DType::Float64,
        _ => return None,
    })
}

/// Parses `(a,b,c)` into three numbers.
fn parse_vector(s: &str) -> Option<[f64; 3]> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    let v: Vec<f64> = inner.split(',').map(|x| x.trim().parse::<f64>()).collect::<std::result::Result<_, _>>().ok()?;
    v.try_into().ok()
}

/// The header fields we use.
#[derive(Debug, Default)]
struct Fields {
    dtype: Option<String>,
    dimension: Option<String>,
    sizes: Option<String>,
    endian: Option<String>,
    encoding: Option<String>,
    spacings: Option<String>,
    directions: Option<String>,
    origin: Option<String>,
    space: Option<String>,
    data_file: Option<String>,
    byte_skip: Option<String>,
    line_skip: Option<String>,
}

/// Splits the header off `bytes`; returns the fields and where the attached data starts.
fn parse_header(bytes: &[u8], path: &Path) -> Result<(Fields, usize)> {
    if !bytes.starts_with(b"NRRD000") {
        return Err(DataError::bad(path, "not a NRRD file (no NRRD000x magic)"));
    }
    let mut f = Fields::default();
    let mut pos = 0;
    let mut first = true;
    loop {
        let rest = bytes.get(pos..).unwrap_or_default();
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if f.data_file.is_some() {
                return Ok((f, bytes.len()));
            }
            return Err(DataError::bad(path, "truncated: the header has no blank line before the data"));
        };
        let line = std::str::from_utf8(&rest[..nl]).map_err(|_| DataError::bad(path, "the header is not text"))?;
        let line = line.trim_end_matches('\r');
        pos += nl + 1;
        if first {
            first = false;
            continue;
        }
        if line.is_empty() {
            return Ok((f, pos));
        }
        if line.starts_with('#') || line.contains(":=") {
            continue;
        }
        let Some((key, value)) = line.split_once(": ") else {
            return Err(DataError::bad(path, format!("malformed header line `{line}`")));
        };
        let value = Some(value.trim().to_string());
        match key.trim().to_ascii_lowercase().as_str() {
            "type" => f.dtype = value,
            "dimension" => f.dimension = value,
            "sizes" => f.sizes = value,
            "endian" => f.endian = value,
            "encoding" => f.encoding = value,
            "spacings" => f.spacings = value,
            "space directions" => f.directions = value,
            "space origin" => f.origin = value,
            "space" => f.space = value,
            "data file" | "datafile" => f.data_file = value,
            "byte skip" | "byteskip" => f.byte_skip = value,
            "line skip" | "lineskip" => f.line_skip = value,
            _ => {}
        }
    }
}

fn required<'a>(v: &'a Option<String>, name: &str, path: &Path) -> Result<&'a str> {
    v.as_deref().ok_or_else(|| DataError::bad(path, format!("header has no `{name}` field")))
}

/// The geometry of the header: columns from `space directions` (or `spacings`), LPS turned to RAS.
fn geometry(f: &Fields, path: &Path) -> Result<Geometry> {
    let mut g = Geometry::from_spacing([1.0; 3]);
    if let Some(d) = &f.directions {
        let cols: Vec<&str> = d.split_whitespace().collect();
        if cols.len() != 3 {
            return Err(DataError::bad(path, format!("`space directions` has {} vectors, expected 3", cols.len())));
        }
        for (j, c) in cols.iter().enumerate() {
            let v =
                parse_vector(c).ok_or_else(|| DataError::bad(path, format!("bad `space directions` vector `{c}`")))?;
            for (row, x) in g.affine.iter_mut().zip(v) {
                row[j] = x;
            }
        }
    } else if let Some(s) = &f.spacings {
        let v: Vec<f64> = s
            .split_whitespace()
            .map(|x| x.parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| DataError::bad(path, format!("bad `spacings` `{s}`")))?;
        let v: [f64; 3] =
            v.try_into().map_err(|_| DataError::bad(path, format!("`spacings` `{s}` is not 3 numbers")))?;
        g = Geometry::from_spacing(v.map(|x| if x.is_finite() && x > 0.0 { x } else { 1.0 }));
    }
    if let Some(o) = &f.origin {
        let v = parse_vector(o).ok_or_else(|| DataError::bad(path, format!("bad `space origin` `{o}`")))?;
        for (row, x) in g.affine.iter_mut().zip(v) {
            row[3] = x;
        }
    }
    let space = f.space.as_deref().unwrap_or("").to_ascii_lowercase();
    if space == "left-posterior-superior" || space == "lps" {
        for row in g.affine.iter_mut().take(2) {
            for v in row.iter_mut() {
                *v = -*v;
            }
        }
    }
    Ok(g)
}

/// The detached data file `name` of the header `path`, which must stay inside the header's
/// folder (no absolute path, no `..` leading out, no symbolic link pointing out).
fn detached_path(path: &Path, name: &str) -> Result<PathBuf> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let outside = || DataError::bad(path, format!("`data file: {name}` points outside the folder {}", dir.display()));
    if name.contains('\0') || Path::new(name).is_absolute() {
        return Err(outside());
    }
    let joined = dir.join(name);
    let base = std::fs::canonicalize(dir).at(dir)?;
    let target = std::fs::canonicalize(&joined).at(&joined)?;
    if !target.starts_with(&base) {
        return Err(outside());
    }
    Ok(target)
}

/// The largest NRRD file (or detached data file) read: the most voxels taken, of 8 bytes each,
/// plus a header.
const MAX_NRRD_BYTES: u64 = ((crate::data::volume::MAX_VOXELS as u64) << 3) + (1 << 20);

/// Reads a 3-D NRRD file.
pub fn read_nrrd(path: impl AsRef<Path>) -> Result<NrrdVolume> {
    let path = path.as_ref();
    let bytes = crate::fsutil::read_regular(path, MAX_NRRD_BYTES)?;
    let (f, data_start) = parse_header(&bytes, path)?;
    let dim = required(&f.dimension, "dimension", path)?;
    if dim != "3" {
        return Err(DataError::bad(path, format!("dimension {dim} not supported, only 3")));
    }
    let sizes: Vec<usize> = required(&f.sizes, "sizes", path)?
        .split_whitespace()
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| DataError::bad(path, "bad `sizes`"))?;
    let dims: [usize; 3] = sizes.try_into().map_err(|_| DataError::bad(path, "`sizes` must have 3 entries"))?;
    if dims.contains(&0) {
        return Err(DataError::bad(path, format!("sizes {dims:?} have an empty axis")));
    }
    let tname = required(&f.dtype, "type", path)?;
    let dtype = parse_type(tname).ok_or_else(|| DataError::bad(path, format!("unsupported data type `{tname}`")))?;
    let big_endian = match f.endian.as_deref() {
        Some("big") => true,
        Some("little") => false,
        None if dtype.size() == 1 => false,
        other => return Err(DataError::bad(path, format!("bad or missing `endian` ({other:?})"))),
    };
    let n = bounded_voxel_count(dims, path)?;
    let nbytes = n.checked_mul(dtype.size()).ok_or_else(|| DataError::bad(path, "sizes too large"))?;
    crate::memory::check_fits(
        (bytes.len() as u64).saturating_add(nbytes as u64).saturating_add(8 * n as u64) + crate::memory::RUNTIME_BYTES,
        &format!("reading this {dims:?} volume"),
        "import it on a machine with more memory",
    )
    .map_err(|why| DataError::bad(path, why))?;
    let encoding = required(&f.encoding, "encoding", path)?;
    let parse_skip = |v: &Option<String>, name: &str| -> Result<i64> {
        v.as_deref()
            .map_or(Ok(0), |s| s.parse::<i64>().map_err(|_| DataError::bad(path, format!("bad `{name}` `{s}`"))))
    };
    let byte_skip = parse_skip(&f.byte_skip, "byte skip")?;
    let line_skip = parse_skip(&f.line_skip, "line skip")?.max(0) as usize;

    // The encoded data: attached after the header, or a detached file next to it.
    let detached: Option<(PathBuf, Vec<u8>)> = match &f.data_file {
        Some(name) if name.starts_with("LIST") || name.contains('%') => {
            return Err(DataError::bad(path, format!("multi-file `data file: {name}` not supported")));
        }
        Some(name) => {
            let p = detached_path(path, name)?;
            let b = crate::fsutil::read_regular(&p, MAX_NRRD_BYTES)?;
            Some((p, b))
        }
        None => None,
    };
    let (data_path, mut encoded): (&Path, &[u8]) = match &detached {
        Some((p, b)) => (p.as_path(), b.as_slice()),
        None => (path, bytes.get(data_start..).unwrap_or_default()),
    };
    for _ in 0..line_skip {
        let nl = encoded
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| DataError::bad(data_path, "truncated: fewer lines than `line skip`"))?;
        encoded = &encoded[nl + 1..];
    }
    let decoded: Vec<u8>;
    let raw: &[u8] = match encoding {
        "raw" => encoded,
        "gzip" | "gz" => {
            // Never more than the sizes declare (bounded by MAX_VOXELS) plus the byte skip: one
            // byte beyond is read only to refuse a stream that goes on (a gzip bomb).
            let want = (nbytes as u64).saturating_add(byte_skip.max(0) as u64);
            let mut out = Vec::with_capacity(nbytes);
            flate2::read::MultiGzDecoder::new(encoded)
                .take(want.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| DataError::bad(data_path, format!("truncated or corrupt gzip data: {e}")))?;
            if byte_skip >= 0 && out.len() as u64 > want {
                return Err(DataError::bad(
                    data_path,
                    format!("gzip data decompresses to more than the {want} bytes the header declares; refused"),
                ));
            }
            decoded = out;
            &decoded
        }
        other => return Err(DataError::bad(path, format!("encoding `{other}` not supported (raw, gzip)"))),
    };
    let raw = if byte_skip == -1 {
        raw.get(raw.len().saturating_sub(nbytes)..).unwrap_or_default()
    } else {
        raw.get(byte_skip.max(0) as usize..).unwrap_or_default()
    };
    if raw.len() < nbytes {
        return Err(DataError::bad(
            data_path,
            format!("truncated: {dims:?} {tname} needs {nbytes} bytes of data, found {}", raw.len()),
        ));
    }
    let mut data = vec![0f32; n];
    decode_line(raw, dtype, big_endian, Scale::IDENTITY, 0, 1, &mut data)
        .ok_or_else(|| DataError::bad(data_path, "voxel data out of range"))?;
    Ok(NrrdVolume { volume: Volume::new(dims, data)?, dtype, geometry: geometry(&f, path)? })
}
