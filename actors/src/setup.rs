//! Building a run from a config: the dataset (generating the synthetic one on first use), the
//! patch loader and the trainer. Used by `uamt train`, `uamt bench`, `uamt eval --checkpoint` and
//! the tests; the environment checks (the configured device exists) happen here, at start-up.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use uamt::checkpoint;
use uamt::config::Config;
use uamt::data::{Dataset, DatasetOptions, PatchLoader};
use uamt::train::Trainer;

/// Opens the configured dataset, generating the synthetic one first if that is what is asked.
/// Installs the SIGBUS handler for the mapped files first. Bad training cases are skipped,
/// each logged with its error (naming the file and the value) and counted in
/// `uamt_skipped_cases_total`; see [`Dataset::open_skipping_bad`] for what is refused instead.
pub fn open_dataset(cfg: &Config) -> Result<Dataset> {
    open_configured(cfg, true)
}

/// Like [`open_dataset`], but never writes: a synthetic dataset that does not exist yet is an
/// error instead of being generated. For configs that come from a file this program did not
/// write itself (the config stored in a checkpoint given to `uamt eval`).
pub fn open_existing_dataset(cfg: &Config) -> Result<Dataset> {
    open_configured(cfg, false)
}

fn open_configured(cfg: &Config, generate: bool) -> Result<Dataset> {
    uamt::data::sigbus::install_handler();
    let root = if cfg.data.dataset.as_os_str().is_empty() {
        let dir = &cfg.data.synth_dir;
        if !dir.join("dataset.json").exists() {
            if !generate {
                anyhow::bail!(
                    "the config names the synthetic dataset in {}, which does not exist; give --dataset",
                    dir.display()
                );
            }
            let s = &cfg.data.synth;
            tracing::info!(dir = %dir.display(), cases = s.cases, labelled = s.labelled, size = ?s.size, "generating the synthetic dataset");
            uamt::data::write_synth(dir, s, false)?;
        }
        dir.clone()
    } else {
        cfg.data.dataset.clone()
    };
    open_dataset_at(&root, cfg.model.n_classes as usize)
}

/// Opens the dataset folder `root` for a model of `model_classes` classes as training does:
/// bad training cases skipped (logged and counted), the rest refused with the same errors
/// (`uamt plan` opens datasets this way too).
pub fn open_dataset_at(root: &std::path::Path, model_classes: usize) -> Result<Dataset> {
    uamt::data::sigbus::install_handler();
    let opts = DatasetOptions { model_classes: Some(model_classes), ..DatasetOptions::default() };
    let (dataset, skipped) =
        Dataset::open_skipping_bad(root, &opts).with_context(|| format!("opening dataset {}", root.display()))?;
    for e in &skipped {
        crate::emit::skipped_case();
        tracing::warn!(error = %e, "case skipped");
    }
    Ok(dataset)
}

/// A patch loader for `cfg` over `dataset` (see [`Config::loader`]).
pub fn loader(cfg: &Config, dataset: Dataset) -> Result<PatchLoader> {
    Ok(PatchLoader::new(Arc::new(dataset), cfg.loader())?)
}

/// How a training run starts with respect to the checkpoint folder.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Continue from the newest checkpoint in `checkpoint.dir` that fits the config.
    pub resume: bool,
    /// Continue from this checkpoint file.
    pub resume_from: Option<PathBuf>,
    /// Start a new run even though `checkpoint.dir` holds another run's checkpoints.
    pub share_checkpoint_dir: bool,
}

/// A trainer ready to run, and the run it belongs to.
#[derive(Debug)]
pub struct Started {
    /// Fresh, or restored from a checkpoint.
    pub trainer: Trainer,
    /// The run's id (kept when resuming).
    pub run_id: String,
    /// The checkpoint it was restored from.
    pub resumed_from: Option<PathBuf>,
    /// This process's exclusive right to the run's checkpoints (held until dropped); none for
    /// the ranks of a data-parallel run other than rank 0, which never touch the folder.
    pub lock: Option<checkpoint::RunLock>,
}

