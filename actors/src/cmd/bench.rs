//! `uamt bench pipeline`: iterations per second of the actor pipeline at several queue depths,
//! loader worker counts and teacher lags, next to the sequential loop, all measured in one run on
//! the same data, shapes and device.

use crate::cmd::train::{loader, open_dataset};
use crate::pipeline::{self, Run};
use anyhow::Result;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
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
        println!("{}", serde_json::json!({"setting": name, "ms_per_iteration": secs * 1e3, "iterations_per_second": 1.0 / secs, "speedup_vs_sequential": baseline.map(|b| b / secs)}));
    } else {
        let ratio = baseline.map_or("-".to_string(), |b| format!("{:.2}x", b / secs));
        println!("{:<34} {:>9.1} {:>8.2} {:>10}", name, secs * 1e3, 1.0 / secs, ratio);
    }
}

/// Benchmarks.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// The training pipeline against the sequential loop.
    Pipeline,
}

fn fresh(cfg: &Config) -> Result<Trainer> {
    Ok(Trainer::seeded(&cfg.model.vnet(), cfg.step_config(), cfg.device.resolve()?, cfg.optim.seed)?)
}

/// Seconds per timed iteration of the sequential loop.
fn sequential(cfg: &Config, warmup: i64, n: i64) -> Result<f64> {
    let l = loader(cfg, open_dataset(cfg)?)?;
    let device = cfg.device.resolve()?;
    if cfg.device.stage_threads() > 0 {
        tch::set_num_threads(cfg.device.stage_threads() as i32);
    }
    let mut tr = fresh(cfg)?;
    let mut t0 = Instant::now();
    for i in 0..warmup + n {
        if i == warmup {
            t0 = Instant::now();
        }
        let (images, labels) = l.batch(i as u64)?;
        let (images, labels) = (images.to_device(device), labels.to_device(device));
        let rnd = tr.draw_random(cfg.optim.seed, &images.size());
        let r = tr.step(&images, &labels, &rnd)?;
        let _ = r.loss.double_value(&[]); // the pipeline reads its losses back too
    }
    Ok(t0.elapsed().as_secs_f64() / n as f64)
}

/// Seconds per timed iteration of the pipeline.
fn pipelined(cfg: &Config, warmup: i64, n: i64) -> Result<f64> {
    let run = |tr: Trainer, steps: i64| -> Result<pipeline::Outcome> {
        pipeline::run(Run {
            config: cfg.clone(),
            device: cfg.device.resolve()?,
            loader: loader(cfg, open_dataset(cfg)?)?,
            trainer: tr,
            stop: Arc::new(AtomicBool::new(false)),
            checkpoint_now: Arc::new(AtomicBool::new(false)),
            max_steps: Some(steps),
            checkpoints: false,
        })
    };
    let warm = run(fresh(cfg)?, warmup)?;
    let out = run(warm.trainer, n)?;
    Ok(out.seconds / n as f64)
}

pub fn run(args: Args) -> Result<()> {
    let What::Pipeline = args.what;
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::demo(),
    };
    cfg.telemetry.listen.clear();
    cfg.optim.iterations = cfg.optim.iterations.max(args.warmup + args.iterations);
    let device = cfg.device.resolve()?;
    if !args.json {
        println!(
        "pipeline benchmark: {:?}, patch {:?}, n_filters {}, {:?}, T {}, {} timed iterations after {} warm-up, device {:?}, threads per stage {}",
        cfg.method.kind, cfg.data.patch, cfg.model.n_filters, (cfg.data.labelled_bs, cfg.data.unlabelled_bs), cfg.method.mc_passes, args.iterations, args.warmup, device, cfg.device.stage_threads()
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
                c.queues.teacher_params = depth.max(lag as usize + 1);
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
