//! `uamt eval`: segmentation metrics (Dice, Jaccard, 95 % Hausdorff, average surface distance,
//! as medpy defines them) either between label volumes made elsewhere (`--prediction` against
//! `--reference`: two NIfTI files, or two folders matched by file name), or of a weights file
//! run by sliding window over a dataset's test split (`--weights` with `--dataset`); a model's
//! evaluation also scores its probabilities and uncertainty (ECE, Brier score, uncertainty AUROC).
//! A table (or `--json`) on stdout, one progress line per case on stderr.

use super::parse::spacing as parse_spacing;
use anyhow::Context;
use std::path::{Path, PathBuf};
use uamt::data::{Dataset, DatasetOptions};
use uamt::eval::{
    compare_paths, evaluate_dataset, load_weights, CaseEvent, EmptyPolicy, EvalOptions, InferOptions, Outputs,
    PictureOptions, Report, RELIABILITY_PNG,
};
use uamt::recipe;

/// Arguments of `uamt eval`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["prediction", "weights", "checkpoint"])))]
pub struct Args {
    /// Predicted labels: a NIfTI file, or a folder of them (matched to --reference by name).
    #[arg(long, requires = "reference", conflicts_with_all = ["weights", "dataset"])]
    pub prediction: Option<PathBuf>,
    /// Reference labels: a NIfTI file, or a folder of them.
    #[arg(long, requires = "prediction")]
    pub reference: Option<PathBuf>,
    /// Voxel size in mm for the millimetre distances (one value or X,Y,Z); default: the
    /// reference header's (the image's with --dataset).
    #[arg(long, value_parser = parse_spacing, conflicts_with = "weights")]
    pub spacing: Option<[f64; 3]>,
    /// Model weights under PyTorch state_dict names: .safetensors, .npz, a PyTorch state_dict
    /// (.pt / .pth), a TorchScript module or tch's .ot, told apart by content; all read as
    /// untrusted by uamt's own parsers (every tensor checked, no code run).
    #[arg(long, requires = "dataset")]
    pub weights: Option<PathBuf>,
    /// A checkpoint written by `uamt train`: its student (or with --teacher its teacher) is evaluated with the model, dataset
    /// and sliding-window settings of the config stored in it (or of --config).
    #[arg(long, conflicts_with_all = ["weights", "prediction"])]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: evaluate its teacher (the EMA weights) instead of its student.
    #[arg(long, requires = "checkpoint")]
    pub teacher: bool,
    /// With --checkpoint: use this config instead of the one stored in the checkpoint.
    #[arg(long, requires = "checkpoint")]
    pub config: Option<PathBuf>,
    /// Dataset folder whose test split is evaluated (with --checkpoint: instead of the config's).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    #[command(flatten)]
    pub net: super::net::NetArgs,
    /// How an empty prediction scores: `zeros` (the UA-MT reference) or `undefined` (distances
    /// left out of the means).
    #[arg(long, default_value = "zeros", value_parser = parse_empty)]
    pub empty: EmptyPolicy,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run the network at this voxel size in mm (one value or X,Y,Z), e.g. the one it was trained
    /// at: images of another voxel size are resampled to it and the prediction is taken back to
    /// their own grid, where it is scored (a model trained at half resolution against the
    /// original labels). Default: each image as it is.
    #[arg(long, value_parser = parse_spacing, conflicts_with = "prediction")]
    pub network_spacing: Option<[f64; 3]>,
    /// Write report.json and report.csv here; with --weights or --checkpoint also per case the
    /// predicted labels, foreground probability and uncertainty (NIfTI) and a PNG of a few slices,
    /// and the reliability diagram of all cases (reliability.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The uncertainty map written with --out, which the uncertainty AUROC then scores: the
    /// checkpoint's teacher's Monte-Carlo passes, or the model's own for --weights or a checkpoint
    /// without a teacher. Without --out the AUROC scores the prediction's entropy (no extra passes).
    #[command(flatten)]
    pub mc: super::net::McArgs,
    /// With --out: replace files that uamt wrote there before (a file of the same name that uamt
    /// did not write is never replaced).
    #[arg(long, requires = "out")]
    pub force: bool,
}

