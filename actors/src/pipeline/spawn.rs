//! The one way a pipeline stage gets a thread: intra-op threads set, the stage's own CUDA stream
//! made current, busy/idle telemetry under the stage's name, panics caught and turned into an
//! error that names the stage. [`join_all`] picks the failure that explains the others.

use crate::queue::Stage;
use anyhow::{anyhow, Result};
use std::thread::JoinHandle;
use tch::Device;
use uamt::gpu::OwnStream;

/// A stage ended because a neighbour went away (its queue closed), not by a fault of its own:
/// the neighbour's own error is the one worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStopped(pub &'static str);

impl std::fmt::Display for PeerStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} stopped", self.0)
    }
}

impl std::error::Error for PeerStopped {}

/// What a stage's body gets: its telemetry and its device.
pub struct StageCtx {
    /// Busy/idle time and items, labelled with the stage's name.
    pub stage: Stage,
    /// Where its tensors live.
    pub device: Device,
}

/// A running stage.
pub struct StageHandle<R> {
    /// The stage's name (a metric label and the thread's name).
    pub name: &'static str,
    /// Its thread.
    handle: JoinHandle<Result<R>>,
}

/// Sets libtorch's intra-op threads for the calling thread (0: leave the default).
pub fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
}

/// Runs `body` on a thread named `name` with `threads` intra-op threads and a stream of its own
/// on `device`. A panic in `body` becomes an error naming the stage.
pub fn spawn_stage<R: Send + 'static>(
    name: &'static str,
    threads: usize,
    device: Device,
    body: impl FnOnce(&StageCtx) -> Result<R> + Send + 'static,
) -> Result<StageHandle<R>> {
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            set_threads(threads);
            let _stream = OwnStream::new(device)?;
            let ctx = StageCtx { stage: Stage { name }, device };
            run_caught(name, || body(&ctx))
        })
        .map_err(|e| anyhow!("cannot start the {name} stage's thread: {e}"))?;
    Ok(StageHandle { name, handle })
}

/// Runs `f`, turning a panic into an error that names `name` and says what the panic said.
pub fn run_caught<R>(name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(anyhow!("the {name} stage panicked: {}", panic_message(payload.as_ref()))),
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

impl<R> StageHandle<R> {
    /// Waits for the stage; its error carries the stage's name.
    pub fn join(self) -> Result<R> {
        let name = self.name;
        match self.handle.join() {
            Ok(r) => r.map_err(|e| e.context(format!("stage `{name}`"))),
            Err(p) => Err(anyhow!("stage `{name}` panicked: {}", panic_message(p.as_ref()))),
        }
    }
}

/// Whether `e` only says that a neighbour stopped.
pub fn is_secondary(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<PeerStopped>().is_some())
}

/// The first error that is not a mere consequence of another stage stopping, else the first.
pub fn primary(errors: Vec<anyhow::Error>) -> Option<anyhow::Error> {
    let i = errors.iter().position(|e| !is_secondary(e)).unwrap_or(0);
    errors.into_iter().nth(i)
}

/// Joins every stage; all of them end once the student's queue ends are dropped.
pub fn join_all(handles: Vec<StageHandle<()>>) -> Vec<anyhow::Error> {
    handles.into_iter().filter_map(|h| h.join().err()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_stage_is_an_error_naming_it() {
        let h = spawn_stage("boom", 0, Device::Cpu, |_| -> Result<()> { panic!("out of memory") }).unwrap();
        let e = format!("{:#}", h.join().unwrap_err());
        assert!(e.contains("boom") && e.contains("out of memory"), "{e}");
    }

    #[test]
    fn the_cause_is_preferred_over_its_consequences() {
        let errors = vec![
            anyhow::Error::new(PeerStopped("the teacher")).context("stage `student`"),
            anyhow!("allocation failed").context("stage `teacher`"),
        ];
        let e = primary(errors).unwrap();
        assert!(format!("{e:#}").contains("allocation failed"));
        assert!(primary(vec![anyhow::Error::new(PeerStopped("x"))]).is_some());
        assert!(primary(Vec::new()).is_none());
    }
}
