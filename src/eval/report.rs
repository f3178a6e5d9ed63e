//! An evaluation's results: the metrics of every case, their mean and standard deviation, the
//! cases that could not be evaluated; written as JSON and CSV (atomically) and as a table.

use super::blend::Blend;
use super::calibration::{Calibration, Reliability, UncertaintySource};
use super::infer::Connectivity;
use super::metrics::CaseMetrics;
use super::picture::reliability_picture;
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The metrics of one named case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The case's name (dataset id or file stem).
    pub id: String,
    /// Its metrics.
    #[serde(flatten)]
    pub metrics: CaseMetrics,
}

/// A case that could not be evaluated (unreadable, no label, shapes differ, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFailure {
    /// The case's name.
    pub id: String,
    /// Why, as the error says it.
    pub error: String,
}

/// Mean and population standard deviation (numpy's default, ddof 0) of one metric over the
/// cases where it is defined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// `None` when no case defines the metric.
    pub mean: Option<f64>,
    /// `None` when no case defines the metric.
    pub std: Option<f64>,
    /// Number of cases averaged.
    pub n: usize,
}

impl Stat {
    /// The statistics of the defined values among `values`.
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> Self {
        let v: Vec<f64> = values.into_iter().flatten().collect();
        if v.is_empty() {
            return Stat { mean: None, std: None, n: 0 };
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Stat { mean: Some(mean), std: Some(var.sqrt()), n: v.len() }
    }
}

/// The statistics of every metric over the evaluated cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Dice.
    pub dice: Stat,
    /// Jaccard.
    pub jaccard: Stat,
    /// 95 % Hausdorff distance, voxels.
    pub hd95: Stat,
    /// Average surface distance, voxels.
    pub asd: Stat,
    /// 95 % Hausdorff distance, millimetres.
    pub hd95_mm: Stat,
    /// Average surface distance, millimetres.
    pub asd_mm: Stat,
    /// Cases whose prediction is empty.
    pub empty_predictions: usize,
    /// Cases whose reference is empty.
    pub empty_references: usize,
    /// Expected calibration error (cases evaluated by running a model only; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ece: Option<Stat>,
    /// Brier score (as `ece`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brier: Option<Stat>,
    /// Uncertainty AUROC over the cases where it is defined (`n` says how many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty_auroc: Option<Stat>,
}

impl Summary {
    /// The summary of `cases`.
    pub fn of(cases: &[CaseResult]) -> Self {
        let stat = |f: fn(&CaseMetrics) -> Option<f64>| Stat::of(cases.iter().map(|c| f(&c.metrics)));
        let calibrated = cases.iter().any(|c| c.metrics.calibration.is_some());
        let calibration = |f: fn(&Calibration) -> Option<f64>| {
            calibrated.then(|| Stat::of(cases.iter().map(|c| c.metrics.calibration.as_ref().and_then(f))))
        };
        Summary {
            dice: stat(|m| Some(m.dice)),
            jaccard: stat(|m| Some(m.jaccard)),
            hd95: stat(|m| m.hd95),
            asd: stat(|m| m.asd),
            hd95_mm: stat(|m| m.hd95_mm),
            asd_mm: stat(|m| m.asd_mm),
            empty_predictions: cases.iter().filter(|c| c.metrics.empty_prediction).count(),
            empty_references: cases.iter().filter(|c| c.metrics.empty_reference).count(),
            ece: calibration(|c| c.ece),
            brier: calibration(|c| c.brier),
            uncertainty_auroc: calibration(|c| c.uncertainty_auroc),
        }
    }
}

/// The results of one evaluation (one checkpoint, or one folder of predictions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What was evaluated: a weights or checkpoint file, a prediction folder.
    pub source: String,
    /// Per case, in evaluation order.
    pub cases: Vec<CaseResult>,
    /// Mean and standard deviation over `cases`.
    pub summary: Summary,
    /// Cases that could not be evaluated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<CaseFailure>,
    /// The uncertainty that `uncertainty_auroc` scores (where a model was run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<UncertaintySource>,
    /// The reliability diagram's bins, pooled over every voxel of every evaluated case (where a
    /// model was run); drawn as [`RELIABILITY_PNG`] by [`Report::write_to`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reliability: Option<Reliability>,
    /// How the predictions were made (where a model was run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<Inference>,
}

/// How an evaluation's predictions were made: the settings two reports must share before their
/// numbers compare. Every key is written, the defaults too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inference {
    /// Sliding-window size `[X, Y, Z]`.
    pub patch: [usize; 3],
    /// Step between window starts `[X, Y, Z]`.
    pub stride: [usize; 3],
    /// How overlapping windows combined: `constant` or `gaussian`.
    pub blend: Blend,
    /// The connectivity of the largest-component filter; `null`: no filter.
    pub largest_component: Option<Connectivity>,
    /// The voxel size (mm) the network ran at; `null`: each image's own.
    pub network_spacing: Option<[f64; 3]>,
}

/// The reliability diagram's file name, next to `report.json`.
pub const RELIABILITY_PNG: &str = "reliability.png";

