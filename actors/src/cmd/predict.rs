//! `uamt predict`: label maps of new images (no label needed) from a checkpoint or a weights
//! file, written in each input's own geometry (shape, affine, orientation), with the
//! preprocessing recorded at import (`preprocessing.json`) applied and undone.

use anyhow::Context;
use std::path::{Path, PathBuf};
use uamt::data::import_raw::Preprocessing;
use uamt::data::normalize::Normalization;
use uamt::eval::predict::{predict_file, PredictOptions, PredictedCase};
use uamt::eval::{load_weights, InferOptions, McOptions};

/// Arguments of `uamt predict`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("model").required(true).args(["checkpoint", "weights"])))]
pub struct Args {
    /// A checkpoint written by `uamt train` (its student, or with --teacher its teacher).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: segment with the teacher (the EMA weights).
    #[arg(long, requires = "checkpoint")]
    pub teacher: bool,
    /// Model weights (.safetensors / .npz / .ot, PyTorch state_dict names), e.g. from `uamt export`.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A NIfTI image, or a folder of them.
    #[arg(long)]
    pub input: PathBuf,
    /// Folder for `<case>.label.nii.gz` (and the optional maps and pictures).
    #[arg(long)]
    pub out: PathBuf,
    /// The dataset folder whose `preprocessing.json` says how to prepare raw images; default:
    /// the checkpoint config's dataset.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Normalisation when the dataset has no `preprocessing.json`: volume, foreground or none.
    #[arg(long, default_value = "volume", value_parser = Normalization::parse)]
    pub normalize: Normalization,
    /// Also write `<case>.prob.nii.gz` (foreground probability) and `<case>.uncertainty.nii.gz` (nats).
    #[arg(long)]
    pub maps: bool,
    /// Also write `<case>.png`: axial slices of the image, the label and the uncertainty.
    #[arg(long)]
    pub png: bool,
    /// Monte-Carlo passes for the uncertainty (0: the entropy of the prediction).
    #[arg(long, default_value_t = 0)]
    pub mc_passes: usize,
    /// Seed of the Monte-Carlo passes.
    #[arg(long, default_value_t = 0)]
    pub mc_seed: u64,
    #[command(flatten)]
    pub net: super::net::NetArgs,
    /// Write `.nii` instead of `.nii.gz`.
    #[arg(long)]
    pub no_gzip: bool,
    /// Print a JSON summary (one object per case, volumes in millilitres) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The NIfTI files `input` names (itself, or the folder's, sorted; hidden files skipped).
fn inputs(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("reading {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
            !n.starts_with('.') && (n.ends_with(".nii") || n.ends_with(".nii.gz"))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        anyhow::bail!("{}: no .nii or .nii.gz files", input.display());
    }
    Ok(v)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.net.device;
    let (model, teacher, window, dataset) = if let Some(ck) = &args.checkpoint {
        let c = super::net::from_checkpoint(ck, None, args.teacher, device)?;
        let ds = (!c.config.data.dataset.as_os_str().is_empty()).then(|| c.config.data.dataset.clone());
        (c.model, c.teacher, c.config.eval.window, ds)
    } else {
        let w = args.weights.as_ref().context("give --checkpoint or --weights")?;
        (load_weights(w, &args.net.weights_config(), device)?, None, InferOptions::default(), None)
    };
    let prep = match args.dataset.as_ref().or(dataset.as_ref()) {
        Some(d) => Preprocessing::read(d)?,
        None => None,
    };
    let prep = prep.unwrap_or_else(|| {
        tracing::info!(normalization = ?args.normalize, "no preprocessing.json: normalising only");
        Preprocessing { normalization: args.normalize, ..Preprocessing::default() }
    });
    let opts = PredictOptions {
        infer: args.net.window(&window),
        maps: args.maps,
        mc: (args.mc_passes > 0).then(|| McOptions {
            passes: args.mc_passes,
            seed: args.mc_seed,
            ..McOptions::default()
        }),
        picture: args.png,
        gzip: !args.no_gzip,
    };
    opts.infer.validate("predict")?;
    let files = inputs(&args.input)?;
    let mut bar = crate::progress::Bar::new("predicting");
    let mut done: Vec<PredictedCase> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let case = predict_file(&model, teacher.as_ref(), f, &prep, &args.out, &opts)
            .with_context(|| format!("segmenting {}", f.display()))?;
        let ml = case.volume_ml.values().sum::<f64>() + 0.0; // + 0.0: an empty sum is -0.0
        let line = format!("{}: {:.2} ml -> {}", case.id, ml, case.labels.display());
        if bar.is_terminal() {
            bar.update(i + 1, files.len(), &line);
        } else {
            eprintln!("[{}/{}] {line}", i + 1, files.len());
        }
        done.push(case);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    }
    Ok(())
}
