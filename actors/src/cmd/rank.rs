//! `uamt rank`: the unlabelled training cases of a dataset (or raw images), most informative
//! first, scored from a model's Monte-Carlo passes (predictive entropy and BALD, over the whole
//! volume and over the predicted foreground with its boundary band; see `uamt::eval::rank`).
//! A table (or `--json`) on stdout; with `--out`, `ranking.json`, `ranking.csv` and a picture per
//! top case.

use anyhow::Context;
use std::path::{Path, PathBuf};
use uamt::data::normalize::Normalization;
use uamt::data::{Case, Dataset, DatasetOptions};
use uamt::eval::rank::{check_passes, rank_case, rank_file, ranks_before, RankSource, DEFAULT_BAND, MAX_BAND};
use uamt::eval::{load_weights, InferOptions, McOptions, Picture, RankOptions, RankedCase, Ranking, Score};
use uamt::fsutil::OutputDir;

/// Arguments of `uamt rank`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("model").required(true).args(["checkpoint", "weights"])))]
pub struct Args {
    /// A checkpoint written by `uamt train`: its student segments and its teacher draws the
    /// Monte-Carlo passes (with --teacher the teacher does both).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: segment with the teacher (the EMA weights) too.
    #[arg(long, requires = "checkpoint")]
    pub teacher: bool,
    /// Model weights (.safetensors / .npz / .ot, PyTorch state_dict names); it segments and
    /// draws the passes.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A dataset folder: its unlabelled training cases are ranked (default: the checkpoint
    /// config's dataset). With --input: the dataset whose `preprocessing.json` prepares the images.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Rank these raw images instead: a NIfTI file, or a folder of them (prepared as `predict`
    /// prepares them).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Normalisation of raw images when the dataset has no `preprocessing.json`: volume,
    /// foreground or none.
    #[arg(long, default_value = "volume", value_parser = Normalization::parse, requires = "input")]
    pub normalize: Normalization,
    /// Monte-Carlo passes (noise + dropout, the recipe's teacher passes) per window, 2..=64.
    #[arg(long, default_value_t = uamt::recipe::MC_PASSES as usize)]
    pub mc_passes: usize,
    /// Seed of the passes' noise and dropout: the same seed, the same ranking.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The score the ranking follows: entropy_fg (default), bald_fg, entropy or bald.
    #[arg(long, default_value = "entropy_fg", value_parser = Score::parse)]
    pub score: Score,
    /// Width in voxels (of the network's grid) of the boundary band around the predicted
    /// foreground that the `_fg` scores cover.
    #[arg(long, default_value_t = DEFAULT_BAND)]
    pub band: f64,
    /// Show (and with --out draw) only the first K cases; ranking.json and ranking.csv list all.
    #[arg(long)]
    pub top: Option<usize>,
    /// Folder for ranking.json, ranking.csv and `<case>.png` per shown case (the image, the
    /// predicted contour and the Monte-Carlo predictive entropy).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With --out: replace files that uamt wrote there before (a file of the same name that uamt
    /// did not write is never replaced).
    #[arg(long, requires = "out")]
    pub force: bool,
    /// Print the ranking (the first K cases) as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub net: super::net::NetArgs,
}

/// What is ranked.
enum Items {
    /// A dataset's unlabelled training cases.
    Cases(Dataset),
    /// Raw images, with the preprocessing that prepares them.
    Files(Vec<PathBuf>, uamt::data::preprocessing::Preprocessing),
}

impl Items {
    /// The case ids and image files, in order.
    fn list(&self) -> Vec<(String, PathBuf)> {
        match self {
            Items::Cases(d) => unlabelled(d).map(|c| (c.id.clone(), c.image.path().to_path_buf())).collect(),
            Items::Files(f, _) => f.iter().map(|p| (uamt::data::nifti::stem(p), p.clone())).collect(),
        }
    }
}

fn unlabelled(d: &Dataset) -> impl Iterator<Item = &Case> {
    d.unlabelled().into_iter().map(|i| &d.training[i])
}

