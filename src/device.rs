//! Where and how a run computes: the config file's `[device]` section ([`DeviceConfig`]): the
//! device asked for and its resolution against the hardware, precision, the schedule of the
//! stages, threads per stage and per Monte-Carlo pass, and the memory layout.

use crate::check::{self, limits};
use crate::gpu::Precision;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub use crate::cuda::{cuda_backend, cuda_device_count, driver_present};

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
    /// The teacher's passes of an iteration (the target pass and each Monte-Carlo forward) run
    /// this many at once, each on its own thread with `threads / pass_workers` intra-op threads;
    /// 0: automatic (on a CPU one pass per thread of the teacher's stage, each single-threaded:
    /// whole passes side by side use a few cores better than one small pass's kernels split
    /// across them). On a GPU one at a time, whatever it says. The logits do not depend on it
    /// beyond the thread count's rounding; the BatchNorm running statistics agree to float
    /// rounding.
    pub pass_workers: usize,
    /// Memory layout of the activations: `contiguous` (libtorch's default), `channels_last`
    /// (channels fastest, what oneDNN's fastest CPU convolutions want) or `auto` (channels-last
    /// on a CPU from 8 filters up, where it measured faster; contiguous below and on a GPU).
    pub layout: Layout,
    /// Processes of one data-parallel run on this host (torchrun's `LOCAL_WORLD_SIZE`; set by
    /// the daemon, not a key): automatic thread counts take this process's share of the cores.
    #[serde(skip)]
    pub processes_on_host: usize,
}

/// The activations' memory layout (`device.layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Channels-last where it pays (see [`DeviceConfig::channels_last`]).
    Auto,
    /// libtorch's default `[N, C, D, H, W]` strides.
    Contiguous,
    /// Channels fastest.
    ChannelsLast,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            device: "auto".into(),
            precision: Precision::Fp32,
            schedule: Schedule::Auto,
            threads: 0,
            pass_workers: 0,
            layout: Layout::Auto,
            streams: true,
            processes_on_host: 1,
        }
    }
}

/// What `device.device` asks for, read without asking the hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `cpu`.
    Cpu,
    /// `auto`: CUDA when available.
    Auto,
    /// `cuda` (GPU 0) or `cuda:N`.
    Cuda(usize),
}

impl DeviceRequest {
    /// Parses `cpu`, `auto`, `cuda` or `cuda:N`; the error names `key`.
    pub fn parse(key: &str, s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "auto" => Ok(DeviceRequest::Auto),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| Error::invalid(key, format!("`{s}` is not cpu, auto, cuda or cuda:N"))),
        }
    }

    /// The libtorch device on this machine: a GPU that is not there is refused (by `key`).
    pub fn resolve(self, key: &str) -> Result<tch::Device> {
        match self {
            DeviceRequest::Cpu => Ok(tch::Device::Cpu),
            DeviceRequest::Auto if !driver_present() => Ok(tch::Device::Cpu),
            DeviceRequest::Auto => Ok(if cuda_device_count() > 0 { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
            DeviceRequest::Cuda(n) => {
                let count = cuda_device_count();
                if n < count {
                    Ok(tch::Device::Cuda(n))
                } else {
                    Err(Error::invalid(
                        key,
                        format!("`cuda:{n}` asked for, but libtorch sees {count} CUDA device(s) (no driver or no GPU?); use \"auto\" to fall back to the CPU"),
                    ))
                }
            }
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
                let cores = (cores / self.processes_on_host.max(1)).max(1);
                if overlapping {
                    (cores / 2).max(1)
                } else {
                    cores
                }
            }
            (n, _) => n,
        }
    }

    /// How the teacher's stage runs its passes (see `pass_workers`), given whether it computes
    /// at the same time as the student (`overlapping`, as for [`DeviceConfig::stage_threads`]).
    pub fn pass_workers(&self, overlapping: bool) -> crate::train::PassWorkers {
        use crate::train::PassWorkers;
        let threads = self.stage_threads(overlapping);
        // On a GPU the passes stay on the stage's own thread and CUDA stream (a worker thread
        // would queue its kernels on the default stream, outside the stage's event ordering).
        let workers = match (self.pass_workers, self.resolve()) {
            (0, Ok(tch::Device::Cpu)) => threads,
            (w, Ok(tch::Device::Cpu)) => w,
            _ => 1,
        };
        if workers <= 1 {
            return PassWorkers::ONE;
        }
        PassWorkers { workers, threads: (threads / workers).max(1) }
    }

    /// Whether a network of `n_filters` on `device` runs channels-last (`layout`; `auto`: on a CPU from 8
    /// filters up: measured 10-20 % faster at 8 filters and 40 % slower at 4 on a 2-core AMD
    /// EPYC, see `benches/RESULTS.md`).
    pub fn channels_last(&self, n_filters: i64, device: tch::Device) -> bool {
        match self.layout {
            Layout::Contiguous => false,
            Layout::ChannelsLast => true,
            Layout::Auto => n_filters >= 8 && device == tch::Device::Cpu,
        }
    }

    /// Checks the values without asking the hardware; errors name the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        let wanted = DeviceRequest::parse(&k("device"), &self.device)?;
        if self.precision == Precision::Tf32 && wanted == DeviceRequest::Cpu {
            return Err(Error::invalid(
                k("precision"),
                "tf32 is a CUDA setting (tensor cores); on the CPU use fp32 or bf16",
            ));
        }
        check::range(&k("threads"), self.threads, 0, limits::THREADS)?;
        check::range(&k("pass_workers"), self.pass_workers, 0, limits::THREADS)
    }

    /// The libtorch device, at start-up: a GPU that this machine (or this libtorch) does not
    /// have is refused, naming `device.device`.
    pub fn resolve(&self) -> Result<tch::Device> {
        const KEY: &str = "device.device";
        DeviceRequest::parse(KEY, &self.device)?.resolve(KEY)
    }
}
