//! One module per subcommand; each has `Args` (clap) and `run`.

pub mod bench;
pub mod ctl;
pub mod eval;
pub mod export;
pub mod import;
pub mod import_raw;
pub mod info;
pub mod net;
pub mod parse;
pub mod plan;
pub mod predict;
pub mod rank;
pub mod synth;
pub mod train;
