//! Who this process is in a data-parallel run: the `[distributed]` section and torchrun's variables.

use crate::check;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The most ranks a run may have (a sanity bound on `WORLD_SIZE`).
pub const MAX_WORLD: usize = 4096;

/// The collective library (`distributed.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Gloo, inside libtorch_cpu: CPU tensors over TCP. (NCCL is not built into this version.)
    Gloo,
}

/// `[distributed]`: how ranks find each other and how they agree. The launch keys are read
/// only where torchrun's variables are absent (the variables win, as in PyTorch).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// The collective library.
    pub backend: Backend,
    /// Longest wait of any collective and of the rendezvous, in seconds: a rank that dies or
    /// stalls ends the job on every rank with an error within about this long.
    pub timeout_s: f64,
    /// Compare the teacher's weights across ranks every this many steps (0: never).
    pub check_every: i64,
    /// Gradient bucket size in MiB (one all-reduce per bucket).
    pub bucket_mb: f64,
    /// Broadcast rank 0's BatchNorm running statistics before every student forward pass, as
    /// DistributedDataParallel's `broadcast_buffers` does.
    pub broadcast_buffers: bool,
    /// Start each gradient bucket's all-reduce during the backward pass, as soon as its
    /// gradients are computed (as DistributedDataParallel does), instead of after it. The same
    /// means bit for bit; whether it is faster depends on the share of the step the all-reduce
    /// takes (see README).
    pub overlap: bool,
    /// This process's rank when `RANK` is not set.
    pub rank: Option<usize>,
    /// The number of processes when `WORLD_SIZE` is not set.
    pub world_size: Option<usize>,
    /// This process's index on its host when `LOCAL_RANK` is not set (default: the rank).
    pub local_rank: Option<usize>,
    /// Rank 0's address when `MASTER_ADDR` is not set.
    pub master_addr: Option<String>,
    /// Rank 0's store port when `MASTER_PORT` is not set.
    pub master_port: Option<u16>,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: Backend::Gloo,
            timeout_s: 300.0,
            check_every: 100,
            bucket_mb: 25.0,
            broadcast_buffers: true,
            overlap: false,
            rank: None,
            world_size: None,
            local_rank: None,
            master_addr: None,
            master_port: None,
        }
    }
}

impl DistConfig {
    /// Checks the values; errors name the key under `prefix` (`distributed.timeout_s`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::within(&k("timeout_s"), self.timeout_s, 0.1, 86_400.0)?;
        check::range(&k("check_every"), self.check_every, 0, i64::MAX)?;
        check::within(&k("bucket_mb"), self.bucket_mb, 0.001, 4096.0)?;
        if let Some(w) = self.world_size {
            check::range(&k("world_size"), w, 1, MAX_WORLD)?;
        }
        if let (Some(r), Some(w)) = (self.rank, self.world_size) {
            if r >= w {
                return Err(Error::invalid(k("rank"), format!("{r} is not below world_size {w}")));
            }
        }
        if self.master_port == Some(0) {
            return Err(Error::invalid(k("master_port"), "0 is not a port rank 0 can be reached on"));
        }
        Ok(())
    }

    /// The collective timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }
}

/// Who this process is in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// 0 .. world.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
    /// The index among the processes on this host (offsets the metrics port).
    pub local_rank: usize,
    /// The processes of this run on this host (`LOCAL_WORLD_SIZE`, which torchrun and
    /// ops/dist-local set), when known.
    pub local_world: Option<usize>,
    /// Rank 0's host, where the store listens.
    pub addr: String,
    /// The store's port.
    pub port: u16,
    /// torchrun's agent already serves the store at `addr:port` (`TORCHELASTIC_USE_AGENT_STORE`):
    /// every rank, rank 0 too, is its client.
    pub agent_store: bool,
    /// torchrun's restart count (`TORCHELASTIC_RESTART_COUNT`): the keys of each attempt are
    /// kept apart, so a restarted job never reads an earlier attempt's.
    pub attempt: u64,
}

