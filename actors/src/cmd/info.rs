//! `uamt info`: not built yet (the data issue fills it).

/// Arguments of `uamt info`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`uamt info` is not implemented yet")
}
