//! `uamt`: the daemon and its command-line tools.

use uamt_actors::cmd;
use uamt_actors::logs::{subscriber, LogFormat};

use clap::{Parser, Subcommand};
use std::io::IsTerminal;

/// Semi-supervised 3D segmentation with the uncertainty-aware mean teacher (UA-MT).
#[derive(Debug, Parser)]
#[command(name = "uamt", version, about)]
struct Cli {
    /// How log lines on stderr look: `text` for people (numbers rounded to three significant
    /// digits), `json` (one object per line, full precision) for log collectors. Colours only
    /// when stderr is a terminal (and NO_COLOR is unset).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// What to do.
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
    /// Import a dataset (UA-MT HDF5, the 2018 challenge's NRRD layout, or a raw MSD / nnU-Net
    /// NIfTI folder) into a dataset folder.
    Import(cmd::import::Args),
    /// A training config planned from a dataset's fingerprint and this machine (or the one
    /// named): voxel size, patch, filters, schedule, evaluation, each with its reason.
    Plan(cmd::plan::Args),
    /// Generate a synthetic LA-like dataset.
    Synth(cmd::synth::Args),
    /// Segmentation metrics (Dice, Jaccard, 95% Hausdorff, ASD) between label volumes, or of a
    /// weights file on a dataset's test split.
    Eval(cmd::eval::Args),
    /// Label maps of new images (no label needed), in each input's own geometry.
    Predict(cmd::predict::Args),
    /// The unlabelled training cases (or raw images), most informative first: which to label next.
    Rank(cmd::rank::Args),
    /// A checkpoint's weights under the reference PyTorch V-Net's state_dict names.
    Export(cmd::export::Args),
    /// Ask a running daemon for its status, a checkpoint, or to stop (its HTTP endpoint).
    Ctl(cmd::ctl::Args),
}

/// Installs the global subscriber ([`subscriber`]): level from RUST_LOG (default info, the HTTP
/// server's own lines at debug), lines on stderr. Colours only when stderr is a terminal (and
/// NO_COLOR is unset).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::util::SubscriberInitExt;
    let no_colour = matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty());
    let colour = std::io::stderr().is_terminal() && !no_colour;
    subscriber(format, colour, std::io::stderr).init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Predict(_) | Command::Eval(_) | Command::Rank(_) => uamt::alloc::tune_for_inference(),
        _ => uamt::alloc::tune(),
    }
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
        Command::Plan(a) => cmd::plan::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Predict(a) => cmd::predict::run(a),
        Command::Rank(a) => cmd::rank::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Ctl(a) => cmd::ctl::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Logging to a stderr whose reader is gone (a closed pipe here, a hung-up terminal in
    /// use) drops the lines without a panic. The logging runs in a child (this test again) whose
    /// stderr is a pipe closed before it writes: a panic there fails the child.
    #[test]
    fn a_log_line_to_a_closed_stderr_is_dropped_without_a_panic() {
        if std::env::var_os("UAMT_TEST_CLOSED_STDERR").is_some() {
            std::thread::sleep(std::time::Duration::from_millis(300));
            for format in [LogFormat::Text, LogFormat::Json] {
                let sub = subscriber(format, false, std::io::stderr);
                tracing::subscriber::with_default(sub, || tracing::info!("into a closed pipe"));
            }
            return;
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::a_log_line_to_a_closed_stderr_is_dropped_without_a_panic", "--nocapture"])
            .env("UAMT_TEST_CLOSED_STDERR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        assert!(status.success(), "logging to a closed stderr failed the child: {status}");
    }
}