impl Args {
    /// The paths this evaluation reads, by flag.
    fn inputs(&self) -> Vec<(&'static str, &Path)> {
        let flags: [(&'static str, &Option<PathBuf>); 6] = [
            ("--prediction", &self.prediction),
            ("--reference", &self.reference),
            ("--weights", &self.weights),
            ("--checkpoint", &self.checkpoint),
            ("--config", &self.config),
            ("--dataset", &self.dataset),
        ];
        flags.into_iter().filter_map(|(f, p)| p.as_deref().map(|p| (f, p))).collect()
    }
}

fn parse_empty(s: &str) -> Result<EmptyPolicy, String> {
    match s {
        "zeros" => Ok(EmptyPolicy::Zeros),
        "undefined" => Ok(EmptyPolicy::Undefined),
        _ => Err(format!("`{s}`: give zeros or undefined")),
    }
}

/// Progress on stderr: a bar on a terminal, one line per case otherwise.
fn progress(bar: &mut crate::progress::Bar, e: &CaseEvent) {
    if bar.is_terminal() {
        bar.update(e.index + 1, e.total, &e.line());
    } else {
        eprintln!("{}", e.line()); // already says "[i/n] case: ..."
    }
}

/// Runs the evaluation the arguments ask for.
fn report(args: &Args) -> anyhow::Result<Report> {
    if let (Some(p), Some(r)) = (&args.prediction, &args.reference) {
        let mut bar = crate::progress::Bar::new("evaluating");
        return Ok(compare_paths(p, r, args.spacing, args.empty, &mut |e| progress(&mut bar, e))?);
    }
    let open = |dir: &Path| {
        uamt::data::sigbus::install_handler();
        Dataset::open(dir, &DatasetOptions::default()).with_context(|| format!("opening dataset {}", dir.display()))
    };
    let device = args.net.device;
    let (model, teacher, dataset, source, window) = if let Some(ck) = &args.checkpoint {
        let c = super::net::from_checkpoint(ck, args.config.as_deref(), args.teacher, device)?;
        // A checkpoint may come from anywhere: its stored config's dataset is opened only if it
        // exists; the synthetic dataset is never generated from it (train does that).
        let dataset = match &args.dataset {
            Some(d) => open(d)?,
            None => crate::setup::open_existing_dataset(&c.config)?,
        };
        (c.model, c.teacher, dataset, ck, c.config.eval.window)
    } else {
        let (Some(weights), Some(dir)) = (&args.weights, &args.dataset) else {
            anyhow::bail!("give --prediction and --reference, --weights and --dataset, or --checkpoint");
        };
        (load_weights(weights, &args.net.weights_config(), device)?, None, open(dir)?, weights, InferOptions::default())
    };
    let infer = args.net.window(&window);
    let mc = args.mc.options(recipe::MC_PASSES as usize)?;
    let opts = EvalOptions {
        infer,
        empty: args.empty,
        network_spacing: args.network_spacing,
        outputs: args.out.as_ref().map(|dir| Outputs {
            dir: dir.clone(),
            nifti: true,
            pictures: true,
            picture: PictureOptions::default(),
            uncertainty: mc.clone(),
        }),
    };
    if let Some(out) = &args.out {
        // The dataset the checkpoint's config names is read too: never written to.
        apart(out, &[("the evaluated dataset", &dataset.root)])?;
        // Outputs are `<out>/<id>.<kind>`: every id must be a plain name (Dataset::open checks it
        // already; checked again here, where the files are named).
        let mut names = Vec::new();
        for case in &dataset.test {
            uamt::data::dataset::check_case_id(&case.id)
                .map_err(|why| anyhow::anyhow!("refusing to write outputs: {why}"))?;
            names.extend(
                ["label.nii.gz", "prob.nii.gz", "uncertainty.nii.gz", "png"].map(|k| format!("{}.{k}", case.id)),
            );
        }
        names.push(RELIABILITY_PNG.to_string());
        claim(out, args.force, names)?;
    }
    if device == tch::Device::Cpu {
        let net = args.network_spacing;
        for case in &dataset.test {
            let h = case.image.header();
            let grid = match net {
                Some(t) => uamt::data::resample::resampled_dims(h.dims, h.geometry.spacing(), t)?,
                None => h.dims,
            };
            let classes = (model.config().n_filters, model.config().n_classes);
            let mc = if args.out.is_some() { args.mc.passes(recipe::MC_PASSES as usize) } else { 0 };
            super::net::check_inference_memory(classes, &opts.infer, h.dims, grid, mc, case.image.path())?;
        }
    }
    let mut bar = crate::progress::Bar::new("evaluating");
    Ok(evaluate_dataset(&model, teacher.as_ref(), &dataset, &source.display().to_string(), &opts, &mut |e| {
        progress(&mut bar, e)
    })?)
}

/// Refuses an `--out` that overlaps what the evaluation reads.
fn apart(out: &Path, inputs: &[(&str, &Path)]) -> anyhow::Result<()> {
    Ok(uamt::fsutil::check_apart(&[("--out", out)], inputs)?)
}

/// Claims the report files and `names` in `--out` before anything is written there.
fn claim(out: &Path, force: bool, mut names: Vec<String>) -> anyhow::Result<()> {
    names.extend(["report.json", "report.csv"].map(String::from));
    let mut dir = uamt::fsutil::OutputDir::open(out, "uamt eval", force)?;
    Ok(dir.claim(&names)?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.mc.options(recipe::MC_PASSES as usize)?;
    if let Some(out) = &args.out {
        apart(out, &args.inputs())?;
        if args.prediction.is_some() {
            claim(out, args.force, Vec::new())?;
        }
    }
    let report = report(&args)?;
    if let Some(dir) = &args.out {
        report.write_to(dir)?;
    }
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if report.cases.is_empty() {
        anyhow::bail!("no case could be evaluated ({} failed)", report.failures.len());
    }
    Ok(())
}
