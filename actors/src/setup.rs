//! Building a run from a config: the dataset (generating the synthetic one on first use), the
//! patch loader and the trainer. Used by `uamt train`, `uamt bench`, `uamt eval --checkpoint` and
//! the tests; the environment checks (the configured device exists) happen here, at start-up.

use anyhow::{Context, Result};
use std::sync::Arc;
use uamt::checkpoint::{self, Snapshot};
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
    let (dataset, skipped) = Dataset::open_skipping_bad(&root, &DatasetOptions::default())
        .with_context(|| format!("opening dataset {}", root.display()))?;
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

/// A fresh trainer on the configured device and precision, or the newest checkpoint's state
/// when `resume`. Refuses a device this machine does not have.
pub fn trainer(cfg: &Config, resume: bool) -> Result<Trainer> {
    let device = cfg.device.resolve()?;
    let mut tr = Trainer::seeded(&cfg.model, cfg.step_config(), device, cfg.optim.seed)?;
    tr.set_precision(cfg.device.precision)?;
    if resume {
        match checkpoint::latest(&cfg.checkpoint.dir) {
            Some((_, path)) => {
                let snap = Snapshot::read(&path)?;
                if snap.seed != cfg.optim.seed {
                    tracing::warn!(
                        checkpoint_seed = snap.seed,
                        config_seed = cfg.optim.seed,
                        "resuming with a different seed"
                    );
                }
                snap.restore_into(&mut tr, &path)?;
                tracing::info!(path = %path.display(), iteration = tr.iter, "resumed");
            }
            None => {
                tracing::info!(dir = %cfg.checkpoint.dir.display(), "no checkpoint to resume from; starting afresh")
            }
        }
    }
    Ok(tr)
}
