//! `uamt plan`: from a dataset's [`Fingerprint`] and a machine to a complete training config,
//! with the reason for every value. The rules, in order (each a function in [`rules`]):
//!
//! 1. **Voxel size**: the import's target spacing, else the one every case shares, else the
//!    median per axis with nnU-Net's anisotropy rule ([`rules::voxel_size`]).
//! 2. **Patch and filters**: the largest patch of multiples of 16, no side above the median case
//!    at that voxel size rounded up to 16, shrunk one side at a time in the median case's
//!    proportions ([`rules::shrinking`]) until the daemon's own memory estimate
//!    ([`Footprint`]) fits the memory; 16 filters (the paper's) unless the patch would have to
//!    go below 64 per side (then 8, then 4), and 4 on a CPU (`ops/la-cpu`'s).
//! 3. **Schedule**: the recipe's 6000 iterations, or with a time budget as many as fit (at most
//!    6000; the patch shrinks further, to 32 per side, while fewer than 2000 would), from a
//!    measured iteration when [`Measure`] is given, else the [`cost::TimeModel`]; the
//!    learning-rate drop and the consistency ramp scaled with the run ([`rules::scaled_schedule`]).
//! 4. **Evaluation**: window = patch, the reference's density (LA's 18/18/4 of 112x112x80) when
//!    six evaluations of the test split cost at most a tenth of the training time, else half a
//!    window per step, else one evaluation at the end.
//!
//! [`file`] writes the config with a comment on every value; `actors/src/cmd/plan.rs` is the
//! command (measuring, printing, writing).

pub mod cost;
pub mod file;
pub mod rules;

use crate::config::Config;
use crate::data::fingerprint::{Fingerprint, Split};
use crate::footprint::Footprint;
use crate::recipe;
use crate::train::Method;
use crate::{Error, Result};
use cost::TimeModel;
use rules::{VoxelChoice, VoxelRule};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Iterations below which a time budget shrinks the patch further (`ops/la-cpu`'s run length).
pub const MIN_ITERATIONS: i64 = 2000;
/// Evaluations of the test split during a run (LA's: every 1000 of 6000 iterations).
pub const EVALUATIONS: i64 = 6;
/// Timings of training iterations a plan makes at most (each a warm-up and a few iterations).
pub const MAX_MEASUREMENTS: usize = 4;
/// At most this share of the training time goes to evaluations.
pub const EVAL_SHARE: f64 = 0.1;
/// Share of a GPU's memory the estimate may fill: the estimate is held at or above the measured
/// peak on a CPU (`actors/tests/fault_daemon.rs`) but has not been checked on a GPU, where the
/// CUDA context, cuDNN's workspaces and the caching allocator's slack come on top.
pub const CUDA_SHARE: f64 = 0.9;

/// The machine a plan is for.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `cpu`, `cuda` or `cuda:N` (`device.device`).
    pub device: String,
    /// Bytes of memory to plan with (the card's on CUDA).
    pub memory: u64,
    /// Where that figure comes from, in words.
    pub memory_source: String,
    /// CPU cores (for the CPU's time estimate).
    pub cores: usize,
}

impl Target {
    /// Whether the plan is for a GPU.
    pub fn is_cuda(&self) -> bool {
        self.device.starts_with("cuda")
    }

    /// The bytes the estimate may fill.
    pub fn usable(&self) -> u64 {
        if self.is_cuda() {
            (self.memory as f64 * CUDA_SHARE) as u64
        } else {
            self.memory
        }
    }
}

/// What to plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The dataset folder as the config will name it.
    pub dataset: PathBuf,
    /// Short name for the run's folders (`runs/<name>/...`).
    pub name: String,
    /// The method asked for (`None`: UA-MT, or supervised when there are no unlabelled cases).
    pub method: Option<Method>,
    /// The time budget in hours (`None`: the recipe's 6000 iterations).
    pub hours: Option<f64>,
    /// The machine.
    pub target: Target,
    /// Output classes (the manifest's `labels`).
    pub n_classes: i64,
    /// The voxel size the import resampled every case to (`preprocessing.json`), if it did.
    pub resampled_to: Option<[f64; 3]>,
    /// Seconds it took to open the dataset (a training run spends them too).
    pub startup_s: f64,
}

/// Times the planned shapes on this machine.
pub trait Measure {
    /// Seconds per training iteration of `cfg`.
    fn iteration(&mut self, cfg: &Config) -> Result<f64>;
    /// Seconds per evaluation window of `cfg` (`eval.patch`, batches of `eval.batch_size`).
    fn window(&mut self, cfg: &Config) -> Result<f64>;
    /// How it measures iterations, in words.
    fn how(&self) -> String;
    /// How it measures windows, in words.
    fn how_window(&self) -> String;
}

/// One planned setting: a row of the printed table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The setting, in words.
    pub setting: String,
    /// Its planned value.
    pub value: String,
    /// The paper's (the recipe's) value.
    pub paper: String,
    /// Why: the fingerprint figure or rule behind it.
    pub why: String,
}

/// A time and where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Seconds.
    pub seconds: f64,
    /// `measured ...` or `estimated ...`.
    pub source: String,
}

/// A plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The planned configuration.
    pub config: Config,
    /// The planned settings with their reasons.
    pub decisions: Vec<Decision>,
    /// What the user should know (re-imports, padding, budgets that do not fit, ...).
    pub notes: Vec<String>,
    /// The comment of every key of the written file (`section.key`).
    pub comments: BTreeMap<String, String>,
    /// The voxel size.
    pub voxel: VoxelChoice,
    /// The median training case at that voxel size.
    pub median_shape: [f64; 3],
    /// The memory estimate of the planned config, bytes.
    pub memory: u64,
    /// Bytes the estimate may fill.
    pub usable: u64,
    /// One training iteration.
    pub iteration: Estimate,
    /// One evaluation of the test split (`None`: no labelled test case).
    pub evaluation: Option<Estimate>,
    /// Evaluations during the run.
    pub evaluations: i64,
    /// Sliding windows of one evaluation.
    pub eval_windows: usize,
    /// Seconds to open the dataset.
    pub startup_s: f64,
    /// The whole run: opening, iterations and evaluations.
    pub total_s: f64,
}

