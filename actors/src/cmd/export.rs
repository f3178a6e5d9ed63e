//! `uamt export`: a checkpoint's student (or teacher) weights under the reference PyTorch
//! V-Net's `state_dict` names, as safetensors, a PyTorch-native `.pt` (what `torch.save` of the
//! `state_dict` writes; `torch.load(f, weights_only=True)` reads it) or `.npz`, written atomically.

use anyhow::Context;
use std::path::PathBuf;
use uamt::checkpoint::Snapshot;

/// Arguments of `uamt export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint written by `uamt train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Export the teacher (the EMA weights) instead of the student.
    #[arg(long)]
    pub teacher: bool,
    /// Output file: `.safetensors` (the default format), `.pt` / `.pth` (PyTorch's own) or `.npz`.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let snap = Snapshot::read(&args.checkpoint)?;
    let named = if args.teacher {
        snap.teacher.with_context(|| format!("{}: --teacher, but it has no teacher", args.checkpoint.display()))?
    } else {
        snap.student
    };
    let ext = args.out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let (npz, pt) = (ext == "npz", ext == "pt" || ext == "pth");
    uamt::fsutil::replace_atomic(&args.out, |tmp| -> anyhow::Result<()> {
        if pt {
            let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
            uamt::model::torchsave::write_state_dict(&named, std::io::BufWriter::new(file), &args.out)?;
        } else if npz {
            // write_npz wants the final extension; the temporary name keeps it.
            tch::Tensor::write_npz(&named, tmp)?;
        } else {
            tch::Tensor::write_safetensors(&named, tmp)?;
        }
        Ok(())
    })?;
    tracing::info!(out = %args.out.display(), tensors = named.len(), teacher = args.teacher, iteration = snap.iteration, "weights exported");
    Ok(())
}
