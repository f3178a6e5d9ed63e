//! `uamt export`: a checkpoint's student (or teacher) weights under the reference PyTorch
//! V-Net's `state_dict` names, as safetensors, a PyTorch-native `.pt` (what `torch.save` of the
//! `state_dict` writes; `torch.load(f, weights_only=True)` reads it) or `.npz`, written atomically.

use anyhow::Context;
use std::path::{Path, PathBuf};
use uamt::checkpoint::Snapshot;
use uamt::fsutil::OutputDir;

/// Arguments of `uamt export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint written by `uamt train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Export the teacher (the EMA weights) instead of the student.
    #[arg(long)]
    pub teacher: bool,
    /// Output file: `.safetensors`, `.pt` / `.pth` (PyTorch's own) or `.npz`; any other
    /// extension is refused. Never the checkpoint itself.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if uamt wrote it before (a file of the same name that uamt did not write
    /// is never replaced).
    #[arg(long)]
    pub force: bool,
}

/// The formats `export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    Pt,
    Npz,
}

/// The format `out`'s extension names; an error for any other.
fn format_of(out: &Path) -> anyhow::Result<Format> {
    let ext = out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "safetensors" => Ok(Format::Safetensors),
        "pt" | "pth" => Ok(Format::Pt),
        "npz" => Ok(Format::Npz),
        _ => anyhow::bail!(
            "--out {}: {} is not a format export writes; name the file .safetensors, .pt (or .pth) or .npz",
            out.display(),
            if ext.is_empty() { "no extension".to_string() } else { format!("`.{ext}`") }
        ),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let format = format_of(&args.out)?;
    uamt::fsutil::check_apart(&[("--out", &args.out)], &[("--checkpoint", &args.checkpoint)])?;
    let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The checkpoint is read (and refused if bad) before anything is created at --out.
    let snap = Snapshot::read(&args.checkpoint)?;
    let mut dir = OutputDir::open(uamt::fsutil::parent_dir(&args.out), "uamt export", args.force)?;
    let named = if args.teacher {
        snap.teacher.with_context(|| format!("{}: --teacher, but it has no teacher", args.checkpoint.display()))?
    } else {
        snap.student
    };
    dir.claim(&[name])?;
    uamt::fsutil::replace_atomic(&args.out, |tmp| -> anyhow::Result<()> {
        if format == Format::Pt {
            let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
            uamt::model::torchsave::write_state_dict(&named, std::io::BufWriter::new(file), &args.out)?;
        } else if format == Format::Npz {
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
