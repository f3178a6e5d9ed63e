//! The control plane: an actix actor that owns the run's lifecycle. The training pipeline (on a
//! thread of its own) and the evaluation service (an actor on an arbiter of its own) are its
//! siblings-in-care: a training stage that fails ends the run with a non-zero exit naming the
//! stage; an evaluation that fails is the evaluation service's business alone.
//!
//! Signals: SIGTERM/SIGINT finish the current step, write a checkpoint and exit 0; a second one
//! forces the exit after [`FORCE_GRACE`]; SIGUSR1 asks for a checkpoint (harmless before training
//! starts: the handlers are installed before anything else happens). After training, with a
//! watched folder, the daemon keeps evaluating until a signal or `POST /stop`. Shutdown waits for
//! a running evaluation at most [`EVAL_GRACE`] (after a signal or a failure).

use crate::control::{Controls, StatusBoard};
use crate::evaluator::{EvalHandle, Evaluator, Finish};
use actix::prelude::*;
use std::time::Duration;

/// How long a second signal leaves the run to finish its checkpoint before the process exits.
pub const FORCE_GRACE: Duration = Duration::from_secs(5);
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
        }
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
        use actix_rt::signal::unix::{signal, SignalKind};
        for (kind, name) in [
            (SignalKind::terminate(), "SIGTERM"),
            (SignalKind::interrupt(), "SIGINT"),
            (SignalKind::user_defined1(), "SIGUSR1"),
        ] {
            match signal(kind) {
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
        if name == "SIGUSR1" {
            self.controls.request_checkpoint();
            return;
        }
        self.signals += 1;
        if self.signals == 1 {
            self.controls.request_stop(name);
            self.board.on_stop_requested();
            if self.training_over {
                self.finish(0, EVAL_GRACE, ctx);
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
