//! UA-MT's HDF5 cases: `image` (float32, `[x][y][z]` in C order, usually gzip-compressed and
//! chunked) and `label` (uint8) in one file per case. Read into x-fastest [`Volume`]s.

use super::error::{DataError, Result};
use super::volume::{bounded_voxel_count, Volume, MAX_VOXELS};
use hdf5::types::TypeDescriptor;
use std::path::Path;

/// One case of a UA-MT HDF5 file.
#[derive(Debug, Clone, PartialEq)]
pub struct H5Case {
    /// The `image` dataset.
    pub image: Volume<f32>,
    /// The `label` dataset.
    pub label: Volume<u8>,
}

fn h5err(path: &Path, what: &str, e: hdf5::Error) -> DataError {
    DataError::bad(path, format!("{what}: {e}"))
}

/// Opens dataset `name` of `file`, checks it is 3-D and numeric, and returns it with its shape.
fn dataset3(file: &hdf5::File, path: &Path, name: &str, integer: bool) -> Result<(hdf5::Dataset, [usize; 3])> {
    let ds = file.dataset(name).map_err(|e| h5err(path, &format!("no dataset `{name}`"), e))?;
    let shape = ds.shape();
    let dims: [usize; 3] = shape
        .as_slice()
        .try_into()
        .map_err(|_| DataError::bad(path, format!("dataset `{name}` has shape {shape:?}, expected 3-D")))?;
    if dims.contains(&0) {
        return Err(DataError::bad(path, format!("dataset `{name}` has shape {shape:?} with an empty axis")));
    }
    // The dataspace is checked before anything is read: a compressed dataset can declare far more
    // than the file holds, and `read_raw` allocates what it declares.
    bounded_voxel_count(dims, path)
        .map_err(|_| DataError::bad(path, format!("dataset `{name}` shape {dims:?} exceeds {MAX_VOXELS} voxels")))?;
    // Read as 8-byte values, then converted: what it needs must fit before it is read.
    let n = dims.iter().map(|&d| d as u64).product::<u64>();
    crate::memory::check_fits(
        n * 10 + crate::memory::RUNTIME_BYTES,
        &format!("reading dataset `{name}` of shape {dims:?}"),
        "import it on a machine with more memory",
    )
    .map_err(|why| DataError::bad(path, why))?;
    let desc = ds
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| h5err(path, &format!("dataset `{name}` data type"), e))?;
    let ok = match desc {
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) => true,
        TypeDescriptor::Float(_) => !integer,
        _ => false,
    };
    if !ok {
        let want = if integer { "an integer type" } else { "a numeric type" };
        return Err(DataError::bad(
            path,
            format!("dataset `{name}` has unsupported data type {desc}, expected {want}"),
        ));
    }
    Ok((ds, dims))
}

/// Reads dataset `name` as float32 intensities; NaN or infinite voxels are an error.
pub fn read_h5_image(file: &hdf5::File, path: &Path, name: &str) -> Result<Volume<f32>> {
    let (ds, dims) = dataset3(file, path, name, false)?;
    let c: Vec<f32> = ds.read_raw().map_err(|e| h5err(path, &format!("cannot read dataset `{name}`"), e))?;
    if let Some(i) = c.iter().position(|v| !v.is_finite()) {
        let bad = c.iter().filter(|v| !v.is_finite()).count();
        return Err(DataError::bad(
            path,
            format!("dataset `{name}` has {bad} NaN or infinite voxels (first at C-order index {i})"),
        ));
    }
    Volume::from_c_order(dims, &c).map_err(|e| DataError::bad(path, e.to_string()))
}

/// Reads dataset `name` as labels: integers in `0..=max_label`.
pub fn read_h5_label(file: &hdf5::File, path: &Path, name: &str, max_label: u8) -> Result<Volume<u8>> {
    let (ds, dims) = dataset3(file, path, name, true)?;
    let c: Vec<i64> = ds.read_raw().map_err(|e| h5err(path, &format!("cannot read dataset `{name}`"), e))?;
    if let Some(v) = c.iter().find(|&&v| !(0..=max_label as i64).contains(&v)) {
        return Err(DataError::bad(path, format!("dataset `{name}` has label value {v}, outside 0..={max_label}")));
    }
    let c: Vec<u8> = c.into_iter().map(|v| v as u8).collect();
    Volume::from_c_order(dims, &c).map_err(|e| DataError::bad(path, e.to_string()))
}

/// Opens an HDF5 file, naming it in the error.
pub fn open_h5(path: &Path) -> Result<hdf5::File> {
    crate::fsutil::check_regular(path)?;
    hdf5::File::open(path).map_err(|e| h5err(path, "not a readable HDF5 file", e))
}

/// Reads a UA-MT case (`image` and `label`, same shape, labels in `0..=max_label`).
pub fn read_h5_case(path: &Path, max_label: u8) -> Result<H5Case> {
    let file = open_h5(path)?;
    let image = read_h5_image(&file, path, "image")?;
    let label = read_h5_label(&file, path, "label", max_label)?;
    if image.dims != label.dims {
        return Err(DataError::bad(
            path,
            format!("`label` shape {:?} differs from `image` shape {:?}", label.dims, image.dims),
        ));
    }
    Ok(H5Case { image, label })
}

/// Writes a case in UA-MT's layout (gzip level 4, chunked), for tests, benchmarks and export.
pub fn write_h5_case(path: &Path, case: &H5Case) -> Result<()> {
    let run = || -> hdf5::Result<()> {
        let file = hdf5::File::create(path)?;
        let chunk = |dims: [usize; 3]| dims.map(|d| d.clamp(1, 32));
        let image = case.image.to_c_order();
        file.new_dataset::<f32>()
            .shape(case.image.dims)
            .chunk(chunk(case.image.dims))
            .deflate(4)
            .create("image")?
            .write_raw(&image)?;
        let label = case.label.to_c_order();
        file.new_dataset::<u8>()
            .shape(case.label.dims)
            .chunk(chunk(case.label.dims))
            .deflate(4)
            .create("label")?
            .write_raw(&label)?;
        Ok(())
    };
    run().map_err(|e| h5err(path, "cannot write HDF5", e))
}
