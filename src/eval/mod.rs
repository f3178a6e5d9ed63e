//! Evaluation: sliding-window segmentation of whole volumes, medpy's surface metrics, reports, and
//! outputs to look at (NIfTI label / probability / uncertainty maps, PNG slices).
//!
//! # Layout
//! - [`infer`]: the reference's sliding window (`test_single_case`), largest-component option;
//!   [`blend`]: how overlapping windows combine (the reference's average, or Gaussian weights).
//! - [`metrics`]: Dice, Jaccard, hd95, asd as `medpy.metric.binary` defines them; [`edt`]: the
//!   exact Euclidean distance transform they rest on.
//! - [`calibration`]: how far the probabilities and the uncertainty can be trusted (ECE, Brier
//!   score, AUROC of the uncertainty as a detector of errors, the reliability diagram's bins).
//! - [`report`]: per-case results, mean and std, JSON / CSV / table.
//! - [`picture`]: a PNG of a few axial slices per case, and the reliability diagram.
//! - [`predict`]: label maps of new, unlabelled images in their own geometry (`uamt predict`).
//! - [`rank`]: which unlabelled volumes to label next, by Monte-Carlo uncertainty (`uamt rank`).
//! - [`compare`]: metrics between label files made elsewhere.
//! - here: [`evaluate_dataset`], the whole evaluation of a model on a dataset's test split, and
//!   [`model_from_named`], building the model from named tensors (a weights file, a checkpoint).
//!
//! What the daemon calls: `model_from_named` when a checkpoint arrives, then `evaluate_dataset`
//! with a progress callback, then [`Report::write_json`] / [`Report::write_csv`].

pub mod blend;
pub mod calibration;
pub mod compare;
pub mod edt;
pub mod infer;
pub mod metrics;
pub mod picture;
pub mod predict;
pub mod rank;
pub mod report;

pub use blend::Blend;
pub use calibration::{Calibration, Reliability, UncertaintySource};
pub use compare::{compare_files, compare_paths};
pub use infer::{
    largest_component, mc_uncertainty, sliding_window, Connectivity, InferOptions, McOptions, Prediction, WindowPlan,
};
pub use metrics::{case_metrics, CaseMetrics, EmptyPolicy};
pub use picture::{case_picture, reliability_picture, Picture, PictureOptions};
pub use rank::{RankConfig, RankOptions, RankedCase, Ranking, Score};
pub use report::{CaseEvent, CaseFailure, CaseResult, Inference, Report, Stat, Summary, RELIABILITY_PNG};

use crate::data::resample::{resample_case, resample_linear};
use crate::data::{write_nifti, Case, Dataset, Volume};
use crate::model::{params::read_named, VNet, VNetConfig};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What is written for each case besides the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// The folder (created if missing).
    pub dir: PathBuf,
    /// `<id>.label.nii.gz` (uint8), `<id>.prob.nii.gz` (foreground probability, float32) and
    /// `<id>.uncertainty.nii.gz` (float32, see `uncertainty`), with the image's affine.
    pub nifti: bool,
    /// `<id>.png` (see [`picture`]), its uncertainty panel showing the same map.
    pub pictures: bool,
    /// How the pictures look.
    pub picture: PictureOptions,
    /// The uncertainty map: `Some`: the Monte-Carlo uncertainty of the teacher (see
    /// [`mc_uncertainty`]; the evaluated model itself when no teacher is given), what UA-MT's
    /// teacher sees; `None`: the entropy of the deterministic prediction (no extra passes).
    /// The uncertainty AUROC scores this map; without outputs it scores the entropy (the
    /// Monte-Carlo passes cost `passes` forward passes per window more, paid only when the map
    /// is written).
    pub uncertainty: Option<McOptions>,
}

/// How a model is evaluated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalOptions {
    /// Window geometry, batching, post-processing.
    pub infer: InferOptions,
    /// How an empty prediction is scored.
    pub empty: EmptyPolicy,
    /// Files to write per case, if any.
    pub outputs: Option<Outputs>,
    /// Run the network at this voxel size (mm): each image whose own voxel size differs is
    /// resampled to it (trilinear), and the class probabilities are taken back to the image's
    /// own grid (trilinear, then argmax), where the metrics and outputs are computed. A model
    /// trained at a reduced resolution is so scored against the original labels. `None`: as is.
    pub network_spacing: Option<[f64; 3]>,
}

