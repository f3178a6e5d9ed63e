//! Data-parallel training on c10d, the engine of `torch.distributed`, through the C++ shim
//! (`src/shim/uamt_dist.cpp`): a TCPStore for the rendezvous and Gloo process groups from the
//! libtorch the binary already links.
//!
//! - [`Launch`]: who this process is, from torchrun's variables (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or the config's `[distributed]` section.
//! - [`World`]: the store and two process groups: one for the student's step (gradients, buffer
//!   broadcasts, the stop vote; always called from the student's thread, in the same order on
//!   every rank) and one for the teacher's checks (called from the teacher's thread), so that
//!   the two threads never interleave collectives on one group.
//! - [`GradSync`]: what DistributedDataParallel does around a step: the student's BatchNorm
//!   buffers broadcast from rank 0 before the forward pass (`broadcast_buffers`), gradients
//!   averaged over the ranks in buckets after the backward pass, and with the last bucket a vote
//!   that makes every rank stop after the same step when any of them was asked to.
//! - [`agree`]: the teacher's weights compared across ranks by checksum.
//!
//! Every collective waits at most `distributed.timeout_s`: a rank that dies ends the others'
//! next collective with an error (its sockets close), one that stalls with a timeout; either way
//! the error names the operation and the ranks, and the process exits non-zero instead of hanging.
//! So does the rendezvous ([`World::connect_or_stop`]), which also gives up as soon as the stop
//! switch (SIGTERM, SIGINT, SIGHUP) is set: its waits (resolving `MASTER_ADDR`, reaching rank 0's
//! store, the other ranks joining) are loops in Rust that look at the deadline and the switch
//! every [`POLL`], not libtorch's own retries, which keep their own schedule.

use crate::check;
use crate::model::ParamStore;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

extern "C" {
    fn uamt_last_error() -> *const c_char;
    fn uamt_dist_store(
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        connect_ms: i64,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn uamt_dist_store_add(store: *mut c_void, key: *const c_char, delta: i64, value: *mut i64) -> c_int;
    fn uamt_dist_store_free(store: *mut c_void);
    fn uamt_dist_group(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn uamt_dist_group_free(group: *mut c_void);
    fn uamt_dist_allreduce(group: *mut c_void, tensor: *mut c_void, op: c_int, timeout_ms: i64) -> c_int;
    fn uamt_dist_broadcast(group: *mut c_void, tensor: *mut c_void, root: c_int, timeout_ms: i64) -> c_int;
    fn uamt_dist_barrier(group: *mut c_void, timeout_ms: i64) -> c_int;
    fn uamt_dist_reducer_new(
        group: *mut c_void,
        params: *mut *mut c_void,
        n: c_int,
        bucket_bytes: i64,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    fn uamt_dist_reducer_arm(reducer: *mut c_void, vote: f32) -> c_int;
    fn uamt_dist_reducer_finish(reducer: *mut c_void, vote: *mut f32) -> c_int;
    fn uamt_dist_reducer_free(reducer: *mut c_void);
}

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

/// Reduction of [`Group::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Elementwise sum.
    Sum,
    /// Elementwise minimum.
    Min,
    /// Elementwise maximum.
    Max,
}

/// The last error of the shim, as text.
fn last_error() -> String {
    // SAFETY: the shim keeps a NUL-terminated thread-local message.
    let msg = unsafe { CStr::from_ptr(uamt_last_error()) }.to_string_lossy();
    let first = msg.lines().next().unwrap_or("").trim().to_string();
    if first.is_empty() {
        "unknown error".into()
    } else {
        first
    }
}

/// The rendezvous store (rank 0 serves it).
#[derive(Debug)]
struct Store(*mut c_void);

// SAFETY: c10d's TCPStore is safe to use from several threads; the handle is only freed on drop.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl Store {
    /// Adds `delta` to the counter `key` (0: reads it); the new value.
    fn add(&self, key: &str, delta: i64) -> std::result::Result<i64, String> {
        let key = CString::new(key).map_err(|_| "a key holds a NUL character".to_string())?;
        let mut value = 0i64;
        // SAFETY: a live store, a valid C string and out-pointer.
        let rc = unsafe { uamt_dist_store_add(self.0, key.as_ptr(), delta, &mut value) };
        if rc == 0 {
            Ok(value)
        } else {
            Err(last_error())
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: made by uamt_dist_store and freed once.
        unsafe { uamt_dist_store_free(self.0) }
    }
}

/// One Gloo process group of all ranks.
#[derive(Debug)]
pub struct Group {
    ptr: *mut c_void,
    /// What it is for, in messages.
    name: &'static str,
    rank: usize,
    world: usize,
    timeout_ms: i64,
    /// A collective failed: the group is not freed (Gloo's destructor could wait on a dead peer).
    failed: AtomicBool,
    /// Keeps the store alive as long as the group.
    _store: Arc<Store>,
}

// SAFETY: the Gloo process group is thread-safe; uamt issues each group's collectives from one
// thread at a time (see the module docs) and frees it only on drop.
unsafe impl Send for Group {}
// SAFETY: as above.
unsafe impl Sync for Group {}

impl Group {
    fn check(&self, what: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        self.failed.store(true, Ordering::SeqCst);
        Err(Error::Distributed(format!(
            "{what} on the {} group failed on rank {} of {} (another rank died, stalled longer than \
             distributed.timeout_s = {:.1} s, or disagrees): {}",
            self.name,
            self.rank,
            self.world,
            self.timeout_ms as f64 / 1000.0,
            last_error()
        )))
    }

    /// Reduces a contiguous CPU tensor in place over all ranks.
    pub fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<()> {
        let op = match op {
            Reduce::Sum => 0,
            Reduce::Min => 1,
            Reduce::Max => 2,
        };
        // SAFETY: `t` is a live tensor handle (at::Tensor*); the shim changes its data only.
        let rc = unsafe { uamt_dist_allreduce(self.ptr, t.as_ptr() as *mut c_void, op, self.timeout_ms) };
        self.check("all-reduce", rc)
    }

    /// Overwrites a contiguous tensor with rank `root`'s.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        // SAFETY: as in all_reduce.
        let rc = unsafe { uamt_dist_broadcast(self.ptr, t.as_ptr() as *mut c_void, root as c_int, self.timeout_ms) };
        self.check("broadcast", rc)
    }

    /// Waits until every rank is here.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        let rc = unsafe { uamt_dist_barrier(self.ptr, self.timeout_ms) };
        self.check("barrier", rc)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.failed.load(Ordering::SeqCst) {
            // SAFETY: made by uamt_dist_group and freed once.
            unsafe { uamt_dist_group_free(self.ptr) }
        }
    }
}

