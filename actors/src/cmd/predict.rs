//! `uamt predict`: label maps of new images (no label needed) from a checkpoint or a weights
//! file, written in each input's own geometry (shape, affine, orientation), with the
//! preprocessing recorded at import (`preprocessing.json`) applied and undone.

use anyhow::Context;
use std::path::{Path, PathBuf};
use uamt::data::normalize::Normalization;
use uamt::data::preprocessing::Preprocessing;
use uamt::eval::predict::{output_names, predict_file, PredictOptions, PredictedCase};
use uamt::eval::{load_weights, InferOptions};
use uamt::fsutil::OutputDir;

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
    /// Model weights under PyTorch state_dict names, e.g. from `uamt export`: .safetensors, .npz,
    /// a PyTorch state_dict (.pt / .pth), a TorchScript module or tch's .ot (told apart by content).
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
    #[command(flatten)]
    pub mc: super::net::McArgs,
    #[command(flatten)]
    pub net: super::net::NetArgs,
    /// Write `.nii` instead of `.nii.gz`.
    #[arg(long)]
    pub no_gzip: bool,
    /// Print a JSON summary (one object per case, volumes in millilitres) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace outputs that uamt wrote in --out before (a file of the same name that uamt did not
    /// write is never replaced).
    #[arg(long)]
    pub force: bool,
}

/// The NIfTI files `input` names: itself, or the folder's (sorted; hidden files and the files
/// uamt wrote there, listed in its `.uamt-written` marker, skipped). A file found in the folder
/// that is not a regular file is refused, as a named one is.
pub(crate) fn inputs(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(input).with_context(|| format!("reading {}", input.display()))?;
    if !meta.is_dir() {
        uamt::fsutil::check_regular(input)?;
        return Ok(vec![input.to_path_buf()]);
    }
    let ours = uamt::fsutil::marker::written_by_uamt(input);
    let mut skipped = 0;
    let mut v = Vec::new();
    for e in std::fs::read_dir(input).with_context(|| format!("reading {}", input.display()))? {
        let p = e.with_context(|| format!("reading {}", input.display()))?.path();
        let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let lower = n.to_lowercase();
        if n.starts_with('.') || !(lower.ends_with(".nii") || lower.ends_with(".nii.gz")) {
            continue;
        }
        if ours.contains(&n) {
            skipped += 1;
            continue;
        }
        uamt::fsutil::check_regular(&p)?;
        v.push(p);
    }
    v.sort();
    // `<case>.label.nii.gz` (and `.prob`, `.uncertainty`) next to `<case>.nii[.gz]`: a map of that
    // image (an earlier prediction, or the user's own label), not a new image.
    let stems: std::collections::HashSet<String> = v.iter().map(|p| uamt::data::nifti::stem(p)).collect();
    let before = v.len();
    v.retain(|p| {
        let stem = uamt::data::nifti::stem(p);
        !["label", "prob", "uncertainty"]
            .iter()
            .any(|k| stem.strip_suffix(&format!(".{k}")).is_some_and(|case| stems.contains(case)))
    });
    skipped += before - v.len();
    if skipped > 0 {
        tracing::info!(
            files = skipped,
            folder = %input.display(),
            "skipping uamt's outputs and the label / probability / uncertainty maps of other images there"
        );
    }
    if v.is_empty() {
        anyhow::bail!("{}: no .nii or .nii.gz files", input.display());
    }
    Ok(v)
}

/// How raw images are prepared: as `dataset`'s `preprocessing.json` says, or, without one,
/// normalised by `normalize` only.
pub(crate) fn preprocessing(dataset: Option<&Path>, normalize: Normalization) -> anyhow::Result<Preprocessing> {
    let prep = match dataset {
        Some(d) => Preprocessing::read(d)?,
        None => None,
    };
    Ok(prep.unwrap_or_else(|| {
        tracing::info!(normalization = ?normalize, "no preprocessing.json: normalising only");
        Preprocessing { normalization: normalize, ..Preprocessing::default() }
    }))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.net.device;
    let mut read: Vec<(&str, &Path)> = vec![("--input", &args.input)];
    read.extend(args.checkpoint.as_deref().map(|p| ("--checkpoint", p)));
    read.extend(args.weights.as_deref().map(|p| ("--weights", p)));
    read.extend(args.dataset.as_deref().map(|p| ("--dataset", p)));
    uamt::fsutil::check_apart(&[("--out", &args.out)], &read)?;
    let (model, teacher, window, dataset, classes) = if let Some(ck) = &args.checkpoint {
        let c = super::net::from_checkpoint(ck, None, args.teacher, device)?;
        let ds = (!c.config.data.dataset.as_os_str().is_empty()).then(|| c.config.data.dataset.clone());
        (c.model, c.teacher, c.config.eval.window, ds, (c.config.model.n_filters, c.config.model.n_classes))
    } else {
        let w = args.weights.as_ref().context("give --checkpoint or --weights")?;
        let cfg = args.net.weights_config();
        (load_weights(w, &cfg, device)?, None, InferOptions::default(), None, (cfg.n_filters, cfg.n_classes))
    };
    if args.dataset.is_none() {
        if let Some(d) = &dataset {
            // The checkpoint's dataset is read (its preprocessing record): never written to.
            uamt::fsutil::check_apart(&[("--out", &args.out)], &[("the checkpoint's dataset", d)])?;
        }
    }
    let prep = preprocessing(args.dataset.as_deref().or(dataset.as_deref()), args.normalize)?;
    let opts = PredictOptions {
        infer: args.net.window(&window),
        maps: args.maps,
        mc: args.mc.options(0)?,
        picture: args.png,
        gzip: !args.no_gzip,
    };
    opts.infer.validate("predict")?;
    let files = inputs(&args.input)?;
    // Before any work: every output name claimed (none exists unless --force and uamt wrote it),
    // and every input's memory need checked from its header.
    let mut names = Vec::new();
    for f in &files {
        names.extend(output_names(&uamt::data::nifti::stem(f), &opts));
        if device == tch::Device::Cpu {
            let h = uamt::data::nifti::read_header(f)?;
            let net = match prep.resample.target(h.geometry.spacing()) {
                Some(t) => uamt::data::resample::resampled_dims(h.dims, h.geometry.spacing(), t)?,
                None => h.dims,
            };
            super::net::check_inference_memory(classes, &opts.infer, h.dims, net, args.mc.passes(0), f)?;
        }
    }
    let mut out = OutputDir::open(&args.out, "uamt predict", args.force)?;
    out.claim(&names)?;
    let mut bar = crate::progress::Bar::new("predicting");
    let mut done: Vec<PredictedCase> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let case = predict_file(&model, teacher.as_ref(), f, &prep, out.dir(), &opts)
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
