//! What the training loop reports, as events that sinks consume: the loop never logs or touches
//! metrics itself. [`LogSink`] writes the progress lines (numbers as numbers: the text log format
//! rounds them for people, JSON keeps them whole, see [`crate::logs`]), [`MetricsSink`] feeds
//! Prometheus; the status board is a third sink.

use crate::emit;
use std::path::Path;
use uamt::train::StepReport;

/// Something the training loop did.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A step's numbers, read back from the device.
    Step {
        /// Losses, weight, mask fraction, learning rate.
        report: &'a StepReport,
        /// Wall time of the step, seconds.
        seconds: f64,
    },
    /// Progress every `telemetry.log_every` steps (and after the last).
    Progress {
        /// The last step's numbers.
        report: &'a StepReport,
        /// Steps done.
        done: i64,
        /// Steps the run is to reach.
        end: i64,
        /// Steps per second since the previous progress event.
        it_per_s: f64,
        /// Seconds to `end` at that rate.
        eta_s: f64,
    },
    /// A checkpoint written.
    Checkpoint {
        /// Where.
        path: &'a Path,
        /// Steps it holds.
        iteration: i64,
        /// Time to snapshot and write it.
        seconds: f64,
    },
    /// A checkpoint that could not be written (the previous ones are intact).
    CheckpointFailed {
        /// Steps it would have held.
        iteration: i64,
        /// Why.
        error: &'a str,
    },
    /// A step whose loss or gradients were not finite, its SGD update skipped
    /// (`optim.on_nonfinite = "skip"`).
    StepSkipped {
        /// The iteration.
        iteration: i64,
        /// Its loss.
        loss: f64,
    },
    /// A periodic evaluation skipped because the evaluator was still busy.
    EvalSkipped {
        /// Steps done.
        iteration: i64,
    },
    /// A periodic ranking skipped because the previous one was still running.
    RankSkipped {
        /// Steps done.
        iteration: i64,
    },
}

/// A consumer of the loop's events.
pub trait Sink: Send {
    /// Takes one event.
    fn on(&mut self, event: &Event<'_>);
}

/// Progress and checkpoint lines through `tracing`.
pub struct LogSink;

impl Sink for LogSink {
    fn on(&mut self, event: &Event<'_>) {
        match *event {
            Event::Progress { report: r, done, end, it_per_s, eta_s } => tracing::info!(
                iteration = done,
                of = end,
                loss = r.loss,
                supervised = r.supervised,
                consistency = r.consistency,
                weight = r.weight,
                mask = r.mask_fraction,
                lr = r.lr,
                "it/s" = it_per_s,
                eta_s = eta_s.round(),
                "training"
            ),
            Event::Checkpoint { path, iteration, seconds } => {
                tracing::info!(path = %path.display(), iteration, seconds, "checkpoint written")
            }
            Event::CheckpointFailed { iteration, error } => {
                tracing::error!(iteration, error, "checkpoint failed; the previous ones are intact")
            }
            Event::EvalSkipped { iteration } => {
                tracing::info!(iteration, "the evaluator is still busy; skipping this periodic evaluation")
            }
            Event::RankSkipped { iteration } => {
                tracing::info!(iteration, "the previous ranking is still running; skipping this one")
            }
            Event::StepSkipped { iteration, loss } => {
                tracing::warn!(iteration, loss, "non-finite loss or gradients: this step's update is skipped")
            }
            Event::Step { .. } => {}
        }
    }
}

/// The Prometheus side.
pub struct MetricsSink;

impl Sink for MetricsSink {
    fn on(&mut self, event: &Event<'_>) {
        match *event {
            Event::Step { report, seconds } => emit::iteration(report, seconds),
            Event::Progress { it_per_s, .. } => emit::it_per_second(it_per_s),
            Event::Checkpoint { seconds, .. } => emit::checkpoint(true, seconds),
            Event::CheckpointFailed { .. } => emit::checkpoint(false, 0.0),
            Event::StepSkipped { .. } => emit::skipped_step(),
            Event::EvalSkipped { .. } | Event::RankSkipped { .. } => {}
        }
    }
}

/// The sinks every daemon run has: log lines and metrics.
pub fn standard() -> Vec<Box<dyn Sink>> {
    vec![Box::new(LogSink), Box::new(MetricsSink)]
}

/// The status board's side (`/status`, `/healthz`): every step, with the latest rate.
pub struct StatusSink {
    /// The board.
    board: crate::status::StatusBoard,
    /// Steps per second and ETA from the latest progress event.
    rate: (f64, f64),
}

impl StatusSink {
    /// A sink feeding `board`.
    pub fn new(board: crate::status::StatusBoard) -> Self {
        StatusSink { board, rate: (0.0, f64::NAN) }
    }
}

impl Sink for StatusSink {
    fn on(&mut self, event: &Event<'_>) {
        match *event {
            Event::Step { report, .. } => self.board.on_step(report, self.rate.0, self.rate.1),
            Event::Progress { report, it_per_s, eta_s, .. } => {
                self.rate = (it_per_s, eta_s);
                self.board.on_step(report, it_per_s, eta_s);
            }
            _ => {}
        }
    }
}