/// The ranks of one run, connected.
#[derive(Debug)]
pub struct World {
    /// Who this process is.
    pub launch: Launch,
    /// The student's collectives (gradients, buffers, stop vote, start state).
    pub step: Arc<Group>,
    /// The teacher's checks.
    pub checks: Arc<Group>,
    /// The settings.
    pub cfg: DistConfig,
}

impl World {
    /// Rendezvous at `launch.addr:launch.port` (rank 0 serves the store there) and builds the
    /// groups; fails with a message naming the address and `distributed.timeout_s` when the
    /// others do not come within the timeout.
    pub fn connect(launch: Launch, cfg: &DistConfig) -> Result<World> {
        World::connect_or_stop(launch, cfg, &AtomicBool::new(false))?
            .ok_or_else(|| Error::Distributed("the rendezvous was stopped".into()))
    }

    /// [`World::connect`] that gives up, with `Ok(None)`, as soon as `stop` is set (checked
    /// every [`POLL`] while it waits for `MASTER_ADDR` to resolve, for rank 0's store to accept
    /// a connection and for the other ranks to join). The whole rendezvous takes at most
    /// `distributed.timeout_s` and about a second more: a connection is only handed to libtorch
    /// (whose own retries keep their own schedule) once a plain connect has reached the store.
    pub fn connect_or_stop(launch: Launch, cfg: &DistConfig, stop: &AtomicBool) -> Result<Option<World>> {
        let timeout_ms = (cfg.timeout_s * 1000.0).round().max(1.0) as i64;
        let clock = Clock { end: Instant::now() + cfg.timeout(), stop };
        let failed = |why: &str| {
            Error::Distributed(format!(
                "rank {} of {}: the rendezvous at {}:{} failed within {:.1} s (distributed.timeout_s): {why}",
                launch.rank, launch.world, launch.addr, launch.port, cfg.timeout_s
            ))
        };
        let gave_up = |i: Interrupted| match i {
            Interrupted::Stopped => Ok(None),
            Interrupted::TimedOut(why) => Err(failed(&why)),
            Interrupted::Failed(e) => Err(e),
        };
        let addr =
            CString::new(launch.addr.clone()).map_err(|_| Error::invalid("MASTER_ADDR", "holds a NUL character"))?;
        let (rank, world) = (launch.rank as c_int, launch.world as c_int);
        let serve = launch.rank == 0 && !launch.agent_store;
        tracing::info!(rank = launch.rank, world = launch.world, master = %format!("{}:{}", launch.addr, launch.port), timeout_s = cfg.timeout_s, "rendezvous: waiting for the other ranks");
        // Rank 0's address must resolve; a client reaches the store with a plain connect first.
        let addrs = match clock.retry(Duration::from_secs(1), |c| resolve(&launch.addr, launch.port, c)) {
            Ok(a) => a,
            Err(i) => return gave_up(i),
        };
        if !serve {
            if let Err(i) = clock.retry(POLL * 4, |c| reach(&addrs, c)) {
                return gave_up(i);
            }
        }
        let connect_ms = clock.left().max(Duration::from_secs(1)).as_millis().min(i64::MAX as u128) as i64;
        let mut store = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer.
        let rc = unsafe {
            uamt_dist_store(
                addr.as_ptr(),
                launch.port as c_int,
                c_int::from(serve),
                world,
                connect_ms,
                timeout_ms,
                &mut store,
            )
        };
        if rc != 0 {
            return Err(failed(&last_error()));
        }
        let store = Arc::new(Store(store));
        // Every rank counts itself in and waits until all have (under torchrun each restart
        // counts under its own key).
        let joined = format!("uamt/attempt_{}/joined", launch.attempt);
        let failed_store = |e: String| failed(&format!("rank 0's store at {}:{}: {e}", launch.addr, launch.port));
        store.add(&joined, 1).map_err(failed_store)?;
        let all = clock.retry(POLL, |_| match store.add(&joined, 0) {
            Ok(n) if n >= launch.world as i64 => Try::Done(()),
            Ok(n) => Try::Later(format!("{n} of {} ranks came", launch.world)),
            Err(e) => Try::Fail(failed_store(e)),
        });
        if let Err(i) = all {
            return gave_up(i);
        }
        let group = |name: &'static str| -> Result<Arc<Group>> {
            let prefix = CString::new(format!("uamt/attempt_{}/{name}/", launch.attempt)).expect("no NUL");
            let mut ptr = std::ptr::null_mut();
            // SAFETY: a live store, valid C string and out-pointer.
            let rc = unsafe { uamt_dist_group(store.0, prefix.as_ptr(), rank, world, timeout_ms, &mut ptr) };
            if rc != 0 {
                return Err(Error::Distributed(format!(
                    "rank {} of {}: creating the Gloo {name} group failed: {}",
                    launch.rank,
                    launch.world,
                    last_error()
                )));
            }
            Ok(Arc::new(Group {
                ptr,
                name,
                rank: launch.rank,
                world: launch.world,
                timeout_ms,
                failed: AtomicBool::new(false),
                _store: store.clone(),
            }))
        };
        let step = group("step")?;
        let checks = group("checks")?;
        Ok(Some(World { launch, step, checks, cfg: cfg.clone() }))
    }
}