/// CSV column names of the calibration metrics, after [`COLUMNS`] where a model was run.
const CALIBRATION_COLUMNS: [&str; 3] = ["ece", "brier", "uncertainty_auroc"];

/// CSV / table column names of the per-case metrics, in order.
const COLUMNS: [&str; 11] = [
    "id",
    "dice",
    "jaccard",
    "hd95",
    "asd",
    "hd95_mm",
    "asd_mm",
    "prediction_voxels",
    "reference_voxels",
    "empty_prediction",
    "empty_reference",
];

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x}"))
}

impl Report {
    /// A report of `cases` (summary computed) and `failures`.
    pub fn new(source: impl Into<String>, cases: Vec<CaseResult>, failures: Vec<CaseFailure>) -> Self {
        let summary = Summary::of(&cases);
        Report {
            source: source.into(),
            cases,
            summary,
            failures,
            uncertainty: None,
            reliability: None,
            inference: None,
        }
    }

    /// The calibration statistics, when the cases have them.
    fn calibration_stats(&self) -> Option<[Stat; 3]> {
        let s = &self.summary;
        Some([s.ece?, s.brier?, s.uncertainty_auroc?])
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Only strings, numbers and booleans: serialisation cannot fail.
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// CSV: a header, one row per case (undefined distances empty), then a `mean` and a `std`
    /// row. Case ids are quoted when they hold a comma or a quote.
    /// Where a model was run, three more columns: `ece`, `brier`, `uncertainty_auroc` (empty
    /// where undefined).
    pub fn to_csv(&self) -> String {
        let calibration = self.calibration_stats();
        let mut header = COLUMNS.to_vec();
        if calibration.is_some() {
            header.extend(CALIBRATION_COLUMNS);
        }
        let mut out = header.join(",") + "\n";
        for c in &self.cases {
            let m = &c.metrics;
            let mut row = [
                csv_field(&c.id),
                format!("{}", m.dice),
                format!("{}", m.jaccard),
                opt(m.hd95),
                opt(m.asd),
                opt(m.hd95_mm),
                opt(m.asd_mm),
                m.prediction_voxels.to_string(),
                m.reference_voxels.to_string(),
                m.empty_prediction.to_string(),
                m.empty_reference.to_string(),
            ]
            .to_vec();
            if calibration.is_some() {
                let c = m.calibration.unwrap_or(Calibration { ece: None, brier: None, uncertainty_auroc: None });
                row.extend([opt(c.ece), opt(c.brier), opt(c.uncertainty_auroc)]);
            }
            out += &(row.join(",") + "\n");
        }
        let s = &self.summary;
        let stats = [s.dice, s.jaccard, s.hd95, s.asd, s.hd95_mm, s.asd_mm];
        for (name, pick) in [("mean", (|t: &Stat| t.mean) as fn(&Stat) -> Option<f64>), ("std", |t: &Stat| t.std)] {
            let mut row = vec![name.to_string()];
            row.extend(stats.iter().map(|t| opt(pick(t))));
            row.extend(
                ["", "", s.empty_predictions.to_string().as_str(), s.empty_references.to_string().as_str()]
                    .map(String::from),
            );
            if let Some(cal) = &calibration {
                row.extend(cal.iter().map(|t| opt(pick(t))));
            }
            out += &(row.join(",") + "\n");
        }
        out
    }

    /// A table for people: Dice and Jaccard in %, distances in voxels and mm, then mean and std.
    /// Where a model was run, also ECE, Brier score and uncertainty AUROC (`-`: undefined), and
    /// a line saying which uncertainty and how many cases the AUROC's mean covers.
    pub fn table(&self) -> String {
        let calibration = self.calibration_stats();
        let mut header = ["case", "Dice %", "Jaccard %", "95HD", "ASD", "95HD mm", "ASD mm"].map(String::from).to_vec();
        if calibration.is_some() {
            header.extend(["ECE", "Brier", "AUROC(u)"].map(String::from));
        }
        header.push("note".into());
        let pct = |v: Option<f64>| v.map_or("-".into(), |x| format!("{:.2}", 100.0 * x));
        let num = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
        let fine = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
        let cal = |c: Option<Calibration>| {
            let c = c.unwrap_or(Calibration { ece: None, brier: None, uncertainty_auroc: None });
            [fine(c.ece), fine(c.brier), fine(c.uncertainty_auroc)]
        };
        let mut rows = vec![header];
        for c in &self.cases {
            let m = &c.metrics;
            let note = match (m.empty_prediction, m.empty_reference) {
                (true, true) => "empty prediction and reference",
                (true, false) => "empty prediction",
                (false, true) => "empty reference",
                (false, false) => "",
            };
            let mut row = vec![
                c.id.clone(),
                pct(Some(m.dice)),
                pct(Some(m.jaccard)),
                num(m.hd95),
                num(m.asd),
                num(m.hd95_mm),
                num(m.asd_mm),
            ];
            if calibration.is_some() {
                row.extend(cal(m.calibration));
            }
            row.push(note.into());
            rows.push(row);
        }
        let s = &self.summary;
        let stats = [s.hd95, s.asd, s.hd95_mm, s.asd_mm];
        let mut mean = vec![format!("mean (n={})", self.cases.len()), pct(s.dice.mean), pct(s.jaccard.mean)];
        mean.extend(stats.iter().map(|t| num(t.mean)));
        let mut std = vec!["std".to_string(), pct(s.dice.std), pct(s.jaccard.std)];
        std.extend(stats.iter().map(|t| num(t.std)));
        if let Some(c) = &calibration {
            mean.extend(c.iter().map(|t| fine(t.mean)));
            std.extend(c.iter().map(|t| fine(t.std)));
        }
        mean.push(String::new());
        std.push(String::new());
        rows.push(mean);
        rows.push(std);
        let mut text = format_table(&rows);
        if let Some([_, _, auroc]) = calibration {
            let source = self.uncertainty.map_or("the uncertainty".to_string(), |u| u.to_string());
            text += &format!(
                "AUROC(u): how well the {source} finds the wrongly labelled voxels; its mean covers {} of {} \
                 cases (undefined where a case has no wrong or no right voxel)\n",
                auroc.n,
                self.cases.len()
            );
        }
        for f in &self.failures {
            text += &format!("failed: {}: {}\n", f.id, f.error);
        }
        text
    }

    /// Writes `to_json()` to `path` atomically (a temporary file, then a rename).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = self.to_json() + "\n";
        Ok(write_atomic(path, |w| w.write_all(text.as_bytes()))?)
    }

