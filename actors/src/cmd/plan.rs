//! `uamt plan`: from a dataset folder and a machine to a complete training config that fits its
//! memory and (with `--hours`) a time budget, with the reason for every value. Opens the dataset
//! as `uamt train` does (the same errors for a bad one), fingerprints it (cached in
//! `<dataset>/fingerprint.json`), times the planned shapes on this machine unless told not to,
//! and applies `uamt::plan`'s rules; prints a table (or `--json`) and writes the config (`--out`)
//! or prints it.

use crate::pipeline::{self, Run};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use uamt::config::{Config, DeviceRequest};
use uamt::data::fingerprint::{CacheOutcome, Fingerprint, FINGERPRINT};
use uamt::data::preprocessing::{Preprocessing, Resample};
use uamt::data::{Dataset, Manifest, PatchLoader};
use uamt::fsutil::OutputDir;
use uamt::plan::{self, dims, duration, gib, Measure, Plan, Request, Target};
use uamt::train::Method;

/// The methods `--method` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Uncertainty-aware mean teacher.
    Uamt,
    /// Mean teacher.
    #[value(name = "mean_teacher")]
    MeanTeacher,
    /// The labelled cases only.
    Supervised,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Uamt => Method::Uamt,
            MethodArg::MeanTeacher => Method::MeanTeacher,
            MethodArg::Supervised => Method::Supervised,
        }
    }
}

/// Arguments of `uamt plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The dataset folder (`uamt import ...` or `uamt synth` wrote it).
    #[arg(long)]
    pub dataset: PathBuf,
    /// The device to plan for: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when this machine has it).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// GiB of memory to plan with (default: what this machine has available on a CPU, the card's
    /// total on CUDA; needed for a CUDA device this machine does not have).
    #[arg(long, value_parser = super::parse::positive)]
    pub memory: Option<f64>,
    /// Time budget in hours: as many iterations as fit (at most the recipe's 6000).
    #[arg(long, value_parser = super::parse::positive)]
    pub hours: Option<f64>,
    /// The method (default: uamt, or supervised when the dataset has no unlabelled case).
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// Write the config here (default: print it after the table).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace `--out` if uamt wrote it before (a file uamt did not write is never replaced).
    #[arg(long)]
    pub force: bool,
    /// Print the plan as one JSON object (the config's text in `config`).
    #[arg(long)]
    pub json: bool,
    /// Do not time the planned shapes here; use the stated estimate.
    #[arg(long)]
    pub no_measure: bool,
}

/// Warm-up iterations of a measurement, then timed ones for about `TIMED_S` seconds (at least
/// `MIN_TIMED`, at most `MAX_TIMED`), all in one run: a run's first steps start its threads and
/// fill its caches (a fresh run for the timed steps measured several times too slow).
const WARMUP: usize = 2;
const TIMED_S: f64 = 3.0;
const MIN_TIMED: usize = 3;
const MAX_TIMED: usize = 20;

/// Times the planned shapes on this machine: training iterations through the daemon's own
/// pipeline on the dataset, evaluation windows through the sliding window.
struct Timer {
    dataset: Arc<Dataset>,
    device: tch::Device,
}

/// Records when each step's numbers arrive (every step reads back here, so each arrival follows
/// the step's work on the device) and stops the run once enough steps are timed.
struct StepClock {
    stamps: Arc<std::sync::Mutex<Vec<Instant>>>,
    controls: crate::control::Controls,
}

/// Seconds of the timed steps (each the time from the previous step's arrival to its own).
fn timed_steps(stamps: &[Instant]) -> Vec<f64> {
    stamps.windows(2).skip(WARMUP - 1).map(|w| (w[1] - w[0]).as_secs_f64()).collect()
}

impl crate::events::Sink for StepClock {
    fn on(&mut self, event: &crate::events::Event<'_>) {
        if let crate::events::Event::Step { .. } = event {
            let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
            stamps.push(Instant::now());
            let timed = timed_steps(&stamps);
            if timed.len() >= MAX_TIMED || (timed.len() >= MIN_TIMED && timed.iter().sum::<f64>() >= TIMED_S) {
                self.controls.request_stop("plan: timed");
            }
        }
    }
}