/// How often a waiting rendezvous looks at its deadline and at the stop switch.
pub const POLL: Duration = Duration::from_millis(50);
/// The longest single connection attempt to rank 0's store.
const PROBE: Duration = Duration::from_secs(1);

/// The clock of one rendezvous: it gives up at `end` (`distributed.timeout_s` after its start)
/// or as soon as `stop` is set.
struct Clock<'a> {
    end: Instant,
    stop: &'a AtomicBool,
}

/// One try of a step of the rendezvous.
enum Try<T> {
    /// Done.
    Done(T),
    /// Not yet, and why (for the message if the time runs out).
    Later(String),
    /// Failed for good: no use trying again.
    Fail(Error),
}

/// Why a step of the rendezvous did not finish.
#[derive(Debug)]
enum Interrupted {
    /// The stop switch was set.
    Stopped,
    /// The deadline passed; why the last try was not done.
    TimedOut(String),
    /// A try failed for good.
    Failed(Error),
}

impl Clock<'_> {
    /// The time to the deadline.
    fn left(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `d`, at most to the deadline, in slices of [`POLL`]; false when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let until = (Instant::now() + d).min(self.end);
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(POLL));
        }
    }

    /// Runs `step` until it is done or fails for good, the deadline passes or the stop switch
    /// is set, sleeping `pause` between tries (a try must itself end by the deadline).
    fn retry<T>(&self, pause: Duration, mut step: impl FnMut(&Self) -> Try<T>) -> Result<T, Interrupted> {
        loop {
            if self.stopped() {
                return Err(Interrupted::Stopped);
            }
            let why = match step(self) {
                Try::Done(v) => return Ok(v),
                Try::Fail(e) => return Err(Interrupted::Failed(e)),
                Try::Later(why) => why,
            };
            if !self.sleep(pause) {
                return Err(Interrupted::Stopped);
            }
            if self.left().is_zero() {
                return Err(Interrupted::TimedOut(why));
            }
        }
    }
}

