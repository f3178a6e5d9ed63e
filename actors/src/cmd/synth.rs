//! `uamt synth`: a synthetic LA-like dataset folder, deterministic by seed. The defaults are
//! [`SynthConfig::default`]'s, the same set a config's `[data.synth]` defaults to.

use super::import::log_report;
use super::parse::{size as parse_size, spacing as parse_spacing};
use std::path::PathBuf;
use uamt::data::synth::{write_synth_with, SynthConfig};

/// Arguments of `uamt synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Dataset folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Training cases.
    #[arg(long, default_value_t = SynthConfig::default().cases)]
    pub cases: usize,
    /// Of which the first K are labelled.
    #[arg(long, default_value_t = SynthConfig::default().labelled)]
    pub labelled: usize,
    /// Test cases.
    #[arg(long, default_value_t = SynthConfig::default().test)]
    pub test: usize,
    /// Volume size X,Y,Z (default 48,48,32).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<[usize; 3]>,
    /// Voxel spacing in mm: one value or X,Y,Z (default 0.625,0.625,1.25).
    #[arg(long, value_parser = parse_spacing)]
    pub spacing: Option<[f64; 3]>,
    /// Seed: the same seed writes the same volumes.
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    pub seed: u64,
    /// Write `.nii.gz` instead of `.nii`.
    #[arg(long)]
    pub gzip: bool,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let d = SynthConfig::default();
    let cfg = SynthConfig {
        cases: args.cases,
        labelled: args.labelled,
        test: args.test,
        size: args.size.unwrap_or(d.size),
        spacing: args.spacing.unwrap_or(d.spacing),
        seed: args.seed,
        gzip: args.gzip,
    };
    let mut bar = crate::progress::Bar::new("generating");
    log_report(&write_synth_with(&args.out, &cfg, args.force, &mut |d, t, id| bar.update(d, t, id))?);
    Ok(())
}
