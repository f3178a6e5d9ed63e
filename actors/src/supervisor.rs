//! The control plane: an actix actor that owns the run's lifecycle. The training pipeline (on a
//! thread of its own) and the evaluation service (an actor on an arbiter of its own) are its
//! siblings-in-care: a training stage that fails ends the run with a non-zero exit naming the
//! stage; an evaluation that fails is the evaluation service's business alone.
//!
//! Signals ([`SIGNALS`]): SIGTERM, SIGINT and SIGHUP (a closed terminal) finish the current step,
//! write a checkpoint and exit 0; a second one forces the exit after [`FORCE_GRACE`]; SIGUSR1 asks
//! for a checkpoint; SIGUSR2 is ignored (logged). The handlers are installed by [`start`], before
//! the HTTP server and training start, so a signal is harmless at any point after that. After
//! training, with a watched folder, the daemon keeps evaluating until a signal or `POST /stop`.
//! Shutdown waits for a running evaluation at most [`EVAL_GRACE`] (after a signal or a failure).

use crate::control::Controls;
use crate::evaluator::{EvalHandle, Evaluator, Finish};
use crate::status::StatusBoard;
use actix::prelude::*;
use actix_rt::signal::unix::SignalKind;
use std::time::Duration;

/// What a signal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// Finish the current step, write a checkpoint and exit 0 (a second one forces the exit).
    Stop,
    /// Write a checkpoint after the current step and go on.
    Checkpoint,
    /// Nothing but a log line at info.
    Ignore,
}

/// The signals the daemon handles and what each does; every other one keeps the system's
/// default. SIGHUP (the terminal of a run started without nohup closed) stops like SIGTERM, so
/// that no step since the last checkpoint is lost.
pub const SIGNALS: [(&str, OnSignal); 5] = [
    ("SIGTERM", OnSignal::Stop),
    ("SIGINT", OnSignal::Stop),
    ("SIGHUP", OnSignal::Stop),
    ("SIGUSR1", OnSignal::Checkpoint),
    ("SIGUSR2", OnSignal::Ignore),
];

/// What the signal `name` does ([`SIGNALS`]); `None` for one the daemon does not handle.
pub fn on_signal(name: &str) -> Option<OnSignal> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, what)| *what)
}

/// The signal called `name` in [`SIGNALS`].
fn kind(name: &str) -> Option<SignalKind> {
    Some(match name {
        "SIGTERM" => SignalKind::terminate(),
        "SIGINT" => SignalKind::interrupt(),
        "SIGHUP" => SignalKind::hangup(),
        "SIGUSR1" => SignalKind::user_defined1(),
        "SIGUSR2" => SignalKind::user_defined2(),
        _ => return None,
    })
}

/// Starts `supervisor` on `system` and returns once it runs, its signal handlers installed.
/// From then on a start-up failure may drop `system` without running it: the actor inside has
/// started (one that had not would be started during that drop, outside any runtime, and panic
/// with "there is no reactor running").
pub fn start(system: &actix::SystemRunner, supervisor: Supervisor) -> anyhow::Result<Addr<Supervisor>> {
    system.block_on(async {
        let addr = supervisor.start();
        addr.send(Started).await.map_err(|e| anyhow::anyhow!("the supervisor did not start: {e}"))?;
        Ok(addr)
    })
}

/// Answered once the supervisor runs ([`start`]).
#[derive(Message)]
#[rtype(result = "()")]
struct Started;

impl Handler<Started> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: Started, _: &mut Self::Context) {}
}

/// How long a second signal leaves the run to finish its checkpoint before the process exits.
pub const FORCE_GRACE: Duration = Duration::from_secs(5);
/// The least a data-parallel step is given to finish after a stop signal ([`stuck_grace`]).
pub const STUCK_MIN: Duration = Duration::from_secs(5);
/// How long shutdown waits for an evaluation in progress after a signal or a failure.
pub const EVAL_GRACE: Duration = Duration::from_secs(10);
/// How long a normal end of training waits for the evaluations it asked for.
pub const EVAL_DRAIN: Duration = Duration::from_secs(3600);

