//! `uamt eval`: segmentation metrics between label volumes, or of a weights file on a dataset.

/// Arguments of `uamt eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("uamt eval: not implemented yet")
}
