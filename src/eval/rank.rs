//! Which unlabelled scans a person should label next (`uamt rank`, and the daemon's `[rank]`):
//! per-volume scores from a model's Monte-Carlo passes, the most informative volume first.
//!
//! One sweep of the sliding window computes, per window, the deterministic prediction (eval mode,
//! what `predict` segments) and `T` Monte-Carlo passes (input noise and dropout, the recipe's
//! teacher passes, see [`McOptions`]); the window averages hold per voxel the class
//! probabilities, the mean of the passes' probabilities `mu` and the mean of the passes' own
//! entropies. From them, per voxel (entropy `H(p) = -sum_c p_c ln(p_c + 1e-6)`, the recipe's):
//! - the predictive entropy `H(mu)` (the Monte-Carlo uncertainty `eval` and UA-MT use);
//! - BALD, the mutual information between the prediction and the passes' weights (dropout masks;
//!   here also the input noise): `H(mu) - mean_t H(p_t)`, never negative since `H` is concave
//!   (float residues below zero are set to 0).
//!
//! Per volume, each map's mean over two regions: the whole volume (`entropy`, `bald`) and the
//! predicted foreground with its boundary band (`entropy_fg`, `bald_fg`): every voxel within
//! `band` voxels (Euclidean distance on the network's grid) of a predicted foreground voxel.
//! A region without voxels (nothing segmented) leaves its scores undefined (`None`), and such
//! volumes rank after every volume whose score is defined. Ties go to the smaller case id.

use super::edt::squared_edt;
use super::infer::{deterministic_probs, mc_pass_probs, window_average, InferOptions, McOptions, Prediction};
use super::picture::{case_picture, Picture, PictureOptions};
use super::predict::{voxel_ml, RawImage};
use crate::check::{self, limits};
use crate::data::preprocessing::Preprocessing;
use crate::data::resample::resample_linear;
use crate::data::{Case, Geometry, Volume};
use crate::model::VNet;
use crate::uncertainty::entropy;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A per-volume score to rank by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Score {
    /// Mean predictive entropy over the whole volume.
    Entropy,
    /// Mean BALD over the whole volume.
    Bald,
    /// Mean predictive entropy over the predicted foreground and its boundary band (the default:
    /// on LA it found the cases the model gets wrong, BALD the ones it gets right; README).
    #[default]
    EntropyFg,
    /// Mean BALD over the predicted foreground and its boundary band.
    BaldFg,
}

impl Score {
    /// Every score, in the order of the reports' columns.
    pub const ALL: [Score; 4] = [Score::Entropy, Score::Bald, Score::EntropyFg, Score::BaldFg];

