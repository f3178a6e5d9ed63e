//! `uamt train`: the daemon. Without `--config` it runs the built-in demo (synthetic data made on
//! first use, 4 filters, 32x32x16 patches, CPU, a few minutes on 2 cores).

use crate::control::Controls;
use crate::evaluator::Evaluator;
use crate::http::{HttpServerHandle, HttpState};
use crate::pipeline::{self, Run};
use crate::setup::{loader_for, open_dataset, start, start_follower, StartOptions};
use crate::status::{Phase, StatusBoard};
use crate::supervisor::{StartEval, Supervisor, TrainingEnded};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uamt::config::Config;

/// Arguments of `uamt train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Config file (TOML); without one, the built-in demo.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the newest checkpoint in `checkpoint.dir` that fits the config (same
    /// architecture, method and seed); newer unusable files of that run are renamed to
    /// `*.rejected` and the previous good one is used.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint file (it must fit the config); the run keeps its run id.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub resume_from: Option<PathBuf>,
    /// Start a new run even though `checkpoint.dir` holds another run's checkpoints (each run
    /// keeps and prunes only its own files).
    #[arg(long)]
    pub share_checkpoint_dir: bool,
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

/// Starts the HTTP control plane if configured; writes its address to `addr_file`. The server
/// stops when the returned handle is dropped.
pub fn telemetry(
    cfg: &Config,
    addr_file: Option<&Path>,
    board: &StatusBoard,
    controls: &Controls,
    labels: &[(&str, String)],
) -> Result<Option<HttpServerHandle>> {
    if cfg.telemetry.listen.is_empty() {
        return Ok(None);
    }
    let t = &cfg.telemetry;
    // The tokens and the certificate first: a bad file is refused before anything listens.
    let access = crate::access::Access::from_config(t)?;
    let tls = if t.tls_cert_file.as_os_str().is_empty() {
        None
    } else {
        Some(crate::tls::server_config(
            "telemetry.tls_cert_file",
            &t.tls_cert_file,
            "telemetry.tls_key_file",
            &t.tls_key_file,
        )?)
    };
    let state = HttpState {
        prometheus: Some(crate::http::install_recorder_labelled(labels)?),
        board: board.clone(),
        controls: controls.clone(),
        access: access.clone(),
    };
    let server = crate::http::spawn_server(&t.listen, state, tls)?;
    let (addr, scheme) = (server.addr(), server.scheme());
    let control = match (&access.control, addr.ip().is_loopback()) {
        (Some(_), _) => "control with the token of telemetry.control_token_file",
        (None, true) => "control from this host only",
        (None, false) => "control from loopback peers only (no telemetry.control_token_file)",
    };
    let read = if access.read.is_some() { "reading with a token" } else { "reading open" };
    tracing::info!(%addr, "metrics at {scheme}://{addr}/metrics, status at {scheme}://{addr}/status ({read}, {control})");
    if let Some(f) = addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|_| std::fs::rename(&tmp, f))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(Some(server))
}