/// The supervisor actor.
pub struct Supervisor {
    /// The switches the training loop reads.
    controls: Controls,
    /// What `/status` and `/healthz` show.
    board: StatusBoard,
    /// The evaluation service, once started.
    eval: Option<EvalHandle>,
    /// Keep evaluating a watched folder after training ends.
    watching: bool,
    /// Training has ended (well or not).
    training_over: bool,
    /// Stop or interrupt signals received.
    signals: u32,
    /// Shutdown has begun.
    finishing: bool,
    /// Why the run failed, if it did (the process exits non-zero with it).
    failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Data-parallel runs: after a stop signal, how long at least a step may take to finish
    /// before it counts as stuck in a collective (see [`stuck_grace`]).
    stuck_after: Option<Duration>,
}

/// How long a data-parallel step may go on after a stop signal before the process gives up on
/// it: a collective waiting on a stalled rank would otherwise hold the stop for the whole
/// `distributed.timeout_s`. Three of the last measured step's time, and at least `min`.
pub fn stuck_grace(min: Duration, seconds_per_step: Option<f64>) -> Duration {
    let three_steps = seconds_per_step.filter(|s| s.is_finite() && *s > 0.0).map_or(0.0, |s| 3.0 * s);
    min.max(Duration::from_secs_f64(three_steps.min(86_400.0)))
}

impl Supervisor {
    /// A supervisor flipping `controls`; `failure` receives the reason when the run fails.
    pub fn new(
        controls: Controls,
        board: StatusBoard,
        watching: bool,
        failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    ) -> Self {
        Supervisor {
            controls,
            board,
            eval: None,
            watching,
            training_over: false,
            signals: 0,
            finishing: false,
            failure,
            stuck_after: None,
        }
    }

    /// A data-parallel run: a stop signal that the current step does not honour within
    /// [`stuck_grace`] (at least `min`) ends the process with exit code 1, naming the cause; the
    /// checkpoints already written stay.
    pub fn data_parallel(mut self, min: Duration) -> Self {
        self.stuck_after = Some(min);
        self
    }

    /// Stops the evaluation service (waiting at most `grace` for the evaluation in progress)
    /// and then the actix system with `code`.
    fn finish(&mut self, code: i32, grace: Duration, ctx: &mut Context<Self>) {
        if self.finishing {
            return;
        }
        self.finishing = true;
        match self.eval.take() {
            Some(eval) => {
                let wait = eval.addr.send(Finish).timeout(grace);
                ctx.spawn(wait.into_actor(self).map(move |r, _, _| {
                    if r.is_err() {
                        tracing::warn!(grace_s = grace.as_secs(), "the evaluator did not finish in time; leaving it");
                    }
                    eval.stop_thread();
                    System::current().stop_with_code(code);
                }));
            }
            None => System::current().stop_with_code(code),
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for (name, _) in SIGNALS {
            let Some(kind) = kind(name) else { continue };
            match actix_rt::signal::unix::signal(kind) {
                Ok(mut s) => {
                    let me = ctx.address();
                    actix::spawn(async move {
                        while s.recv().await.is_some() {
                            me.do_send(Signal(name));
                        }
                    });
                }
                Err(e) => tracing::warn!(signal = name, error = %e, "cannot install a signal handler"),
            }
        }
        // A stop asked for over HTTP after training (while watching) ends the daemon.
        ctx.run_interval(Duration::from_millis(200), |act, ctx| {
            if act.training_over && act.controls.stop_requested() {
                act.finish(0, EVAL_GRACE, ctx);
            }
        });
    }
}

/// A signal arrived.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Signal(pub &'static str);

impl Handler<Signal> for Supervisor {
    type Result = ();
    fn handle(&mut self, Signal(name): Signal, ctx: &mut Self::Context) {
        match on_signal(name) {
            Some(OnSignal::Stop) => {}
            Some(OnSignal::Checkpoint) => {
                self.controls.request_checkpoint();
                return;
            }
            Some(OnSignal::Ignore) | None => {
                tracing::info!(signal = name, "signal ignored");
                return;
            }
        }
        self.signals += 1;
        if self.signals == 1 {
            self.controls.request_stop(name);
            self.board.on_stop_requested();
            if self.training_over {
                self.finish(0, EVAL_GRACE, ctx);
            } else if let Some(min) = self.stuck_after {
                let grace = stuck_grace(min, self.board.seconds_per_step());
                ctx.run_later(grace, move |act, _| {
                    if !act.training_over {
                        tracing::error!(
                            signal = name,
                            waited_s = grace.as_secs_f64(),
                            "the step did not finish after the stop signal: a collective is waiting on another rank \
                             (stalled or gone); exiting without a final checkpoint (the last one written stays)"
                        );
                        std::process::exit(1);
                    }
                });
            }
        } else {
            tracing::warn!(
                signal = name,
                grace_s = FORCE_GRACE.as_secs(),
                "second signal: exiting after the grace period"
            );
            ctx.run_later(FORCE_GRACE, |_, _| {
                tracing::error!("forced exit: the run did not stop in time");
                std::process::exit(130);
            });
        }
    }
}

/// Start the evaluation service; the handle comes back on `reply`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartEval {
    /// The evaluator it runs.
    pub evaluator: Evaluator,
    /// Where its results are shown.
    pub board: Option<StatusBoard>,
    /// Where its handle goes.
    pub reply: crossbeam_channel::Sender<anyhow::Result<EvalHandle>>,
}

