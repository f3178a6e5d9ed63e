//! Checkpoints: one `.safetensors` file per checkpoint holding the student and teacher (weights
//! and BatchNorm buffers, named like the reference PyTorch `state_dict`), the momentum buffers,
//! the iteration, the seed, the run id and the config. Written to a temporary name, synced and
//! renamed into place ([`crate::fsutil`]), so a reader never sees a partial file and a failed
//! write leaves the older ones intact; a state with a non-finite value is never written.
//!
//! Runs: every run has an id ([`new_run_id`]), stored in its checkpoints (`meta.run_id`) and in
//! their names (`ckpt-<iteration>-<run id>.safetensors`). Retention prunes only the run's own
//! files, and resuming ([`resume_newest`]) takes only a checkpoint that fits the config (same
//! architecture, method and seed), falling back past unreadable ones, which are renamed to
//! `<name>.rejected`. Files of version 1 (before run ids) read as run id `""`, and a run with
//! that id keeps their old names (`ckpt-<iteration>.safetensors`).
//!
//! Reading is for untrusted files: [`crate::model::tensorfile`] checks the file and every tensor
//! before libtorch sees it, and the metadata are read from the checked bytes.
//!
//! Randomness needs no saved generator state: every draw (sampling, augmentation, noise,
//! dropout) is a function of (seed, iteration), so (seed, iteration) is the RNG state.
//!
//! - `snapshot`: the file, written and read (untrusted), and what it holds;
//! - `folder`: a checkpoint folder: run ids, names, listing, the run lock, retention and when to
//!   write;
//! - `resume`: which checkpoint a run continues from.

mod folder;
mod resume;
mod snapshot;

pub use folder::*;
pub use resume::*;
pub use snapshot::*;
