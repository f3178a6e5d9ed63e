//! The daemon's configuration: one TOML file, every field defaulted and documented, unknown keys
//! rejected, ranges checked at start-up with an error that names the key.
//!
//! The defaults are the recipe's full LA settings; `Config::demo()` is the built-in demo.

use crate::model::{Normalization, VNetConfig};
use crate::train::{Method, StepConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the training data come from and how patches are cut.
    pub data: DataConfig,
    /// The network.
    pub model: ModelConfig,
    /// UA-MT, Mean Teacher or supervised, and their hyper-parameters.
    pub method: MethodConfig,
    /// Optimiser, schedule, length and seed.
    pub optim: OptimConfig,
    /// Capacities of the pipeline's bounded queues and the loader's worker count.
    pub queues: QueueConfig,
    /// Device, precision and threads.
    pub device: DeviceConfig,
    /// Where checkpoints go, how often, how many are kept.
    pub checkpoint: CheckpointConfig,
    /// Periodic and hot-reload evaluation.
    pub eval: EvalConfig,
    /// Metrics endpoint and logging.
    pub telemetry: TelemetryConfig,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset folder (`dataset.json` + NIfTI volumes). Empty: a synthetic dataset is generated
    /// into `synth_dir` on first use, as `[data.synth]` describes.
    pub dataset: PathBuf,
    /// Where the synthetic dataset lives when `dataset` is empty.
    pub synth_dir: PathBuf,
    /// The synthetic dataset's shape.
    pub synth: SynthSection,
    /// Patch size `[X, Y, Z]`; each side divisible by 16.
    pub patch: [usize; 3],
    /// Labelled patches at the head of each batch.
    pub labelled_bs: usize,
    /// Unlabelled patches after them (ignored for supervised training).
    pub unlabelled_bs: usize,
    /// Random rot90 + flip before the crop.
    pub rot_flip: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: PathBuf::new(),
            synth_dir: PathBuf::from("runs/synth"),
            synth: SynthSection::default(),
            patch: [112, 112, 80],
            labelled_bs: 2,
            unlabelled_bs: 2,
            rot_flip: true,
        }
    }
}

/// `[data.synth]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthSection {
    /// Training cases.
    pub cases: usize,
    /// Of which the first this many are labelled.
    pub labelled: usize,
    /// Test cases.
    pub test: usize,
    /// Volume size `[X, Y, Z]`.
    pub size: [usize; 3],
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SynthSection {
    fn default() -> Self {
        SynthSection { cases: 10, labelled: 2, test: 2, size: [48, 48, 32], seed: 7 }
    }
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Input channels.
    pub n_channels: i64,
    /// Output classes.
    pub n_classes: i64,
    /// Channels at the first level.
    pub n_filters: i64,
    /// `batchnorm` or `none`.
    pub normalization: Normalization,
    /// Dropout3d probability on x5 and x9 (0 disables dropout).
    pub dropout_p: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        let v = VNetConfig::default();
        ModelConfig {
            n_channels: v.n_channels,
            n_classes: v.n_classes,
            n_filters: v.n_filters,
            normalization: v.normalization,
            dropout_p: v.dropout_p,
        }
    }
}

impl ModelConfig {
    /// The network these settings describe.
    pub fn vnet(&self) -> VNetConfig {
        VNetConfig {
            n_channels: self.n_channels,
            n_classes: self.n_classes,
            n_filters: self.n_filters,
            normalization: self.normalization,
            has_dropout: self.dropout_p > 0.0,
            dropout_p: self.dropout_p,
        }
    }
}

/// `[method]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodConfig {
    /// `uamt`, `mean_teacher` or `supervised`.
    pub kind: Method,
    /// Monte-Carlo teacher passes T.
    pub mc_passes: i64,
    /// Copies of the unlabelled patches per teacher forward (2 in the reference).
    pub mc_repeats: i64,
    /// Batch the Monte-Carlo forwards into one, BatchNorm statistics still per original
    /// forward: the reference's numbers, fewer and larger kernels (default off).
    pub mc_batched: bool,
    /// Standard deviation of the teacher's input noise.
    pub noise_std: f64,
    /// Noise clamp.
    pub noise_clip: f64,
    /// Maximum consistency weight.
    pub consistency: f64,
    /// The consistency ramp counts in units of this many iterations.
    pub consistency_interval: i64,
    /// Length of the consistency ramp-up in those units.
    pub consistency_rampup: f64,
    /// EMA decay ceiling.
    pub ema_decay: f64,
    /// 0: the teacher of iteration i is the EMA after step i-1 (the reference, exact);
    /// 1: one step older, so its passes overlap the whole student step.
    pub teacher_lag: i64,
}