/// A V-Net shaped by `config` on `device` with its weights taken from `named` (every tensor of
/// the model must be present, with its shape; `origin` names the source in errors).
pub fn model_from_named(
    config: &VNetConfig,
    device: Device,
    named: &[(String, Tensor)],
    origin: &Path,
) -> Result<VNet> {
    let model = VNet::new(config, device)?;
    model.store().load_named(named, origin, false)?;
    Ok(model)
}

/// The one way to make a model for inference from named weights, whatever their source (a
/// checkpoint's student or teacher, an exported weights file): shaped by `config`, on `device`,
/// its activations channels-last where `layout` (a `[device]` section) says so, as in training,
/// and its BatchNorm folded into the convolutions ([`VNet::folded_for_inference`]: eval-mode and
/// Monte-Carlo passes only).
pub fn inference_model(
    config: &VNetConfig,
    device: Device,
    named: &[(String, Tensor)],
    origin: &Path,
    layout: &crate::device::DeviceConfig,
) -> Result<VNet> {
    let mut model = model_from_named(config, device, named, origin)?;
    model.set_channels_last(layout.channels_last(config.n_filters, device));
    Ok(model.folded_for_inference())
}

/// [`inference_model`] on a weights file of any format [`read_named`] reads (`.safetensors`,
/// `.npz`, PyTorch's `state_dict` `.pt` / `.pth`, TorchScript, tch's `.ot`), with the default
/// `[device]` layout (channels-last on a CPU from 8 filters), as a checkpoint with the
/// default config gets.
pub fn load_weights(path: &Path, config: &VNetConfig, device: Device) -> Result<VNet> {
    inference_model(config, device, &read_named(path)?, path, &crate::device::DeviceConfig::default())
}

/// The uncertainty that [`evaluate_case`] maps and scores under `opts` (`teacher`: whether a
/// teacher is given).
pub fn uncertainty_source(opts: &EvalOptions, teacher: bool) -> UncertaintySource {
    match opts.outputs.as_ref().and_then(|o| o.uncertainty.as_ref()) {
        Some(mc) => UncertaintySource::MonteCarlo { passes: mc.passes, seed: mc.seed, teacher },
        None => UncertaintySource::Entropy,
    }
}

/// Segments one case, scores it against its label (segmentation and calibration metrics) and
/// writes the requested outputs; `teacher`, when given, is the model whose Monte-Carlo
/// uncertainty is drawn (a checkpoint's teacher).
pub fn evaluate_case(model: &VNet, teacher: Option<&VNet>, case: &Case, opts: &EvalOptions) -> Result<CaseMetrics> {
    Ok(evaluate_case_binned(model, teacher, case, opts)?.0)
}

