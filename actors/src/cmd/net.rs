//! What `uamt eval` and `uamt predict` share: the network's shape for a bare weights file, the
//! sliding window, the device, and the loading of a checkpoint's student or teacher.

use super::parse::size as parse_size;
use std::path::Path;
use tch::Device;
use uamt::checkpoint::Snapshot;
use uamt::config::Config;
use uamt::eval::{inference_model, Blend, Connectivity, InferOptions, McOptions};
use uamt::model::{VNet, VNetConfig};
use uamt::recipe;

/// The network and its sliding window (flattened into a subcommand's arguments).
#[derive(Debug, clap::Args)]
pub struct NetArgs {
    /// V-Net filters at the first level (for --weights; a checkpoint says its own).
    #[arg(long, default_value_t = recipe::N_FILTERS)]
    pub n_filters: i64,
    /// Output classes (for --weights; a checkpoint says its own).
    #[arg(long, default_value_t = recipe::N_CLASSES)]
    pub n_classes: i64,
    /// Sliding-window patch X,Y,Z (each a multiple of 16); default the recipe's 112,112,80, or
    /// the config's with --checkpoint.
    #[arg(long, value_parser = parse_size)]
    pub patch: Option<[usize; 3]>,
    /// Sliding-window stride X,Y,Z; default the recipe's 18,18,4, or the config's with
    /// --checkpoint.
    #[arg(long, value_parser = parse_size)]
    pub stride: Option<[usize; 3]>,
    /// Windows per forward pass; default 4, or the config's with --checkpoint.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Keep only the largest connected component, with 6- or 26-connectivity (off by default).
    #[arg(long)]
    pub largest_component: Option<Connectivity>,
    /// How overlapping windows combine: `constant` (every window alike, the reference's average)
    /// or `gaussian` (weighted towards each window's centre, as nnU-Net); default constant, or
    /// the config's `eval.blend` with --checkpoint.
    #[arg(long)]
    pub blend: Option<Blend>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available). The device in a checkpoint's
    /// stored config is not consulted: this one is used.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

/// The same rule as the config's `device.device`, checked now (a GPU that is not there is
/// refused).
fn parse_device(s: &str) -> Result<Device, String> {
    uamt::config::DeviceConfig { device: s.into(), ..Default::default() }.resolve().map_err(|e| e.to_string())
}

impl NetArgs {
    /// The sliding window: these arguments where given, else `defaults` (a config's).
    pub fn window(&self, defaults: &InferOptions) -> InferOptions {
        InferOptions {
            patch: self.patch.unwrap_or(defaults.patch),
            stride: self.stride.unwrap_or(defaults.stride),
            batch_size: self.batch.unwrap_or(defaults.batch_size),
            largest_component: self.largest_component.or(defaults.largest_component),
            blend: self.blend.unwrap_or(defaults.blend),
        }
    }

    /// The V-Net of a bare weights file.
    pub fn weights_config(&self) -> VNetConfig {
        VNetConfig { n_filters: self.n_filters, n_classes: self.n_classes, ..VNetConfig::default() }
    }
}

/// A checkpoint's model on a device.
pub struct FromCheckpoint {
    /// The model that segments: the student, or the teacher when asked for.
    pub model: VNet,
    /// The model whose Monte-Carlo uncertainty is drawn: the checkpoint's teacher when the
    /// student segments (`None`: the segmenting model's own).
    pub teacher: Option<VNet>,
    /// The config stored in the checkpoint (or the one given instead).
    pub config: Config,
    /// Training iterations done when the checkpoint was written.
    pub iteration: i64,
}

/// Reads checkpoint `ck` (untrusted: every parse fallible) and builds its student, or with
/// `teacher` its teacher, on `device`; `config` replaces the stored config.
pub fn from_checkpoint(
    ck: &Path,
    config: Option<&Path>,
    teacher: bool,
    device: Device,
) -> anyhow::Result<FromCheckpoint> {
    let snap = Snapshot::read(ck)?;
    let cfg = match config {
        Some(p) => Config::load(p)?,
        None => Config::from_toml(&snap.config, ck)?,
    };
    let load = |named: &[(String, tch::Tensor)]| inference_model(&cfg.model, device, named, ck, &cfg.device);
    let t = snap.teacher.as_ref().map(|t| load(t)).transpose()?;
    let (model, teacher) = if teacher {
        let t = t.ok_or_else(|| {
            anyhow::anyhow!("{}: --teacher, but this checkpoint has no teacher (supervised training)", ck.display())
        })?;
        (t, None) // the teacher segments and also draws the uncertainty
    } else {
        (load(&snap.student)?, t)
    };
    Ok(FromCheckpoint { model, teacher, config: cfg, iteration: snap.iteration })
}

/// The most Monte-Carlo passes taken (`--mc-passes`).
pub const MAX_MC_PASSES: usize = 256;

/// The Monte-Carlo uncertainty of `eval` and `predict` (flattened into both).
#[derive(Debug, clap::Args)]
pub struct McArgs {
    /// Monte-Carlo passes (noise + dropout, the recipe's teacher passes) per window for the
    /// uncertainty map, at most 256; 0: the entropy of the prediction instead (no extra passes).
    /// Default: 8 (the recipe's T) for `eval`, 0 for `predict`.
    #[arg(long)]
    pub mc_passes: Option<usize>,
    /// Seed of the Monte-Carlo passes' noise and dropout.
    #[arg(long, default_value_t = 0)]
    pub mc_seed: u64,
}

impl McArgs {
    /// The passes asked for, or `default`.
    pub fn passes(&self, default: usize) -> usize {
        self.mc_passes.unwrap_or(default)
    }

    /// The Monte-Carlo options (`None`: the prediction's entropy); more than [`MAX_MC_PASSES`]
    /// passes are refused.
    pub fn options(&self, default: usize) -> anyhow::Result<Option<McOptions>> {
        let passes = self.passes(default);
        anyhow::ensure!(passes <= MAX_MC_PASSES, "--mc-passes {passes}: at most {MAX_MC_PASSES}");
        Ok((passes > 0).then(|| McOptions { passes, seed: self.mc_seed, ..McOptions::default() }))
    }
}

/// Refuses (naming the flags to change) segmenting the volume `file` (of `input` voxels, run on a
/// grid of `network` voxels) when its estimated peak does not fit this machine's memory.
pub fn check_inference_memory(
    (n_filters, n_classes): (i64, i64),
    window: &InferOptions,
    input: [usize; 3],
    network: [usize; 3],
    mc_passes: usize,
    file: &Path,
) -> anyhow::Result<()> {
    let need = uamt::footprint::inference_bytes(
        n_filters,
        n_classes,
        window.patch,
        window.batch_size,
        input,
        network,
        mc_passes,
    );
    let what = format!(
        "segmenting {} ({input:?} voxels) with {}x{}x{} windows, {} at a time,",
        file.display(),
        window.patch[0],
        window.patch[1],
        window.patch[2],
        window.batch_size
    );
    uamt::memory::check_fits(need, &what, "choose a smaller --patch or --batch").map_err(anyhow::Error::msg)
}
