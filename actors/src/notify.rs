//! systemd's notify protocol (`Type=notify`, `WatchdogSec=`), through the `sd-notify` crate:
//! `READY=1` once the data are open and the HTTP server listens, `STOPPING=1` when a stop is asked
//! for (signal, `POST /stop`) or training ends, and `WATCHDOG=1` every half `WATCHDOG_USEC` while
//! the liveness that `GET /healthz` reports holds (no stage failed, and in training a step within
//! `telemetry.stall_after_s`). A stuck daemon stops feeding the watchdog and systemd restarts it;
//! a healthy one keeps feeding it. Without `NOTIFY_SOCKET` (not under systemd) nothing is sent.

use crate::control::Controls;
use crate::status::StatusBoard;
use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The shortest watchdog period honoured (half of it between two `WATCHDOG=1`).
const MIN_WATCHDOG: Duration = Duration::from_millis(20);

/// Sends `states` to the service manager, if there is one; a failure is logged (once per kind of
/// message is enough: it recurs only if the socket went away).
fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The daemon's side of the protocol: cheap to clone, every message sent at most once where that
/// matters (`READY=1`, `STOPPING=1`).
#[derive(Clone, Default)]
pub struct Notifier {
    /// `READY=1` was sent.
    ready: Arc<AtomicBool>,
    /// `STOPPING=1` was sent.
    stopping: Arc<AtomicBool>,
}

impl Notifier {
    /// A notifier; with `WATCHDOG_USEC` (and `WATCHDOG_PID` naming this process, as systemd sets
    /// them) a thread feeds the watchdog from `board`'s health and sends `STOPPING=1` as soon as
    /// `controls` asks for a stop. Without a watchdog the thread only waits for the stop.
    pub fn start(board: StatusBoard, controls: Controls) -> Notifier {
        let n = Notifier::default();
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return n;
        }
        let mut usec = 0u64;
        let period =
            sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec).max(MIN_WATCHDOG) / 2);
        let me = n.clone();
        let spawned = std::thread::Builder::new().name("sd-notify".into()).spawn(move || {
            me.watch(board, controls, period);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the systemd watchdog thread");
        }
        if let Some(p) = period {
            tracing::info!(every_s = p.as_secs_f64(), "feeding systemd's watchdog while healthy");
        }
        n
    }

    /// The thread's loop: `WATCHDOG=1` every `period` while healthy, `STOPPING=1` on a stop.
    fn watch(&self, board: StatusBoard, controls: Controls, period: Option<Duration>) {
        let tick = period.unwrap_or(Duration::from_secs(3600));
        let mut starved: Option<String> = None;
        loop {
            if controls.wait_for_stop(tick) {
                self.stopping();
                if period.is_none() {
                    return;
                }
                // Keep feeding while the final step and checkpoint are written.
                std::thread::sleep(tick);
            }
            if period.is_none() {
                continue;
            }
            match board.health() {
                Ok(()) => {
                    if starved.take().is_some() {
                        tracing::info!("healthy again: feeding systemd's watchdog");
                    }
                    send(&[NotifyState::Watchdog]);
                }
                Err(why) => {
                    if starved.is_none() {
                        tracing::warn!(reason = %why, "not feeding systemd's watchdog: the daemon is not healthy");
                    }
                    starved = Some(why);
                }
            }
        }
    }

    /// `READY=1` (once): the data are open and the HTTP server listens.
    pub fn ready(&self) {
        if !self.ready.swap(true, Ordering::SeqCst) {
            send(&[NotifyState::Ready, NotifyState::Status("training")]);
        }
    }

    /// `STOPPING=1` (once): the daemon is shutting down.
    pub fn stopping(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        }
    }
}