    /// Its name in reports, flags and the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Score::Entropy => "entropy",
            Score::Bald => "bald",
            Score::EntropyFg => "entropy_fg",
            Score::BaldFg => "bald_fg",
        }
    }

    /// The score called `s`.
    pub fn parse(s: &str) -> std::result::Result<Score, String> {
        Score::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("`{s}`: give one of {}", Score::ALL.map(Score::as_str).join(", ")))
    }

    /// This score of `s`.
    pub fn of(self, s: &CaseScores) -> Option<f64> {
        match self {
            Score::Entropy => s.entropy,
            Score::Bald => s.bald,
            Score::EntropyFg => s.entropy_fg,
            Score::BaldFg => s.bald_fg,
        }
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scores of one volume, in nats per voxel; `None` where undefined (an empty region, or a
/// map that is not finite).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CaseScores {
    /// Mean predictive entropy `H(mu)` over the volume.
    pub entropy: Option<f64>,
    /// Mean BALD over the volume.
    pub bald: Option<f64>,
    /// Mean predictive entropy over the predicted foreground and its band.
    pub entropy_fg: Option<f64>,
    /// Mean BALD over the predicted foreground and its band.
    pub bald_fg: Option<f64>,
}

/// Running sums, over Monte-Carlo passes, of the class probabilities and of each pass's entropy.
#[derive(Debug, Default)]
pub struct PassMeans {
    /// Sum of the passes' probabilities `[b, C, ...]`.
    sum_p: Option<Tensor>,
    /// Sum of the passes' entropies `[b, 1, ...]`.
    sum_h: Option<Tensor>,
    /// Passes added.
    n: usize,
}

impl PassMeans {
    /// Adds one pass's class probabilities `p` (`[b, C, ...]`, classes on axis 1).
    pub fn add(&mut self, p: &Tensor) -> Result<()> {
        let h = entropy(p, 1, true);
        self.sum_p = Some(match self.sum_p.take() {
            None => p.shallow_clone(),
            Some(s) => s.f_add(p)?,
        });
        self.sum_h = Some(match self.sum_h.take() {
            None => h,
            Some(s) => s.f_add(&h)?,
        });
        self.n += 1;
        Ok(())
    }

    /// `[b, C + 1, ...]`: the mean probabilities, then the mean of the passes' entropies.
    pub fn finish(self) -> Result<Tensor> {
        let (Some(p), Some(h)) = (self.sum_p, self.sum_h) else {
            return Err(Error::invalid("rank.mc_passes", "at least one Monte-Carlo pass is needed"));
        };
        let n = self.n as f64;
        Ok(Tensor::f_cat(&[p.f_div_scalar(n)?, h.f_div_scalar(n)?], 1)?)
    }
}

/// The predictive entropy `H(mu)` and BALD `max(H(mu) - mean_h, 0)` maps from the mean class
/// probabilities `mu` (`[C, ...]`) and the mean of the passes' entropies `mean_h` (`[...]`).
pub fn uncertainty_maps(mu: &Tensor, mean_h: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = entropy(mu, 0, false);
    let bald = h.f_sub(mean_h)?.f_clamp_min(0.0)?;
    Ok((h, bald))
}

/// A volume's prediction and uncertainty maps on the network's grid.
#[derive(Debug)]
pub struct RankMaps {
    /// The deterministic prediction (as `predict` and `eval` segment).
    pub prediction: Prediction,
    /// The predictive entropy `H(mu)` `[X, Y, Z]`, equal to [`super::mc_uncertainty`]'s map.
    pub entropy: Tensor,
    /// BALD `[X, Y, Z]`.
    pub bald: Tensor,
}

/// The prediction of `model` and the Monte-Carlo maps of `teacher` (the model itself when
/// `None`) on `image` (`[X, Y, Z]`), in one sweep of the sliding window: per window one
/// eval-mode pass and `mc.passes` Monte-Carlo passes.
pub fn rank_maps(
    model: &VNet,
    teacher: Option<&VNet>,
    image: &Tensor,
    infer: &InferOptions,
    mc: &McOptions,
) -> Result<RankMaps> {
    mc.validate("rank")?;
    let mc_model = teacher.unwrap_or(model);
    let classes = model.config().n_classes;
    if mc_model.config().n_classes != classes {
        return Err(Error::invalid(
            "rank",
            format!("the teacher has {} classes, the model {classes}", mc_model.config().n_classes),
        ));
    }
    let all = window_average(&[model, mc_model], image, infer, 2 * classes + 1, &|nets, x, first| {
        let det = deterministic_probs(nets[0], x)?;
        let mut means = PassMeans::default();
        for t in 0..mc.passes as u64 {
            means.add(&mc_pass_probs(nets[1], x, first, t, mc)?)?;
        }
        Ok(Tensor::f_cat(&[det, means.finish()?], 1)?)
    })?;
    let probabilities = all.f_narrow(0, 0, classes)?.f_contiguous()?;
    let mu = all.f_narrow(0, classes, classes)?;
    let (entropy, bald) = uncertainty_maps(&mu, &all.f_get(2 * classes)?)?;
    let prediction = Prediction::of(probabilities, infer.largest_component)?;
    Ok(RankMaps { prediction, entropy, bald })
}

/// The predicted foreground and its boundary band: every voxel within `band` voxels (Euclidean,
/// centre to centre) of a voxel whose label is not 0; the foreground itself when `band` is 0,
/// nothing when nothing is segmented.
pub fn foreground_band(labels: &Volume<u8>, band: f64) -> Vec<bool> {
    let feature: Vec<bool> = labels.data.iter().map(|&l| l != 0).collect();
    let limit = band * band;
    squared_edt(&feature, labels.dims, [1.0; 3]).into_iter().map(|d| d <= limit).collect()
}

/// The mean of `values` where `keep` holds (everywhere when `keep` is `None`), in f64; `None`
/// when no voxel is kept or the mean is not finite.
fn mean_over(values: &[f32], keep: Option<&[bool]>) -> Option<f64> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (i, &v) in values.iter().enumerate() {
        if keep.is_none_or(|k| k[i]) {
            sum += v as f64;
            n += 1;
        }
    }
    let mean = sum / n as f64;
    (n > 0 && mean.is_finite()).then_some(mean)
}

