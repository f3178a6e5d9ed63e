//! `uamt`: the daemon and its command-line tools.

use uamt_actors::cmd;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;

/// Semi-supervised 3D segmentation with the uncertainty-aware mean teacher (UA-MT).
#[derive(Debug, Parser)]
#[command(name = "uamt", version, about)]
struct Cli {
    /// How log lines on stderr look: `text` for people, `json` (one object per line) for log
    /// collectors. Colours only when stderr is a terminal (and NO_COLOR is unset).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure throughput (the pipeline against the sequential loop).
    Bench(cmd::bench::Args),
    /// Train (without --config: a tiny built-in demo on synthetic data, on CPU).
    Train(cmd::train::Args),
    /// Print shape, data type, spacing, orientation and intensity statistics of volumes.
    Info(cmd::info::Args),
    /// Import a dataset (UA-MT HDF5, the 2018 challenge's NRRD layout, or a raw MSD / nnU-Net
    /// NIfTI folder) into a dataset folder.
    Import(cmd::import::Args),
    /// Generate a synthetic LA-like dataset.
    Synth(cmd::synth::Args),
    /// Segmentation metrics (Dice, Jaccard, 95% Hausdorff, ASD) between label volumes, or of a
    /// weights file on a dataset's test split.
    Eval(cmd::eval::Args),
    /// Label maps of new images (no label needed), in each input's own geometry.
    Predict(cmd::predict::Args),
    /// A checkpoint's weights under the reference PyTorch V-Net's state_dict names.
    Export(cmd::export::Args),
}

/// Installs the global subscriber: level from RUST_LOG (default info), lines on stderr.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let no_colour = matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty());
    let colour = std::io::stderr().is_terminal() && !no_colour;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn main() -> anyhow::Result<()> {
    uamt::alloc::tune();
    let cli = Cli::parse();
    // One-shot commands: an interrupt removes what is half-written (the daemon finishes its step
    // and checkpoints instead, see supervisor.rs). Before any other thread starts.
    if !matches!(cli.command, Command::Train(_) | Command::Bench(_)) {
        uamt::fsutil::cleanup::remove_staged_on_signals()?;
    }
    init_logging(cli.log_format);
    match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Export(a) => cmd::export::run(a),
    }
}
