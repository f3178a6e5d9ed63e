//! One module per subcommand; each has `Args` (clap) and `run`.

pub mod bench;
pub mod eval;
pub mod import;
pub mod info;
pub mod synth;
pub mod train;
