//! The c10d objects through the shim: the TCPStore, the Gloo groups and their collectives, and
//! the rendezvous that bounds every wait by the timeout and the stop switch.

use super::launch::{DistConfig, Launch};
use crate::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

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
    pub(super) fn uamt_dist_reducer_new(
        group: *mut c_void,
        params: *mut *mut c_void,
        n: c_int,
        bucket_bytes: i64,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> c_int;
    pub(super) fn uamt_dist_reducer_arm(reducer: *mut c_void, vote: f32) -> c_int;
    pub(super) fn uamt_dist_reducer_finish(reducer: *mut c_void, vote: *mut f32) -> c_int;
    pub(super) fn uamt_dist_reducer_free(reducer: *mut c_void);
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
    pub(super) ptr: *mut c_void,
    /// What it is for, in messages.
    name: &'static str,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) timeout_ms: i64,
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
    pub(super) fn check(&self, what: &str, rc: c_int) -> Result<()> {
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