    /// Creates `dir` if needed and writes `report.json` and `report.csv` into it, and where the
    /// report has reliability bins the diagram [`RELIABILITY_PNG`] (each atomically).
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        self.write_json(&dir.join("report.json"))?;
        self.write_csv(&dir.join("report.csv"))?;
        if let Some(r) = &self.reliability {
            reliability_picture(r)?.write_png(&dir.join(RELIABILITY_PNG))?;
        }
        Ok(())
    }

    /// Writes `to_csv()` to `path` atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        let text = self.to_csv();
        Ok(write_atomic(path, |w| w.write_all(text.as_bytes()))?)
    }
}

/// `s` as a CSV field: quoted (quotes doubled) when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Left-aligned columns separated by two spaces, a rule under the header.
fn format_table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let line = |r: &Vec<String>| {
        r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
            + "\n"
    };
    let mut out = line(&rows[0]);
    out += &(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  ") + "\n");
    rows[1..].iter().for_each(|r| out += &line(r));
    out
}

/// Progress: one case done (or failed).
#[derive(Debug)]
pub struct CaseEvent<'a> {
    /// 0-based position among the cases evaluated.
    pub index: usize,
    /// Number of cases evaluated.
    pub total: usize,
    /// The case's name.
    pub id: &'a str,
    /// Its metrics, or why it failed.
    pub outcome: std::result::Result<&'a CaseMetrics, &'a str>,
    /// Wall time it took, seconds.
    pub seconds: f64,
}

impl CaseEvent<'_> {
    /// One plain line for a log or a terminal.
    pub fn line(&self) -> String {
        let head = format!("[{}/{}] {}", self.index + 1, self.total, self.id);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}"));
        match self.outcome {
            Ok(m) => format!(
                "{head}: dice {:.4} jaccard {:.4} hd95 {} asd {}{} ({:.1} s)",
                m.dice,
                m.jaccard,
                fmt(m.hd95),
                fmt(m.asd),
                if m.empty_prediction { " [empty prediction]" } else { "" },
                self.seconds
            ),
            Err(e) => format!("{head}: failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str, dice: f64, hd95: Option<f64>) -> CaseResult {
        let metrics = CaseMetrics {
            dice,
            jaccard: dice / (2.0 - dice),
            hd95,
            asd: hd95.map(|h| h / 4.0),
            hd95_mm: hd95,
            asd_mm: hd95,
            prediction_voxels: 10,
            reference_voxels: 12,
            empty_prediction: false,
            empty_reference: hd95.is_none(),
            calibration: None,
        };
        CaseResult { id: id.into(), metrics }
    }

    #[test]
    fn should_average_defined_values_with_population_std() {
        let r = Report::new(
            "w",
            vec![case("a", 0.8, Some(2.0)), case("b,1", 0.6, Some(4.0)), case("c", 0.0, None)],
            vec![],
        );
        assert_eq!(r.summary.hd95, Stat { mean: Some(3.0), std: Some(1.0), n: 2 });
        assert_eq!(r.summary.dice.n, 3);
        assert!((r.summary.dice.mean.unwrap() - 1.4 / 3.0).abs() < 1e-12);
        let csv = r.to_csv();
        assert_eq!(csv.lines().count(), 1 + 3 + 2);
        assert!(csv.contains("\n\"b,1\",0.6,"), "{csv}");
        assert!(csv.lines().nth(3).unwrap().starts_with("c,0,0,,,"), "{csv}");
        assert!(r.table().contains("empty reference"));
    }
}