/// A fresh trainer on the configured device and precision. Refuses a device this machine does
/// not have.
fn fresh(cfg: &Config) -> Result<Trainer> {
    let device = cfg.device.resolve()?;
    let mut tr = Trainer::seeded(&cfg.model, cfg.step_config(), device, cfg.optim.seed)?;
    tr.set_precision(cfg.device.precision)?;
    tr.set_channels_last(cfg.device.channels_last(cfg.model.n_filters, device));
    Ok(tr)
}

/// The start of a training run: checks that `checkpoint.dir` is writable, then resumes as
/// `opts` asks (falling back past unusable checkpoints of the run, see
/// [`checkpoint::resume_newest`]) or starts a new run with a new id; a new run refuses a folder
/// holding another run's checkpoints unless `opts.share_checkpoint_dir`.
pub fn start(cfg: &Config, opts: &StartOptions) -> Result<Started> {
    let dir = &cfg.checkpoint.dir;
    checkpoint::check_writable(dir).with_context(|| format!("checkpoint.dir `{}` is not writable", dir.display()))?;
    let mut tr = fresh(cfg)?;
    if let Some(file) = &opts.resume_from {
        let r = checkpoint::resume_from(file, cfg, &mut tr).context("--resume-from")?;
        let lock = checkpoint::lock_run(dir, &r.run_id)?;
        tracing::info!(path = %r.path.display(), iteration = r.iteration, run = %r.run_id, "resumed");
        return Ok(Started { trainer: tr, run_id: r.run_id, resumed_from: Some(r.path), lock: Some(lock) });
    }
    if opts.resume {
        match checkpoint::resume_newest(dir, cfg, &mut tr) {
            Ok(Some(r)) => {
                let lock = checkpoint::lock_run(dir, &r.run_id)?;
                tracing::info!(path = %r.path.display(), iteration = r.iteration, run = %r.run_id, set_aside = r.set_aside.len(), "resumed");
                return Ok(Started { trainer: tr, run_id: r.run_id, resumed_from: Some(r.path), lock: Some(lock) });
            }
            Ok(None) => tracing::info!(dir = %dir.display(), "no checkpoint to resume from; starting a new run"),
            Err(e) if opts.share_checkpoint_dir => {
                tracing::info!(error = %e, "nothing of this run to resume; starting a new run beside the others")
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(
                    "--resume: no usable checkpoint (give --resume-from FILE, or --share-checkpoint-dir to start a new run beside these)",
                ))
            }
        }
    }
    let others = checkpoint::entries(dir);
    if let Some(e) = others.last().filter(|_| !opts.share_checkpoint_dir) {
        anyhow::bail!(
            "checkpoint.dir `{}` already holds {} checkpoint(s) of another run (newest: {}); continue it with \
             --resume, use another checkpoint.dir, or pass --share-checkpoint-dir to start a new run beside it \
             (each run keeps and prunes only its own files)",
            dir.display(),
            others.len(),
            e.path.display()
        );
    }
    let run_id = checkpoint::new_run_id(cfg.optim.seed);
    let lock = checkpoint::lock_run(dir, &run_id)?;
    tracing::info!(run = %run_id, dir = %dir.display(), "new run");
    Ok(Started { trainer: tr, run_id, resumed_from: None, lock: Some(lock) })
}

/// The start of a data-parallel rank other than 0: a fresh trainer, no checkpoint folder (its
/// state, resumed or not, comes from rank 0 through [`uamt::dist::share_start`]).
pub fn start_follower(cfg: &Config) -> Result<Started> {
    Ok(Started { trainer: fresh(cfg)?, run_id: String::new(), resumed_from: None, lock: None })
}

/// A patch loader for rank `rank` of `world` data-parallel processes (see [`Config::loader_for`]).
pub fn loader_for(cfg: &Config, dataset: Dataset, rank: usize, world: usize) -> Result<PatchLoader> {
    Ok(PatchLoader::new(Arc::new(dataset), cfg.loader_for(rank, world))?)
}

/// A trainer: fresh (no checkpoint folder involved, as benchmarks need), or when `resume` the
/// newest fitting checkpoint's state as [`start`] finds it.
pub fn trainer(cfg: &Config, resume: bool) -> Result<Trainer> {
    if resume {
        Ok(start(cfg, &StartOptions { resume: true, ..StartOptions::default() })?.trainer)
    } else {
        fresh(cfg)
    }
}
