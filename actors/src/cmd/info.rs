//! `uamt info`: shape, data type, spacing, orientation and intensity statistics of volume files,
//! the way nib-ls or fslinfo print them.

use std::io::Write;
use std::path::PathBuf;
use uamt::data::stats::{describe, VolumeInfo};

/// Arguments of `uamt info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Volume files: .nii, .nii.gz, .nrrd, or UA-MT .h5 (one row per 3-D dataset).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn fmt_triple(v: [f64; 3]) -> String {
    v.iter()
        .map(|x| format!("{x:.4}").trim_end_matches('0').trim_end_matches('.').to_string())
        .collect::<Vec<_>>()
        .join("x")
}

fn row(i: &VolumeInfo) -> Vec<String> {
    let labels = i
        .labels
        .as_ref()
        .map_or("-".into(), |l| l.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(" "));
    vec![
        i.file.clone(),
        i.shape.map(|d| d.to_string()).join("x"),
        i.dtype.clone(),
        i.spacing.map_or("-".into(), fmt_triple),
        i.orientation.clone().unwrap_or_else(|| "-".into()),
        format!("{:.4}", i.min),
        format!("{:.4}", i.max),
        format!("{:.4}", i.mean),
        format!("{:.4}", i.std),
        if i.non_finite > 0 { format!("{labels} (non-finite: {})", i.non_finite) } else { labels },
    ]
}

/// Formats rows as a left-aligned table with a header.
fn table(infos: &[VolumeInfo]) -> String {
    let header = ["file", "shape", "dtype", "spacing", "orient", "min", "max", "mean", "std", "labels"]
        .map(String::from)
        .to_vec();
    let rows: Vec<Vec<String>> = std::iter::once(header).chain(infos.iter().map(row)).collect();
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| {
            r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
                + "\n"
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut infos = Vec::new();
    let mut failed = 0;
    for f in &args.files {
        match describe(f) {
            Ok(mut v) => infos.append(&mut v),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    let text = if args.json {
        serde_json::to_string_pretty(&infos)? + "\n"
    } else if infos.is_empty() {
        String::new()
    } else {
        table(&infos)
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`uamt info ... | head`) is not an error.
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} files could not be read", args.files.len());
    }
    Ok(())
}