/// `[x, y, z]` as `XxYxZ`.
pub fn dims<T: std::fmt::Display>(v: [T; 3]) -> String {
    format!("{}x{}x{}", v[0], v[1], v[2])
}

/// A voxel size in millimetres (`0.625 mm` when isotropic).
pub fn mm(s: [f64; 3]) -> String {
    let f = |v: f64| format!("{}", (v * 1000.0).round() / 1000.0);
    if (s[0] - s[1]).abs() < 1e-9 && (s[1] - s[2]).abs() < 1e-9 {
        format!("{} mm", f(s[0]))
    } else {
        format!("{}x{}x{} mm", f(s[0]), f(s[1]), f(s[2]))
    }
}

/// Bytes as GiB.
pub fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Seconds in words (`0.42 s`, `12.3 min`, `4.1 h`).
pub fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn axis(a: usize) -> &'static str {
    ["x", "y", "z"][a.min(2)]
}

/// The config every plan starts from: the recipe's settings, the dataset, the method and its
/// batch, the run's folders and the device's queues.
fn base(req: &Request, fp: &Fingerprint, method: Method) -> Config {
    let mut c = Config::default();
    c.data.dataset = req.dataset.clone();
    c.data.sampler.labelled_bs = recipe::LABELLED_BS.min(fp.counts.labelled).max(1);
    c.data.sampler.unlabelled_bs = if method == Method::Supervised { 0 } else { recipe::UNLABELLED_BS };
    c.model.n_classes = req.n_classes;
    c.method.kind = method;
    c.device.device = req.target.device.clone();
    let runs = PathBuf::from("runs").join(&req.name);
    c.checkpoint.dir = runs.join("checkpoints");
    c.eval.report_dir = runs.join("eval");
    c.eval.every = i64::from(fp.counts.test_labelled > 0); // counts the window in the estimate
    if req.target.is_cuda() {
        // config/la-uamt.toml's: the loaders keep a GPU fed.
        c.queues.batches = 8;
        c.queues.loader_workers = 4;
    } else {
        // ops/la-cpu's: one loader beside the compute on few cores.
        c.queues.loader_workers = 1;
    }
    c
}

/// `cfg` with `n_filters` and `patch` (the evaluation window too).
fn shaped(cfg: &Config, n_filters: i64, patch: [usize; 3]) -> Config {
    let mut c = cfg.clone();
    c.model.n_filters = n_filters;
    c.data.loader.patch = patch;
    c.eval.window.patch = patch;
    c
}