impl Handler<StartEval> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: StartEval, _: &mut Self::Context) {
        let h = EvalHandle::start(msg.evaluator, msg.board);
        if let Ok(h) = &h {
            self.eval = Some(h.clone());
        }
        let _ = msg.reply.send(h);
    }
}

/// Training ended: `Ok` (done or stopped on request) or the error that ended it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TrainingEnded(pub std::result::Result<(), String>);

impl Handler<TrainingEnded> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: TrainingEnded, ctx: &mut Self::Context) {
        self.training_over = true;
        match msg.0 {
            Err(why) => {
                tracing::error!(error = %why, "training failed; ending the run");
                let stage = why.split('`').nth(1).unwrap_or("training").to_string();
                self.board.stage_failed(&stage, &why);
                *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                self.finish(1, EVAL_GRACE, ctx);
            }
            Ok(()) if self.controls.stop_requested() => self.finish(0, EVAL_GRACE, ctx),
            Ok(()) if self.watching && self.eval.is_some() => tracing::info!(
                "training finished; still evaluating checkpoints dropped into the watched folder until SIGTERM or POST /stop"
            ),
            Ok(()) => self.finish(0, EVAL_DRAIN, ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_step_gets_three_steps_and_at_least_the_minimum() {
        let min = Duration::from_secs(5);
        assert_eq!(stuck_grace(min, None), min);
        assert_eq!(stuck_grace(min, Some(0.2)), min);
        assert_eq!(stuck_grace(min, Some(4.0)), Duration::from_secs(12));
        assert_eq!(stuck_grace(min, Some(f64::NAN)), min);
        assert_eq!(stuck_grace(min, Some(f64::INFINITY)), min);
        assert_eq!(stuck_grace(min, Some(1e12)), Duration::from_secs(86_400));
    }

    /// SIGHUP is SIGTERM's twin, SIGUSR2 does nothing, SIGUSR1 asks for a checkpoint, and every
    /// signal of the table has a handler to install.
    #[test]
    fn sighup_stops_like_sigterm_and_sigusr2_is_ignored() {
        assert_eq!(on_signal("SIGHUP"), on_signal("SIGTERM"));
        assert_eq!(on_signal("SIGTERM"), Some(OnSignal::Stop));
        assert_eq!(on_signal("SIGINT"), Some(OnSignal::Stop));
        assert_eq!(on_signal("SIGUSR1"), Some(OnSignal::Checkpoint));
        assert_eq!(on_signal("SIGUSR2"), Some(OnSignal::Ignore));
        assert_eq!(on_signal("SIGWINCH"), None);
        for (name, _) in SIGNALS {
            assert!(kind(name).is_some(), "{name} has no handler");
        }
    }

    /// A start-up failure after the supervisor started drops the actix system unrun: no panic
    /// (before, the actor was first polled inside that drop and its signal handlers panicked;
    /// tokio catches a panic in a task's drop, so the test watches the panic hook).
    #[test]
    fn dropping_the_system_after_start_does_not_panic() {
        use std::sync::atomic::{AtomicBool, Ordering};
        static PANICKED: AtomicBool = AtomicBool::new(false);
        let me = std::thread::current().id();
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == me {
                PANICKED.store(true, Ordering::SeqCst);
            }
            before(info)
        }));
        let system = actix::System::new();
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
        let controls = Controls::new();
        let board = StatusBoard::new(10, Duration::from_secs(60));
        let sup = Supervisor::new(controls, board, false, failure);
        let addr = start(&system, sup).expect("started");
        assert!(addr.connected());
        drop(addr);
        drop(system);
        assert!(!PANICKED.load(Ordering::SeqCst), "a panic while the system was dropped");
    }
}