impl Default for MethodConfig {
    fn default() -> Self {
        let s = StepConfig::default();
        MethodConfig {
            kind: s.method,
            mc_passes: s.mc_passes,
            mc_repeats: s.mc_repeats,
            mc_batched: s.mc_batched,
            noise_std: s.noise_std,
            noise_clip: s.noise_clip,
            consistency: s.consistency,
            consistency_interval: s.consistency_interval,
            consistency_rampup: s.consistency_rampup,
            ema_decay: s.ema_decay,
            teacher_lag: 0,
        }
    }
}

/// `[optim]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Training iterations.
    pub iterations: i64,
    /// Initial learning rate.
    pub base_lr: f64,
    /// Learning-rate drop interval.
    pub lr_step: i64,
    /// Learning-rate drop factor.
    pub lr_gamma: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// Seed of initialisation, sampling, augmentation, noise and dropout.
    pub seed: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        let s = StepConfig::default();
        OptimConfig {
            iterations: s.max_iter,
            base_lr: s.base_lr,
            lr_step: s.lr_step,
            lr_gamma: s.lr_gamma,
            momentum: s.momentum,
            weight_decay: s.weight_decay,
            seed: 1337,
        }
    }
}

/// `[queues]`: a full queue blocks its producer (backpressure).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Batches prepared ahead by the loader workers (shared among them).
    pub batches: usize,
    /// Loader worker threads.
    pub loader_workers: usize,
    /// Teacher outputs waiting for the uncertainty/mask computer.
    pub teacher: usize,
    /// Guidance (target + mask) waiting for the student.
    pub guidance: usize,
    /// Student parameter snapshots waiting for the EMA updater.
    pub params: usize,
    /// Teacher weight versions waiting for the teacher sampler.
    pub teacher_params: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { batches: 4, loader_workers: 2, teacher: 2, guidance: 2, params: 2, teacher_params: 2 }
    }
}

/// Numeric precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// fp32 with libtorch's defaults, as the reference runs (cuDNN may use TF32 for
    /// convolutions on Ampere and newer; matmuls stay fp32).
    Fp32,
    /// TF32 tensor cores for cuDNN convolutions and cuBLAS matmuls (CUDA only).
    Tf32,
    /// bfloat16 autocast: convolutions in bf16, BatchNorm, softmax, the losses, the weights and
    /// the optimiser in fp32 (CUDA, where it pays; also runs on the CPU).
    Bf16,
}

/// How the training stages are scheduled (`device.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The pipeline where its overlap pays (a GPU, or a teacher lag), else the sequential loop.
    Auto,
    /// Every stage in line on one thread.
    Sequential,
    /// A thread per stage, bounded queues between them.
    Pipelined,
}

/// `[device]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    pub device: String,
    /// Precision: `fp32` (the reference's), `tf32` or `bf16`.
    pub precision: Precision,
    /// On CUDA, give each pipeline stage its own stream, so the teacher's passes overlap the
    /// student's step on the device (hand-offs wait on events). Off: every stage on libtorch's
    /// default stream.
    pub streams: bool,
    /// How the training stages run: `sequential` (one thread, in line), `pipelined` (a thread
    /// per stage, bounded queues between them) or `auto` (the pipeline on a GPU or with
    /// `method.teacher_lag >= 1`, the sequential loop on a CPU with `teacher_lag = 0`).
    pub schedule: Schedule,
    /// libtorch intra-op threads per pipeline stage; 0: automatic (on CPU every core when the
    /// stages take turns, as with `teacher_lag = 0`, half of them with a lag, when student and
    /// teacher compute at the same time; on a GPU libtorch's default). Oversubscribed OpenMP
    /// threads are very slow, so keep threads x busy stages <= cores.
    pub threads: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            device: "auto".into(),
            precision: Precision::Fp32,
            schedule: Schedule::Auto,
            threads: 0,
            streams: true,
        }
    }
}