/// The four scores of a volume from its maps (same length) and its foreground-and-band region.
pub fn case_scores(entropy: &[f32], bald: &[f32], region: &[bool]) -> CaseScores {
    CaseScores {
        entropy: mean_over(entropy, None),
        bald: mean_over(bald, None),
        entropy_fg: mean_over(entropy, Some(region)),
        bald_fg: mean_over(bald, Some(region)),
    }
}

/// How volumes are ranked.
#[derive(Debug, Clone, PartialEq)]
pub struct RankOptions {
    /// The sliding window (as `predict`'s).
    pub infer: InferOptions,
    /// The Monte-Carlo passes.
    pub mc: McOptions,
    /// Width of the boundary band around the predicted foreground, in voxels of the network's grid.
    pub band: f64,
    /// Also draw each volume's picture (image, predicted contour, predictive entropy).
    pub picture: bool,
}

/// One ranked volume: what `ranking.json` and `ranking.csv` hold per case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCase {
    /// 1 for the most informative (set by [`Ranking::new`]).
    pub rank: usize,
    /// The case id (a dataset's, or the input file's stem).
    pub case: String,
    /// The image file.
    pub source: PathBuf,
    /// Every score.
    #[serde(flatten)]
    pub scores: CaseScores,
    /// Predicted foreground volume (every non-zero label) in millilitres, in the image's own grid.
    pub volume_ml: f64,
    /// Voxels of the network's grid.
    pub voxels: usize,
    /// Predicted foreground voxels there.
    pub foreground_voxels: usize,
    /// Voxels of the foreground-and-band region there.
    pub region_voxels: usize,
    /// The image's shape.
    pub dims: [usize; 3],
    /// The network's grid (after resampling).
    pub network_dims: [usize; 3],
}

/// Ranks the volume `net_image` (the network's input; `raw` with `geometry` the image in its own
/// grid, where the volume and the picture are taken) of case `id` read from `source`.
#[allow(clippy::too_many_arguments)]
fn rank_image(
    model: &VNet,
    teacher: Option<&VNet>,
    id: &str,
    source: &Path,
    raw: &Volume<f32>,
    geometry: &Geometry,
    net_image: &Volume<f32>,
    opts: &RankOptions,
) -> Result<(RankedCase, Option<Picture>)> {
    let maps = rank_maps(model, teacher, &net_image.to_tensor()?, &opts.infer, &opts.mc)?;
    let net_labels = maps.prediction.label_volume()?;
    let entropy = Volume::<f32>::from_tensor(&maps.entropy)?;
    let bald = Volume::<f32>::from_tensor(&maps.bald)?;
    let region = foreground_band(&net_labels, opts.band);
    let scores = case_scores(&entropy.data, &bald.data, &region);
    let labels = maps.prediction.labels_in(raw.dims, opts.infer.largest_component)?;
    let foreground = labels.data.iter().filter(|&&l| l != 0).count();
    let picture = if opts.picture {
        let u = if entropy.dims == raw.dims { entropy } else { resample_linear(&entropy, raw.dims)? };
        Some(case_picture(raw, None, &labels, Some(&u), &PictureOptions::default())?)
    } else {
        None
    };
    let ranked = RankedCase {
        rank: 0,
        case: id.to_string(),
        source: source.to_path_buf(),
        scores,
        volume_ml: foreground as f64 * voxel_ml(geometry) + 0.0,
        voxels: net_labels.data.len(),
        foreground_voxels: net_labels.data.iter().filter(|&&l| l != 0).count(),
        region_voxels: region.iter().filter(|&&r| r).count(),
        dims: raw.dims,
        network_dims: net_image.dims,
    };
    Ok((ranked, picture))
}

