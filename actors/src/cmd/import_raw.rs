//! `uamt import nifti`: a raw Medical Segmentation Decathlon or nnU-Net folder into a dataset
//! folder, with normalisation, resampling, an optional crop and the semi-supervised split.

use super::parse::spacing as parse_spacing;
use std::path::PathBuf;
use uamt::data::import::{read_list, ImportReport};
use uamt::data::import_raw::{import_raw_with, Labelled, RawImport};
use uamt::data::normalize::Normalization;
use uamt::data::preprocessing::Resample;

/// Arguments of `uamt import nifti`.
#[derive(Debug, clap::Args)]
pub struct NiftiArgs {
    /// The raw folder: `dataset.json`, `imagesTr/`, `labelsTr/`, `imagesTs/` (MSD names, or
    /// nnU-Net v2's `<case>_0000.nii.gz`).
    #[arg(long)]
    pub src: PathBuf,
    /// Dataset folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Intensity normalisation per case: `volume` (z-score over the whole volume before any
    /// crop, the LA reference's scheme; alias `reference`), `foreground` (over non-zero voxels)
    /// or `none`.
    #[arg(long, default_value = "volume", value_parser = Normalization::parse)]
    pub normalize: Normalization,
    /// Resample to this voxel size in mm (one value or X,Y,Z).
    #[arg(long, value_parser = parse_spacing, conflicts_with = "downsample")]
    pub spacing: Option<[f64; 3]>,
    /// Resample by this factor (2: half the resolution in every axis), within 1/16..=16.
    #[arg(long)]
    pub downsample: Option<f64>,
    /// Crop training cases to the label box plus this margin in voxels (after resampling), at
    /// most 1024.
    #[arg(long, value_parser = clap::value_parser!(u16).range(..=1024))]
    pub crop_margin: Option<u16>,
    /// The first N training cases (in the source's order) are labelled; the rest unlabelled.
    #[arg(long, conflicts_with_all = ["labelled_list", "labelled_fraction"])]
    pub labelled: Option<usize>,
    /// A file listing the labelled training case IDs, one a line.
    #[arg(long, conflicts_with = "labelled_fraction")]
    pub labelled_list: Option<PathBuf>,
    /// This fraction of the training cases, drawn with --seed, is labelled.
    #[arg(long)]
    pub labelled_fraction: Option<f64>,
    /// Seed of --labelled-fraction.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Move the last K labelled training cases into a labelled test split (for `uamt eval`
    /// when the source's test images have no labels).
    #[arg(long, default_value_t = 0)]
    pub holdout: usize,
    /// Write `.nii.gz` instead of `.nii`.
    #[arg(long)]
    pub gzip: bool,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `uamt import nifti`, calling `progress(done, total, id)` per case.
pub fn run_nifti(a: NiftiArgs, progress: &mut dyn FnMut(usize, usize, &str)) -> anyhow::Result<ImportReport> {
    let labelled = match (a.labelled, &a.labelled_list, a.labelled_fraction) {
        (Some(n), _, _) => Labelled::First(n),
        (_, Some(list), _) => Labelled::List(read_list(list)?),
        (_, _, Some(f)) => Labelled::Fraction(f, a.seed),
        _ => Labelled::All,
    };
    let resample = match (a.spacing, a.downsample) {
        (Some(s), _) => Resample::Spacing(s),
        (_, Some(f)) => Resample::Factor(f),
        _ => Resample::Keep,
    };
    let opts = RawImport {
        src: a.src,
        out: a.out,
        normalization: a.normalize,
        resample,
        crop_margin: a.crop_margin.map(usize::from),
        labelled,
        holdout: a.holdout,
        gzip: a.gzip,
        force: a.force,
    };
    Ok(import_raw_with(&opts, progress)?)
}
