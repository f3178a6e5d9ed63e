//! Importing UA-MT's HDF5 files (`<ID>.h5`, `h5/<ID>.h5` or `<ID>/mri_norm2.h5` with `image` and
//! `label`, listed in `train.list` and `test.list`) into a dataset folder.

use super::dataset::Manifest;
use super::error::{DataError, Result};
use super::h5::read_h5_case;
use super::import::{
    entry_for, ext, locate_all, report, write_case, ImportCommon, ImportReport, Progress, Split, Staging,
};
use super::volume::Geometry;
use std::path::{Path, PathBuf};

/// Options of the UA-MT HDF5 importer.
#[derive(Debug, Clone, PartialEq)]
pub struct H5Import {
    /// Source (`<ID>.h5`, `h5/<ID>.h5` or `<ID>/mri_norm2.h5` per case), output and split.
    pub common: ImportCommon,
    /// Voxel spacing written to the headers (the HDF5 files dropped it; LA is 0.625 mm).
    pub spacing: [f64; 3],
    /// Highest label value accepted.
    pub max_label: u8,
    /// Resample every case to this voxel spacing (mm): the image trilinearly, the label by
    /// nearest neighbour, the geometry kept (`None`: as stored).
    pub resample_to: Option<[f64; 3]>,
}

impl H5Import {
    /// The defaults for `src` and `out`: 16 labelled, 0.625 mm, labels 0..=1, `.nii`, no resampling.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        H5Import { common: ImportCommon::new(src, out), spacing: [0.625; 3], max_label: 1, resample_to: None }
    }
}

/// Where the HDF5 file of case `id` is under `src`, if anywhere.
pub fn find_h5(src: &Path, id: &str) -> Option<PathBuf> {
    [src.join(format!("{id}.h5")), src.join("h5").join(format!("{id}.h5")), src.join(id).join("mri_norm2.h5")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Imports UA-MT HDF5 cases into a dataset folder.
pub fn import_h5(opts: &H5Import) -> Result<ImportReport> {
    import_h5_with(opts, &mut |_, _, _| {})
}

/// [`import_h5`], calling `progress(done, total, id)` after each case.
pub fn import_h5_with(opts: &H5Import, progress: Progress<'_>) -> Result<ImportReport> {
    let c = &opts.common;
    if opts.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(DataError::invalid("spacing", format!("{:?} must be positive", opts.spacing)));
    }
    let train_list = c.train_list.clone().unwrap_or_else(|| c.src.join("train.list"));
    let test_list = c.test_list.clone().unwrap_or_else(|| c.src.join("test.list"));
    let split = Split::from_lists(&train_list, Some(&test_list), c.labelled)?;
    locate_all(&split, (&train_list, Some(&test_list)), |id| find_h5(&c.src, id), "HDF5 file")?;
    let inputs = [("--src", c.src.as_path()), ("--train-list", &train_list), ("--test-list", &test_list)];
    let staging = Staging::new(&c.out, c.force, "uamt import h5", &inputs)?;
    let geometry = Geometry::from_spacing(opts.spacing);
    let (mut training, mut test) = (Vec::new(), Vec::new());
    let cases = split.cases();
    let total = split.train.len() + split.test.len();
    for (n, (id, is_test, labelled)) in cases.enumerate() {
        let path = find_h5(&c.src, id).ok_or_else(|| DataError::bad(&c.src, format!("case `{id}` disappeared")))?;
        let case = read_h5_case(&path, opts.max_label)?;
        let entry = entry_for(id, is_test, labelled, ext(c.gzip));
        match opts.resample_to {
            Some(target) => {
                let (image, label, g) =
                    crate::data::resample::resample_case(&case.image, Some(&case.label), &geometry, target)
                        .map_err(|e| DataError::bad(&path, e.to_string()))?;
                let label = label.ok_or_else(|| DataError::bad(&path, "label lost in resampling"))?;
                write_case(staging.dir(), &entry, &image, &label, &g)?;
            }
            None => write_case(staging.dir(), &entry, &case.image, &case.label, &geometry)?,
        }
        tracing::debug!(case = %id, dims = ?case.image.dims, test = is_test, "imported");
        if is_test {
            test.push(entry)
        } else {
            training.push(entry)
        }
        progress(n + 1, total, id);
    }
    let resampled = opts.resample_to.map_or(String::new(), |t| format!("; resampled to {t:?} mm"));
    let description = format!(
        "imported from UA-MT HDF5 files in {}; spacing {:?} mm (assumed, the HDF5 files carry none){resampled}",
        c.src.display(),
        opts.spacing
    );
    report(staging, Manifest::new("LA2018", &description, "MRI", &["background", "left atrium"], training, test))
}
