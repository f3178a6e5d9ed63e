//! Loader worker: cuts the augmented patches of its share of the iterations (worker w of n takes
//! iterations w, w + n, ...) from the memory-mapped dataset into a host buffer. Buffers come back
//! from the dispatcher through a ring, so the steady state allocates no new ones.

use super::messages::Loaded;
use uamt::data::{HostBatch, PatchLoader};

/// One loader worker's state.
pub struct LoaderWorker {
    /// Cuts the patches.
    loader: PatchLoader,
    /// This worker's index.
    index: usize,
    /// How many workers share the iterations.
    workers: usize,
}

impl LoaderWorker {
    /// Worker `index` of `workers`.
    pub fn new(loader: PatchLoader, index: usize, workers: usize) -> Self {
        LoaderWorker { loader, index, workers: workers.max(1) }
    }

    /// The iterations in `start..end` this worker cuts, in order.
    pub fn iterations(&self, start: i64, end: i64) -> impl Iterator<Item = i64> {
        (start + self.index as i64..end).step_by(self.workers)
    }

    /// Fills `host` (a recycled buffer or a new one) with iteration `iter`'s batch. A batch that
    /// cannot be cut (a case became unreadable) is passed on as its error text: the dispatcher
    /// decides what to do with it.
    pub fn process(&self, iter: i64, mut host: HostBatch) -> Loaded {
        match self.loader.fill(iter as u64, &mut host) {
            Ok(()) => (iter, Ok(host)),
            Err(e) => (iter, Err(e.to_string())),
        }
    }
}
