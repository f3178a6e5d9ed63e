//! Bounded, instrumented queues: crossbeam channels whose capacity comes from the config. A full
//! queue blocks its producer (backpressure); every queue exports its depth, capacity, items
//! pushed and popped and the seconds its producers and consumers spent blocked, and reports its
//! depth to the process-wide registry that `GET /status` reads ([`crate::status::queue_depths`]).

use crate::emit;
use crate::status::{self, QueueGauge};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The other end is gone (the pipeline is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Producer half.
pub struct Tx<T> {
    /// Queue name, a metric label.
    name: &'static str,
    /// The channel.
    tx: Sender<T>,
    /// Depth in the status registry, shared with the other end.
    gauge: Arc<QueueGauge>,
}

/// Consumer half.
pub struct Rx<T> {
    /// Queue name, a metric label.
    name: &'static str,
    /// The channel.
    rx: Receiver<T>,
    /// Depth in the status registry, shared with the other end.
    gauge: Arc<QueueGauge>,
}

/// A bounded queue named `name` holding at most `capacity` items.
pub fn bounded<T>(name: &'static str, capacity: usize) -> (Tx<T>, Rx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    emit::queue_capacity(name, capacity);
    let gauge = status::register_queue(name, capacity);
    (Tx { name, tx, gauge: gauge.clone() }, Rx { name, rx, gauge })
}

impl<T> Tx<T> {
    /// Counts one push that waited `blocked` seconds and records the depth.
    fn pushed(&self, blocked: f64) {
        let depth = self.tx.len();
        self.gauge.set_depth(depth);
        emit::queue_push(self.name, depth, blocked);
    }

    /// Pushes `v`, blocking while the queue is full; returns the seconds spent blocked.
    pub fn send(&self, v: T) -> Result<f64, Closed> {
        let blocked = match self.tx.try_send(v) {
            Ok(()) => 0.0,
            Err(TrySendError::Disconnected(_)) => return Err(Closed),
            Err(TrySendError::Full(v)) => {
                let t0 = Instant::now();
                self.tx.send(v).map_err(|_| Closed)?;
                t0.elapsed().as_secs_f64()
            }
        };
        self.pushed(blocked);
        Ok(blocked)
    }
}

impl<T> Tx<T> {
    /// Pushes `v` only if there is room: `Ok(false)` (and `v` dropped) when the queue is full.
    /// For work that may be skipped rather than hold up its producer (periodic evaluation).
    pub fn try_send(&self, v: T) -> Result<bool, Closed> {
        match self.tx.try_send(v) {
            Ok(()) => {
                self.pushed(0.0);
                Ok(true)
            }
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Disconnected(_)) => Err(Closed),
        }
    }
}

impl<T> Rx<T> {
    /// Counts one pop that waited `blocked` seconds and records the depth.
    fn popped(&self, blocked: f64) {
        let depth = self.rx.len();
        self.gauge.set_depth(depth);
        emit::queue_pop(self.name, depth, blocked);
    }

    /// Pops the next item, blocking while the queue is empty; also returns the seconds blocked.
    pub fn recv(&self) -> Result<(T, f64), Closed> {
        let (v, blocked) = match self.rx.try_recv() {
            Ok(v) => (v, 0.0),
            Err(TryRecvError::Disconnected) => return Err(Closed),
            Err(TryRecvError::Empty) => {
                let t0 = Instant::now();
                let v = self.rx.recv().map_err(|_| Closed)?;
                (v, t0.elapsed().as_secs_f64())
            }
        };
        self.popped(blocked);
        Ok((v, blocked))
    }

    /// Like [`Rx::recv`] but gives up after `timeout` (`Ok(None)`), so a caller can look at a
    /// stop flag while it waits.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<(T, f64)>, Closed> {
        let t0 = Instant::now();
        match self.rx.recv_timeout(timeout) {
            Ok(v) => {
                let blocked = t0.elapsed().as_secs_f64();
                self.popped(blocked);
                Ok(Some((v, blocked)))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                emit::queue_blocked(self.name, "pop", t0.elapsed().as_secs_f64());
                Ok(None)
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Closed),
        }
    }
}

/// Busy and idle time of one pipeline stage, exported as counters labelled by stage.
pub struct Stage {
    /// Stage name, a metric label.
    pub name: &'static str,
}

impl Stage {
    /// Runs `work`, counting its time as busy.
    pub fn busy<R>(&self, work: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = work();
        emit::stage_busy(self.name, t0.elapsed().as_secs_f64());
        r
    }

    /// Counts `secs` spent waiting on queues as idle.
    pub fn idle(&self, secs: f64) {
        emit::stage_idle(self.name, secs);
    }

    /// One item finished.
    pub fn done(&self) {
        emit::stage_item(self.name);
    }
}

/// An item from one of two queues.
pub enum Either<A, B> {
    /// From the first queue.
    Left(A),
    /// From the second queue.
    Right(B),
}

/// Pops from whichever of `a` and `b` has an item first (blocking while both are empty); also
/// returns the seconds blocked. A closed queue is no longer waited on; `Closed` once both are.
pub fn recv_either<A, B>(a: &Rx<A>, b: &Rx<B>) -> Result<(Either<A, B>, f64), Closed> {
    let t0 = Instant::now();
    let mut sel = crossbeam_channel::Select::new();
    let (mut ia, mut ib) = (Some(sel.recv(&a.rx)), Some(sel.recv(&b.rx)));
    loop {
        if ia.is_none() && ib.is_none() {
            return Err(Closed);
        }
        let op = sel.select();
        let i = op.index();
        if Some(i) == ia {
            match op.recv(&a.rx) {
                Ok(v) => {
                    let blocked = t0.elapsed().as_secs_f64();
                    emit::queue_pop(a.name, a.rx.len(), blocked);
                    return Ok((Either::Left(v), blocked));
                }
                Err(_) => {
                    sel.remove(i);
                    ia = None;
                }
            }
        } else {
            match op.recv(&b.rx) {
                Ok(v) => {
                    let blocked = t0.elapsed().as_secs_f64();
                    emit::queue_pop(b.name, b.rx.len(), blocked);
                    return Ok((Either::Right(v), blocked));
                }
                Err(_) => {
                    sel.remove(i);
                    ib = None;
                }
            }
        }
    }
}