/// `host:port`'s addresses. The name lookup cannot be interrupted, so it runs on a thread of
/// its own that is left behind when it outlasts the deadline or a stop.
fn resolve(host: &str, port: u16, clock: &Clock) -> Try<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel();
    let target = (host.to_string(), port);
    let looked_up = std::thread::Builder::new().name("resolve".into()).spawn(move || {
        let _ = tx.send(target.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    if let Err(e) = looked_up {
        return Try::Fail(Error::Distributed(format!("cannot start a thread to resolve {host}: {e}")));
    }
    loop {
        match rx.recv_timeout(POLL) {
            Ok(Ok(a)) if !a.is_empty() => return Try::Done(a),
            Ok(Ok(_)) => return Try::Later(format!("{host} resolves to no address")),
            Ok(Err(e)) => return Try::Later(format!("cannot resolve {host}: {e}")),
            Err(mpsc::RecvTimeoutError::Timeout) if clock.stopped() || clock.left().is_zero() => {
                return Try::Later(format!("resolving {host} did not finish"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Try::Later(format!("resolving {host} failed")),
        }
    }
}

/// A plain TCP connection to any of `addrs` (at most [`PROBE`] each, and not past the deadline),
/// closed at once.
fn reach(addrs: &[std::net::SocketAddr], clock: &Clock) -> Try<()> {
    let mut why = String::from("no time left to connect");
    for a in addrs {
        let wait = clock.left().min(PROBE);
        if wait.is_zero() {
            break;
        }
        match std::net::TcpStream::connect_timeout(a, wait) {
            Ok(_) => return Try::Done(()),
            Err(e) => why = format!("cannot connect to {a}: {e}"),
        }
    }
    Try::Later(why)
}

/// Packs `tensors` (each flattened, in order) into one new fp32 buffer on the host with `extra`
/// more elements at the end. One copy per tensor, whatever its device or kind: Gloo reduces host
/// memory (CUDA tensors are staged through it).
fn pack(tensors: &[Tensor], extra: i64) -> Result<Tensor> {
    let total: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    let flat = Tensor::f_empty([total + extra], (Kind::Float, tch::Device::Cpu))?;
    tch::no_grad(|| -> Result<()> {
        let mut at = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            flat.narrow(0, at, n).f_copy_(&t.detach().reshape([-1]))?;
            at += n;
        }
        Ok(())
    })?;
    Ok(flat)
}

/// Copies a packed buffer back into `tensors` (each keeps its shape, kind and device).
fn unpack(flat: &Tensor, tensors: &[Tensor]) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let mut at = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            t.shallow_clone().f_copy_(&flat.narrow(0, at, n).view(t.size().as_slice()))?;
            at += n;
        }
        Ok(())
    })
}

/// Broadcasts `tensors` from rank 0 in buckets of about `bucket_bytes`.
pub fn broadcast_all(group: &Group, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
    for bucket in buckets(tensors, bucket_bytes) {
        let part: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].shallow_clone()).collect();
        let flat = pack(&part, 0)?;
        group.broadcast(&flat, 0)?;
        unpack(&flat, &part)?;
    }
    Ok(())
}

/// Splits tensor indices into consecutive runs of at most about `bucket_bytes` (fp32) each;
/// a tensor larger than a bucket is a bucket of its own.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut size = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.numel() * 4;
        if out.is_empty() || (size + bytes > bucket_bytes && !out.last().is_some_and(|b| b.is_empty())) {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("pushed").push(i);
        size += bytes;
    }
    out
}

