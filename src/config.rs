//! The daemon's configuration: one TOML file, every field defaulted and documented, unknown keys
//! rejected, values checked with an error that names the key.
//!
//! Each section is its component's own config (`[model]` is [`VNetConfig`], `[method]` and
//! `[optim]` are the training step's, `[data]` holds the [`LoaderConfig`] and [`SynthConfig`],
//! `[eval]` the sliding window's [`InferOptions`], `[rank]` the ranking's [`RankConfig`]); each validates itself and
//! [`Config::validate`] calls them in turn. Validation is static: nothing here asks the hardware;
//! [`DeviceConfig::resolve`] does, at start-up. The defaults are the recipe's full LA settings;
//! `Config::demo()` is the built-in demo.

use crate::check::{self, limits};
use crate::data::{LoaderConfig, SamplerConfig, SynthConfig};
pub use crate::device::{DeviceConfig, DeviceRequest, Layout, Schedule};
use crate::eval::InferOptions;
pub use crate::eval::RankConfig;
use crate::model::VNetConfig;
use crate::train::{Method, MethodConfig, OptimConfig, StepConfig};
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
    pub model: VNetConfig,
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
    /// Periodic ranking of the unlabelled training cases (which to label next).
    pub rank: RankConfig,
    /// Metrics endpoint and logging.
    pub telemetry: TelemetryConfig,
    /// Data-parallel training over several processes (used only when a world size is given).
    pub distributed: crate::dist::DistConfig,
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
    pub synth: SynthConfig,
    /// Patch size and augmentation (`patch`, `rot_flip`: keys of `[data]` itself).
    #[serde(flatten)]
    pub loader: LoaderConfig,
    /// Batch composition (`labelled_bs`, `unlabelled_bs`, `unlabelled_restart_each_epoch`: keys
    /// of `[data]` itself). Its seed is `optim.seed` and `unlabelled_bs` applies to uamt and
    /// mean_teacher only: see [`Config::loader`].
    #[serde(flatten)]
    pub sampler: SamplerConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: PathBuf::new(),
            synth_dir: PathBuf::from("runs/synth"),
            synth: SynthConfig::default(),
            loader: LoaderConfig::default(),
            sampler: SamplerConfig::default(),
        }
    }
}

impl DataConfig {
    /// Checks every value; errors name the key under `prefix` (`data.patch`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        self.loader.validate(prefix)?;
        self.sampler.validate(prefix)?;
        if self.dataset.as_os_str().is_empty() {
            self.synth.validate(&check::key(prefix, "synth"))?;
        }
        Ok(())
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
    /// Student parameters (the EMA's input) and snapshot requests waiting for the teacher.
    pub params: usize,
    /// Unused since the EMA runs on the teacher's thread; accepted (and ignored) so that config
    /// files and the configs stored in checkpoints of earlier versions still parse.
    #[serde(default, skip_serializing)]
    pub teacher_params: Option<usize>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { batches: 4, loader_workers: 2, teacher: 2, guidance: 2, params: 2, teacher_params: None }
    }
}

impl QueueConfig {
    /// Checks every capacity; errors name the key under `prefix` (`queues.batches`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        for (name, v) in
            [("batches", self.batches), ("teacher", self.teacher), ("guidance", self.guidance), ("params", self.params)]
        {
            check::range(&k(name), v, 1, limits::QUEUE)?;
        }
        check::range(&k("loader_workers"), self.loader_workers, 1, limits::LOADER_WORKERS)
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Folder of this run's checkpoints (not empty).
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

impl CheckpointConfig {
    /// Checks every value; errors name the key under `prefix` (`checkpoint.dir`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        if self.dir.as_os_str().is_empty() {
            return Err(Error::invalid(k("dir"), "must name a folder"));
        }
        check::range(&k("every"), self.every, 0, i64::MAX)?;
        check::range(&k("keep"), self.keep, 1, usize::MAX)
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
    /// The sliding window (`patch`, `stride`, `batch_size`, `largest_component`, keys of
    /// `[eval]` itself).
    #[serde(flatten)]
    pub window: InferOptions,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            watch_dir: PathBuf::new(),
            report_dir: PathBuf::from("runs/default/eval"),
            window: InferOptions::default(),
        }
    }
}