impl DeviceConfig {
    /// The intra-op thread count each compute stage sets (0: leave libtorch's default). With
    /// `threads = 0` on the CPU: every core when the stages take turns (the sequential loop, the
    /// pipeline with `teacher_lag = 0`, where the student waits for the teacher's guidance and
    /// the teacher for the student's weights), half of them each when student and teacher run
    /// at the same time (`overlapping`: a lag >= 1), so that they do not fight over cores.
    pub fn stage_threads(&self, overlapping: bool) -> usize {
        match (self.threads, self.resolve()) {
            (0, Ok(tch::Device::Cpu)) => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                if overlapping {
                    (cores / 2).max(1)
                } else {
                    cores
                }
            }
            (n, _) => n,
        }
    }

    /// The libtorch device.
    pub fn resolve(&self) -> Result<tch::Device> {
        match self.device.as_str() {
            "cpu" => Ok(tch::Device::Cpu),
            "auto" => Ok(tch::Device::cuda_if_available()),
            "cuda" => Self::cuda(0),
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::invalid("device.device", format!("`{s}` is not cpu, auto, cuda or cuda:N")))
                .and_then(Self::cuda),
        }
    }

    /// GPU `n`, refused by name when this machine (or this libtorch) has no such device.
    fn cuda(n: usize) -> Result<tch::Device> {
        let count = tch::Cuda::device_count() as usize;
        if n < count {
            Ok(tch::Device::Cuda(n))
        } else {
            Err(Error::invalid(
                "device.device",
                format!("`cuda:{n}` asked for, but libtorch sees {count} CUDA device(s) (no driver or no GPU?); use \"auto\" to fall back to the CPU"),
            ))
        }
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Folder of this run's checkpoints.
    pub dir: PathBuf,
    /// Write one every this many iterations (0: only at the end and at shutdown).
    pub every: i64,
    /// Keep this many of the newest (at least 1).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { dir: PathBuf::from("runs/default/checkpoints"), every: 500, keep: 3 }
    }
}

/// `[eval]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate the student on the test split every this many iterations (0: never).
    pub every: i64,
    /// A folder watched for checkpoints to evaluate (empty: none).
    pub watch_dir: PathBuf,
    /// Where reports go.
    pub report_dir: PathBuf,
    /// Sliding-window patch.
    pub patch: [usize; 3],
    /// Sliding-window strides `[x, y, z]`.
    pub stride: [usize; 3],
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            watch_dir: PathBuf::new(),
            report_dir: PathBuf::from("runs/default/eval"),
            patch: [112, 112, 80],
            stride: [18, 18, 4],
        }
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the Prometheus endpoint (`/metrics`); port 0 picks a free one; empty disables.
    pub listen: String,
    /// Log a progress line every this many iterations.
    pub log_every: i64,
    /// Read the step's losses and mask fraction back to the host (for metrics and logs) every
    /// this many iterations, all in one copy: each read waits for the device, so on a GPU
    /// reading every step would stall the student's queue. 0: automatic (every step on the
    /// CPU, where reading costs nothing; every 10 on CUDA).
    pub readback_every: i64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { listen: "127.0.0.1:9184".into(), log_every: 20, readback_every: 0 }
    }
}

impl TelemetryConfig {
    /// Iterations between read-backs on `device` (see `readback_every`).
    pub fn readback_interval(&self, device: tch::Device) -> i64 {
        match self.readback_every {
            0 if device.is_cuda() => 10,
            0 => 1,
            n => n,
        }
    }
}