/// The student's side of a data-parallel step (see the module docs).
pub struct GradSync {
    group: Arc<Group>,
    bucket_bytes: usize,
    broadcast_buffers: bool,
    /// This rank's stop request (the daemon's stop switch).
    stop: Arc<AtomicBool>,
    /// Whether any rank asked to stop, as of the last step's vote.
    agreed_stop: bool,
    /// The all-reduce started during backward (see [`GradSync::overlapping`]).
    overlap: Option<Overlap>,
}

/// The shim's reducer: hooks on the parameters that launch each bucket's all-reduce as soon as
/// backward has produced its gradients.
struct Overlap {
    ptr: *mut c_void,
    /// Keeps the parameter handles (and their hooks' owner) alive.
    _params: Vec<Tensor>,
}

// SAFETY: the reducer is used by the thread that runs the step (and by libtorch's autograd on
// that thread's behalf); it guards its own state with a mutex.
unsafe impl Send for Overlap {}

impl Drop for Overlap {
    fn drop(&mut self) {
        // SAFETY: made by uamt_dist_reducer_new and freed once (its hooks removed).
        unsafe { uamt_dist_reducer_free(self.ptr) }
    }
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("rank", &self.group.rank)
            .field("world", &self.group.world)
            .field("bucket_bytes", &self.bucket_bytes)
            .field("agreed_stop", &self.agreed_stop)
            .finish()
    }
}

impl GradSync {
    /// The step's collectives on `world.step`; `stop` is this rank's stop switch, voted on with
    /// every step's last gradient bucket.
    pub fn new(world: &World, stop: Arc<AtomicBool>) -> Self {
        GradSync { stop, ..Self::on(world.step.clone(), world.cfg.bucket_mb, world.cfg.broadcast_buffers) }
    }

    /// Without a stop switch of its own (tests, library use).
    pub fn on(group: Arc<Group>, bucket_mb: f64, broadcast_buffers: bool) -> Self {
        GradSync {
            group,
            bucket_bytes: (bucket_mb * 1024.0 * 1024.0) as usize,
            broadcast_buffers,
            stop: Arc::new(AtomicBool::new(false)),
            agreed_stop: false,
            overlap: None,
        }
    }

    /// Starts each gradient bucket's all-reduce during the backward pass, as soon as its
    /// gradients are computed (hooks on `store`'s trainable tensors), instead of after it. The
    /// buckets then run in reverse parameter order; the means are the same.
    pub fn overlapping(mut self, store: &ParamStore) -> Result<Self> {
        let params: Vec<Tensor> = store.trainable().map(|p| p.tensor.shallow_clone()).collect();
        let mut ptrs: Vec<*mut c_void> = params.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut ptr = std::ptr::null_mut();
        let bytes = self.bucket_bytes.min(i64::MAX as usize) as i64;
        // SAFETY: live tensor handles and group; valid out-pointer.
        let rc = unsafe {
            uamt_dist_reducer_new(
                self.group.ptr,
                ptrs.as_mut_ptr(),
                ptrs.len() as c_int,
                bytes,
                self.group.timeout_ms,
                &mut ptr,
            )
        };
        self.group.check("setting up the gradient reducer", rc)?;
        self.overlap = Some(Overlap { ptr, _params: params });
        Ok(self)
    }

