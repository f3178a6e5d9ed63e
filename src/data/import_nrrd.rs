//! Importing the 2018 challenge's NRRD layout (`<ID>/lgemri.nrrd`, `<ID>/laendo.nrrd`) with the
//! reference preprocessing: z-score, and a crop in x/y to the label box plus a margin.

use super::dataset::Manifest;
use super::error::{DataError, IoAt, Result};
use super::import::{
    entry_for, ext, locate_all, read_list, report, write_case, ImportCommon, ImportReport, Progress, Split, Staging,
};
use super::nrrd::read_nrrd;
use super::volume::Volume;
use crate::rng::{stream, Rng};
use std::fs;
use std::path::{Path, PathBuf};

/// Crop margin per side, in voxels, around the label's x/y bounding box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Margin {
    /// Drawn per side from `lo..=hi` (the reference: `np.random.randint(10, 20)`, i.e. 10..=19).
    Random {
        /// Smallest margin.
        lo: usize,
        /// Largest margin.
        hi: usize,
    },
    /// The same margin on every side.
    Fixed(usize),
}

impl Margin {
    /// The reference's margin: 10..=19 voxels, drawn per side.
    pub const REFERENCE: Margin = Margin::Random { lo: 10, hi: 19 };
}

/// Options of the 2018 challenge importer.
#[derive(Debug, Clone, PartialEq)]
pub struct NrrdImport {
    /// Source (`<ID>/lgemri.nrrd` and `<ID>/laendo.nrrd` per case; without lists, every case
    /// folder not in the test list is a training case), output and split.
    pub common: ImportCommon,
    /// The patch size the crop must at least cover in x and y (z is not cropped).
    pub patch: [usize; 3],
    /// Crop margin.
    pub margin: Margin,
    /// Seed of the random margins.
    pub seed: u64,
}

impl NrrdImport {
    /// The reference's defaults: margins 10..=19, patch 112 x 112 x 80, 16 labelled, seed 1337.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        NrrdImport { common: ImportCommon::new(src, out), patch: [112, 112, 80], margin: Margin::REFERENCE, seed: 1337 }
    }
}

/// A preprocessed challenge case.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// Z-scored (over the whole uncropped volume) and cropped intensities.
    pub image: Volume<f32>,
    /// 1 where the challenge label was 255, else 0; cropped.
    pub label: Volume<u8>,
    /// The crop's first voxel in the original volume.
    pub origin: [usize; 3],
}

/// The reference preprocessing (UA-MT's `la_heart_processing.py`): label = (raw == 255);
/// image z-scored with the mean and population std of the whole volume; x and y cropped to
/// `[min - m - p, max + m + p)` clipped to the volume, where `min`/`max` are the label's
/// bounding box (inclusive), `m` the margin of that side and `p = max(patch - (max - min), 0) / 2`
/// so the crop covers at least the patch; z is kept whole. `margins` = `[x low, x high, y low, y high]`.
/// `paths` (image, label) name the files in errors.
pub fn preprocess_challenge(
    image: &Volume<f32>,
    label_raw: &Volume<f32>,
    patch: [usize; 3],
    margins: [usize; 4],
    paths: (&Path, &Path),
) -> Result<Preprocessed> {
    let (image_path, path) = paths;
    if image.dims != label_raw.dims {
        return Err(DataError::bad(
            path,
            format!(
                "label shape {:?} differs from image shape {:?} ({})",
                label_raw.dims,
                image.dims,
                image_path.display()
            ),
        ));
    }
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        return Err(DataError::bad(image_path, format!("NaN or infinite voxels (first at index {i})")));
    }
    let [w, h, d] = image.dims;
    let (mut lo, mut hi) = ([usize::MAX; 2], [0usize; 2]);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                if label_raw.data[label_raw.index(x, y, z)] == 255.0 {
                    lo = [lo[0].min(x), lo[1].min(y)];
                    hi = [hi[0].max(x), hi[1].max(y)];
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        return Err(DataError::bad(path, "the label has no foreground (255) voxels"));
    }
    let threads = super::parallel::threads();
    let stats = super::normalize::moments(&image.data, |_| true, threads)
        .ok_or_else(|| DataError::bad(image_path, "the image has no voxels"))?;
    let (mean, std) = (stats.mean, stats.std);
    if std == 0.0 {
        return Err(DataError::bad(image_path, "the image is constant (standard deviation 0)"));
    }
    let dims_xy = [w, h];
    let mut start = [0usize; 2];
    let mut end = [0usize; 2];
    for a in 0..2 {
        let p = patch[a].saturating_sub(hi[a] - lo[a]) / 2;
        start[a] = lo[a].saturating_sub(margins[2 * a] + p);
        end[a] = (hi[a] + margins[2 * a + 1] + p).min(dims_xy[a]);
    }
    let dims = [end[0] - start[0], end[1] - start[1], d];
    let mut out_image = Volume::<f32>::zeros(dims);
    let mut out_label = Volume::<u8>::zeros(dims);
    let plane = dims[0] * dims[1];
    // Each z slice of the crop on whichever thread: the same bits for any thread count.
    super::parallel::for_each_chunk(&mut out_image.data, plane, threads, |first, part| {
        for (k, slice) in part.chunks_mut(plane.max(1)).enumerate() {
            let z = first / plane + k;
            for (o, v) in slice.iter_mut().enumerate() {
                let (x, y) = (o % dims[0], o / dims[0]);
                *v = ((image.data[image.index(x + start[0], y + start[1], z)] as f64 - mean) / std) as f32;
            }
        }
    });
    for z in 0..d {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let (o, s) = (out_label.index(x, y, z), label_raw.index(x + start[0], y + start[1], z));
                out_label.data[o] = (label_raw.data[s] == 255.0) as u8;
            }
        }
    }
    Ok(Preprocessed { image: out_image, label: out_label, origin: [start[0], start[1], 0] })
}

