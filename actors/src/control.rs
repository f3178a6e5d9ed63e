//! The run's control requests, shared by the training threads, the signal handlers and the HTTP
//! control plane ([`crate::http`]): [`Controls`] carries requests in (stop, checkpoint). What
//! goes out (the status board, queue depths) is [`crate::status`]'s.
//!
//! Nothing here holds a lock across I/O: every method copies numbers in or out under a short lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Locks `m`, taking the data even if a panicking thread poisoned it: every value guarded here
/// is a plain record that stays consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`Controls`] shares between its clones.
#[derive(Default)]
struct ControlState {
    /// Finish the current step, write a checkpoint, stop. Read on every step, so an atomic.
    stop: Arc<AtomicBool>,
    /// Write a checkpoint after the current step; taken (reset) by whoever writes it.
    checkpoint: Arc<AtomicBool>,
    /// Why the run was asked to stop (the first reason wins), guarded for [`Controls::wait_for_stop`].
    reason: Mutex<Option<&'static str>>,
    /// Wakes the threads blocked in [`Controls::wait_for_stop`].
    stopped: Condvar,
}

/// Lifecycle requests for the run: a cheap, cloneable handle. Signals and `POST /stop`,
/// `POST /checkpoint` write into it; the training loop reads it once per step; a service thread
/// can block on [`Controls::wait_for_stop`] instead of polling.
#[derive(Clone, Default)]
pub struct Controls {
    /// The shared switches.
    inner: Arc<ControlState>,
}

impl Controls {
    /// Fresh controls: nothing requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to finish its current step, write a checkpoint and stop. `reason` names who
    /// asked (`"SIGTERM"`, `"http"`); the first reason is kept. Wakes every waiter.
    pub fn request_stop(&self, reason: &'static str) {
        let mut r = lock(&self.inner.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        drop(r);
        self.inner.stopped.notify_all();
    }

    /// Asks for a checkpoint after the current step (the run goes on).
    pub fn request_checkpoint(&self) {
        self.inner.checkpoint.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }

    /// Who asked the run to stop, if anyone did through [`Controls::request_stop`].
    pub fn stop_reason(&self) -> Option<&'static str> {
        *lock(&self.inner.reason)
    }

    /// Whether a checkpoint was requested, without taking the request.
    pub fn checkpoint_requested(&self) -> bool {
        self.inner.checkpoint.load(Ordering::SeqCst)
    }

    /// Takes the checkpoint request: true once per request (the flag is reset to false).
    pub fn take_checkpoint_request(&self) -> bool {
        self.inner.checkpoint.swap(false, Ordering::SeqCst)
    }

    /// Blocks until a stop is requested or `timeout` passes; returns whether a stop was requested.
    pub fn wait_for_stop(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut r = lock(&self.inner.reason);
        loop {
            if self.stop_requested() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = self.inner.stopped.wait_timeout(r, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The stop switch itself, for code that still takes an `Arc<AtomicBool>` (the pipeline's
    /// `Run`). Storing into it directly records no reason and wakes no waiter before its timeout.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.inner.stop.clone()
    }

    /// The checkpoint switch itself, for code that still takes an `Arc<AtomicBool>`.
    pub fn checkpoint_flag(&self) -> Arc<AtomicBool> {
        self.inner.checkpoint.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_request_is_taken_once() {
        let c = Controls::new();
        assert!(!c.take_checkpoint_request());
        c.clone().request_checkpoint();
        assert!(c.checkpoint_requested());
        assert!(c.take_checkpoint_request());
        assert!(!c.take_checkpoint_request());
    }

    #[test]
    fn stop_keeps_the_first_reason_and_wakes_a_waiter() {
        let c = Controls::new();
        assert!(!c.wait_for_stop(Duration::from_millis(1)));
        let other = c.clone();
        let waiter = std::thread::spawn(move || other.wait_for_stop(Duration::from_secs(60)));
        c.request_stop("SIGTERM");
        c.request_stop("http");
        assert!(waiter.join().unwrap());
        assert!(c.stop_requested() && c.stop_flag().load(Ordering::SeqCst));
        assert_eq!(c.stop_reason(), Some("SIGTERM"));
    }
}
