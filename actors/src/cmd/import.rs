//! `uamt import`: not built yet (the data issue fills it).

/// Arguments of `uamt import`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`uamt import` is not implemented yet")
}
