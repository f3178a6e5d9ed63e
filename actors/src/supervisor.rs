//! The control plane: an actix actor that owns the run's lifecycle. It turns SIGTERM/SIGINT into
//! "finish the current step, checkpoint, stop" and SIGUSR1 into "checkpoint after this step", and
//! takes the same requests as `Stop` and `CheckpointNow` messages.
//! Tensors never travel through it; the data plane is [`crate::pipeline`].

use actix::prelude::*;

/// Lifecycle switches shared with the pipeline (moved to [`crate::control`]).
pub use crate::control::Controls;

/// The supervisor actor.
pub struct Supervisor {
    /// The switches it flips.
    pub controls: Controls,
}

/// Ask the run to stop after the current step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop(pub &'static str);

/// Ask for a checkpoint after the current step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckpointNow;

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let me = ctx.address();
        let again = me.clone();
        actix::spawn(async move {
            use actix_rt::signal::unix::{signal, SignalKind};
            let Ok(mut usr1) = signal(SignalKind::user_defined1()) else { return };
            while usr1.recv().await.is_some() {
                again.do_send(CheckpointNow);
            }
        });
        actix::spawn(async move {
            use actix_rt::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                tracing::warn!("cannot install signal handlers");
                return;
            };
            let name = tokio_select(&mut term, &mut int).await;
            me.do_send(Stop(name));
        });
    }
}

/// Waits for the first of two signals and names it.
async fn tokio_select(
    term: &mut actix_rt::signal::unix::Signal,
    int: &mut actix_rt::signal::unix::Signal,
) -> &'static str {
    let t = std::pin::pin!(term.recv());
    let i = std::pin::pin!(int.recv());
    match futures_select(t, i).await {
        0 => "SIGTERM",
        _ => "SIGINT",
    }
}

/// Index of the first of two futures to finish.
async fn futures_select<A: std::future::Future, B: std::future::Future>(
    mut a: std::pin::Pin<&mut A>,
    mut b: std::pin::Pin<&mut B>,
) -> usize {
    std::future::poll_fn(move |cx| {
        if a.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(0);
        }
        if b.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(1);
        }
        std::task::Poll::Pending
    })
    .await
}

impl Handler<Stop> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: Stop, _: &mut Self::Context) {
        tracing::info!(reason = msg.0, "stopping after the current step (a checkpoint follows)");
        self.controls.request_stop(msg.0);
    }
}

impl Handler<CheckpointNow> for Supervisor {
    type Result = ();
    fn handle(&mut self, _: CheckpointNow, _: &mut Self::Context) {
        tracing::info!("checkpoint requested; writing one after the current step");
        self.controls.request_checkpoint();
    }
}
