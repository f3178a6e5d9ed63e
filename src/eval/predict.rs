//! Segmenting new images that have no label (`uamt predict`): the preprocessing recorded at
//! import (normalisation, resampling) is applied to the raw image, the sliding window runs on
//! the network's grid, and the class probabilities are taken back to the input's own grid, so
//! the label map has the input's shape, affine and orientation. Optional probability and
//! uncertainty maps (same grid) and a PNG overlay.

use super::infer::{mc_uncertainty, sliding_window, InferOptions, McOptions};
use super::picture::{case_picture, PictureOptions};
use crate::data::nifti::stem;
use crate::data::preprocessing::Preprocessing;
use crate::data::resample::resample_linear;
use crate::data::{write_nifti, Geometry, GzCache, NiftiVolume, Volume};
use crate::model::VNet;
use crate::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `predict_file` writes besides the label map.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictOptions {
    /// The sliding window.
    pub infer: InferOptions,
    /// Write `<id>.prob.nii.gz` (foreground probability) and `<id>.uncertainty.nii.gz`.
    pub maps: bool,
    /// Monte-Carlo passes for the uncertainty map (`None`: the entropy of the prediction).
    pub mc: Option<McOptions>,
    /// Write `<id>.png`.
    pub picture: bool,
    /// Write `.nii.gz` (else `.nii`).
    pub gzip: bool,
}

/// One segmented image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictedCase {
    /// The case name (the input's file stem).
    pub id: String,
    /// The input image.
    pub input: PathBuf,
    /// The label map written.
    pub labels: PathBuf,
    /// Its shape (the input's).
    pub dims: [usize; 3],
    /// Voxel size in mm (the input's).
    pub spacing: [f64; 3],
    /// The input's orientation codes (`RAS`, `LPS`, ...), kept by the label map.
    pub orientation: String,
    /// The grid the network saw (after resampling).
    pub network_dims: [usize; 3],
    /// Segmented volume per non-background class value, in millilitres.
    pub volume_ml: std::collections::BTreeMap<String, f64>,
    /// Seconds spent segmenting (the sliding window and the label map in the input's grid; not
    /// reading, preprocessing, maps or writing).
    pub inference_seconds: f64,
}

/// A raw image read for the network: as it is in its file, and as the network sees it.
#[derive(Debug, Clone)]
pub struct RawImage {
    /// The image in its own grid and intensities.
    pub raw: Volume<f32>,
    /// Its geometry (checked: finite and non-degenerate).
    pub geometry: Geometry,
    /// Normalised and resampled as `preprocessing.json` says: the network's input.
    pub net_image: Volume<f32>,
}

impl RawImage {
    /// Reads the NIfTI image `input` and applies `prep` (normalisation, resampling; no crop).
    pub fn read(input: &Path, prep: &Preprocessing) -> Result<Self> {
        let file = NiftiVolume::open(input, &GzCache::Memory)?;
        let geometry = file.header().geometry;
        geometry.check().map_err(|why| crate::Error::File { path: input.to_path_buf(), why })?;
        let raw = file.read_f32()?;
        let (net_image, _) = prep.apply(&raw, &geometry, input)?;
        Ok(RawImage { raw, geometry, net_image })
    }
}

/// The volume of one voxel of `geometry` in millilitres: |det| of the affine's 3x3 part / 1000.
pub fn voxel_ml(geometry: &Geometry) -> f64 {
    let a = &geometry.affine;
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    det.abs() / 1000.0
}

/// The names of the files [`predict_file`] writes for the case `id`.
pub fn output_names(id: &str, opts: &PredictOptions) -> Vec<String> {
    let ext = if opts.gzip { ".nii.gz" } else { ".nii" };
    let mut v = vec![format!("{id}.label{ext}")];
    if opts.maps {
        v.push(format!("{id}.prob{ext}"));
        v.push(format!("{id}.uncertainty{ext}"));
    }
    if opts.picture {
        v.push(format!("{id}.png"));
    }
    v
}

/// Segments the NIfTI image `input` and writes `<id>.label.nii[.gz]` (and the optional outputs)
/// into `out`. `teacher`, when given, draws the Monte-Carlo uncertainty.
pub fn predict_file(
    model: &VNet,
    teacher: Option<&VNet>,
    input: &Path,
    prep: &Preprocessing,
    out: &Path,
    opts: &PredictOptions,
) -> Result<PredictedCase> {
    let RawImage { raw, geometry, net_image } = RawImage::read(input, prep)?;
    let image_t = net_image.to_tensor()?;
    let started = std::time::Instant::now();
    let pred = sliding_window(model, &image_t, &opts.infer)?;
    let dims = raw.dims;
    let resampled = net_image.dims != dims;
    let labels = pred.labels_in(dims, opts.infer.largest_component)?;
    let inference_seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(out).map_err(|e| crate::Error::Io { path: out.to_path_buf(), source: e })?;
    let id = stem(input);
    let ext = if opts.gzip { ".nii.gz" } else { ".nii" };
    let path = |kind: &str| out.join(format!("{id}.{kind}{ext}"));
    let label_path = path("label");
    write_nifti(&label_path, &labels, &geometry)?;
    let back = |v: Volume<f32>| if resampled { resample_linear(&v, dims) } else { Ok(v) };
    let mut uncertainty = None;
    if opts.maps || opts.picture {
        let u = match &opts.mc {
            Some(mc) => mc_uncertainty(teacher.unwrap_or(model), &image_t, &opts.infer, mc)?,
            None => pred.entropy(),
        };
        uncertainty = Some(back(Volume::<f32>::from_tensor(&u)?)?);
    }
    if opts.maps {
        let fg = back(Volume::<f32>::from_tensor(&(1.0 - pred.probabilities.get(0)))?)?;
        write_nifti(path("prob"), &fg, &geometry)?;
        if let Some(u) = &uncertainty {
            write_nifti(path("uncertainty"), u, &geometry)?;
        }
    }
    if opts.picture {
        let pic = case_picture(&raw, None, &labels, uncertainty.as_ref(), &PictureOptions::default())?;
        pic.write_png(&out.join(format!("{id}.png")))?;
    }
    let ml = voxel_ml(&geometry);
    let mut counts = std::collections::BTreeMap::<u8, usize>::new();
    for &l in labels.data.iter().filter(|&&l| l != 0) {
        *counts.entry(l).or_default() += 1;
    }
    let volume_ml = counts.into_iter().map(|(c, n)| (c.to_string(), n as f64 * ml)).collect();
    Ok(PredictedCase {
        id,
        input: input.to_path_buf(),
        labels: label_path,
        dims,
        spacing: geometry.spacing(),
        orientation: geometry.orientation(),
        network_dims: net_image.dims,
        volume_ml,
        inference_seconds,
    })
}
