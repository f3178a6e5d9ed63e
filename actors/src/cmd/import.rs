//! `uamt import`: UA-MT's HDF5 files or the 2018 challenge's NRRD layout into a dataset folder
//! (written to a temporary folder and renamed into place, so a failed import leaves nothing).

use std::path::PathBuf;
use uamt::data::import::{ImportCommon, ImportReport};
use uamt::data::import_h5::{import_h5_with, H5Import};
use uamt::data::import_nrrd::{import_nrrd_with, Margin, NrrdImport};

/// Arguments of `uamt import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub source: Source,
}

/// What to import from.
#[derive(Debug, clap::Subcommand)]
pub enum Source {
    /// UA-MT HDF5 files: `<ID>.h5` (or `h5/<ID>.h5`, `<ID>/mri_norm2.h5`) with `image` and
    /// `label`, plus `train.list` and `test.list`.
    H5(H5Args),
    /// The 2018 challenge layout: `<ID>/lgemri.nrrd` and `<ID>/laendo.nrrd` (label 255), with
    /// the reference preprocessing (z-score, crop x/y to the label box plus a margin).
    Nrrd(NrrdArgs),
    /// A raw Medical Segmentation Decathlon or nnU-Net folder (`dataset.json`, `imagesTr`,
    /// `labelsTr`, `imagesTs`) with normalisation, resampling, crop and the labelled split.
    Nifti(super::import_raw::NiftiArgs),
}

/// Options shared by both importers.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Source folder.
    #[arg(long)]
    pub src: PathBuf,
    /// Dataset folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// The first N training IDs are labelled (16 = the 20 % protocol on LA, 8 = 10 %).
    #[arg(long, default_value_t = 16)]
    pub labelled: usize,
    /// Training list (default: `<src>/train.list`).
    #[arg(long)]
    pub train_list: Option<PathBuf>,
    /// Test list (default: `<src>/test.list`).
    #[arg(long)]
    pub test_list: Option<PathBuf>,
    /// Write `.nii.gz` instead of `.nii` (read through a decompressed cache later).
    #[arg(long)]
    pub gzip: bool,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `uamt import h5`.
#[derive(Debug, clap::Args)]
pub struct H5Args {
    #[command(flatten)]
    pub common: Common,
    /// Voxel spacing in mm written to the headers: one value or X,Y,Z (LA: 0.625 isotropic).
    #[arg(long, default_value = "0.625", value_parser = super::parse::spacing)]
    pub spacing: [f64; 3],
    /// Highest label value accepted.
    #[arg(long, default_value_t = 1)]
    pub max_label: u8,
    /// Resample by this factor (2: half the resolution, LA 0.625 -> 1.25 mm): images
    /// trilinearly, labels by nearest neighbour, the geometry updated.
    #[arg(long, conflicts_with = "to_spacing")]
    pub downsample: Option<f64>,
    /// Resample to this voxel spacing in mm (one value or X,Y,Z).
    #[arg(long, value_parser = super::parse::spacing)]
    pub to_spacing: Option<[f64; 3]>,
}

/// Arguments of `uamt import nrrd`.
#[derive(Debug, clap::Args)]
pub struct NrrdArgs {
    #[command(flatten)]
    pub common: Common,
    /// Fixed crop margin per side in voxels, at most 1024 (default: random 10..=19 per side, as
    /// the reference).
    #[arg(long, value_parser = clap::value_parser!(u16).range(..=1024))]
    pub margin: Option<u16>,
    /// Seed of the random margins.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Patch size X,Y,Z the x/y crop must at least cover.
    #[arg(long, default_value = "112,112,80", value_parser = super::parse::size)]
    pub patch: [usize; 3],
}

impl From<Common> for ImportCommon {
    fn from(c: Common) -> Self {
        ImportCommon {
            src: c.src,
            out: c.out,
            labelled: c.labelled,
            train_list: c.train_list,
            test_list: c.test_list,
            gzip: c.gzip,
            force: c.force,
        }
    }
}

/// Logs what an import or `uamt synth` wrote.
pub fn log_report(r: &ImportReport) {
    for (path, why) in &r.ignored {
        tracing::warn!(file = %path.display(), why = %why, "not imported");
    }
    if !r.ignored.is_empty() {
        tracing::warn!(files = r.ignored.len(), "files in the source's folders were not imported (listed above)");
    }
    tracing::info!(out = %r.out.display(), training = r.training, labelled = r.labelled, test = r.test, "dataset written");
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut bar = crate::progress::Bar::new("importing");
    let report = match args.source {
        Source::H5(a) => {
            let resample_to = match (a.downsample, a.to_spacing) {
                (Some(f), _) if !(f.is_finite() && (1.0 / 16.0..=16.0).contains(&f)) => {
                    anyhow::bail!("--downsample must be a factor in 1/16..=16, got {f}")
                }
                (Some(f), _) => Some(a.spacing.map(|s| s * f)),
                (None, t) => t,
            };
            import_h5_with(
                &H5Import { common: a.common.into(), spacing: a.spacing, max_label: a.max_label, resample_to },
                &mut |d, t, id| bar.update(d, t, id),
            )?
        }
        Source::Nrrd(a) => {
            let margin = a.margin.map_or(Margin::REFERENCE, |m| Margin::Fixed(usize::from(m)));
            import_nrrd_with(
                &NrrdImport { common: a.common.into(), patch: a.patch, margin, seed: a.seed },
                &mut |d, t, id| bar.update(d, t, id),
            )?
        }
        Source::Nifti(a) => {
            let r = super::import_raw::run_nifti(a, &mut |d, t, id| bar.update(d, t, id))?;
            log_report(&r);
            // What to run next: the plan for this dataset (add --device cuda --memory GIB or
            // --hours H to plan for a GPU or a time budget).
            let name = r.out.file_name().map_or("dataset".into(), |n| n.to_string_lossy().into_owned());
            let config = r.out.with_file_name(format!("{name}.toml"));
            super::plan::say(&format!("next: uamt plan --dataset {} --out {}\n", r.out.display(), config.display()));
            return Ok(());
        }
    };
    log_report(&report);
    Ok(())
}
