//! `uamt train`: the daemon. Without `--config` it runs the built-in demo (synthetic data made on
//! first use, 4 filters, 32x32x16 patches, CPU, a few minutes on 2 cores).

use crate::pipeline::{self, Run};
use crate::setup::{loader, open_dataset, trainer};
use crate::supervisor::{Controls, Supervisor};
use actix::Actor;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use uamt::config::Config;

/// Arguments of `uamt train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config file (TOML); without one, the built-in demo.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the newest checkpoint in the config's checkpoint folder.
    #[arg(long)]
    pub resume: bool,
    /// Override `optim.iterations`.
    #[arg(long)]
    pub iterations: Option<i64>,
    /// Stop (with a checkpoint) after this many steps of this invocation, without changing the
    /// schedule: for running a long protocol in pieces with `--resume`. At least 1.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub stop_after: Option<i64>,
    /// Override `checkpoint.dir`.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Override `optim.seed` (weights, sampling, augmentation, noise and dropout).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override `telemetry.listen` (e.g. 127.0.0.1:0 for any free port; "" to disable).
    #[arg(long)]
    pub listen: Option<String>,
    /// Write the metrics endpoint's bound address to this file once it listens.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

/// The config this invocation runs with.
pub fn resolve_config(args: &Args) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::demo(),
    };
    if let Some(n) = args.iterations {
        cfg.optim.iterations = n;
    }
    if let Some(d) = &args.checkpoint_dir {
        cfg.checkpoint.dir = d.clone();
    }
    if let Some(seed) = args.seed {
        cfg.optim.seed = seed;
    }
    if let Some(l) = &args.listen {
        cfg.telemetry.listen = l.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Starts the metrics endpoint if configured; writes its address to `addr_file`.
pub fn telemetry(cfg: &Config, addr_file: Option<&Path>) -> Result<()> {
    if cfg.telemetry.listen.is_empty() {
        return Ok(());
    }
    let handle = crate::http::install_recorder()?;
    let addr = crate::http::serve(&cfg.telemetry.listen, handle)?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    if let Some(f) = addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|_| std::fs::rename(&tmp, f))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let cfg = resolve_config(&args)?;
    if args.config.is_none() {
        tracing::info!("no --config: running the built-in demo (synthetic data, CPU)");
    }
    telemetry(&cfg, args.addr_file.as_deref())?;
    let dataset = open_dataset(&cfg)?;
    tracing::info!(
        labelled = dataset.labelled().len(),
        unlabelled = dataset.unlabelled().len(),
        test = dataset.test.len(),
        "dataset open"
    );
    let loader = loader(&cfg, dataset)?;
    let trainer = trainer(&cfg, args.resume)?;
    let device = cfg.device.resolve()?;
    tracing::info!(method = ?cfg.method.kind, ?device, from = trainer.iter, to = cfg.optim.iterations, teacher_lag = cfg.method.teacher_lag, "training");
    let controls = Controls::default();
    let run = Run {
        config: cfg,
        device,
        loader,
        trainer,
        stop: controls.stop.clone(),
        checkpoint_now: controls.checkpoint_now.clone(),
        max_steps: args.stop_after,
        checkpoints: true,
    };
    let system = actix::System::new();
    let outcome = system.block_on(async move {
        let _supervisor = Supervisor { controls }.start();
        actix_rt::task::spawn_blocking(move || pipeline::run(run)).await
    })??;
    let last = outcome.reports.last();
    tracing::info!(
        steps = outcome.reports.len(),
        seconds = format!("{:.1}", outcome.seconds),
        stopped = outcome.stopped,
        final_loss = last.map(|r| r.loss),
        checkpoint = ?outcome.last_checkpoint,
        "done"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// `uamt train`'s arguments on their own.
    #[derive(Debug, Parser)]
    struct Cli {
        /// The arguments.
        #[command(flatten)]
        args: super::Args,
    }

    #[test]
    fn stop_after_must_be_at_least_one() {
        for bad in ["0", "-1"] {
            assert!(Cli::try_parse_from(["train", "--stop-after", bad]).is_err(), "--stop-after {bad} accepted");
        }
        assert_eq!(Cli::try_parse_from(["train", "--stop-after", "1"]).unwrap().args.stop_after, Some(1));
    }
}