impl EvalConfig {
    /// Checks every value; errors name the key under `prefix` (`eval.stride`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        check::range(&check::key(prefix, "every"), self.every, 0, i64::MAX)?;
        self.window.validate(prefix)
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
    /// `GET /healthz` answers 503 when training has recorded no step for this many seconds (a
    /// stage that hangs); keep it above the slowest step times `readback_every`. The systemd
    /// watchdog is fed only while this check passes.
    pub stall_after_s: u64,
    /// A file holding the secret token that control requests (`POST /stop`, `POST /checkpoint`)
    /// must carry as `Authorization: Bearer <token>`. Empty: no token, and control requests are
    /// taken from loopback peers only. The file must be a regular file of at least 16 bytes that
    /// neither group nor others may access (mode 600, as ssh asks of its keys); only its path is
    /// stored (in checkpoints too), never the token.
    pub control_token_file: PathBuf,
    /// A file holding the token that the read-only endpoints (`/metrics`, `/healthz`, `/status`)
    /// then require (Prometheus: `authorization: credentials_file`); the control token is taken
    /// there too. Empty: reading is open to whoever reaches the port. Same rules as
    /// `control_token_file`.
    pub read_token_file: PathBuf,
    /// The server's certificate chain (PEM, the server's certificate first). With
    /// `tls_key_file`, the endpoint speaks HTTPS only. Empty: plain HTTP.
    pub tls_cert_file: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`'s certificate.
    pub tls_key_file: PathBuf,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: "127.0.0.1:9184".into(),
            log_every: 20,
            readback_every: 0,
            stall_after_s: 600,
            control_token_file: PathBuf::new(),
            read_token_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
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

    /// Checks every value; errors name the key under `prefix` (`telemetry.listen`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::invalid(
                k("listen"),
                format!("`{}` is not an address like 127.0.0.1:9184", self.listen),
            ));
        }
        check::range(&k("log_every"), self.log_every, 1, i64::MAX)?;
        check::range(&k("stall_after_s"), self.stall_after_s, 1, 7 * 24 * 3600)?;
        match (self.tls_cert_file.as_os_str().is_empty(), self.tls_key_file.as_os_str().is_empty()) {
            (false, true) => {
                return Err(Error::invalid(k("tls_key_file"), "tls_cert_file is set: give its private key too"))
            }
            (true, false) => {
                return Err(Error::invalid(k("tls_cert_file"), "tls_key_file is set: give its certificate too"))
            }
            _ => {}
        }
        check::range(&k("readback_every"), self.readback_every, 0, i64::MAX).map_err(|_| {
            Error::invalid(k("readback_every"), format!("must be >= 0 (0: automatic), got {}", self.readback_every))
        })
    }
}

impl Config {
    /// The built-in demo: synthetic data, 4 filters, 32x32x16 patches, CPU, a few minutes.
    pub fn demo() -> Self {
        let mut c = Config::default();
        c.data.synth_dir = PathBuf::from("runs/demo/synth");
        c.data.loader.patch = [32, 32, 16];
        c.model.n_filters = 4;
        c.optim.iterations = 300;
        c.method.consistency_interval = 5;
        c.device.device = "cpu".into();
        c.checkpoint.dir = PathBuf::from("runs/demo/checkpoints");
        c.checkpoint.every = 100;
        c.eval.every = 150;
        c.eval.report_dir = PathBuf::from("runs/demo/eval");
        c.eval.window.patch = [32, 32, 16];
        c.eval.window.stride = [8, 8, 4];
        c.telemetry.log_every = 20;
        c
    }

    /// Parses and validates TOML text; `origin` names the source in errors. Static: a config
    /// that names a GPU parses on a machine without one.
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
        let text = crate::fsutil::read_text(path)?;
        Self::from_toml(&text, path)
    }

    /// The config as TOML (stored in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Everything one training step needs: `[method]`, `[optim]` and `data.labelled_bs`.
    pub fn step_config(&self) -> StepConfig {
        StepConfig {
            method: self.method.clone(),
            optim: self.optim.clone(),
            labelled_bs: self.data.sampler.labelled_bs as i64,
        }
    }

    /// The patch loader's settings: `[data]`'s, seeded by `optim.seed`, with no unlabelled
    /// patches for supervised training.
    pub fn loader(&self) -> LoaderConfig {
        let sampler =
            SamplerConfig { seed: self.optim.seed, unlabelled_bs: self.unlabelled_bs(), ..self.data.sampler.clone() };
        LoaderConfig { sampler, ..self.data.loader.clone() }
    }

    /// [`Config::loader`] for rank `rank` of `world` data-parallel processes: each takes its
    /// slice of every global batch (see [`SamplerConfig::world`]).
    pub fn loader_for(&self, rank: usize, world: usize) -> LoaderConfig {
        let mut l = self.loader();
        l.sampler.rank = rank;
        l.sampler.world = world;
        l
    }

    /// Unlabelled patches per batch for the chosen method (0 when supervised).
    pub fn unlabelled_bs(&self) -> usize {
        if self.method.kind == Method::Supervised {
            0
        } else {
            self.data.sampler.unlabelled_bs
        }
    }

    /// Checks every value, section by section, then the rules that tie sections together;
    /// the error names the key (`section.field`). Asks no hardware.
    pub fn validate(&self) -> Result<()> {
        self.data.validate("data")?;
        self.model.validate("model")?;
        self.method.validate("method")?;
        self.optim.validate("optim")?;
        self.queues.validate("queues")?;
        self.device.validate("device")?;
        self.checkpoint.validate("checkpoint")?;
        self.eval.validate("eval")?;
        self.rank.validate("rank")?;
        self.telemetry.validate("telemetry")?;
        self.distributed.validate("distributed")?;
        self.validate_across()
    }

    /// The rules between sections.
    fn validate_across(&self) -> Result<()> {
        if self.model.n_channels != 1 {
            return Err(Error::invalid(
                "model.n_channels",
                format!("the data loader produces 1 channel, got {}", self.model.n_channels),
            ));
        }
        if self.method.kind != Method::Supervised && self.data.sampler.unlabelled_bs == 0 {
            return Err(Error::invalid("data.unlabelled_bs", "must be >= 1 for uamt and mean_teacher"));
        }
        // The teacher may run teacher_lag + 1 iterations ahead of the student; the queue that
        // closes the loop must hold that many items or the pipeline could wait on itself.
        let need = self.method.teacher_lag as usize + 1;
        if self.queues.params < need {
            return Err(Error::invalid(
                "queues.params",
                format!("must be >= method.teacher_lag + 1 = {need}, got {}", self.queues.params),
            ));
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
