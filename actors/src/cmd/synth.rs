//! `uamt synth`: not built yet (the data issue fills it).

/// Arguments of `uamt synth`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`uamt synth` is not implemented yet")
}
