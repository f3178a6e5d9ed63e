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
    /// Also measure the peer in the same run: the reference PyTorch loop
    /// (`benches/reference/uamt_reference.py`) with its cases preloaded and no loader workers,
    /// at the same shapes, T, seed, device and thread count, once before and once after the
    /// daemon's settings (the table shows their mean, and every setting's ratio to it).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// UA-MT HDF5 folder (with `train.list`) the peer reads its cases from.
    #[arg(long, default_value = "../shared/data/la2018")]
    pub peer_data: PathBuf,
    /// The Python that runs the peer (default: `$UAMT_PYTHON`, else `python3`).
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
}

/// The peer's command line for `cfg` (see `Args::peer`).
fn peer_command(cfg: &Config, args: &Args, script: &std::path::Path) -> Result<std::process::Command> {
    anyhow::ensure!(
        cfg.method.kind == uamt::train::Method::Uamt,
        "--peer: the reference loop trains UA-MT; this config's method is {:?}",
        cfg.method.kind
    );
    anyhow::ensure!(script.is_file(), "--peer: {} is not a file", script.display());
    let list = args.peer_data.join("train.list");
    anyhow::ensure!(list.is_file(), "--peer-data: {} not found (a UA-MT HDF5 folder has a train.list)", list.display());
    let ids = uamt::fsutil::read_text(&list)
        .map_err(|e| anyhow::anyhow!("--peer-data: {e}"))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    anyhow::ensure!(
        ids >= 2,
        "--peer-data: {} lists {ids} case(s); the peer needs labelled and unlabelled ones",
        list.display()
    );
    // The reference's split: the first 16 IDs labelled (fewer on a small folder), the rest not.
    let labelled = 16.min(ids / 2);
    let python = args
        .peer_python
        .clone()
        .or_else(|| std::env::var_os("UAMT_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let device = cfg.device.resolve()?;
    let [x, y, z] = cfg.data.loader.patch;
    let (l, u) = (cfg.data.sampler.labelled_bs, cfg.unlabelled_bs());
    let mut c = std::process::Command::new(python);
    c.arg(script)
        .arg("--data")
        .arg(&args.peer_data)
        .args(["--labelled", &labelled.to_string()])
        .args(["--patch", &format!("{x},{y},{z}"), "--n-filters", &cfg.model.n_filters.to_string()])
        .args(["--batch-size", &(l + u).to_string(), "--labelled-bs", &l.to_string()])
        .args(["--T", &cfg.method.mc_passes.to_string(), "--seed", &cfg.optim.seed.to_string()])
        .args(["--iterations", &args.iterations.to_string(), "--warmup", &args.warmup.to_string()])
        .args(["--device", if device.is_cuda() { "cuda" } else { "cpu" }])
        .args(["--threads", &cfg.device.stage_threads(false).to_string(), "--workers", "0", "--preload", "--json"])
        .env("PYTHONWARNINGS", "ignore");
    Ok(c)
}

/// Seconds per timed iteration of the peer (its mean over the timed iterations).
fn peer(cmd: &mut std::process::Command) -> Result<f64> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("--peer: cannot run {:?}: {e}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        anyhow::bail!("--peer failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
    }
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with('{'));
    let v: serde_json::Value =
        serde_json::from_str(last.unwrap_or("")).map_err(|e| anyhow::anyhow!("--peer: no JSON result line ({e})"))?;
    let ms = v["ms_per_iteration_mean"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("--peer: no ms_per_iteration_mean in {v}"))?;
    anyhow::ensure!(v["finite"].as_bool() != Some(false), "--peer: the reference produced non-finite losses");
    Ok(ms / 1e3)
}

/// One measured setting, with its ratios to the sequential loop and to the peer.
fn line(json: bool, name: &str, secs: f64, baseline: Option<f64>, peer: Option<f64>) {
    if json {
        println!(
            "{}",
            serde_json::json!({"setting": name, "ms_per_iteration": secs * 1e3, "iterations_per_second": 1.0 / secs,
                "speedup_vs_sequential": baseline.map(|b| b / secs), "speedup_vs_peer": peer.map(|p| p / secs)})
        );
    } else {
        let ratio = |b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}x", b / secs));
        println!("{:<44} {:>9.1} {:>8.2} {:>10} {:>10}", name, secs * 1e3, 1.0 / secs, ratio(baseline), ratio(peer));
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
    let mut peer_cmd = args.peer.as_ref().map(|p| peer_command(&cfg, &args, p)).transpose()?;
    let auto = pipeline::Mode::auto(&cfg, device);
    if !args.json {
        println!(
        "pipeline benchmark: {:?}, patch {:?}, n_filters {}, {:?}, T {}, {} timed iterations after {} warm-up, device {:?}, threads per stage {} (with a lag: {}), layout {}, teacher passes at once {}",
        cfg.method.kind, cfg.data.loader.patch, cfg.model.n_filters, (cfg.data.sampler.labelled_bs, cfg.data.sampler.unlabelled_bs), cfg.method.mc_passes, args.iterations, args.warmup, device, cfg.device.stage_threads(false), cfg.device.stage_threads(true),
        if cfg.device.channels_last(cfg.model.n_filters, device) { "channels-last" } else { "contiguous" }, cfg.device.pass_workers(false).workers
        );
    }
    // Measure everything first (progress on stderr), then print the table.
    let mut rows: Vec<(String, f64)> = Vec::new();
    let peer_before = peer_cmd.as_mut().map(|c| {
        eprintln!("bench: the peer (before)");
        peer(c)
    });
    let peer_before = peer_before.transpose()?;
    let seq = if args.no_sequential {
        None
    } else {
        eprintln!("bench: sequential loop");
        Some(sequential(&cfg, args.warmup, args.iterations)?)
    };
    if let Some(s) = seq {
        let is_default = auto == Mode::Sequential && !args.json;
        let default = if is_default { " (the default here)" } else { "" };
        rows.push((format!("sequential loop{default}"), s));
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
                let name = format!("pipeline lag {lag}, workers {workers}, depth {depth}");
                eprintln!("bench: {name}");
                rows.push((name, pipelined(&c, args.warmup, args.iterations)?));
            }
        }
    }
    let peer_after = peer_cmd.as_mut().map(|c| {
        eprintln!("bench: the peer (after)");
        peer(c)
    });
    let peer_after = peer_after.transpose()?;
    let peer_mean = match (peer_before, peer_after) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        _ => None,
    };
    if !args.json {
        println!("{:<44} {:>9} {:>8} {:>10} {:>10}", "setting", "ms/it", "it/s", "vs seq", "vs peer");
    }
    if let (Some(p), Some(a), Some(b)) = (peer_mean, peer_before, peer_after) {
        let name = format!("peer: PyTorch reference, preloaded ({:.0} / {:.0})", a * 1e3, b * 1e3);
        line(args.json, &name, p, seq, peer_mean);
    }
    for (name, s) in &rows {
        line(args.json, name, *s, seq, peer_mean);
    }
    if !args.json {
        println!("(ratios > 1: this setting is faster than the sequential loop / the peer measured in this run)");
    }
    Ok(())
}