/// [`evaluate_case`], with the case's reliability bins.
fn evaluate_case_binned(
    model: &VNet,
    teacher: Option<&VNet>,
    case: &Case,
    opts: &EvalOptions,
) -> Result<(CaseMetrics, Reliability)> {
    let label = case
        .label
        .as_ref()
        .ok_or_else(|| Error::invalid("dataset", format!("test case `{}` has no label to compare with", case.id)))?;
    let reference = label.read_labels()?;
    let image = case.image.read_f32()?;
    let header = case.image.header();
    let own = header.geometry.spacing();
    let resampled = match opts.network_spacing {
        Some(s) if s.iter().zip(own).any(|(a, b)| (a - b).abs() > 1e-6 * b) => {
            Some(resample_case(&image, None, &header.geometry, s)?.0)
        }
        _ => None,
    };
    let image_t = resampled.as_ref().unwrap_or(&image).to_tensor()?;
    let pred = sliding_window(model, &image_t, &opts.infer)?;
    let labels = pred.labels_in(image.dims, opts.infer.largest_component)?;
    // Maps made on the network's grid, in the image's.
    let back = |v: Volume<f32>| if v.dims == image.dims { Ok(v) } else { resample_linear(&v, image.dims) };
    let mut metrics = case_metrics(&labels, &reference, header.spacing, opts.empty)?;
    let uncertainty = match opts.outputs.as_ref().and_then(|o| o.uncertainty.as_ref()) {
        Some(mc) => mc_uncertainty(teacher.unwrap_or(model), &image_t, &opts.infer, mc)?,
        None => pred.entropy(),
    };
    let uncertainty = back(Volume::<f32>::from_tensor(&uncertainty)?)?;
    // Every non-zero label is foreground: its probability is that of every class but 0 (class
    // 1's, what `prob.nii.gz` holds, for two classes).
    let classes = pred.probabilities.size()[0];
    let foreground = pred.probabilities.f_narrow(0, 1, classes - 1)?.f_sum_dim_intlist(0, false, Kind::Float)?;
    let probability = back(Volume::<f32>::from_tensor(&foreground)?)?;
    let (calibration, bins) = Calibration::of(&probability.data, &labels.data, &reference.data, &uncertainty.data)?;
    metrics.calibration = Some(calibration);
    if let Some(out) = &opts.outputs {
        std::fs::create_dir_all(&out.dir).map_err(|e| Error::Io { path: out.dir.clone(), source: e })?;
        if out.nifti {
            let file = |kind: &str| out.dir.join(format!("{}.{kind}.nii.gz", case.id));
            write_nifti(file("label"), &labels, &header.geometry)?;
            let class1 =
                if classes == 2 { probability } else { back(Volume::<f32>::from_tensor(&pred.foreground())?)? };
            write_nifti(file("prob"), &class1, &header.geometry)?;
            write_nifti(file("uncertainty"), &uncertainty, &header.geometry)?;
        }
        if out.pictures {
            let pic = case_picture(&image, Some(&reference), &labels, Some(&uncertainty), &out.picture)?;
            pic.write_png(&out.dir.join(format!("{}.png", case.id)))?;
        }
    }
    Ok((metrics, bins))
}

/// Evaluates `model` on `cases`: a case that fails (unreadable, no label, ...) is listed in the
/// report's failures and the others go on. `progress` hears about every case as it ends.
pub fn evaluate_cases(
    model: &VNet,
    teacher: Option<&VNet>,
    cases: &[Case],
    source: &str,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(&CaseEvent),
) -> Report {
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut pooled: Option<Reliability> = None;
    for (index, case) in cases.iter().enumerate() {
        let t0 = Instant::now();
        let outcome = evaluate_case_binned(model, teacher, case, opts)
            .map(|(metrics, bins)| {
                pooled.get_or_insert_with(Reliability::default).merge(&bins);
                metrics
            })
            .map_err(|e| e.to_string());
        let event = CaseEvent {
            index,
            total: cases.len(),
            id: &case.id,
            outcome: outcome.as_ref().map_err(String::as_str),
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress(&event);
        match outcome {
            Ok(metrics) => results.push(CaseResult { id: case.id.clone(), metrics }),
            Err(error) => failures.push(CaseFailure { id: case.id.clone(), error }),
        }
    }
    let mut report = Report::new(source, results, failures);
    report.uncertainty = Some(uncertainty_source(opts, teacher.is_some()));
    report.reliability = pooled;
    let infer = &opts.infer;
    report.inference = Some(Inference {
        patch: infer.patch,
        stride: infer.stride,
        blend: infer.blend,
        largest_component: infer.largest_component,
        network_spacing: opts.network_spacing,
    });
    report
}

/// Evaluates `model` on the test split of `dataset` (see [`evaluate_cases`]); an error only when
/// the split is empty.
pub fn evaluate_dataset(
    model: &VNet,
    teacher: Option<&VNet>,
    dataset: &Dataset,
    source: &str,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(&CaseEvent),
) -> Result<Report> {
    if dataset.test.is_empty() {
        return Err(Error::File {
            path: dataset.root.join(crate::data::dataset::MANIFEST),
            why: "the test split lists no case".into(),
        });
    }
    Ok(evaluate_cases(model, teacher, &dataset.test, source, opts, progress))
}