/// Ranks a case of a dataset folder (its image as stored: the network's grid).
pub fn rank_case(
    model: &VNet,
    teacher: Option<&VNet>,
    case: &Case,
    opts: &RankOptions,
) -> Result<(RankedCase, Option<Picture>)> {
    let image = case.image.read_f32()?;
    let geometry = case.image.header().geometry;
    rank_image(model, teacher, &case.id, case.image.path(), &image, &geometry, &image, opts)
}

/// Ranks a raw NIfTI image, prepared as `predict` prepares it (`prep`: the recorded
/// normalisation and resampling); its id is the file's stem.
pub fn rank_file(
    model: &VNet,
    teacher: Option<&VNet>,
    input: &Path,
    prep: &Preprocessing,
    opts: &RankOptions,
) -> Result<(RankedCase, Option<Picture>)> {
    let r = RawImage::read(input, prep)?;
    let id = crate::data::nifti::stem(input);
    rank_image(model, teacher, &id, input, &r.raw, &r.geometry, &r.net_image, opts)
}

/// The order of two cases under `score`: defined scores first, higher first, then the case id.
fn order(score: Score, a: &RankedCase, b: &RankedCase) -> std::cmp::Ordering {
    let key = |c: &RankedCase| score.of(&c.scores);
    match (key(a), key(b)) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
    .then_with(|| a.case.cmp(&b.case))
}

/// Whether `a` ranks before `b` under `score` (see [`Ranking::new`]).
pub fn ranks_before(score: Score, a: &RankedCase, b: &RankedCase) -> bool {
    order(score, a, b) == std::cmp::Ordering::Less
}

/// The Monte-Carlo passes behind a ranking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankSource {
    /// The model file or run the weights came from.
    pub model: String,
    /// Whether the Monte-Carlo passes are a teacher's (the checkpoint's EMA weights).
    pub teacher: bool,
    /// Passes per window.
    pub mc_passes: usize,
    /// Their seed.
    pub mc_seed: u64,
    /// The boundary band, voxels.
    pub band_voxels: f64,
    /// The training iteration of the weights, when known.
    pub iteration: Option<i64>,
}

/// Volumes sorted most informative first: what `ranking.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    /// The score the order follows.
    pub score: Score,
    /// Where the scores come from.
    pub source: RankSource,
    /// Every ranked volume, `rank` 1 first.
    pub cases: Vec<RankedCase>,
}

impl Ranking {
    /// Sorts `cases` by `score` (highest first; undefined scores last; ties by case id) and
    /// numbers them from 1.
    pub fn new(score: Score, source: RankSource, mut cases: Vec<RankedCase>) -> Self {
        cases.sort_by(|a, b| order(score, a, b));
        for (i, c) in cases.iter_mut().enumerate() {
            c.rank = i + 1;
        }
        Ranking { score, source, cases }
    }

    /// The first `k` cases (all when `None`).
    pub fn top(&self, k: Option<usize>) -> &[RankedCase] {
        &self.cases[..k.unwrap_or(usize::MAX).min(self.cases.len())]
    }

    /// This ranking with only its first `k` cases.
    pub fn truncated(&self, k: Option<usize>) -> Ranking {
        Ranking { score: self.score, source: self.source.clone(), cases: self.top(k).to_vec() }
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// CSV: `case,rank,entropy,bald,entropy_fg,bald_fg,volume_ml`, an empty cell where a score is
    /// undefined.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("case,rank");
        for s in Score::ALL {
            out += &format!(",{s}");
        }
        out += ",volume_ml\n";
        for c in &self.cases {
            out += &format!("{},{}", csv_cell(&c.case), c.rank);
            for s in Score::ALL {
                out += &format!(",{}", s.of(&c.scores).map(|v| format!("{v:.9}")).unwrap_or_default());
            }
            out += &format!(",{:.4}\n", c.volume_ml);
        }
        out
    }