/// Runs the daemon: the supervisor and its signal handlers first, then (on a thread of its own)
/// the data, the model, the evaluation service and the training pipeline. Exits non-zero when
/// training fails, naming the stage and the cause.
pub fn run(args: Args) -> Result<()> {
    let mut cfg = resolve_config(&args)?;
    if args.config.is_none() {
        tracing::info!("no --config: running the built-in demo (synthetic data, CPU)");
    }
    let launch = uamt::dist::Launch::resolve(&cfg.distributed, |k| std::env::var(k).ok())?;
    let mut labels = Vec::new();
    let mut addr_file = args.addr_file.clone();
    if let Some(l) = &launch {
        adapt_to_rank(&mut cfg, l)?;
        cfg.validate()?;
        labels.push(("rank", l.rank.to_string()));
        addr_file =
            addr_file.map(|f| if l.rank == 0 { f } else { PathBuf::from(format!("{}.rank{}", f.display(), l.rank)) });
        tracing::info!(rank = l.rank, world = l.world, local_rank = l.local_rank, master = %format!("{}:{}", l.addr, l.port), "data-parallel training");
    }
    let device = cfg.device.resolve()?;
    // What the config needs, refused now if this machine cannot hold it (on a GPU the device's
    // free memory cannot be asked here; the estimate is logged, the allocator's error is clean).
    let footprint = uamt::footprint::Footprint::of(&cfg);
    if device == tch::Device::Cpu {
        if let Some(available) = uamt::memory::available_memory() {
            // Ranks on one host share its memory (LOCAL_WORLD_SIZE of them, when told).
            match launch.as_ref().and_then(|l| l.local_world).map(|n| n as u64).filter(|n| *n > 1) {
                Some(n) => footprint.check(available / n, &format!("this rank's share (1/{n}) of this machine"))?,
                None => footprint.check(available, "this machine")?,
            }
        }
    }
    tracing::info!(estimate = %footprint.describe(), "memory");
    let controls = Controls::new();
    let board = StatusBoard::new(cfg.optim.iterations, Duration::from_secs(cfg.telemetry.stall_after_s));
    // systemd (Type=notify): READY=1 once the data are open, STOPPING=1, the watchdog.
    let notifier = crate::notify::Notifier::start(board.clone(), controls.clone());
    let failure = Arc::new(std::sync::Mutex::new(None));
    let watching = !cfg.eval.watch_dir.as_os_str().is_empty();
    let system = actix::System::new();
    // The supervisor (and its signal handlers) first: whatever fails after this returns an error
    // without a panic, and a signal is never fatal.
    let mut supervisor = Supervisor::new(controls.clone(), board.clone(), watching, failure.clone());
    if launch.is_some() {
        // A stop that a collective stuck on a stalled rank holds ends the process within seconds,
        // not after distributed.timeout_s.
        supervisor = supervisor.data_parallel(crate::supervisor::STUCK_MIN);
    }
    let supervisor = crate::supervisor::start(&system, supervisor)?;
    let _http = telemetry(&cfg, addr_file.as_deref(), &board, &controls, &labels)?;
    let addr = supervisor.clone();
    let plane = Plane { controls, board, notifier: notifier.clone() };
    std::thread::Builder::new().name("training".into()).spawn(move || {
        let ended = crate::pipeline::spawn::run_caught("training", || train(cfg, device, &args, launch, plane, &addr))
            .map_err(|e| format!("{e:#}"));
        addr.do_send(TrainingEnded(ended));
    })?;
    let code = system.run_with_code();
    notifier.stopping();
    let code = code?;
    let failed = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
        None if code != 0 => Err(anyhow::anyhow!("the daemon ended with code {code}")),
        None => Ok(()),
    }
}

/// What a data-parallel rank changes in its config: only rank 0 evaluates (and, later, writes
/// checkpoints); the world size is recorded in the config stored in checkpoints (a resume needs
/// the same); on one host, local rank k serves metrics on the configured port + k.
fn adapt_to_rank(cfg: &mut Config, l: &uamt::dist::Launch) -> Result<()> {
    cfg.distributed.world_size = Some(l.world);
    // Automatic thread counts share the host's cores with the other local ranks (torchrun and
    // ops/dist-local say how many there are), unless a launcher already pinned this process to
    // fewer cores than the host has (its share is then all it sees).
    if let Some(n) = l.local_world {
        cfg.device.processes_on_host = uamt::dist::sharing_cores(n);
    }
    // On GPUs each local rank takes its own device ("cuda" / "auto" mean cuda:LOCAL_RANK here);
    // the collectives stage the tensors through host memory (Gloo), untested on GPUs so far.
    if let Ok(tch::Device::Cuda(_)) = cfg.device.resolve() {
        if matches!(cfg.device.device.trim(), "auto" | "cuda") {
            let count = uamt::device::cuda_device_count().max(1);
            cfg.device.device = format!("cuda:{}", l.local_rank % count);
        }
    }
    if !l.is_first() {
        cfg.eval.every = 0;
        cfg.eval.watch_dir = PathBuf::new();
        cfg.rank.every = 0;
    }
    if l.local_rank > 0 && !cfg.telemetry.listen.is_empty() {
        let addr: std::net::SocketAddr = cfg.telemetry.listen.parse().with_context(|| {
            format!("telemetry.listen `{}` is not an address:port to offset by LOCAL_RANK", cfg.telemetry.listen)
        })?;
        if addr.port() != 0 {
            let port = u16::try_from(addr.port() as usize + l.local_rank).map_err(|_| {
                anyhow::anyhow!("telemetry.listen port {} + LOCAL_RANK {} is past 65535", addr.port(), l.local_rank)
            })?;
            cfg.telemetry.listen = std::net::SocketAddr::new(addr.ip(), port).to_string();
        }
    }
    Ok(())
}

/// What the training thread shares with the control plane.
struct Plane {
    /// Stop and checkpoint requests.
    controls: Controls,
    /// What `/status` and `/healthz` report.
    board: StatusBoard,
    /// systemd's notifications.
    notifier: crate::notify::Notifier,
}