impl Launch {
    /// Reads torchrun's variables through `env` (the process environment in the daemon),
    /// falling back to `cfg`. `None` for a single process (no world size, or 1). Errors name
    /// the variable or key and the value.
    pub fn resolve(cfg: &DistConfig, env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        fn num<T: std::str::FromStr>(var: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::invalid(var, format!("{v:?} is not a non-negative integer of its range")))
        }
        let from = |var: &str, key: Option<usize>| -> Result<Option<(usize, String)>> {
            match env(var) {
                Some(v) if !v.trim().is_empty() => Ok(Some((num(var, &v)?, var.to_string()))),
                _ => Ok(key.map(|k| (k, format!("distributed.{}", var.to_lowercase())))),
            }
        };
        let world = from("WORLD_SIZE", cfg.world_size)?;
        let Some((world, world_src)) = world else { return Ok(None) };
        if world == 0 || world > MAX_WORLD {
            return Err(Error::invalid(world_src, format!("{world} is not between 1 and {MAX_WORLD}")));
        }
        if world == 1 {
            return Ok(None);
        }
        let (rank, rank_src) = from("RANK", cfg.rank)?.ok_or_else(|| {
            Error::invalid(
                "RANK",
                format!("WORLD_SIZE is {world} but this process's rank is not given (RANK or distributed.rank)"),
            )
        })?;
        if rank >= world {
            return Err(Error::invalid(rank_src, format!("{rank} is not below the world size {world}")));
        }
        let local_rank = from("LOCAL_RANK", cfg.local_rank)?.map_or(rank, |(l, _)| l);
        let addr = match env("MASTER_ADDR").filter(|v| !v.trim().is_empty()) {
            Some(a) => a.trim().to_string(),
            None => cfg.master_addr.clone().filter(|a| !a.is_empty()).ok_or_else(|| {
                Error::invalid(
                    "MASTER_ADDR",
                    "not set: rank 0's host is needed (MASTER_ADDR or distributed.master_addr)",
                )
            })?,
        };
        let port = match env("MASTER_PORT").filter(|v| !v.trim().is_empty()) {
            Some(p) => num::<u16>("MASTER_PORT", &p)?,
            None => cfg.master_port.ok_or_else(|| {
                Error::invalid(
                    "MASTER_PORT",
                    "not set: rank 0's store port is needed (MASTER_PORT or distributed.master_port)",
                )
            })?,
        };
        if port == 0 {
            return Err(Error::invalid("MASTER_PORT", "0 is not a port rank 0 can be reached on"));
        }
        let agent_store = env("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let attempt = match env("TORCHELASTIC_RESTART_COUNT").filter(|v| !v.trim().is_empty()) {
            Some(v) => num::<u64>("TORCHELASTIC_RESTART_COUNT", &v)?,
            None => 0,
        };
        let local_world = match env("LOCAL_WORLD_SIZE").filter(|v| !v.trim().is_empty()) {
            Some(v) => Some(num::<usize>("LOCAL_WORLD_SIZE", &v)?.clamp(1, world)),
            None => None,
        };
        Ok(Some(Launch { rank, world, local_rank, local_world, addr, port, agent_store, attempt }))
    }

    /// Rank `rank` of `world` on one host (local rank = rank), the store served by rank 0.
    pub fn new(rank: usize, world: usize, addr: &str, port: u16) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            local_world: None,
            addr: addr.to_string(),
            port,
            agent_store: false,
            attempt: 0,
        }
    }

    /// Whether this process writes checkpoints and evaluates.
    pub fn is_first(&self) -> bool {
        self.rank == 0
    }

    /// The seed of this rank's step randomness (noise, dropout): the run's seed mixed with the
    /// rank, so ranks draw independently and any rank's draws can be recomputed.
    pub fn draw_seed(&self, seed: u64) -> u64 {
        crate::rng::key(seed, &[crate::rng::stream::RANK, self.rank as u64])
    }
}

/// How many processes share the cores this process sees, given `local_world` ranks on the host:
/// all of them, unless a launcher pinned this process to fewer cores than the host has online
/// (then those few are its own share, and 1).
pub fn sharing_cores(local_world: usize) -> usize {
    let seen = std::thread::available_parallelism().map_or(1, |c| c.get());
    // SAFETY: a plain query of the C library.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if seen < online {
        1
    } else {
        local_world.clamp(1, MAX_WORLD)
    }
}
