//! `uamt bench pipeline`: iterations per second of the actor pipeline at several queue depths,
//! loader worker counts and teacher lags, next to the sequential loop, all measured in one run on
//! the same data, shapes and device.
//!
//! `uamt bench streams`: the exact pipeline (`teacher_lag = 0`) with a CUDA stream per stage
//! against all stages on the default stream, from the same start: the losses must agree (the
//! hand-offs between streams are correct) and the times say what the overlap buys. On the CPU
//! both runs are the same code path; the check means something on a GPU.

use crate::pipeline::{self, Mode, Run};
use crate::setup::{loader, open_dataset};
use anyhow::Result;
use std::path::PathBuf;
use uamt::config::Config;
use uamt::train::Trainer;

/// Arguments of `uamt bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    pub what: What,
    /// Config file; without one, the demo's shapes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Timed iterations per setting (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 20)]
    pub iterations: i64,
    /// Untimed iterations before each measurement.
    #[arg(long, default_value_t = 3)]
    pub warmup: i64,
    /// Queue depths to try (every queue gets this capacity).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2, 4])]
    pub depths: Vec<usize>,
    /// Loader worker counts to try.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2])]
    pub workers: Vec<usize>,
    /// Teacher lags to try.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0i64, 1])]
    pub lags: Vec<i64>,
    /// Skip the sequential loop (when only the pipeline's numbers are wanted).
    #[arg(long)]
    pub no_sequential: bool,
    /// Print one JSON object per setting instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One measured setting.
fn line(json: bool, name: &str, secs: f64, baseline: Option<f64>) {
    if json {
        println!(
            "{}",
            serde_json::json!({"setting": name, "ms_per_iteration": secs * 1e3, "iterations_per_second": 1.0 / secs, "speedup_vs_sequential": baseline.map(|b| b / secs)})
        );
    } else {
        let ratio = baseline.map_or("-".to_string(), |b| format!("{:.2}x", b / secs));
        println!("{:<34} {:>9.1} {:>8.2} {:>10}", name, secs * 1e3, 1.0 / secs, ratio);
    }
}

/// Benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// The training pipeline against the sequential loop.
    Pipeline,
    /// The exact pipeline with a CUDA stream per stage against the default stream: same losses?
    Streams,
}

fn fresh(cfg: &Config) -> Result<Trainer> {
    crate::setup::trainer(cfg, false)
}

/// `steps` steps from `tr` in `mode`, without checkpoints.
fn steps(cfg: &Config, tr: Trainer, steps: i64, mode: Mode) -> Result<pipeline::Outcome> {
    let device = cfg.device.resolve()?;
    let mut run = Run::new(cfg.clone(), device, loader(cfg, open_dataset(cfg)?)?, tr);
    run.mode = mode;
    run.max_steps = Some(steps);
    run.checkpoints = false;
    pipeline::run(run)
}

/// `steps` pipeline steps from `tr`, without checkpoints.
fn pipeline_steps(cfg: &Config, tr: Trainer, n: i64) -> Result<pipeline::Outcome> {
    steps(cfg, tr, n, Mode::Pipelined)
}

/// Seconds per timed iteration of the daemon's sequential mode.
fn sequential(cfg: &Config, warmup: i64, n: i64) -> Result<f64> {
    let warm = steps(cfg, fresh(cfg)?, warmup, Mode::Sequential)?;
    let out = steps(cfg, warm.trainer, n, Mode::Sequential)?;
    Ok(out.seconds / n as f64)
}

/// Seconds per timed iteration of the pipeline.
fn pipelined(cfg: &Config, warmup: i64, n: i64) -> Result<f64> {
    let warm = pipeline_steps(cfg, fresh(cfg)?, warmup)?;
    let out = pipeline_steps(cfg, warm.trainer, n)?;
    Ok(out.seconds / n as f64)
}

/// `uamt bench streams`: see the module documentation. Fails when the losses disagree.
fn streams(cfg: &Config, args: &Args) -> Result<()> {
    let run = |streams: bool| -> Result<(Vec<f64>, f64)> {
        let mut c = cfg.clone();
        c.device.streams = streams;
        c.method.teacher_lag = 0;
        let warm = pipeline_steps(&c, fresh(&c)?, args.warmup)?;
        let out = pipeline_steps(&c, warm.trainer, args.iterations)?;
        let losses = warm.reports.iter().chain(&out.reports).map(|r| r.loss).collect();
        Ok((losses, out.seconds / args.iterations as f64))
    };
    let (with, t_with) = run(true)?;
    let (without, t_without) = run(false)?;
    // cuDNN's benchmark mode may pick other algorithms in the second run: allow rounding.
    let worst = with.iter().zip(&without).map(|(a, b)| (a - b).abs() / b.abs().max(1e-6)).fold(0.0, f64::max);
    let agree = with.len() == without.len() && worst <= 1e-3;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"streams_ms_per_iteration": t_with * 1e3, "default_stream_ms_per_iteration": t_without * 1e3,
                "speedup": t_without / t_with, "max_relative_loss_difference": worst, "steps": with.len(), "agree": agree})
        );
    } else {
        println!(
            "streams: {:.1} ms/it with a stream per stage, {:.1} ms/it on the default stream ({:.2}x)",
            t_with * 1e3,
            t_without * 1e3,
            t_without / t_with
        );
        if !cfg.device.resolve()?.is_cuda() {
            println!("(not on CUDA: both runs take the same code path, so the times differ by noise only)");
        }
        println!("losses of {} steps agree to {worst:.2e} relative (at most 1e-3 allowed)", with.len());
    }
    anyhow::ensure!(agree, "with streams the losses differ from the default stream's by up to {worst:.3e} relative: a hand-off is not ordered");
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::demo(),
    };
    cfg.telemetry.listen.clear();
    cfg.optim.iterations = cfg.optim.iterations.max(args.warmup + args.iterations);
    let device = cfg.device.resolve()?;
    if args.what == What::Streams {
        return streams(&cfg, &args);
    }
    if !args.json {
        println!(
        "pipeline benchmark: {:?}, patch {:?}, n_filters {}, {:?}, T {}, {} timed iterations after {} warm-up, device {:?}, threads per stage {} (with a lag: {})",
        cfg.method.kind, cfg.data.loader.patch, cfg.model.n_filters, (cfg.data.sampler.labelled_bs, cfg.data.sampler.unlabelled_bs), cfg.method.mc_passes, args.iterations, args.warmup, device, cfg.device.stage_threads(false), cfg.device.stage_threads(true)
        );
        println!("{:<34} {:>9} {:>8} {:>10}", "setting", "ms/it", "it/s", "vs seq");
    }
    let seq = if args.no_sequential { None } else { Some(sequential(&cfg, args.warmup, args.iterations)?) };
    if let Some(s) = seq {
        line(args.json, "sequential loop", s, seq);
    }
    for &lag in &args.lags {
        for &workers in &args.workers {
            for &depth in &args.depths {
                let mut c = cfg.clone();
                c.method.teacher_lag = lag;
                c.queues.loader_workers = workers;
                c.queues.batches = depth.max(workers);
                c.queues.teacher = depth;
                c.queues.guidance = depth;
                c.queues.params = depth.max(lag as usize + 1);
                c.validate()?;
                let s = pipelined(&c, args.warmup, args.iterations)?;
                line(args.json, &format!("pipeline lag {lag}, workers {workers}, depth {depth}"), s, seq);
            }
        }
    }
    if !args.json && seq.is_some() {
        println!("(ratios > 1: the pipeline is faster than the sequential loop measured in this run)");
    }
    Ok(())
}