impl Config {
    /// The built-in demo: synthetic data, 4 filters, 32x32x16 patches, CPU, a few minutes.
    pub fn demo() -> Self {
        let mut c = Config::default();
        c.data.synth_dir = PathBuf::from("runs/demo/synth");
        c.data.patch = [32, 32, 16];
        c.model.n_filters = 4;
        c.optim.iterations = 300;
        c.method.consistency_interval = 5;
        c.device.device = "cpu".into();
        c.checkpoint.dir = PathBuf::from("runs/demo/checkpoints");
        c.checkpoint.every = 100;
        c.eval.every = 150;
        c.eval.report_dir = PathBuf::from("runs/demo/eval");
        c.eval.patch = [32, 32, 16];
        c.eval.stride = [8, 8, 4];
        c.telemetry.log_every = 20;
        c
    }

    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let c: Config = toml::from_str(text).map_err(|e| Error::File {
            path: origin.to_path_buf(),
            why: format!("invalid config: {}", e.message().trim()).replace('\n', " ") + &span_hint(text, e.span()),
        })?;
        c.validate().map_err(|e| Error::File { path: origin.to_path_buf(), why: e.to_string() })?;
        Ok(c)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, path)
    }

    /// The config as TOML (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Hyper-parameters of one training step.
    pub fn step_config(&self) -> StepConfig {
        let m = &self.method;
        StepConfig {
            method: m.kind,
            labelled_bs: self.data.labelled_bs as i64,
            mc_passes: m.mc_passes,
            mc_repeats: m.mc_repeats,
            mc_batched: m.mc_batched,
            noise_std: m.noise_std,
            noise_clip: m.noise_clip,
            consistency: m.consistency,
            consistency_interval: m.consistency_interval,
            consistency_rampup: m.consistency_rampup,
            max_iter: self.optim.iterations,
            ema_decay: m.ema_decay,
            base_lr: self.optim.base_lr,
            lr_step: self.optim.lr_step,
            lr_gamma: self.optim.lr_gamma,
            momentum: self.optim.momentum,
            weight_decay: self.optim.weight_decay,
        }
    }

    /// Unlabelled patches per batch for the chosen method (0 when supervised).
    pub fn unlabelled_bs(&self) -> usize {
        if self.method.kind == Method::Supervised {
            0
        } else {
            self.data.unlabelled_bs
        }
    }

    /// Checks every range; the error names the key (`section.field`).
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: String| Err(Error::invalid(k, why));
        if let Some(s) = self.data.patch.iter().find(|s| **s == 0 || **s % 16 != 0) {
            return bad(
                "data.patch",
                format!("every side must be a positive multiple of 16, got {s} in {:?}", self.data.patch),
            );
        }
        if self.data.labelled_bs == 0 {
            return bad("data.labelled_bs", "must be >= 1".into());
        }
        if self.method.kind != Method::Supervised && self.data.unlabelled_bs == 0 {
            return bad("data.unlabelled_bs", "must be >= 1 for uamt and mean_teacher".into());
        }
        let s = &self.data.synth;
        if self.data.dataset.as_os_str().is_empty()
            && (s.cases == 0 || s.labelled == 0 || s.labelled > s.cases || s.size.contains(&0))
        {
            return bad("data.synth", format!("need cases >= labelled >= 1 and a non-empty size, got {s:?}"));
        }
        if self.model.n_channels != 1 {
            return bad(
                "model.n_channels",
                format!("the data loader produces 1 channel, got {}", self.model.n_channels),
            );
        }
        if self.model.n_classes < 2 {
            return bad("model.n_classes", format!("must be >= 2, got {}", self.model.n_classes));
        }
        if self.model.n_filters < 1 {
            return bad("model.n_filters", format!("must be >= 1, got {}", self.model.n_filters));
        }
        if !(0.0..1.0).contains(&self.model.dropout_p) {
            return bad("model.dropout_p", format!("must be in [0, 1), got {}", self.model.dropout_p));
        }
        let m = &self.method;
        if m.kind == Method::Uamt && (m.mc_passes < 1 || m.mc_repeats < 1 || m.mc_passes % m.mc_repeats != 0) {
            return bad(
                "method.mc_passes",
                format!("must be a positive multiple of method.mc_repeats ({}), got {}", m.mc_repeats, m.mc_passes),
            );
        }
        if m.noise_std < 0.0 || m.noise_clip < 0.0 {
            return bad("method.noise_std", "noise_std and noise_clip must be >= 0".into());
        }
        if m.consistency < 0.0 || m.consistency_rampup < 0.0 {
            return bad("method.consistency", "consistency and consistency_rampup must be >= 0".into());
        }
        if m.consistency_interval < 1 {
            return bad("method.consistency_interval", format!("must be >= 1, got {}", m.consistency_interval));
        }
        if !(0.0..=1.0).contains(&m.ema_decay) {
            return bad("method.ema_decay", format!("must be in [0, 1], got {}", m.ema_decay));
        }
        if !(0..=4).contains(&m.teacher_lag) {
            return bad("method.teacher_lag", format!("must be in 0..=4, got {}", m.teacher_lag));
        }
        let o = &self.optim;
        if o.iterations < 1 {
            return bad("optim.iterations", format!("must be >= 1, got {}", o.iterations));
        }
        if !(o.base_lr > 0.0 && o.base_lr.is_finite()) {
            return bad("optim.base_lr", format!("must be a positive number, got {}", o.base_lr));
        }
        if o.momentum < 0.0 || o.weight_decay < 0.0 || o.lr_gamma <= 0.0 {
            return bad("optim.momentum", "momentum and weight_decay must be >= 0, lr_gamma > 0".into());
        }
        let q = &self.queues;
        for (k, v) in [
            ("queues.batches", q.batches),
            ("queues.loader_workers", q.loader_workers),
            ("queues.teacher", q.teacher),
            ("queues.guidance", q.guidance),
        ] {
            if v == 0 {
                return bad(k, "must be >= 1".into());
            }
        }
        // The teacher may run teacher_lag + 1 iterations ahead of the student; the two queues that
        // close the loop must hold that many items or the pipeline could wait on itself.
        let need = m.teacher_lag as usize + 1;
        for (k, v) in [("queues.params", q.params), ("queues.teacher_params", q.teacher_params)] {
            if v < need {
                return bad(k, format!("must be >= method.teacher_lag + 1 = {need}, got {v}"));
            }
        }
        if q.loader_workers > 64 {
            return bad("queues.loader_workers", format!("at most 64, got {}", q.loader_workers));
        }
        self.device.resolve()?;
        if self.device.precision == Precision::Tf32 && self.device.device == "cpu" {
            return bad(
                "device.precision",
                "tf32 is a CUDA setting (tensor cores); on the CPU use fp32 or bf16".into(),
            );
        }
        if self.device.threads > 256 {
            return bad("device.threads", format!("at most 256, got {}", self.device.threads));
        }
        if self.checkpoint.keep == 0 {
            return bad("checkpoint.keep", "must be >= 1".into());
        }
        if self.checkpoint.every < 0 || self.eval.every < 0 {
            return bad("checkpoint.every", "checkpoint.every and eval.every must be >= 0".into());
        }
        if self.eval.stride.contains(&0) || self.eval.patch.iter().any(|s| *s == 0 || s % 16 != 0) {
            return bad("eval.stride", "eval.stride must be positive and eval.patch multiples of 16".into());
        }
        if !self.telemetry.listen.is_empty() && self.telemetry.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "telemetry.listen",
                format!("`{}` is not an address like 127.0.0.1:9184", self.telemetry.listen),
            );
        }
        if self.telemetry.readback_every < 0 {
            return bad(
                "telemetry.readback_every",
                format!("must be >= 0 (0: automatic), got {}", self.telemetry.readback_every),
            );
        }
        if self.telemetry.log_every < 1 {
            return bad("telemetry.log_every", "must be >= 1".into());
        }
        Ok(())
    }
}

/// " (line L)" for a byte span of `text`, to point at the bad key.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(r) = span else { return String::new() };
    let start = r.start.min(text.len());
    let line_no = text[..start].lines().count().max(1);
    // Name the key too (`table.key`), when the error points into a `key = value` line.
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key =
        line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = text[..line_start].lines().rev().find_map(|l| {
        l.trim().strip_prefix('[').and_then(|l| l.split(']').next()).map(|t| t.trim_matches('[').trim().to_string())
    });
    match (key, table) {
        (Some(k), Some(t)) => format!(" (`{t}.{k}`, line {line_no})"),
        (Some(k), None) => format!(" (`{k}`, line {line_no})"),
        _ => format!(" (line {line_no})"),
    }
}