/// Plans a run of the dataset `fp` describes on `req.target`; `measure` times the planned shapes
/// (`None`: the stated estimate).
pub fn make(fp: &Fingerprint, req: &Request, mut measure: Option<&mut dyn Measure>) -> Result<Plan> {
    let mut notes = Vec::new();
    let mut comments = BTreeMap::new();
    let mut decisions = Vec::new();
    let counts = fp.counts;

    // The method and the batch.
    let method = match req.method {
        Some(m) if m != Method::Supervised && counts.unlabelled == 0 => {
            return Err(Error::invalid(
                "--method",
                format!(
                    "{} learns from unlabelled cases but the dataset has none (training would refuse \
                     data.unlabelled_bs); plan --method supervised, or import with fewer --labelled",
                    method_name(m)
                ),
            ))
        }
        Some(m) => m,
        None if counts.unlabelled == 0 => {
            notes.push("the dataset has no unlabelled training case: planned supervised training".to_string());
            Method::Supervised
        }
        None => Method::Uamt,
    };
    let mut cfg = base(req, fp, method);
    let voxel = rules::voxel_size(fp, req.resampled_to)
        .ok_or_else(|| Error::invalid("dataset", "it lists no training case to plan from"))?;
    let median = rules::median_shape(fp, voxel.spacing);
    let cap = rules::patch_cap(median);

    // Memory: the largest patch (and the widest network) whose estimate fits.
    let usable = req.target.usable();
    let fits = |cfg: &Config| Footprint::of(cfg).total() <= usable;
    let cuda = req.target.is_cuda();
    let ladder: &[i64] = if cuda { &[16, 8, 4] } else { &[4] };
    let at_min = rules::shrinking(cap, median, rules::MIN_SIDE);
    let mut chosen = None;
    for &f in ladder {
        if let Some(p) = rules::first_fitting(&at_min, |p| fits(&shaped(&cfg, f, p))) {
            chosen = Some((f, p));
            break;
        }
    }
    let below_min = chosen.is_none();
    let last = *ladder.last().unwrap_or(&4);
    let (filters, mem_patch) = match chosen {
        Some(c) => c,
        None => {
            let tiny = rules::shrinking(cap, median, rules::MULTIPLE);
            match rules::first_fitting(&tiny, |p| fits(&shaped(&cfg, last, p))) {
                Some(p) => (last, p),
                None => {
                    let smallest = shaped(&cfg, last, *tiny.last().unwrap_or(&[16; 3]));
                    return Err(Error::invalid(
                        "--memory",
                        format!(
                            "not even a {} patch with {last} filters fits: it needs {} and {} has {} usable",
                            dims(smallest.data.loader.patch),
                            Footprint::of(&smallest).describe(),
                            req.target.memory_source,
                            gib(usable)
                        ),
                    ));
                }
            }
        }
    };

    // Time: the model (and, measuring, the machine) picks the patch a budget allows.
    let model0 = if cuda { TimeModel::cuda() } else { TimeModel::cpu(req.target.cores) };
    let budget = req.hours.map(|h| h * 3600.0);
    let train_budget = budget.map(|b| b * (1.0 - EVAL_SHARE) - req.startup_s);
    if let (Some(h), Some(tb)) = (req.hours, train_budget) {
        if tb <= 0.0 {
            return Err(Error::invalid(
                "--hours",
                format!("{h} h leaves no time to train once the dataset is open ({:.0} s)", req.startup_s),
            ));
        }
    }
    let time_seq = rules::shrinking(mem_patch, median, rules::TIME_MIN_SIDE);
    // Whether `seconds` per iteration leave room for MIN_ITERATIONS in the budget.
    let enough = |seconds: f64| !matches!(train_budget, Some(tb) if tb / seconds < MIN_ITERATIONS as f64);
    // The largest patch of the sequence the model says is fast enough (the smallest if none).
    let pick = |model: &TimeModel| -> usize {
        time_seq
            .iter()
            .position(|&p| enough(model.iteration_s(&shaped(&cfg, filters, p))))
            .unwrap_or(time_seq.len() - 1)
    };
    let mut model = model0;
    let mut at = pick(&model0);
    let mut iteration = Estimate {
        seconds: model.iteration_s(&shaped(&cfg, filters, time_seq[at])),
        source: model0.source.to_string(),
    };
    if let Some(m) = measure.as_deref_mut() {
        // A search along the sequence guided by the model, each measurement recalibrating it:
        // never back to a patch measured too slow, never past one measured fast enough.
        let mut measured: Vec<(usize, f64)> = Vec::new();
        for _ in 0..MAX_MEASUREMENTS {
            let t = m.iteration(&shaped(&cfg, filters, time_seq[at]))?;
            measured.push((at, t));
            model = model0.calibrated(&shaped(&cfg, filters, time_seq[at]), t);
            let slow = measured.iter().filter(|(_, t)| !enough(*t)).map(|(i, _)| i + 1).max().unwrap_or(0);
            let good = measured.iter().filter(|(_, t)| enough(*t)).map(|(i, _)| *i).min().unwrap_or(time_seq.len() - 1);
            let lo = slow.min(time_seq.len() - 1);
            let next = pick(&model).clamp(lo, good.max(lo));
            if measured.iter().any(|(i, _)| *i == next) {
                break;
            }
            at = next;
        }
        // The largest patch measured fast enough, else the smallest measured.
        let (i, t) = measured
            .iter()
            .copied()
            .filter(|(_, t)| enough(*t))
            .min_by_key(|(i, _)| *i)
            .or_else(|| measured.iter().copied().max_by_key(|(i, _)| *i))
            .unwrap_or((at, iteration.seconds));
        at = i;
        model = model0.calibrated(&shaped(&cfg, filters, time_seq[at]), t);
        iteration = Estimate { seconds: t, source: format!("measured: {}", m.how()) };
    }
    let patch = time_seq[at];
    let at_floor = at + 1 == time_seq.len();
    cfg = shaped(&cfg, filters, patch);
    let t_iter = iteration.seconds.max(1e-6);

    // Iterations and the schedule scaled with them.
    let iterations = match train_budget {
        None => recipe::ITERATIONS,
        Some(tb) => {
            let n = ((tb / t_iter).floor() as i64).min(recipe::ITERATIONS);
            let n = if n >= 60 { n / 60 * 60 } else { n };
            if n < 1 {
                return Err(Error::invalid(
                    "--hours",
                    format!(
                        "{} h does not fit one iteration ({}) once the dataset is open",
                        req.hours.unwrap_or_default(),
                        duration(t_iter)
                    ),
                ));
            }
            n
        }
    };
    let (lr_step, interval) = rules::scaled_schedule(iterations);
    cfg.optim.iterations = iterations;
    cfg.optim.lr_step = lr_step;
    cfg.method.consistency_interval = interval;

    // Evaluation: the window is the patch; the stride and how often, from what it costs.
    let tests: Vec<[usize; 3]> = fp
        .test()
        .filter(|c| c.has_label)
        .map(|c| rules::shape_at(c, voxel.spacing).map(|v| v.round().max(1.0) as usize))
        .collect();
    let reference = rules::reference_stride(patch);
    let half = rules::half_stride(patch);
    let count = |stride: [usize; 3]| tests.iter().map(|&d| rules::windows(d, patch, stride)).sum::<usize>();
    let train_s = iterations as f64 * t_iter;
    let (mut evaluation, mut evaluations, mut stride, mut eval_windows) = (None, 0i64, half, 0usize);
    let eval_why;
    let mut window_source = model.source.to_string();
    if tests.is_empty() {
        eval_why = if counts.test == 0 {
            "no test cases: no evaluation during training".to_string()
        } else {
            "no test case has a label (import with --holdout K to keep labelled cases for testing): no evaluation \
             during training"
                .to_string()
        };
        notes.push(eval_why.clone());
    } else {
        let mut probe = cfg.clone();
        probe.eval.window.stride = reference;
        let t_window = match measure {
            Some(m) => {
                window_source = format!("measured: {}", m.how_window());
                m.window(&probe)?
            }
            None => model.window_s(&probe),
        };
        let n_evals = if iterations >= EVALUATIONS && iterations % EVALUATIONS == 0 { EVALUATIONS } else { 1 };
        let options = [(reference, n_evals), (half, n_evals), (half, 1)];
        let cost = |(s, n): ([usize; 3], i64)| n as f64 * count(s) as f64 * t_window;
        let pickd = options.iter().copied().find(|&o| cost(o) <= EVAL_SHARE * train_s);
        let (s, n) = pickd.unwrap_or((half, 1));
        let left = budget.map(|b| b - req.startup_s - train_s);
        if pickd.is_none() && left.is_some_and(|l| cost((s, n)) > l) {
            eval_why = format!(
                "one evaluation of the {} labelled test cases takes about {}, more than the budget leaves: none during \
                 training (run `uamt eval --checkpoint` afterwards)",
                tests.len(),
                duration(cost((half, 1)))
            );
            notes.push(eval_why.clone());
        } else {
            (stride, evaluations, eval_windows) = (s, n, count(s));
            evaluation = Some(Estimate { seconds: count(s) as f64 * t_window, source: window_source.clone() });
            let density = if s == reference {
                format!(
                    "the reference's stride as a share of the window (LA's 18/18/4 of 112x112x80: a voxel well \
                     inside a volume in about {:.0} windows)",
                    rules::coverage(patch, s)
                )
            } else {
                format!(
                    "half a window per step (nnU-Net's: a voxel well inside a volume in about {:.0} windows); the \
                     reference's density would take {} per evaluation",
                    rules::coverage(patch, s),
                    duration(count(reference) as f64 * t_window)
                )
            };
            eval_why = format!(
                "{density}; {} evaluation(s) of {} windows over {} labelled test case(s), about {} each{}",
                n,
                count(s),
                tests.len(),
                duration(count(s) as f64 * t_window),
                if pickd.is_none() { " (more than a tenth of the training time)" } else { "" }
            );
        }
    }
    cfg.eval.every = if evaluations > 0 { iterations / evaluations } else { 0 };
    cfg.eval.window.stride = stride;

    // Checkpoints and logs, with the run's length.
    cfg.checkpoint.every = (iterations / 12).max(1);
    cfg.telemetry.log_every = (iterations / 100).clamp(1, 50);
    let readback = if cuda { 10.0 } else { 1.0 };
    cfg.telemetry.stall_after_s = ((10.0 * t_iter * readback).ceil() as u64).clamp(600, 7 * 24 * 3600);
    cfg.validate()?;

    let memory = Footprint::of(&cfg).total();
    let eval_total = evaluation.as_ref().map_or(0.0, |e| e.seconds) * evaluations as f64;
    let total_s = req.startup_s + train_s + eval_total;

    // The reasons, for the table and the file.
    let paper = Config::default();
    let at = mm(voxel.spacing);
    let voxel_why = match voxel.rule {
        VoxelRule::Resampled => "the voxel size the import resampled every case to (preprocessing.json)".to_string(),
        VoxelRule::Uniform => format!("every one of the {} training cases is stored at it", voxel.training),
        VoxelRule::Median => format!("the median voxel size of the {} training cases, per axis", voxel.training),
        VoxelRule::Anisotropic { axis: a, median } => format!(
            "the median voxel size, but {} (median {median} mm) is more than {}x the finest axis: its {}th \
             percentile instead (nnU-Net's rule for anisotropic data)",
            axis(a),
            rules::ANISOTROPY,
            rules::ANISOTROPIC_PERCENTILE
        ),
    };
    if voxel.cases_at_it < voxel.training {
        let s = voxel.spacing.map(|v| (v * 1000.0).round() / 1000.0);
        notes.push(format!(
            "{} of the {} training cases are stored at voxel sizes more than a tenth off {at}, in whose voxels \
             the patch is planned: re-import them at it (`uamt import nifti ... --spacing {x}`, `uamt import h5 ... \
             --to-spacing {x}`)",
            voxel.training - voxel.cases_at_it,
            voxel.training,
            x = format!("{},{},{}", s[0], s[1], s[2])
        ));
    }
    decisions.push(Decision {
        setting: "voxel size".into(),
        value: at.clone(),
        paper: "0.625 mm (LA)".into(),
        why: voxel_why.clone(),
    });

    let median_txt = dims(median.map(|v| format!("{:.1}", v).trim_end_matches(".0").to_string()));
    let smaller = fp
        .training()
        .filter(|c| {
            let s = rules::shape_at(c, voxel.spacing);
            (0..3).any(|a| s[a] < patch[a] as f64 - 0.5)
        })
        .count();
    if smaller > 0 {
        notes.push(format!(
            "{smaller} of the {} training cases are smaller than the {} patch along some axis: they are padded with \
             zeros to it (as the reference's random crop pads){}",
            voxel.training,
            dims(patch),
            if cap.iter().zip(median).any(|(&c, m)| (c as f64) > m + 0.5 && m < rules::MULTIPLE as f64) {
                "; the median case is smaller than the smallest patch the V-Net takes (16 per side)"
            } else {
                ""
            }
        ));
    }
    let paper_patch = shaped(&cfg, paper.model.n_filters, paper.data.loader.patch);
    let paper_need = Footprint::of(&paper_patch).total();
    let mut patch_why = format!(
        "the largest multiple of 16 per side within the median training case ({median_txt} voxels at {at}, rounded \
         up to {}), shrunk in its proportions until the daemon's memory estimate fits in {} ({})",
        dims(cap),
        gib(usable),
        if cuda {
            "90 % of the card: the estimate is untested on a GPU"
        } else {
            "no margin: the estimate is held at or above a run's measured peak"
        }
    );
    if patch != mem_patch {
        patch_why.push_str(&format!(
            "; memory allows {}, the time budget shrank it so that at least {MIN_ITERATIONS} iterations fit where \
             possible",
            dims(mem_patch)
        ));
    }
    if patch != paper.data.loader.patch {
        patch_why.push_str(&format!(
            "; the paper's 112x112x80 was chosen for LA and a smaller GPU, not from the data (with 16 filters it needs \
             {} here)",
            gib(paper_need)
        ));
    }
    if let Some(fg) = foreground_box(fp) {
        let fov = [0, 1, 2].map(|a| patch[a] as f64 * voxel.spacing[a]);
        let short: Vec<String> = (0..3)
            .filter(|&a| fov[a] + 1e-6 < fg[a])
            .map(|a| format!("{} {:.0} of {:.0} mm", axis(a), fov[a], fg[a]))
            .collect();
        if !short.is_empty() {
            notes.push(format!(
                "the {} patch sees less than the median foreground box ({}): a coarser voxel size (re-import with \
                 --spacing or --downsample) would show the network more of the anatomy in the same time",
                dims(patch),
                short.join(", ")
            ));
        }
    }
    decisions.push(Decision {
        setting: "patch".into(),
        value: dims(patch),
        paper: dims(paper.data.loader.patch),
        why: patch_why.clone(),
    });

    let filters_why = if !cuda {
        format!(
            "4 on a CPU, as ops/la-cpu: 16 filters cost {:.0}x the arithmetic per patch",
            cost::forward_flops(patch, 16, req.n_classes) / cost::forward_flops(patch, 4, req.n_classes)
        )
    } else if filters == 16 {
        "16, the paper's: it fits with the patch above".to_string()
    } else if below_min {
        format!("{filters}: even with 4 filters only a patch below 64 per side fits the memory")
    } else {
        format!(
            "{filters}, fewer than the paper's 16: with more the patch would have to fall below 64 per side (or the \
             median case) to fit"
        )
    };
    decisions.push(Decision {
        setting: "filters".into(),
        value: filters.to_string(),
        paper: "16".into(),
        why: filters_why.clone(),
    });

    let (lbs, ubs) = (cfg.data.sampler.labelled_bs, cfg.unlabelled_bs());
    let batch_why = if lbs < recipe::LABELLED_BS {
        format!("the recipe's 2 + 2, but the dataset has {} labelled case(s)", counts.labelled)
    } else if method == Method::Supervised {
        "the recipe's 2 labelled patches (supervised: no unlabelled ones)".to_string()
    } else {
        "the recipe's 2 labelled + 2 unlabelled patches, T = 8 Monte-Carlo passes".to_string()
    };
    decisions.push(Decision {
        setting: "method, batch".into(),
        value: format!("{} {lbs} + {ubs}", method_name(method)),
        paper: "uamt 2 + 2".into(),
        why: format!(
            "{batch_why}; {} labelled, {} unlabelled, {} test case(s) ({} with labels)",
            counts.labelled, counts.unlabelled, counts.test, counts.test_labelled
        ),
    });

    let iter_why = match req.hours {
        None => "the recipe's".to_string(),
        Some(h) => {
            let why = format!(
                "as many as fit in {h} h at {} per iteration ({}), after {} to open the dataset and a tenth of the \
                 budget kept for evaluation; at most the recipe's 6000",
                duration(t_iter),
                iteration.source,
                duration(req.startup_s)
            );
            if iterations < MIN_ITERATIONS {
                notes.push(format!(
                    "only {iterations} iterations fit in {h} h with a {} patch{} (fewer than {MIN_ITERATIONS}, \
                     ops/la-cpu's): expect an undertrained model, or give more --hours",
                    dims(patch),
                    if at_floor {
                        ", the smallest a budget may shrink it to"
                    } else {
                        " (the measurements ran out before a smaller one was timed)"
                    }
                ));
            }
            why
        }
    };
    decisions.push(Decision {
        setting: "iterations".into(),
        value: iterations.to_string(),
        paper: recipe::ITERATIONS.to_string(),
        why: iter_why.clone(),
    });
    let sched_why = format!(
        "the recipe's 2500 and 150 of 6000 scaled to {iterations} iterations (as ops/la-cpu scales them); the \
         uncertainty threshold ramps over the run's own length"
    );
    decisions.push(Decision {
        setting: "lr drop, ramp unit".into(),
        value: format!("{lr_step}, {interval}"),
        paper: "2500, 150".into(),
        why: sched_why.clone(),
    });
    decisions.push(Decision {
        setting: "eval window, stride".into(),
        value: format!("{}, {}", dims(patch), stride.map(|s| s.to_string()).join("/")),
        paper: "112x112x80, 18/18/4".into(),
        why: eval_why.clone(),
    });

    // The file's comments.
    let ds = format!("the dataset folder (relative to where `uamt train` runs): {}", req.dataset.display());
    note(&mut comments, &["data.dataset"], ds);
    note(&mut comments, &["data.patch"], format!("planned: {patch_why}"));
    note(&mut comments, &["data.labelled_bs", "data.unlabelled_bs"], format!("planned: {batch_why}"));
    note(&mut comments, &["model.n_classes"], format!("the classes dataset.json's `labels` name ({})", req.n_classes));
    note(&mut comments, &["model.n_filters"], format!("planned: {filters_why}"));
    note(&mut comments, &["model.dropout_p"], "the recipe's Dropout3d probability".into());
    note(
        &mut comments,
        &["method.kind"],
        format!("{} (--method, or UA-MT when the dataset has unlabelled cases)", method_name(method)),
    );
    note(
        &mut comments,
        &[
            "method.mc_passes",
            "method.mc_repeats",
            "method.consistency",
            "method.consistency_rampup",
            "method.ema_decay",
        ],
        "the recipe's".into(),
    );
    note(&mut comments, &["method.consistency_interval", "optim.lr_step"], format!("planned: {sched_why}"));
    note(&mut comments, &["method.teacher_lag"], "0: the reference's order, exact".into());
    note(&mut comments, &["optim.iterations"], format!("planned: {iter_why}"));
    note(&mut comments, &["optim.base_lr", "optim.lr_gamma", "optim.seed"], "the recipe's".into());
    let queues =
        if cuda { "config/la-uamt.toml's, to keep a GPU fed" } else { "ops/la-cpu's: one loader beside the compute" };
    note(&mut comments, &["queues.batches", "queues.loader_workers"], queues.into());
    note(
        &mut comments,
        &["device.device"],
        format!("--device; planned with {} of memory ({})", gib(req.target.memory), req.target.memory_source),
    );
    note(&mut comments, &["device.precision"], "fp32, the reference's".into());
    note(&mut comments, &["checkpoint.dir", "eval.report_dir"], format!("this run's folders, under runs/{}", req.name));
    note(&mut comments, &["checkpoint.every"], "a twelfth of the run (LA: 500 of 6000)".into());
    note(&mut comments, &["checkpoint.keep"], "the newest three".into());
    note(&mut comments, &["eval.every", "eval.stride"], format!("planned: {eval_why}"));
    note(&mut comments, &["eval.patch"], "the training patch (the reference's window is its patch)".into());
    note(&mut comments, &["eval.batch_size"], "windows per forward pass (results do not depend on it)".into());
    note(&mut comments, &["telemetry.listen"], "the metrics endpoint (\"\" to switch it off)".into());
    note(
        &mut comments,
        &["telemetry.log_every"],
        "about a hundred log lines per run, at most every 50 iterations".into(),
    );
    note(&mut comments, &["telemetry.stall_after_s"], "/healthz reports a stall after this long without a step".into());

    Ok(Plan {
        config: cfg,
        decisions,
        notes,
        comments,
        voxel,
        median_shape: median,
        memory,
        usable,
        iteration,
        evaluation,
        evaluations,
        eval_windows,
        startup_s: req.startup_s,
        total_s,
    })
}

