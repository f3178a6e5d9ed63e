//! One module per subcommand; each has `Args` (clap) and `run`.

pub mod bench;
pub mod eval;
pub mod export;
pub mod import;
pub mod import_raw;
pub mod info;
pub mod net;
pub mod parse;
pub mod plan;
pub mod predict;
pub mod synth;
pub mod train;