/// Imports the 2018 challenge's NRRD cases with the reference preprocessing.
pub fn import_nrrd(opts: &NrrdImport) -> Result<ImportReport> {
    import_nrrd_with(opts, &mut |_, _, _| {})
}

/// [`import_nrrd`], calling `progress(done, total, id)` after each case.
pub fn import_nrrd_with(opts: &NrrdImport, progress: Progress<'_>) -> Result<ImportReport> {
    let c = &opts.common;
    let default_train = c.src.join("train.list");
    let default_test = c.src.join("test.list");
    let train_list = c.train_list.clone().or_else(|| default_train.is_file().then_some(default_train));
    let test_list = c.test_list.clone().or_else(|| default_test.is_file().then_some(default_test));
    let image_of = |id: &str| c.src.join(id).join("lgemri.nrrd");
    let label_of = |id: &str| c.src.join(id).join("laendo.nrrd");
    let split = match &train_list {
        Some(tl) => Split::from_lists(tl, test_list.as_deref(), c.labelled)?,
        None => {
            let mut ids: Vec<String> = fs::read_dir(&c.src)
                .at(&c.src)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("lgemri.nrrd").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ids.sort();
            // Without a training list, every case folder not in the test list is a training case.
            let test = test_list.as_deref().map(read_list).transpose()?.unwrap_or_default();
            ids.retain(|id| !test.contains(id));
            if ids.is_empty() {
                return Err(DataError::bad(&c.src, "no training case folders with lgemri.nrrd"));
            }
            if c.labelled > ids.len() {
                return Err(DataError::invalid(
                    "labelled",
                    format!("{} labelled cases but {} has only {}", c.labelled, c.src.display(), ids.len()),
                ));
            }
            Split { train: ids, test, labelled: c.labelled }
        }
    };
    let listed = (train_list.as_deref().unwrap_or(&c.src), test_list.as_deref());
    locate_all(&split, listed, |id| image_of(id).is_file().then(|| image_of(id)), "lgemri.nrrd")?;
    locate_all(&split, listed, |id| label_of(id).is_file().then(|| label_of(id)), "laendo.nrrd")?;
    let mut inputs = vec![("--src", c.src.as_path())];
    inputs.extend(train_list.as_deref().map(|p| ("--train-list", p)));
    inputs.extend(test_list.as_deref().map(|p| ("--test-list", p)));
    let staging = Staging::new(&c.out, c.force, "uamt import nrrd", &inputs)?;
    let (mut training, mut test) = (Vec::new(), Vec::new());
    let cases = split.cases();
    for (n, (id, is_test, labelled)) in cases.enumerate() {
        let image = read_nrrd(image_of(id))?;
        let label = read_nrrd(label_of(id))?;
        let margins = match opts.margin {
            Margin::Fixed(m) => [m; 4],
            Margin::Random { lo, hi } => {
                let mut rng = Rng::keyed(opts.seed, &[stream::MARGIN, n as u64]);
                [0; 4].map(|_| rng.range(lo, hi.max(lo) + 1))
            }
        };
        let p =
            preprocess_challenge(&image.volume, &label.volume, opts.patch, margins, (&image_of(id), &label_of(id)))?;
        let geometry = image.geometry.cropped(p.origin);
        let entry = entry_for(id, is_test, labelled, ext(c.gzip));
        write_case(staging.dir(), &entry, &p.image, &p.label, &geometry)?;
        tracing::debug!(case = %id, dims = ?p.image.dims, origin = ?p.origin, "imported");
        if is_test {
            test.push(entry)
        } else {
            training.push(entry)
        }
        progress(n + 1, split.train.len() + split.test.len(), id);
    }
    let margin = match opts.margin {
        Margin::Fixed(m) => format!("{m}"),
        Margin::Random { lo, hi } => format!("random {lo}..={hi} (seed {})", opts.seed),
    };
    let description = format!("imported from the 2018 LA challenge NRRD files in {}; z-scored, cropped in x/y to the label box plus a {margin} voxel margin, at least {:?}", c.src.display(), &opts.patch[..2]);
    report(staging, Manifest::new("LA2018", &description, "MRI", &["background", "left atrium"], training, test))
}
