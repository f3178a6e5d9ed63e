//! `uamt`: the daemon and its command-line tools.

use uamt_actors::cmd;

use clap::{Parser, Subcommand};

/// Semi-supervised 3D segmentation with the uncertainty-aware mean teacher (UA-MT).
#[derive(Debug, Parser)]
#[command(name = "uamt", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure throughput (the pipeline against the sequential loop).
    Bench(cmd::bench::Args),
    /// Train (without --config: a tiny built-in demo on synthetic data, on CPU).
    Train(cmd::train::Args),
    /// Print shape, data type, spacing, orientation and intensity statistics of volumes.
    Info(cmd::info::Args),
    /// Import a dataset (UA-MT HDF5 or the 2018 challenge's NRRD layout) into a dataset folder.
    Import(cmd::import::Args),
    /// Generate a synthetic LA-like dataset.
    Synth(cmd::synth::Args),
    /// Segmentation metrics (Dice, Jaccard, 95% Hausdorff, ASD) between label volumes, or of a
    /// weights file on a dataset's test split.
    Eval(cmd::eval::Args),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Import(a) => cmd::import::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Eval(a) => cmd::eval::run(a),
    }
}
