//! Data-parallel training on c10d, the engine of `torch.distributed`, through the C++ shim
//! (`src/shim/uamt_dist.cpp`): a TCPStore for the rendezvous and Gloo process groups from the
//! libtorch the binary already links.
//!
//! - [`Launch`]: who this process is, from torchrun's variables (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or the config's `[distributed]` section.
//! - [`World`]: the store and two process groups: one for the student's step (gradients, buffer
//!   broadcasts, the stop vote; always called from the student's thread, in the same order on
//!   every rank) and one for the teacher's checks (called from the teacher's thread), so that
//!   the two threads never interleave collectives on one group.
//! - [`GradSync`]: what DistributedDataParallel does around a step: the student's BatchNorm
//!   buffers broadcast from rank 0 before the forward pass (`broadcast_buffers`), gradients
//!   averaged over the ranks in buckets after the backward pass, and with the last bucket a vote
//!   that makes every rank stop after the same step when any of them was asked to.
//! - [`agree`]: the teacher's weights compared across ranks by checksum.
//!
//! Every collective waits at most `distributed.timeout_s`: a rank that dies ends the others'
//! next collective with an error (its sockets close), one that stalls with a timeout; either way
//! the error names the operation and the ranks, and the process exits non-zero instead of hanging.
//! So does the rendezvous ([`World::connect_or_stop`]), which also gives up as soon as the stop
//! switch (SIGTERM, SIGINT, SIGHUP) is set: its waits (resolving `MASTER_ADDR`, reaching rank 0's
//! store, the other ranks joining) are loops in Rust that look at the deadline and the switch
//! every [`POLL`], not libtorch's own retries, which keep their own schedule.
//!
//! Files: `launch.rs` (the `[distributed]` section and [`Launch`]), `world.rs` (the shim's store
//! and groups, the rendezvous), `grad.rs` ([`GradSync`], [`agree`], [`share_start`]).

mod grad;
mod launch;
mod world;

pub use grad::*;
pub use launch::*;
pub use world::*;