/// The training thread's work: data, model, evaluation service, pipeline.
fn train(
    cfg: Config,
    device: tch::Device,
    args: &Args,
    launch: Option<uamt::dist::Launch>,
    plane: Plane,
    supervisor: &actix::Addr<Supervisor>,
) -> Result<()> {
    let Plane { controls, board, notifier } = plane;
    // Data-parallel: meet the other ranks first (a rank that fails later ends theirs too). A
    // stop (signal, POST /stop) during the rendezvous ends it at once: exit 0, no step made.
    let world = match launch {
        Some(l) => {
            let (rank, size) = (l.rank, l.world);
            let Some(w) = uamt::dist::World::connect_or_stop(l, &cfg.distributed, &controls.stop_flag())? else {
                tracing::warn!(
                    rank,
                    world = size,
                    reason = controls.stop_reason().unwrap_or("stop"),
                    "stopped during the rendezvous, before any step: no checkpoint written"
                );
                return Ok(());
            };
            tracing::info!(rank = w.launch.rank, world = w.launch.world, "all ranks connected");
            Some(Arc::new(w))
        }
        None => None,
    };
    let first = world.as_ref().is_none_or(|w| w.launch.is_first());
    let (rank, size) = world.as_ref().map_or((0, 1), |w| (w.launch.rank, w.launch.world));
    // The checkpoint folder first (writable, whose run), before any time goes into the data.
    let opts = StartOptions {
        resume: args.resume,
        resume_from: args.resume_from.clone(),
        share_checkpoint_dir: args.share_checkpoint_dir,
    };
    let started = if first { start(&cfg, &opts)? } else { start_follower(&cfg)? };
    // Rank 0 opens (and, for the synthetic dataset, first generates) the data; the others open
    // it once it is there (ranks on other hosts need their own copy at the same path).
    if let Some(w) = world.as_ref().filter(|_| !first) {
        w.step.barrier()?;
    }
    let dataset = open_dataset(&cfg)?;
    if let Some(w) = world.as_ref().filter(|_| first) {
        w.step.barrier()?;
    }
    tracing::info!(
        labelled = dataset.labelled().len(),
        unlabelled = dataset.unlabelled().len(),
        test = dataset.test.len(),
        "dataset open"
    );
    if cfg.rank.every > 0 && dataset.unlabelled().is_empty() {
        anyhow::bail!(
            "rank.every = {}, but the dataset {} has no unlabelled training case to rank; set rank.every = 0",
            cfg.rank.every,
            dataset.root.display()
        );
    }
    // The HTTP server listens already (it started before this thread): ready for systemd.
    notifier.ready();
    let loader = loader_for(&cfg, dataset, rank, size)?;
    // Held until training (and its final checkpoint) is over: no other process resumes this run.
    let _lock = started.lock;
    let mut trainer = started.trainer;
    if let Some(w) = &world {
        uamt::dist::share_start(&w.step, &mut trainer)?;
        let sync = uamt::dist::GradSync::new(w, controls.stop_flag());
        let sync = if w.cfg.overlap { sync.overlapping(trainer.student.store())? } else { sync };
        trainer.sync = Some(Box::new(sync));
    }
    let mut run = Run::new(cfg.clone(), device, loader, trainer);
    run.checkpoints = first;
    run.dist = world;
    run.run_id = started.run_id;
    run.controls = controls;
    run.max_steps = args.stop_after;
    run.sinks = crate::events::standard();
    run.sinks.push(Box::new(crate::events::StatusSink::new(board.clone())));
    run.fault = crate::pipeline::fault::Fault::from_env();
    run.hold = crate::pipeline::fault::Hold::from_env();
    if cfg.eval.every > 0 || !cfg.eval.watch_dir.as_os_str().is_empty() || cfg.rank.every > 0 {
        let evaluator = Evaluator::new(&cfg, run.loader.dataset().clone(), device)?;
        let (reply, handle) = crossbeam_channel::bounded(1);
        supervisor.do_send(StartEval { evaluator, board: Some(board.clone()), reply });
        let eval = handle.recv().map_err(|_| anyhow::anyhow!("the supervisor is gone"))??;
        if cfg.rank.every > 0 {
            let rank = eval.clone();
            run.rank = Some(Box::new(move |iteration, take| rank.offer_rank(iteration, take)));
        }
        run.eval = Some(Box::new(move |req| eval.offer(req)));
    }
    tracing::info!(method = ?cfg.method.kind, ?device, mode = ?run.mode, from = run.trainer.iter, to = cfg.optim.iterations, teacher_lag = cfg.method.teacher_lag, "training");
    board.set_iteration(run.trainer.iter);
    board.set_end(run.max_steps.map_or(cfg.optim.iterations, |n| (run.trainer.iter + n).min(cfg.optim.iterations)));
    board.set_phase(Phase::Training);
    let outcome = pipeline::run(run)?;
    board.set_phase(Phase::Finished);
    let last = outcome.reports.last();
    tracing::info!(
        steps = outcome.reports.len(),
        seconds = outcome.seconds,
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