impl Measure for Timer {
    fn iteration(&mut self, cfg: &Config) -> uamt::Result<f64> {
        let mut c = cfg.clone();
        c.telemetry.listen.clear();
        c.telemetry.readback_every = 1;
        c.eval.every = 0;
        let steps = (WARMUP + MAX_TIMED) as i64;
        c.optim.iterations = c.optim.iterations.max(steps);
        eprintln!(
            "plan: timing iterations of a {} patch with {} filters on {:?}",
            dims(c.data.loader.patch),
            c.model.n_filters,
            self.device
        );
        let timed = || -> Result<f64> {
            let loader = PatchLoader::new(self.dataset.clone(), c.loader())?;
            let mut run = Run::new(c.clone(), self.device, loader, crate::setup::trainer(&c, false)?);
            let stamps = Arc::new(std::sync::Mutex::new(Vec::new()));
            run.sinks.push(Box::new(StepClock { stamps: stamps.clone(), controls: run.controls.clone() }));
            run.max_steps = Some(steps);
            run.checkpoints = false;
            pipeline::run(run)?;
            let stamps = stamps.lock().unwrap_or_else(|e| e.into_inner());
            let timed = timed_steps(&stamps);
            anyhow::ensure!(!timed.is_empty(), "no step was timed ({} ran)", stamps.len());
            Ok(timed.iter().sum::<f64>() / timed.len() as f64)
        };
        timed().map_err(|e| uamt::Error::invalid("plan", format!("timing the planned shapes failed: {e:#}")))
    }

    fn window(&mut self, cfg: &Config) -> uamt::Result<f64> {
        let opts = &cfg.eval.window;
        let b = opts.batch_size.max(1);
        // A volume whose sliding window is exactly one batch of windows along x.
        let d = [opts.patch[0] + opts.stride[0] * (b - 1), opts.patch[1], opts.patch[2]].map(|v| v as i64);
        let mut model = uamt::model::VNet::new(&cfg.model, self.device)?;
        model.set_channels_last(cfg.device.channels_last(cfg.model.n_filters, self.device));
        let image = tch::Tensor::f_zeros(d, (tch::Kind::Float, self.device))?;
        // Kernels run asynchronously on a GPU: the time counts once the device is done.
        let sync = || {
            if let tch::Device::Cuda(n) = self.device {
                tch::Cuda::synchronize(n as i64);
            }
        };
        uamt::eval::infer::sliding_window(&model, &image, opts)?; // warm-up
        sync();
        let t0 = Instant::now();
        uamt::eval::infer::sliding_window(&model, &image, opts)?;
        sync();
        Ok(t0.elapsed().as_secs_f64() / b as f64)
    }

    fn how(&self) -> String {
        format!(
            "{WARMUP} warm-up, then {MIN_TIMED} to {MAX_TIMED} timed iterations (about {TIMED_S} s) on this machine"
        )
    }

    fn how_window(&self) -> String {
        "a batch of windows after a warm-up batch, on this machine".to_string()
    }
}