    /// Before the backward pass: arms the overlapping reducer with this rank's stop vote (a
    /// no-op without one).
    pub fn before_backward(&mut self) -> Result<()> {
        if let Some(o) = &self.overlap {
            let vote = if self.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 };
            // SAFETY: a live reducer.
            let rc = unsafe { uamt_dist_reducer_arm(o.ptr, vote) };
            self.group.check("arming the gradient reducer", rc)?;
        }
        Ok(())
    }

    /// Before the forward pass: rank 0's floating-point buffers (BatchNorm running statistics)
    /// on every rank, when `broadcast_buffers`.
    pub fn before_forward(&self, store: &ParamStore) -> Result<()> {
        if !self.broadcast_buffers {
            return Ok(());
        }
        let bufs: Vec<Tensor> =
            store.buffers().filter(|p| p.tensor.kind() != Kind::Int64).map(|p| p.tensor.shallow_clone()).collect();
        if bufs.is_empty() {
            return Ok(());
        }
        broadcast_all(&self.group, &bufs, usize::MAX)
    }

    /// After the backward pass: every trainable parameter's gradient replaced by the mean over
    /// the ranks (divided by the world size, then summed, as DistributedDataParallel does), and
    /// the stop vote taken.
    pub fn after_backward(&mut self, store: &ParamStore) -> Result<()> {
        if let Some(o) = &self.overlap {
            let mut vote = 0f32;
            // SAFETY: a live reducer, armed by before_backward.
            let rc = unsafe { uamt_dist_reducer_finish(o.ptr, &mut vote) };
            self.group.check("all-reduce of the gradients (started during backward)", rc)?;
            self.agreed_stop = vote > 0.0;
            return Ok(());
        }
        let world = self.group.world as f64;
        let grads: Vec<Tensor> = store
            .trainable()
            .map(|p| {
                let g = p.tensor.grad();
                // Every parameter of the V-Net gets a gradient; one without would contribute
                // zeros here (keeping the buckets alike on every rank) and keep no mean.
                if g.defined() {
                    g
                } else {
                    p.tensor.zeros_like()
                }
            })
            .collect();
        let plan = buckets(&grads, self.bucket_bytes);
        let last = plan.len().saturating_sub(1);
        let mut any_stop = false;
        for (b, bucket) in plan.iter().enumerate() {
            let part: Vec<Tensor> = bucket.iter().map(|&i| grads[i].shallow_clone()).collect();
            // The last bucket carries the stop vote in one more element.
            let vote = usize::from(b == last) as i64;
            let mut flat = pack(&part, vote)?;
            if b == last {
                let n = flat.size()[0];
                let _ = flat.get(n - 1).f_fill_(if self.stop.load(Ordering::SeqCst) { world } else { 0.0 })?;
            }
            let _ = flat.f_div_scalar_(world)?;
            self.group.all_reduce(&flat, Reduce::Sum)?;
            if b == last {
                any_stop = flat.double_value(&[flat.size()[0] - 1]) > 0.5;
            }
            unpack(&flat, &part)?;
        }
        self.agreed_stop = any_stop;
        Ok(())
    }

    /// Whether some rank asked to stop, as of the last step: every rank reads the same answer
    /// after the same step.
    pub fn agreed_stop(&self) -> bool {
        self.agreed_stop
    }

    /// The group.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }
}

/// The step calls the collectives through its hook ([`crate::train::GradientHook`]).
impl crate::train::GradientHook for GradSync {
    fn before_forward(&self, store: &ParamStore) -> Result<()> {
        GradSync::before_forward(self, store)
    }

    fn before_backward(&mut self) -> Result<()> {
        GradSync::before_backward(self)
    }

    fn after_backward(&mut self, store: &ParamStore) -> Result<()> {
        GradSync::after_backward(self, store)
    }

    fn agreed_stop(&self) -> bool {
        GradSync::agreed_stop(self)
    }
}

/// Compares `tensors` across the ranks: per tensor a float64 sum and sum of squares, reduced
/// by minimum and maximum; any difference is an error naming `what`, the step and the first
/// tensor that differs.
pub fn agree(group: &Group, what: &str, step: i64, named: &[(String, Tensor)]) -> Result<()> {
    // Per tensor its sum and sum of squares in float64, stacked on its device: one copy to
    // the host for all of them.
    let sums: Vec<f64> = tch::no_grad(|| -> Result<Vec<f64>> {
        let parts: Vec<Tensor> = named
            .iter()
            .flat_map(|(_, t)| {
                let d = t.detach().to_kind(Kind::Double);
                [d.sum(Kind::Double), (&d * &d).sum(Kind::Double)]
            })
            .map(|t| t.to_device(tch::Device::Cpu))
            .collect();
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(Vec::<f64>::try_from(&Tensor::f_stack(&parts, 0)?)?)
    })?;
    let lo = Tensor::from_slice(&sums);
    let hi = lo.copy();
    group.all_reduce(&lo, Reduce::Min)?;
    group.all_reduce(&hi, Reduce::Max)?;
    let (lo, hi): (Vec<f64>, Vec<f64>) = (Vec::try_from(&lo)?, Vec::try_from(&hi)?);
    for (k, (a, b)) in lo.iter().zip(&hi).enumerate() {
        // NaN never equals itself: a NaN anywhere is a disagreement too.
        if !(a == b) {
            let name = &named[k / 2].0;
            return Err(Error::Distributed(format!(
                "after step {step} the {what} differ between ranks at `{name}` (checksums from {a:e} to {b:e}); \
                 the ranks no longer train the same model"
            )));
        }
    }
    Ok(())
}