    /// A table of the first `k` cases for people.
    pub fn table(&self, k: Option<usize>) -> String {
        let rows = self.top(k);
        let width = rows.iter().map(|c| c.case.len()).max().unwrap_or(4).max(4);
        let mut out = format!("{:>4}  {:<width$}", "rank", "case");
        for s in Score::ALL {
            let name = if s == self.score { format!("{s}*") } else { s.to_string() };
            out += &format!("  {name:>11}");
        }
        out += "  volume ml\n";
        for c in rows {
            out += &format!("{:>4}  {:<width$}", c.rank, c.case);
            for s in Score::ALL {
                let v = s.of(&c.scores).map(|v| format!("{v:.6}")).unwrap_or_else(|| "-".into());
                out += &format!("  {v:>11}");
            }
            out += &format!("  {:>9.2}\n", c.volume_ml);
        }
        let s = &self.source;
        out += &format!(
            "* ranked by {} (highest first), {} Monte-Carlo passes of the {} (seed {}), band {} voxels; {} of {} cases shown\n",
            self.score,
            s.mc_passes,
            if s.teacher { "teacher" } else { "model" },
            s.mc_seed,
            s.band_voxels,
            rows.len(),
            self.cases.len()
        );
        out
    }
}

/// A CSV cell: quoted when it holds a comma, a quote or a line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `[rank]`: the daemon ranks the unlabelled training cases with the current teacher (the student
/// for supervised training) every `every` iterations, on the evaluation service, and writes
/// `<dir>/ranking.json` and `ranking.csv` (replaced atomically). The sliding window is `[eval]`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RankConfig {
    /// Rank every this many iterations (0: never).
    pub every: i64,
    /// Where `ranking.json` and `ranking.csv` go.
    pub dir: PathBuf,
    /// Monte-Carlo passes per window (at least 2: BALD of one pass is 0).
    pub mc_passes: usize,
    /// Seed of the passes' noise and dropout.
    pub seed: u64,
    /// The score the ranking follows.
    pub score: Score,
    /// Boundary band around the predicted foreground, voxels.
    pub band: f64,
    /// Cases shown on `GET /status`.
    pub top: usize,
}

impl Default for RankConfig {
    fn default() -> Self {
        RankConfig {
            every: 0,
            dir: PathBuf::from("runs/default/rank"),
            mc_passes: crate::recipe::MC_PASSES as usize,
            seed: 0,
            score: Score::default(),
            band: DEFAULT_BAND,
            top: 5,
        }
    }
}

/// The default boundary band, voxels.
pub const DEFAULT_BAND: f64 = 3.0;
/// The widest boundary band, voxels.
pub const MAX_BAND: f64 = 64.0;

/// Checks a Monte-Carlo pass count for ranking (`key` names it in the error).
pub fn check_passes(key: &str, passes: usize) -> Result<()> {
    check::range(key, passes, 2, limits::MC_PASSES as usize).map_err(|_| {
        Error::invalid(
            key,
            format!("must be in 2..={} (BALD compares the passes: one pass gives 0), got {passes}", limits::MC_PASSES),
        )
    })
}