/// The device to plan for and the memory to plan with.
fn target(args: &Args) -> Result<(Target, Option<tch::Device>)> {
    let request = DeviceRequest::parse("--device", &args.device)?;
    // Through `cuda_device_count`, which loads libtorch's CUDA backend first (libtorch asked
    // before that would answer "no CUDA" for good); not at all for the CPU, nor for `auto`
    // without an NVIDIA driver.
    let count = match request {
        DeviceRequest::Cpu => 0,
        DeviceRequest::Auto if !uamt::device::driver_present() => 0,
        _ => uamt::device::cuda_device_count(),
    };
    let (name, cuda_index) = match request {
        DeviceRequest::Cpu => ("cpu".to_string(), None),
        DeviceRequest::Auto if count > 0 => ("cuda".to_string(), Some(0)),
        DeviceRequest::Auto => ("cpu".to_string(), None),
        DeviceRequest::Cuda(n) => (if n == 0 { "cuda".to_string() } else { format!("cuda:{n}") }, Some(n)),
    };
    let here = match cuda_index {
        None => Some(tch::Device::Cpu),
        Some(n) if n < count => Some(tch::Device::Cuda(n)),
        Some(_) => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (memory, source) = match (args.memory, cuda_index, here) {
        (Some(g), _, _) => {
            anyhow::ensure!(g <= 1024.0 * 1024.0, "--memory {g}: at most 1048576 GiB");
            ((g * (1u64 << 30) as f64) as u64, format!("--memory {g}"))
        }
        (None, None, _) => {
            let a = uamt::memory::available_memory().context(
                "cannot read this machine's available memory (/proc/meminfo, the cgroup's limit); give --memory GIB",
            )?;
            (a, "available here: MemAvailable, cgroup, UAMT_MAX_MEMORY".to_string())
        }
        (None, Some(n), Some(_)) => (uamt::gpu::cuda_total_memory(n)?, format!("the total of {name}")),
        (None, Some(_), None) => anyhow::bail!(
            "--device {}: libtorch sees {count} CUDA device(s) here; give --memory GIB (the card's memory) to plan \
             for a GPU this machine does not have",
            args.device
        ),
    };
    Ok((Target { device: name, memory, memory_source: source, cores }, here))
}

/// The output classes the manifest's `labels` name (at least 2; the recipe's 2 when it names
/// none).
fn classes(root: &Path) -> Result<i64> {
    let manifest = Manifest::read(root).with_context(|| format!("opening dataset {}", root.display()))?;
    Ok(if manifest.labels.is_empty() { uamt::recipe::N_CLASSES } else { manifest.n_classes().max(2) as i64 })
}

fn describe_cache(outcome: &CacheOutcome, root: &Path) -> String {
    let path = root.join(FINGERPRINT);
    match outcome {
        CacheOutcome::Cached => format!("read from {} (the cases are unchanged)", path.display()),
        CacheOutcome::Written => format!("computed and cached in {}", path.display()),
        CacheOutcome::NotCached(why) => format!("computed, not cached: {why}"),
    }
}

/// The printed table.
fn table(plan: &Plan, fp: &Fingerprint, args: &Args, target: &Target, cache: &str) -> String {
    let mut s = String::new();
    let c = fp.counts;
    s.push_str(&format!(
        "uamt plan: {} for {} ({} of memory: {}), {}\n",
        args.dataset.display(),
        target.device,
        gib(target.memory),
        target.memory_source,
        plan::method_name(plan.config.method.kind)
    ));
    let median = plan.median_shape.map(|v| format!("{v:.1}").trim_end_matches(".0").to_string());
    s.push_str(&format!(
        "fingerprint: {} training cases ({} labelled, {} unlabelled), {} test ({} labelled); median case {} at {}; {}\n\n",
        c.labelled + c.unlabelled,
        c.labelled,
        c.unlabelled,
        c.test,
        c.test_labelled,
        dims(median),
        plan::mm(plan.voxel.spacing),
        cache
    ));
    let w = [20, 22, 20];
    s.push_str(&format!(
        "{:<w0$} {:<w1$} {:<w2$} why\n",
        "setting",
        "planned",
        "paper",
        w0 = w[0],
        w1 = w[1],
        w2 = w[2]
    ));
    let indent = w.iter().sum::<usize>() + 3;
    for d in &plan.decisions {
        let mut line =
            format!("{:<w0$} {:<w1$} {:<w2$} ", d.setting, d.value, d.paper, w0 = w[0], w1 = w[1], w2 = w[2]);
        let mut width = line.len();
        for word in d.why.split_whitespace() {
            if width + word.len() > indent + 80 && width > indent {
                line.truncate(line.trim_end().len());
                line.push('\n');
                line.push_str(&" ".repeat(indent));
                width = indent;
            }
            line.push_str(word);
            line.push(' ');
            width += word.len() + 1;
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    let cfg = &plan.config;
    s.push('\n');
    s.push_str(&format!("memory      {} estimated (footprint) of {} usable\n", gib(plan.memory), gib(plan.usable)));
    s.push_str(&format!("iteration   {} ({})\n", duration(plan.iteration.seconds), plan.iteration.source));
    match &plan.evaluation {
        Some(e) => s.push_str(&format!(
            "evaluation  {} each, {} of them ({} windows; {})\n",
            duration(e.seconds),
            plan.evaluations,
            plan.eval_windows,
            e.source
        )),
        None => s.push_str("evaluation  none during training\n"),
    }
    let evals = plan.evaluation.as_ref().map_or(0.0, |e| e.seconds) * plan.evaluations as f64;
    s.push_str(&format!(
        "total       {} = {} opening the dataset + {} x {} + {} evaluating{}\n",
        duration(plan.total_s),
        duration(plan.startup_s),
        cfg.optim.iterations,
        duration(plan.iteration.seconds),
        duration(evals),
        args.hours.map_or(String::new(), |h| format!(" (budget {h} h)"))
    ));
    if !plan.notes.is_empty() {
        s.push_str("notes:\n");
        for n in &plan.notes {
            s.push_str(&format!("  - {n}\n"));
        }
    }
    s
}

/// Writes to stdout; a reader that went away (`uamt plan | head`) is not an error worth a panic.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes()).and_then(|_| std::io::stdout().flush());
}

pub fn run(args: Args) -> Result<()> {
    let (target, here) = target(&args)?;
    if let Some(out) = &args.out {
        uamt::fsutil::check_apart(&[("--out", out)], &[("--dataset", &args.dataset)])?;
    }
    let root = args.dataset.clone();
    let n_classes = classes(&root)?;
    let t0 = Instant::now();
    let dataset = crate::setup::open_dataset_at(&root, n_classes as usize)?;
    let startup_s = t0.elapsed().as_secs_f64();
    let (fp, outcome) = Fingerprint::of(&dataset).with_context(|| format!("fingerprinting {}", root.display()))?;
    let cache = describe_cache(&outcome, &root);
    if let CacheOutcome::NotCached(why) = &outcome {
        tracing::warn!(dataset = %root.display(), why = %why, "fingerprint not cached");
    }
    let dataset = Arc::new(dataset);
    // The batch training would draw: refused here as training would refuse it.
    let mut probe = Config::default();
    probe.data.sampler.labelled_bs = uamt::recipe::LABELLED_BS.min(fp.counts.labelled).max(1);
    probe.data.sampler.unlabelled_bs = 0;
    PatchLoader::new(dataset.clone(), probe.loader()).with_context(|| format!("dataset {}", root.display()))?;
    let resampled_to = match Preprocessing::read(&root)?.map(|p| p.resample) {
        Some(Resample::Spacing(s)) => Some(s),
        _ => None,
    };
    let name = root
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "planned".into());
    let request = Request {
        dataset: root.clone(),
        name,
        method: args.method.map(Method::from),
        hours: args.hours,
        target: target.clone(),
        n_classes,
        resampled_to,
        startup_s,
    };
    let mut timer = here.map(|device| Timer { dataset: dataset.clone(), device });
    let measure: Option<&mut dyn Measure> = match (&mut timer, args.no_measure) {
        (Some(t), false) => Some(t),
        _ => None,
    };
    let measuring = measure.is_some();
    let load = uamt::memory::load_average();
    let mut plan = plan::make(&fp, &request, measure)?;
    match load {
        // Other work on the cores makes libtorch's threads wait for each other: a timing taken
        // then says little about the machine alone.
        Some(l) if measuring && l > 0.5 * target.cores as f64 => plan.notes.push(format!(
            "timed while this machine was busy (load average {l:.1} on {} cores before timing): the times hold \
             only while it stays as busy; plan again when it is quiet, or give --no-measure for the stated estimate",
            target.cores
        )),
        _ => {}
    }
    if here.is_none() && !args.no_measure {
        plan.notes
            .push(format!("not measured: {} is not on this machine; the times are the stated estimate", target.device));
    }
    // Whatever training would refuse about this dataset and batch, refused now.
    PatchLoader::new(dataset.clone(), plan.config.loader()).with_context(|| format!("dataset {}", root.display()))?;
    let header = vec![
        format!(
            "Planned by `uamt plan --dataset {} --device {}{}{}` for {} of memory ({}).",
            root.display(),
            target.device,
            args.hours.map_or(String::new(), |h| format!(" --hours {h}")),
            args.method.map_or(String::new(), |m| format!(" --method {}", plan::method_name(m.into()))),
            gib(target.memory),
            target.memory_source
        ),
        format!(
            "Estimated: {} of memory, {} per iteration ({}), {} in all.",
            gib(plan.memory),
            duration(plan.iteration.seconds),
            plan.iteration.source,
            duration(plan.total_s)
        ),
    ];
    let text = plan.file(&header)?;
    if let Some(out) = &args.out {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut dir = OutputDir::open(uamt::fsutil::parent_dir(out), "uamt plan", args.force)?;
        dir.claim(&[name])?;
        uamt::fsutil::write_atomic(out, |w| w.write_all(text.as_bytes()))?;
    }
    if args.json {
        let v = serde_json::json!({
            "dataset": root,
            "device": target.device,
            "memory_bytes": target.memory,
            "memory_source": target.memory_source,
            "fingerprint": {
                "cache": match &outcome {
                    CacheOutcome::Cached => "cached",
                    CacheOutcome::Written => "written",
                    CacheOutcome::NotCached(_) => "not_cached",
                },
                "counts": fp.counts,
                "median_shape": plan.median_shape,
                "voxel_size": plan.voxel.spacing,
                "voxel_rule": format!("{:?}", plan.voxel.rule),
                "cases_at_voxel_size": plan.voxel.cases_at_it,
            },
            "decisions": plan.decisions,
            "estimate": {
                "memory_bytes": plan.memory,
                "usable_bytes": plan.usable,
                "iteration": plan.iteration,
                "evaluation": plan.evaluation,
                "evaluations": plan.evaluations,
                "eval_windows": plan.eval_windows,
                "startup_seconds": plan.startup_s,
                "total_seconds": plan.total_s,
            },
            "notes": plan.notes,
            "out": args.out,
            "config": text,
        });
        say(&format!("{v}\n"));
    } else {
        say(&table(&plan, &fp, &args, &target, &cache));
        match &args.out {
            Some(out) => say(&format!(
                "\nconfig written to {}; train with: uamt train --config {}\n",
                out.display(),
                out.display()
            )),
            None => say(&format!("\n{text}")),
        }
    }
    Ok(())
}