/// Records `why` as the comment of every key of `keys`.
fn note(comments: &mut BTreeMap<String, String>, keys: &[&str], why: String) {
    for k in keys {
        comments.insert(k.to_string(), why.clone());
    }
}

/// The method's name as the config spells it.
pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::Uamt => "uamt",
        Method::MeanTeacher => "mean_teacher",
        Method::Supervised => "supervised",
    }
}

/// The median foreground bounding box of the labelled training cases, mm per axis.
fn foreground_box(fp: &Fingerprint) -> Option<[f64; 3]> {
    let boxes: Vec<[f64; 3]> = fp
        .cases
        .iter()
        .filter(|c| c.split == Split::Labelled)
        .filter_map(|c| c.foreground.as_ref().map(|f| f.bbox_mm))
        .collect();
    if boxes.is_empty() {
        return None;
    }
    Some([0, 1, 2].map(|a| rules::median(boxes.iter().map(|b| b[a]).collect())))
}

impl Plan {
    /// The config file's text: a header saying what planned it, then every section with a comment
    /// on every value.
    pub fn file(&self, header: &[String]) -> Result<String> {
        let mut lines = header.to_vec();
        lines.extend(self.notes.iter().map(|n| format!("Note: {n}.")));
        file::write(&self.config, &self.comments, &lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fingerprint::{CaseFingerprint, Counts, Foreground, Intensity};

    fn case(id: usize, shape: [usize; 3], spacing: [f64; 3], split: Split) -> CaseFingerprint {
        let foreground = (split == Split::Labelled).then(|| Foreground {
            voxels: 1000,
            volume_ml: 1.0,
            bbox_start: [0; 3],
            bbox_end: shape.map(|s| s / 2),
            bbox_mm: [0, 1, 2].map(|a| (shape[a] / 2) as f64 * spacing[a]),
            intensity: Intensity {
                mean: 0.0,
                std: 1.0,
                min: -1.0,
                max: 1.0,
                median: 0.0,
                p00_5: -1.0,
                p99_5: 1.0,
                sampled_every: 1,
            },
        });
        CaseFingerprint {
            id: format!("c{id}"),
            split,
            shape,
            spacing,
            orientation: "RAS".into(),
            extent_mm: [0, 1, 2].map(|a| shape[a] as f64 * spacing[a]),
            has_label: split != Split::Unlabelled,
            foreground,
        }
    }

    /// LA's shapes: 16 labelled and 64 unlabelled training cases around the median
    /// 192x142.5x88 at 0.625 mm, 20 test cases.
    fn la() -> Fingerprint {
        let mut cases = Vec::new();
        for i in 0..80 {
            let split = if i < 16 { Split::Labelled } else { Split::Unlabelled };
            let x = [176, 192, 208][i % 3];
            cases.push(case(i, [x, if i % 2 == 0 { 142 } else { 143 }, 88], [0.625; 3], split));
        }
        cases.extend((0..20).map(|i| case(100 + i, [192, 144, 88], [0.625; 3], Split::Test)));
        fingerprint(cases)
    }

    fn fingerprint(cases: Vec<CaseFingerprint>) -> Fingerprint {
        let n = |s: Split| cases.iter().filter(|c| c.split == s).count();
        let counts = Counts {
            labelled: n(Split::Labelled),
            unlabelled: n(Split::Unlabelled),
            test: n(Split::Test),
            test_labelled: cases.iter().filter(|c| c.split == Split::Test && c.has_label).count(),
        };
        Fingerprint { version: 1, key: Vec::new(), counts, cases, classes: Vec::new(), foreground_intensity: None }
    }

    fn request(device: &str, gib: f64, hours: Option<f64>) -> Request {
        Request {
            dataset: PathBuf::from("data/la2018"),
            name: "la2018".into(),
            method: None,
            hours,
            target: Target {
                device: device.into(),
                memory: (gib * (1u64 << 30) as f64) as u64,
                memory_source: "--memory".into(),
                cores: 2,
            },
            n_classes: 2,
            resampled_to: None,
            startup_s: 5.0,
        }
    }

    /// Seconds per iteration: the CPU model's overhead plus `per_gflop` per GFLOP raised to
    /// `power` (1: what the model assumes); windows likewise. Counts its calls.
    struct Fake {
        per_gflop: f64,
        calls: usize,
        power: f64,
    }

    impl Fake {
        fn new(per_gflop: f64) -> Self {
            Fake { per_gflop, calls: 0, power: 1.0 }
        }
    }

    impl Measure for Fake {
        fn iteration(&mut self, cfg: &Config) -> Result<f64> {
            self.calls += 1;
            Ok(cost::CPU_OVERHEAD_S + (cost::iteration_flops(cfg) / 1e9).powf(self.power) * self.per_gflop)
        }
        fn window(&mut self, cfg: &Config) -> Result<f64> {
            Ok(cost::window_flops(cfg) / 1e9 * self.per_gflop)
        }
        fn how(&self) -> String {
            "fake".into()
        }
        fn how_window(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn la_on_a_large_card_takes_the_paper_s_network_and_the_median_case() {
        let plan = make(&la(), &request("cuda", 141.0, None), None).unwrap();
        let c = &plan.config;
        assert_eq!(plan.median_shape, [192.0, 142.5, 88.0]);
        assert_eq!(plan.voxel.spacing, [0.625; 3]);
        assert_eq!(plan.voxel.rule, VoxelRule::Uniform);
        assert_eq!(c.data.loader.patch, [192, 144, 96]);
        assert_eq!(c.model.n_filters, 16);
        assert_eq!((c.data.sampler.labelled_bs, c.data.sampler.unlabelled_bs), (2, 2));
        assert_eq!((c.optim.iterations, c.optim.lr_step, c.method.consistency_interval), (6000, 2500, 150));
        assert_eq!(c.method.mc_passes, 8);
        assert_eq!(c.eval.window.patch, c.data.loader.patch);
        assert_eq!(c.eval.window.stride, rules::reference_stride([192, 144, 96]));
        assert_eq!((c.eval.every, plan.evaluations), (1000, 6));
        assert!(plan.memory <= plan.usable);
        // Why it differs from the paper's 112x112x80 is said.
        let patch = plan.decisions.iter().find(|d| d.setting == "patch").unwrap();
        assert!(patch.why.contains("paper's 112x112x80"), "{}", patch.why);
        // The stated estimate: 98 min for the paper's shapes, more for the bigger patch.
        assert!(plan.iteration.seconds > 0.98 && plan.iteration.source.starts_with("estimated"));
    }

    #[test]
    fn the_patch_is_the_largest_that_fits_the_memory_in_multiples_of_16() {
        for gib in [4.0, 6.0, 9.0, 16.0] {
            let plan = make(&la(), &request("cuda", gib, None), None).unwrap();
            let c = &plan.config;
            let p = c.data.loader.patch;
            assert!(p.iter().all(|s| s % 16 == 0), "{p:?}");
            assert!((0..3).all(|a| p[a] <= [192, 144, 96][a]), "{p:?}");
            assert!(plan.memory <= plan.usable, "{gib} GiB: {}", gib_of(plan.memory));
            // The next larger patch of the sequence would not fit with these filters.
            let seq = rules::shrinking([192, 144, 96], plan.median_shape, rules::MIN_SIDE);
            let i = seq.iter().position(|&q| q == p).unwrap();
            if i > 0 {
                assert!(Footprint::of(&shaped(c, c.model.n_filters, seq[i - 1])).total() > plan.usable);
            }
        }
    }

    fn gib_of(b: u64) -> f64 {
        b as f64 / (1u64 << 30) as f64
    }

    #[test]
    fn fewer_filters_only_when_the_patch_would_fall_below_the_minimum_or_on_a_cpu() {
        let big = make(&la(), &request("cuda", 141.0, None), None).unwrap();
        assert_eq!(big.config.model.n_filters, 16);
        // A small card: 16 filters would need a patch below 64 per side, so 8 (or 4) instead,
        // with a patch of at least 64 per side.
        let small = make(&la(), &request("cuda", 3.0, None), None).unwrap();
        assert!(small.config.model.n_filters < 16, "{}", small.config.model.n_filters);
        assert!(small.config.data.loader.patch.iter().all(|&s| s >= 64));
        let with16 = shaped(&small.config, 16, [64, 64, 64]);
        assert!(Footprint::of(&with16).total() > small.usable);
        let cpu = make(&la(), &request("cpu", 24.0, None), None).unwrap();
        assert_eq!(cpu.config.model.n_filters, 4);
        // Nothing fits: refused, naming --memory.
        let err = make(&la(), &request("cuda", 0.5, None), None).unwrap_err().to_string();
        assert!(err.contains("--memory") && err.contains("16x16x16"), "{err}");
    }

    #[test]
    fn a_time_budget_sets_the_iterations_from_the_measured_time() {
        let mut fake = Fake::new(0.08);
        let plan = make(&la(), &request("cpu", 24.0, Some(0.5)), Some(&mut fake)).unwrap();
        let c = &plan.config;
        assert!(plan.iteration.source.starts_with("measured"));
        // Within the budget, opening and evaluations included.
        assert!(plan.total_s <= 0.5 * 3600.0, "{}", plan.total_s);
        assert!(c.optim.iterations as f64 * plan.iteration.seconds <= 0.9 * 1800.0 - 5.0);
        // The budget shrank the patch until 2000 iterations fit.
        assert!(c.optim.iterations >= MIN_ITERATIONS && c.optim.iterations <= 6000, "{}", c.optim.iterations);
        assert_eq!(c.optim.iterations % 60, 0);
        let (lr, ramp) = rules::scaled_schedule(c.optim.iterations);
        assert_eq!((c.optim.lr_step, c.method.consistency_interval), (lr, ramp));
        // The next larger patch would not have allowed 2000 iterations.
        let seq = rules::shrinking([192, 144, 96], plan.median_shape, rules::TIME_MIN_SIDE);
        let i = seq.iter().position(|&q| q == c.data.loader.patch).unwrap();
        assert!(i > 0);
        let bigger = fake.iteration(&shaped(c, 4, seq[i - 1])).unwrap();
        assert!((0.9 * 1800.0 - 5.0) / bigger < MIN_ITERATIONS as f64);
        // A generous budget: the recipe's 6000 at most, the memory's patch.
        let long = make(&la(), &request("cpu", 24.0, Some(1000.0)), Some(&mut Fake::new(0.08)));
        let long = long.unwrap();
        assert_eq!(long.config.optim.iterations, 6000);
        assert_eq!(long.config.data.loader.patch, [192, 144, 96]);
        // A budget too short for one iteration is refused, naming --hours.
        let err = make(&la(), &request("cpu", 24.0, Some(0.001)), None).unwrap_err().to_string();
        assert!(err.contains("--hours"), "{err}");
    }

    #[test]
    fn a_slow_machine_gets_fewer_iterations_and_says_so() {
        let mut slow = Fake::new(50.0);
        let plan = make(&la(), &request("cpu", 24.0, Some(0.5)), Some(&mut slow)).unwrap();
        assert!(plan.config.optim.iterations < MIN_ITERATIONS);
        assert_eq!(plan.config.data.loader.patch, [32, 32, 32]);
        assert!(plan.notes.iter().any(|n| n.contains("undertrained") && n.contains("smallest")), "{:?}", plan.notes);
        assert!(plan.total_s <= 1800.0);
        assert!(slow.calls <= MAX_MEASUREMENTS);
    }

    #[test]
    fn measurements_correct_a_model_that_scales_wrongly() {
        // Time grows faster than the arithmetic: the model's first pick is too big, the
        // measurements walk down to a patch that fits 2000 iterations, and never back up.
        for (power, per_gflop) in [(1.4, 0.04), (0.7, 0.05)] {
            let mut fake = Fake { per_gflop, calls: 0, power };
            let plan = make(&la(), &request("cpu", 24.0, Some(0.5)), Some(&mut fake)).unwrap();
            let c = &plan.config;
            let t = fake.iteration(&c.clone()).unwrap();
            assert_eq!(plan.iteration.seconds, t, "the plan uses the chosen patch's own measurement");
            assert!(c.optim.iterations as f64 * t <= 0.9 * 1800.0 - 5.0);
            assert!(c.optim.iterations >= MIN_ITERATIONS, "{power}: {} iterations", c.optim.iterations);
            assert!(fake.calls <= MAX_MEASUREMENTS + 1, "{}", fake.calls);
            // The uncalibrated model's first pick was wrong (too slow, or needlessly small), so it
            // took more than one timing (the test's own call is the last).
            assert!(fake.calls >= 3, "{power}: {} timings", fake.calls);
        }
    }

    #[test]
    fn anisotropic_cases_get_the_low_percentile_and_a_reimport_note() {
        let mut cases: Vec<_> = (0..9).map(|i| case(i, [320, 320, 20 + i], [0.7, 0.7, 5.0], Split::Labelled)).collect();
        cases.push(case(9, [320, 320, 30], [0.7, 0.7, 3.0], Split::Unlabelled));
        cases.push(case(10, [320, 320, 40], [0.7, 0.7, 2.5], Split::Unlabelled));
        let plan = make(&fingerprint(cases), &request("cuda", 24.0, None), None).unwrap();
        assert!(matches!(plan.voxel.rule, VoxelRule::Anisotropic { axis: 2, .. }));
        assert!((plan.voxel.spacing[2] - 3.0).abs() < 1e-9, "{:?}", plan.voxel.spacing);
        assert!(plan.notes.iter().any(|n| n.contains("--spacing 0.7,0.7,3")), "{:?}", plan.notes);
        // Shaped like the median case at 3 mm: long in-plane, short in z.
        let p = plan.config.data.loader.patch;
        assert!(p[0] > p[2] && p[1] > p[2], "{p:?}");
        assert!(p[2] <= rules::round_up(plan.median_shape[2]));
    }

    #[test]
    fn one_labelled_case_small_cases_and_no_test_labels_are_planned_and_said() {
        let mut cases = vec![case(0, [10, 12, 9], [1.0; 3], Split::Labelled)];
        cases.extend((1..4).map(|i| case(i, [11, 10, 8], [1.0; 3], Split::Unlabelled)));
        let mut t = case(9, [12, 12, 9], [1.0; 3], Split::Test);
        t.has_label = false;
        cases.push(t);
        let plan = make(&fingerprint(cases), &request("cpu", 24.0, None), None).unwrap();
        let c = &plan.config;
        assert_eq!(c.data.loader.patch, [16, 16, 16]);
        assert_eq!((c.data.sampler.labelled_bs, c.data.sampler.unlabelled_bs), (1, 2));
        assert!(plan.notes.iter().any(|n| n.contains("padded")), "{:?}", plan.notes);
        assert_eq!(c.eval.every, 0);
        assert!(plan.notes.iter().any(|n| n.contains("no test case has a label")), "{:?}", plan.notes);
        let batch = plan.decisions.iter().find(|d| d.setting == "method, batch").unwrap();
        assert!(batch.why.contains("1 labelled case"), "{}", batch.why);
    }

    #[test]
    fn the_method_follows_the_dataset_unless_asked_and_impossible_ones_are_refused() {
        let cases = vec![case(0, [64; 3], [1.0; 3], Split::Labelled), case(1, [64; 3], [1.0; 3], Split::Labelled)];
        let fp = fingerprint(cases);
        let plan = make(&fp, &request("cpu", 24.0, None), None).unwrap();
        assert_eq!(plan.config.method.kind, Method::Supervised);
        assert_eq!(plan.config.unlabelled_bs(), 0);
        let mut req = request("cpu", 24.0, None);
        req.method = Some(Method::Uamt);
        let err = make(&fp, &req, None).unwrap_err().to_string();
        assert!(err.contains("--method") && err.contains("no"), "{err}");
        let mut req = request("cpu", 24.0, None);
        req.method = Some(Method::MeanTeacher);
        assert!(make(&la(), &req, None).unwrap().config.method.kind == Method::MeanTeacher);
    }

    #[test]
    fn the_written_file_reads_back_as_planned_with_a_reason_on_every_key() {
        let plan = make(&la(), &request("cpu", 24.0, Some(0.5)), None).unwrap();
        let text = plan.file(&["header".to_string()]).unwrap();
        let back = Config::from_toml(&text, std::path::Path::new("planned.toml")).unwrap();
        assert_eq!(back, plan.config);
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains(" = ") && !l.starts_with('#') {
                assert!(lines[i - 1].starts_with("# "), "no comment above `{l}`");
            }
        }
        for key in file::keys(&plan.config) {
            assert!(plan.comments.contains_key(&key), "{key}");
        }
        // A key without a reason is a planner bug, reported as such.
        let mut bare = plan.comments.clone();
        bare.remove("data.patch");
        let err = file::write(&plan.config, &bare, &[]).unwrap_err().to_string();
        assert!(err.contains("data.patch"), "{err}");
    }
}