/// Makes every rank start from rank 0's state: the iteration, the student's and the teacher's
/// tensors (BatchNorm statistics included) and the momentum buffers. Rank 0 may have resumed
/// from a checkpoint the others never read (it need only be on rank 0's disk).
pub fn share_start(group: &Group, tr: &mut crate::train::Trainer) -> Result<()> {
    let it = Tensor::from_slice(&[tr.iter]);
    group.broadcast(&it, 0)?;
    tr.iter = it.int64_value(&[0]);
    let mut all: Vec<Tensor> = tr.student.store().iter().map(|p| p.tensor.shallow_clone()).collect();
    if let Some(t) = &tr.teacher {
        all.extend(t.store().iter().map(|p| p.tensor.shallow_clone()));
    }
    all.extend(tr.opt.buffers().iter().map(|(_, t)| t.shallow_clone()));
    // Integer buffers (BatchNorm's batch counters) travel as float32: exact below 2^24.
    broadcast_all(group, &all, 25 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn timeout(s: f64) -> DistConfig {
        DistConfig { timeout_s: s, ..DistConfig::default() }
    }

    /// Nobody at rank 0's port, or a name that does not resolve: the error comes at the timeout
    /// (not after libtorch's own retries), naming `distributed.timeout_s` and the cause.
    #[test]
    fn the_rendezvous_gives_up_at_the_timeout() {
        for (host, cause) in [("127.0.0.1", "cannot connect"), ("no-such-host.invalid", "resolve")] {
            let t0 = Instant::now();
            let e = World::connect(Launch::new(1, 2, host, free_port()), &timeout(1.5)).expect_err("connected");
            let took = t0.elapsed().as_secs_f64();
            let msg = e.to_string();
            assert!((1.4..3.0).contains(&took), "{host}: gave up after {took:.2} s: {msg}");
            assert!(msg.contains("distributed.timeout_s") && msg.contains(cause), "{host}: {msg}");
        }
    }

    /// The stop switch ends the rendezvous within a poll or two, whether the rank waits for rank
    /// 0's store (rank 1, nobody there) or for the other ranks (rank 0, serving the store).
    #[test]
    fn a_stop_ends_the_rendezvous_at_once() {
        for rank in [1, 0] {
            let stop = Arc::new(AtomicBool::new(false));
            let flip = stop.clone();
            let t0 = Instant::now();
            let flipper = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                flip.store(true, Ordering::SeqCst);
            });
            let w = World::connect_or_stop(Launch::new(rank, 2, "127.0.0.1", free_port()), &timeout(60.0), &stop);
            let took = t0.elapsed().as_secs_f64();
            flipper.join().unwrap();
            assert!(matches!(w, Ok(None)), "rank {rank}: {w:?}");
            assert!(took < 1.5, "rank {rank}: stopped after {took:.2} s");
        }
    }

    /// The clock's retries: done at once, given up at the deadline with the last reason, or
    /// stopped between tries.
    #[test]
    fn the_clock_retries_until_done_the_deadline_or_a_stop() {
        let stop = AtomicBool::new(false);
        let clock = Clock { end: Instant::now() + Duration::from_millis(300), stop: &stop };
        let mut n = 0;
        let done = clock.retry(POLL, |_| {
            n += 1;
            if n == 3 {
                Try::Done(n)
            } else {
                Try::Later("not yet".into())
            }
        });
        assert!(matches!(done, Ok(3)), "{done:?}");
        let t0 = Instant::now();
        let late = clock.retry(POLL, |_| Try::<()>::Later(format!("try {n}")));
        assert!(matches!(&late, Err(Interrupted::TimedOut(why)) if why == "try 3"), "{late:?}");
        assert!(t0.elapsed() < Duration::from_millis(400));
        stop.store(true, Ordering::SeqCst);
        let clock = Clock { end: Instant::now() + Duration::from_secs(60), stop: &stop };
        assert!(matches!(clock.retry(POLL, |_| Try::<()>::Later(String::new())), Err(Interrupted::Stopped)));
    }
}
