//! The one place where uamt touches a file a user named, with the rules every command keeps:
//!
//! - [`open`]: reading. A path is opened only if it is (or links to) a regular file; a FIFO,
//!   device, socket or folder is refused before anything is read, and the open never blocks. A
//!   secret (a token file) is read only when its group and others have no access to it.
//! - [`atomic`]: writing. Every file is written under a temporary name and renamed into place; a
//!   target that exists and is not a regular file is refused.
//! - [`cleanup`]: what is being written (temporary files, staging folders) is removed on error
//!   and, in the one-shot commands, on SIGINT, SIGTERM and SIGHUP.
//! - [`paths`]: an output never equals, contains or lies inside an input (after resolving links).
//! - [`marker`]: an output is replaced only when uamt wrote it before (`.uamt-written`), and only
//!   when the user asked (`--force`).

pub mod atomic;
pub mod cleanup;
mod io;
pub mod marker;
pub mod open;
pub mod paths;

pub use atomic::{check_target, replace_atomic, sync_dir, write_atomic};
pub use io::{kind_of, parent_dir, temp_name, IoError};
pub use marker::OutputDir;
pub use open::{check_regular, open_regular, read_private, read_regular, read_text};
pub use paths::{check_apart, resolve};
