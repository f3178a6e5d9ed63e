//! Lifecycle requests shared between the control plane (signals, HTTP) and the training loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Stop and checkpoint requests; cheap to clone, every clone sees the same switches.
#[derive(Clone, Default, Debug)]
pub struct Controls {
    /// Finish the current step, write a checkpoint, stop.
    stop: Arc<AtomicBool>,
    /// Write a checkpoint after the current step.
    checkpoint: Arc<AtomicBool>,
}

impl Controls {
    /// Asks the run to stop after the current step.
    pub fn request_stop(&self, reason: &'static str) {
        tracing::info!(reason, "stopping after the current step (a checkpoint follows)");
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Asks for a checkpoint after the current step.
    pub fn request_checkpoint(&self) {
        tracing::info!("checkpoint requested; writing one after the current step");
        self.checkpoint.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether a checkpoint was asked for since the last call.
    pub fn take_checkpoint_request(&self) -> bool {
        self.checkpoint.swap(false, Ordering::SeqCst)
    }
}