fn open_dataset(dir: &Path) -> anyhow::Result<Dataset> {
    uamt::data::sigbus::install_handler();
    Dataset::open(dir, &DatasetOptions::default()).with_context(|| format!("opening dataset {}", dir.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_passes("--mc-passes", args.mc_passes)?;
    anyhow::ensure!(
        args.band.is_finite() && (0.0..=MAX_BAND).contains(&args.band),
        "--band {}: give a width in 0..={MAX_BAND} voxels",
        args.band
    );
    anyhow::ensure!(args.top != Some(0), "--top 0: give at least 1 (or leave it out for every case)");
    let device = args.net.device;
    let mut read: Vec<(&str, &Path)> = Vec::new();
    read.extend(args.input.as_deref().map(|p| ("--input", p)));
    read.extend(args.checkpoint.as_deref().map(|p| ("--checkpoint", p)));
    read.extend(args.weights.as_deref().map(|p| ("--weights", p)));
    read.extend(args.dataset.as_deref().map(|p| ("--dataset", p)));
    if let Some(out) = &args.out {
        uamt::fsutil::check_apart(&[("--out", out)], &read)?;
    }
    let (model, teacher, window, config, source) = if let Some(ck) = &args.checkpoint {
        let c = super::net::from_checkpoint(ck, None, args.teacher, device)?;
        let source = RankSource {
            model: ck.display().to_string(),
            teacher: args.teacher || c.teacher.is_some(),
            mc_passes: args.mc_passes,
            mc_seed: args.seed,
            band_voxels: args.band,
            iteration: Some(c.iteration),
        };
        (c.model, c.teacher, c.config.eval.window.clone(), Some(c.config), source)
    } else {
        let w = args.weights.as_ref().context("give --checkpoint or --weights")?;
        let source = RankSource {
            model: w.display().to_string(),
            teacher: false,
            mc_passes: args.mc_passes,
            mc_seed: args.seed,
            band_voxels: args.band,
            iteration: None,
        };
        (load_weights(w, &args.net.weights_config(), device)?, None, InferOptions::default(), None, source)
    };
    let items = match (&args.input, &args.dataset, &config) {
        (Some(input), given, _) => {
            // As `predict`: the preprocessing of --dataset, or of the checkpoint config's dataset.
            let stored = config.as_ref().map(|c| c.data.dataset.clone()).filter(|d| !d.as_os_str().is_empty());
            let prep_from = given.clone().or(stored);
            if let (Some(out), Some(d)) = (&args.out, &prep_from) {
                uamt::fsutil::check_apart(&[("--out", out)], &[("the dataset", d)])?;
            }
            Items::Files(
                super::predict::inputs(input)?,
                super::predict::preprocessing(prep_from.as_deref(), args.normalize)?,
            )
        }
        (None, Some(d), _) => Items::Cases(open_dataset(d)?),
        (None, None, Some(c)) => Items::Cases(crate::setup::open_existing_dataset(c)?),
        (None, None, None) => {
            anyhow::bail!("give --dataset (whose unlabelled training cases are ranked) or --input (raw images)")
        }
    };
    if let (Some(out), Items::Cases(d)) = (&args.out, &items) {
        // The dataset is read: never written to.
        uamt::fsutil::check_apart(&[("--out", out)], &[("the ranked dataset", &d.root)])?;
    }
    let list = items.list();
    if let Items::Cases(d) = &items {
        anyhow::ensure!(
            !list.is_empty(),
            "{}: the dataset has no unlabelled training case to rank ({} labelled)",
            d.root.display(),
            d.labelled().len()
        );
    }
    let mut ids = std::collections::HashSet::new();
    for (id, path) in &list {
        anyhow::ensure!(
            ids.insert(id.as_str()),
            "{}: a second image named `{id}`; case ids must differ",
            path.display()
        );
    }
    let opts = RankOptions {
        infer: args.net.window(&window),
        mc: McOptions { passes: args.mc_passes, seed: args.seed, ..McOptions::default() },
        band: args.band,
        picture: args.out.is_some(),
    };
    opts.infer.validate("rank")?;
    // Before any work: the outputs (the pictures of whichever cases come out on top), and every
    // input's memory need from its header.
    let mut out = match &args.out {
        Some(dir) => {
            let mut o = OutputDir::open(dir, "uamt rank", args.force)?;
            for (id, _) in &list {
                uamt::data::dataset::check_case_id(id)
                    .map_err(|why| anyhow::anyhow!("refusing to write outputs: {why}"))?;
            }
            let reports = ["ranking.json".to_string(), "ranking.csv".to_string()];
            let pictures = list.iter().map(|(id, _)| format!("{id}.png"));
            o.check(&reports.iter().cloned().chain(pictures).collect::<Vec<_>>())?;
            o.claim(&reports)?;
            Some(o)
        }
        None => None,
    };
    if device == tch::Device::Cpu {
        let classes = (model.config().n_filters, model.config().n_classes);
        for (_, path) in &list {
            let h = uamt::data::nifti::read_header(path)?;
            let net = match &items {
                Items::Files(_, prep) => match prep.resample.target(h.geometry.spacing()) {
                    Some(t) => uamt::data::resample::resampled_dims(h.dims, h.geometry.spacing(), t)?,
                    None => h.dims,
                },
                Items::Cases(_) => h.dims,
            };
            // The sweep holds 2 C + 1 averaged maps: budget it as one pass more.
            super::net::check_inference_memory(classes, &opts.infer, h.dims, net, args.mc_passes + 1, path)?;
        }
    }
    let mut bar = crate::progress::Bar::new("ranking");
    let mut ranked: Vec<RankedCase> = Vec::new();
    let mut pictures: Vec<(RankedCase, Picture)> = Vec::new(); // the current top K, best first
    let keep = args.top.unwrap_or(usize::MAX);
    let cases: Vec<&Case> = match &items {
        Items::Cases(d) => unlabelled(d).collect(),
        Items::Files(..) => Vec::new(),
    };
    for (i, (_, path)) in list.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let (case, picture) = match &items {
            Items::Cases(_) => rank_case(&model, teacher.as_ref(), cases[i], &opts),
            Items::Files(_, prep) => rank_file(&model, teacher.as_ref(), path, prep, &opts),
        }
        .with_context(|| format!("ranking {}", path.display()))?;
        let value = args.score.of(&case.scores).map_or("undefined".to_string(), |v| format!("{v:.6}"));
        let line = format!("{}: {}={value} ({:.1} s)", case.case, args.score, t0.elapsed().as_secs_f64());
        if bar.is_terminal() {
            bar.update(i + 1, list.len(), &line);
        } else {
            eprintln!("[{}/{}] {line}", i + 1, list.len());
        }
        if let Some(p) = picture {
            let at = pictures.iter().position(|(c, _)| ranks_before(args.score, &case, c)).unwrap_or(pictures.len());
            if at < keep {
                pictures.insert(at, (case.clone(), p));
                pictures.truncate(keep);
            }
        }
        ranked.push(case);
    }
    let ranking = Ranking::new(args.score, source, ranked);
    if let Some(o) = &mut out {
        let names: Vec<String> = pictures.iter().map(|(c, _)| format!("{}.png", c.case)).collect();
        o.claim(&names)?;
        for (c, p) in &pictures {
            p.write_png(&o.path(&format!("{}.png", c.case)))?;
        }
        let write = |name: &str, text: String| -> anyhow::Result<()> {
            let path = o.path(name);
            uamt::fsutil::write_atomic(&path, |w| w.write_all(text.as_bytes()))?;
            Ok(())
        };
        write("ranking.csv", ranking.to_csv())?;
        write("ranking.json", ranking.to_json() + "\n")?;
    }
    if args.json {
        println!("{}", ranking.truncated(args.top).to_json());
    } else {
        print!("{}", ranking.table(args.top));
    }
    Ok(())
}