impl RankConfig {
    /// Checks every value; errors name the key under `prefix` (`rank.mc_passes`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let k = |name| check::key(prefix, name);
        check::range(&k("every"), self.every, 0, i64::MAX)?;
        check_passes(&k("mc_passes"), self.mc_passes)?;
        check::within(&k("band"), self.band, 0.0, MAX_BAND)?;
        check::range(&k("top"), self.top, 1, 1000)?;
        if self.every > 0 && self.dir.as_os_str().is_empty() {
            return Err(Error::invalid(k("dir"), "must name a folder when rank.every > 0"));
        }
        Ok(())
    }

    /// The Monte-Carlo options.
    pub fn mc(&self) -> McOptions {
        McOptions { passes: self.mc_passes, seed: self.seed, ..McOptions::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// `[T, C, n]` probabilities as a tensor from per-pass, per-class values.
    fn stack(passes: &[&[&[f32]]]) -> Tensor {
        let t: Vec<Tensor> = passes
            .iter()
            .map(|p| Tensor::stack(&p.iter().map(|c| Tensor::from_slice(c)).collect::<Vec<_>>(), 0))
            .collect();
        Tensor::stack(&t, 0)
    }

    /// The maps of a `[T, C, n]` stack through [`PassMeans`] (passes as the batch of one window).
    fn maps(s: &Tensor) -> (Vec<f32>, Vec<f32>) {
        let mut m = PassMeans::default();
        for t in 0..s.size()[0] {
            m.add(&s.get(t).unsqueeze(0)).unwrap();
        }
        let c = s.size()[1];
        let all = m.finish().unwrap().get(0);
        let (h, b) = uncertainty_maps(&all.narrow(0, 0, c), &all.get(c)).unwrap();
        (Vec::<f32>::try_from(&h).unwrap(), Vec::<f32>::try_from(&b).unwrap())
    }

    fn h(p: &[f64]) -> f64 {
        -p.iter().map(|p| p * (p + 1e-6).ln()).sum::<f64>()
    }

    #[test]
    fn entropy_and_bald_match_hand_values() {
        // Voxel 0: passes (0.9, 0.1) and (0.1, 0.9): mean (0.5, 0.5). Voxel 1: both (0.7, 0.3).
        let s = stack(&[&[&[0.9, 0.7], &[0.1, 0.3]], &[&[0.1, 0.7], &[0.9, 0.3]]]);
        let (ent, bald) = maps(&s);
        let want_h0 = h(&[0.5, 0.5]);
        let want_b0 = want_h0 - 0.5 * (h(&[0.9, 0.1]) + h(&[0.1, 0.9]));
        assert!((ent[0] as f64 - want_h0).abs() < 1e-6, "{} vs {want_h0}", ent[0]);
        assert!((bald[0] as f64 - want_b0).abs() < 1e-6, "{} vs {want_b0}", bald[0]);
        assert!((ent[1] as f64 - h(&[0.7, 0.3])).abs() < 1e-6);
        assert!(bald[1].abs() < 1e-6, "passes that agree carry no information: {}", bald[1]);
    }

    #[test]
    fn bald_is_zero_when_every_pass_agrees_and_never_negative() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        let same = Tensor::rand([1, 3, 50], (Kind::Float, tch::Device::Cpu)).softmax(1, Kind::Float);
        let s = Tensor::cat(&[&same, &same, &same, &same], 0);
        let (_, bald) = maps(&s);
        assert!(bald.iter().all(|&b| b == 0.0), "{bald:?}");
        let s = (Tensor::rand([6, 3, 400], (Kind::Float, tch::Device::Cpu)) * 6.0).softmax(1, Kind::Float);
        let (ent, bald) = maps(&s);
        assert!(bald.iter().all(|&b| b >= 0.0));
        assert!(bald.iter().zip(&ent).all(|(b, h)| b <= h), "BALD is at most the predictive entropy");
        assert!(bald.iter().any(|&b| b > 0.01), "passes that disagree carry information");
    }

    #[test]
    fn the_band_is_the_foreground_grown_by_its_width() {
        let mut labels = Volume::<u8>::zeros([9, 9, 9]);
        let centre = labels.index(4, 4, 4);
        labels.data[centre] = 1;
        let count = |band: f64| foreground_band(&labels, band).iter().filter(|&&b| b).count();
        assert_eq!(count(0.0), 1);
        assert_eq!(count(1.0), 7, "the 6 face neighbours");
        assert_eq!(count(1.5), 19, "and the 12 edge neighbours at sqrt 2");
        assert_eq!(count(1.8), 27, "and the 8 corners at sqrt 3");
        assert_eq!(count(2.0), 33);
        let empty = Volume::<u8>::zeros([4, 4, 4]);
        assert!(foreground_band(&empty, 3.0).iter().all(|&b| !b), "nothing segmented: no region");
    }

    #[test]
    fn scores_are_means_over_their_regions_and_undefined_on_an_empty_one() {
        let e = [0.1f32, 0.2, 0.3, 0.6];
        let b = [0.0f32, 0.1, 0.0, 0.3];
        let s = case_scores(&e, &b, &[false, true, false, true]);
        assert!((s.entropy.unwrap() - 0.3).abs() < 1e-7 && (s.bald.unwrap() - 0.1).abs() < 1e-7);
        assert!((s.entropy_fg.unwrap() - 0.4).abs() < 1e-7 && (s.bald_fg.unwrap() - 0.2).abs() < 1e-7);
        let s = case_scores(&e, &b, &[false; 4]);
        assert_eq!((s.entropy_fg, s.bald_fg), (None, None));
        assert!(s.entropy.is_some());
        let s = case_scores(&[f32::NAN, 0.0], &[0.0, 0.0], &[true, true]);
        assert_eq!(s.entropy, None, "a non-finite map leaves its score undefined");
    }

    fn case(id: &str, bald_fg: Option<f64>, entropy: f64) -> RankedCase {
        RankedCase {
            rank: 0,
            case: id.into(),
            source: PathBuf::from(id),
            scores: CaseScores { entropy: Some(entropy), bald: Some(0.0), entropy_fg: None, bald_fg },
            volume_ml: 1.0,
            voxels: 8,
            foreground_voxels: 1,
            region_voxels: 2,
            dims: [2, 2, 2],
            network_dims: [2, 2, 2],
        }
    }

    #[test]
    fn ranking_puts_high_scores_first_undefined_last_and_ties_by_id() {
        let src = RankSource {
            model: "m".into(),
            teacher: true,
            mc_passes: 8,
            mc_seed: 0,
            band_voxels: 3.0,
            iteration: None,
        };
        let cases =
            vec![case("d", None, 0.9), case("c", Some(0.2), 0.1), case("b", Some(0.5), 0.1), case("a", Some(0.2), 0.5)];
        let r = Ranking::new(Score::BaldFg, src.clone(), cases.clone());
        let order: Vec<(&str, usize)> = r.cases.iter().map(|c| (c.case.as_str(), c.rank)).collect();
        assert_eq!(order, [("b", 1), ("a", 2), ("c", 3), ("d", 4)]);
        let r = Ranking::new(Score::Entropy, src, cases);
        assert_eq!(r.cases.iter().map(|c| c.case.as_str()).collect::<Vec<_>>(), ["d", "a", "b", "c"]);
        assert_eq!(r.top(Some(2)).len(), 2);
        let csv = r.to_csv();
        assert!(csv.starts_with("case,rank,entropy,bald,entropy_fg,bald_fg,volume_ml\nd,1,0.900000000,0.000000000,,,"));
        let back: Ranking = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn scores_parse_by_name_and_the_config_is_checked_by_key() {
        for s in Score::ALL {
            assert_eq!(Score::parse(s.as_str()), Ok(s));
        }
        assert!(Score::parse("variance").unwrap_err().contains("bald_fg"));
        assert!(RankConfig::default().validate("rank").is_ok());
        let bad = |c: RankConfig, key: &str| {
            let e = c.validate("rank").unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(RankConfig { mc_passes: 1, ..RankConfig::default() }, "rank.mc_passes");
        bad(RankConfig { every: -1, ..RankConfig::default() }, "rank.every");
        bad(RankConfig { band: f64::NAN, ..RankConfig::default() }, "rank.band");
        bad(RankConfig { top: 0, ..RankConfig::default() }, "rank.top");
        bad(RankConfig { every: 5, dir: PathBuf::new(), ..RankConfig::default() }, "rank.dir");
    }
}
