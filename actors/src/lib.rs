//! # uamt-actors: the daemon
//!
//! The actor pipeline around the core library `uamt`, and the `uamt` command-line tool.
//!
//! # Actors and their jobs
//! | actor | thread | job |
//! |---|---|---|
//! | loader workers (N) | `loader-w` | cut augmented patches of batch i from the memory-mapped dataset into recycled host buffers |
//! | dispatcher | `dispatcher` | put batches in iteration order, make tensors on the device, fan out to student and teacher |
//! | student trainer | caller | forward(i), wait for guidance(i), loss, backward, SGD, hand parameters to the EMA, log, checkpoint |
//! | teacher sampler | `teacher` | 1 + T noisy teacher passes on the unlabelled patches with the teacher version the lag asks for |
//! | uncertainty/mask computer | `mask` | entropy of the mean Monte-Carlo softmax, threshold, mask |
//! | EMA updater | `ema` | teacher = EMA of the student's parameters; publishes each version |
//! | evaluator | `evaluator` | sliding-window evaluation of the student every N steps and of checkpoints dropped into a watched folder |
//! | supervisor (actix) | actix system | lifecycle: signals, stop, checkpoint requests |
//! | HTTP control plane (actix-web) | `http` + 2 workers, its own actix system | `/metrics`, `/healthz`, `/status`; `POST /stop`, `POST /checkpoint` into [`control::Controls`]; who may call what in [`access`], HTTPS in [`tls`] |
//! | systemd notifier | `sd-notify` | `READY=1`, `STOPPING=1`, `WATCHDOG=1` while `/healthz`'s liveness holds ([`notify`]) |
//!
//! Tensors travel only through bounded crossbeam queues ([`queue`]); actix carries control
//! messages ([`supervisor`]). Requests in (stop, checkpoint) live in [`control`], the run's state
//! out (the [`status::StatusBoard`], queue depths) in [`status`]. Metric names live in
//! [`uamt::telemetry`]; [`emit`] emits them and [`http`] serves them with the status.
//! [`setup`] builds a run (dataset, loader, trainer) from a config.

pub mod access;
pub mod client;
pub mod cmd;
pub mod control;
pub mod emit;
pub mod evaluator;
pub mod events;
pub mod http;
pub mod logs;
pub mod notify;
pub mod pipeline;
pub mod progress;
pub mod queue;
pub mod setup;
pub mod status;
pub mod supervisor;
pub mod tls;
