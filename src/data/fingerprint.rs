//! A dataset's fingerprint: what `uamt plan` decides from. Per case its shape, voxel size,
//! orientation and extent in millimetres; for the cases whose labels training may use (the
//! labelled training cases), the foreground (every non-zero label): its size, bounding box in
//! voxels and millimetres, and the image's intensities inside it; the counts of labelled,
//! unlabelled and test cases; the class frequencies. Unlabelled and test cases contribute their
//! geometry only: the planner never looks at labels that training may not use.
//!
//! Computed once and cached as `<dataset>/fingerprint.json` ([`FINGERPRINT`]), keyed on the
//! manifest and every volume's size and modification time ([`FileStamp`]), so it is recomputed
//! when a case is added, removed, relabelled or replaced. The cache is a file uamt writes into
//! a folder it may not own, so it goes through the folder's `.uamt-written` marker
//! ([`crate::fsutil::OutputDir`]): a `fingerprint.json` that uamt did not write is never
//! replaced, and a folder that cannot be written is simply not cached ([`CacheOutcome`]).
//!
//! Percentiles are numpy's default (linear interpolation between the two nearest ranks).

use super::dataset::{Case, Dataset, MANIFEST};
use super::error::{DataError, Result};
use super::nifti::NiftiVolume;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The cache's file name inside the dataset folder.
pub const FINGERPRINT: &str = "fingerprint.json";

/// The format of [`Fingerprint`]; a cache of another version is recomputed.
pub const VERSION: u32 = 1;

/// A case's foreground percentiles are computed from at most this many of its voxels (every
/// k-th in file order beyond it); its mean, standard deviation, minimum and maximum from all.
pub const CASE_SAMPLE: usize = 1 << 24;

/// The pooled percentiles take at most this many foreground voxels of each labelled case
/// (every k-th in file order beyond it, as nnU-Net pools a sample per case).
pub const POOL_SAMPLE: usize = 100_000;

/// One file the fingerprint was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// The path, relative to the dataset folder where it lies inside it.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its modification time, nanoseconds since the epoch.
    pub modified_ns: i128,
}

impl FileStamp {
    /// The stamp of `path` (named relative to `root`), or `None` where it cannot be read.
    fn of(root: &Path, path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let modified = meta.modified().ok()?;
        let ns = match modified.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        let file = path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned();
        Some(FileStamp { file, bytes: meta.len(), modified_ns: ns })
    }
}

/// Which split a case belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// A training case whose label training uses.
    Labelled,
    /// A training case whose label (if any) training does not use.
    Unlabelled,
    /// A test case.
    Test,
}

/// Intensity statistics of a set of voxels (population standard deviation, numpy's linear
/// percentiles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intensity {
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Median.
    pub median: f64,
    /// 0.5th percentile.
    pub p00_5: f64,
    /// 99.5th percentile.
    pub p99_5: f64,
    /// The percentiles come from every this many voxels in file order (1: all of them; pooled
    /// over cases: the largest stride of any case).
    pub sampled_every: usize,
}

/// The foreground (non-zero label) of one labelled case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Foreground {
    /// Foreground voxels.
    pub voxels: u64,
    /// Their volume in millilitres (voxels times the voxel volume).
    pub volume_ml: f64,
    /// The bounding box's first voxel `[x, y, z]`.
    pub bbox_start: [usize; 3],
    /// One past the bounding box's last voxel.
    pub bbox_end: [usize; 3],
    /// The bounding box's size along each voxel axis in millimetres.
    pub bbox_mm: [f64; 3],
    /// The image's intensities inside the foreground.
    pub intensity: Intensity,
}

/// One case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFingerprint {
    /// The case's id.
    pub id: String,
    /// Its split.
    pub split: Split,
    /// `[X, Y, Z]` voxels.
    pub shape: [usize; 3],
    /// Voxel size in millimetres.
    pub spacing: [f64; 3],
    /// Axis codes (`RAS`, `LPS`, ...).
    pub orientation: String,
    /// The volume's size along each voxel axis in millimetres.
    pub extent_mm: [f64; 3],
    /// Whether a label volume is listed (test cases need one to be evaluated).
    pub has_label: bool,
    /// The foreground, for labelled training cases; `None` for the others, or when the label
    /// has no foreground at all.
    pub foreground: Option<Foreground>,
}

/// How many cases of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Labelled training cases.
    pub labelled: usize,
    /// Unlabelled training cases.
    pub unlabelled: usize,
    /// Test cases.
    pub test: usize,
    /// Test cases with a label (the ones an evaluation can score).
    pub test_labelled: usize,
}

/// One class's share of the labelled training cases' voxels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassFrequency {
    /// The label value.
    pub value: u8,
    /// Its name in the manifest (empty when unnamed).
    pub name: String,
    /// Voxels of this class over all labelled training cases.
    pub voxels: u64,
    /// `voxels` over all their voxels.
    pub fraction: f64,
    /// Labelled training cases containing it.
    pub cases: usize,
}

/// The fingerprint of a dataset folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`VERSION`].
    pub version: u32,
    /// The files it was computed from (the manifest first).
    pub key: Vec<FileStamp>,
    /// Cases per split.
    pub counts: Counts,
    /// Every case, training cases first, in manifest order.
    pub cases: Vec<CaseFingerprint>,
    /// Class frequencies over the labelled training cases, every value found or named.
    pub classes: Vec<ClassFrequency>,
    /// Foreground intensities pooled over the labelled training cases (up to [`POOL_SAMPLE`]
    /// voxels of each for the percentiles; mean and spread over all), when any has foreground.
    pub foreground_intensity: Option<Intensity>,
}

/// What happened to the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheOutcome {
    /// Read from a cache whose key matched.
    Cached,
    /// Computed and written to the cache.
    Written,
    /// Computed; not cached, for the reason given.
    NotCached(String),
}

/// numpy's default percentile (`q` in 0..=100) of sorted, non-empty `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = (v.len() - 1) as f64 * (q / 100.0).clamp(0.0, 1.0);
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    let frac = pos - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// Mean, sum of squared deviations and extremes, merged chunk by chunk (Chan et al.).
#[derive(Debug, Clone, Copy)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Moments {
    fn new() -> Self {
        Moments { n: 0, mean: 0.0, m2: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY }
    }

    fn merge(&mut self, o: &Moments) {
        if o.n == 0 {
            return;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        self.mean += delta * o.n as f64 / n as f64;
        self.m2 += o.m2 + delta * delta * self.n as f64 * o.n as f64 / n as f64;
        self.n = n;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Moments::new();
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let m2 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        let (min, max) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        Moments { n: values.len() as u64, mean, m2, min, max }
    }

    /// With the percentiles of `sorted` (a sample taken every `every` voxels).
    fn intensity(&self, sorted: &[f64], every: usize) -> Intensity {
        Intensity {
            mean: self.mean,
            std: if self.n > 0 { (self.m2 / self.n as f64).sqrt() } else { f64::NAN },
            min: self.min,
            max: self.max,
            median: percentile(sorted, 50.0),
            p00_5: percentile(sorted, 0.5),
            p99_5: percentile(sorted, 99.5),
            sampled_every: every,
        }
    }
}

/// What the two passes over a labelled case's image and label yield.
struct Scan {
    foreground: Option<Foreground>,
    /// Voxels per label value.
    classes: [u64; 256],
    /// Every `pool_every`-th of its foreground intensities (at most [`POOL_SAMPLE`]).
    pool: Vec<f64>,
    /// The stride of `pool`.
    pool_every: usize,
    /// Its foreground moments (all voxels).
    moments: Moments,
}

/// Reads `label` once (class counts, foreground size and box), then `image` and `label` again
/// for the intensities inside the foreground: all of them for the moments, every k-th (in file
/// order, x fastest) for the percentiles, k chosen from the foreground's size.
fn scan(image: &NiftiVolume, label: &NiftiVolume, spacing: [f64; 3]) -> Result<Scan> {
    let [nx, ny, nz] = image.dims();
    let slice = nx * ny;
    let (mut img, mut lab) = (vec![0f64; slice], vec![0f64; slice]);
    let mut classes = [0u64; 256];
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    for z in 0..nz {
        label.read_line(z * slice, 1, &mut lab)?;
        for (i, &l) in lab.iter().enumerate() {
            // Dataset::open checked that labels are integers in 0..n_classes <= 256.
            let class = l.clamp(0.0, 255.0) as usize;
            classes[class] += 1;
            if class != 0 {
                for (a, c) in [i % nx, i / nx, z].into_iter().enumerate() {
                    lo[a] = lo[a].min(c);
                    hi[a] = hi[a].max(c + 1);
                }
            }
        }
    }
    let n = classes[1..].iter().sum::<u64>() as usize;
    if n == 0 {
        return Ok(Scan { foreground: None, classes, pool: Vec::new(), pool_every: 1, moments: Moments::new() });
    }
    let (every, pool_every) = (n.div_ceil(CASE_SAMPLE), n.div_ceil(POOL_SAMPLE));
    let mut sample = Vec::with_capacity(n.div_ceil(every));
    let mut pool = Vec::with_capacity(n.div_ceil(pool_every));
    let mut moments = Moments::new();
    let mut k = 0usize;
    let mut chunk = Vec::with_capacity(slice);
    for z in 0..nz {
        image.read_line(z * slice, 1, &mut img)?;
        label.read_line(z * slice, 1, &mut lab)?;
        chunk.clear();
        for (&v, _) in img.iter().zip(&lab).filter(|(_, &l)| l != 0.0) {
            if k.is_multiple_of(every) {
                sample.push(v);
            }
            if k.is_multiple_of(pool_every) {
                pool.push(v);
            }
            k += 1;
            chunk.push(v);
        }
        moments.merge(&Moments::of(&chunk));
    }
    sample.sort_by(f64::total_cmp);
    let voxel_ml = spacing.iter().product::<f64>() / 1000.0;
    let foreground = Foreground {
        voxels: n as u64,
        volume_ml: n as f64 * voxel_ml,
        bbox_start: lo,
        bbox_end: hi,
        bbox_mm: [0, 1, 2].map(|a| (hi[a] - lo[a]) as f64 * spacing[a]),
        intensity: moments.intensity(&sample, every),
    };
    Ok(Scan { foreground: Some(foreground), classes, pool, pool_every, moments })
}

/// The geometry part of a case's fingerprint.
fn geometry(case: &Case, split: Split) -> CaseFingerprint {
    let g = case.image.header().geometry;
    let spacing = g.spacing();
    let shape = case.image.dims();
    CaseFingerprint {
        id: case.id.clone(),
        split,
        shape,
        spacing,
        orientation: g.orientation(),
        extent_mm: [0, 1, 2].map(|a| shape[a] as f64 * spacing[a]),
        has_label: case.label.is_some(),
        foreground: None,
    }
}

/// The files `dataset` was opened from, stamped: the manifest, then each case's image and label.
/// `None` when one cannot be read (then nothing is cached).
pub fn key_of(dataset: &Dataset) -> Option<Vec<FileStamp>> {
    let root = &dataset.root;
    let mut key = vec![FileStamp::of(root, &root.join(MANIFEST))?];
    for case in dataset.training.iter().chain(&dataset.test) {
        key.push(FileStamp::of(root, case.image.path())?);
        if let Some(l) = &case.label {
            key.push(FileStamp::of(root, l.path())?);
        }
    }
    Some(key)
}

impl Fingerprint {
    /// Computes the fingerprint of an opened dataset (reading every voxel of the labelled
    /// training cases once).
    pub fn compute(dataset: &Dataset) -> Result<Self> {
        let mut cases = Vec::new();
        let mut classes = [0u64; 256];
        let mut class_cases = [0usize; 256];
        let mut pool = Vec::new();
        let mut pooled = Moments::new();
        let mut pool_every = 1;
        for case in &dataset.training {
            let split = if case.labelled { Split::Labelled } else { Split::Unlabelled };
            let mut fp = geometry(case, split);
            if case.labelled {
                let label = case.label.as_ref().ok_or_else(|| {
                    DataError::bad(
                        dataset.root.join(MANIFEST),
                        format!("case `{}` is labelled but has no label", case.id),
                    )
                })?;
                let s = scan(&case.image, label, fp.spacing)?;
                for (c, &n) in s.classes.iter().enumerate() {
                    classes[c] += n;
                    class_cases[c] += usize::from(n > 0);
                }
                pooled.merge(&s.moments);
                pool_every = pool_every.max(s.pool_every);
                pool.extend(s.pool);
                fp.foreground = s.foreground;
            }
            cases.push(fp);
        }
        for case in &dataset.test {
            cases.push(geometry(case, Split::Test));
        }
        let total: u64 = classes.iter().sum();
        let names = &dataset.manifest.labels;
        let classes = (0..256usize)
            .filter(|&c| classes[c] > 0 || names.contains_key(&c.to_string()))
            .map(|c| ClassFrequency {
                value: c as u8,
                name: names.get(&c.to_string()).cloned().unwrap_or_default(),
                voxels: classes[c],
                fraction: if total > 0 { classes[c] as f64 / total as f64 } else { 0.0 },
                cases: class_cases[c],
            })
            .collect();
        pool.sort_by(f64::total_cmp);
        // Percentiles of the per-case samples: `sampled_every` is the largest case's stride.
        let foreground_intensity = (pooled.n > 0).then(|| pooled.intensity(&pool, pool_every));
        let counts = Counts {
            labelled: dataset.training.iter().filter(|c| c.labelled).count(),
            unlabelled: dataset.training.iter().filter(|c| !c.labelled).count(),
            test: dataset.test.len(),
            test_labelled: dataset.test.iter().filter(|c| c.label.is_some()).count(),
        };
        Ok(Fingerprint {
            version: VERSION,
            key: key_of(dataset).unwrap_or_default(),
            counts,
            cases,
            classes,
            foreground_intensity,
        })
    }

    /// The training cases (labelled and unlabelled).
    pub fn training(&self) -> impl Iterator<Item = &CaseFingerprint> {
        self.cases.iter().filter(|c| c.split != Split::Test)
    }

    /// The test cases.
    pub fn test(&self) -> impl Iterator<Item = &CaseFingerprint> {
        self.cases.iter().filter(|c| c.split == Split::Test)
    }

    /// The cache of `dir`, if there is one that parses; `None` otherwise (absent, unreadable,
    /// another version: all mean "compute it").
    pub fn read_cache(dir: &Path) -> Option<Self> {
        let text = crate::fsutil::read_text(&dir.join(FINGERPRINT)).ok()?;
        serde_json::from_str::<Fingerprint>(&text).ok().filter(|f| f.version == VERSION)
    }

    /// Writes the cache into the dataset folder `dir` through its marker: a `fingerprint.json`
    /// that uamt did not write there is refused (and left alone).
    pub fn write_cache(&self, dir: &Path) -> Result<()> {
        let mut out = crate::fsutil::OutputDir::open(dir, "uamt plan", true)?;
        out.claim(&[FINGERPRINT.to_string()])?;
        let path: PathBuf = out.path(FINGERPRINT);
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DataError::bad(&path, format!("cannot serialise: {e}")))?;
        Ok(crate::fsutil::write_atomic(&path, |w| w.write_all(format!("{text}\n").as_bytes()))?)
    }

    /// The fingerprint of an opened dataset: the cached one when its key matches the files the
    /// dataset was opened from, else computed and (where the folder allows) cached.
    pub fn of(dataset: &Dataset) -> Result<(Self, CacheOutcome)> {
        let key = key_of(dataset);
        if let (Some(cached), Some(key)) = (Self::read_cache(&dataset.root), &key) {
            if &cached.key == key {
                return Ok((cached, CacheOutcome::Cached));
            }
        }
        let fp = Self::compute(dataset)?;
        if key.is_none() {
            return Ok((fp, CacheOutcome::NotCached("a volume's size or time stamp could not be read".into())));
        }
        let outcome = match fp.write_cache(&dataset.root) {
            Ok(()) => CacheOutcome::Written,
            Err(e) => CacheOutcome::NotCached(e.to_string()),
        };
        Ok((fp, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy_does() {
        let v = [1.0, 2.0, 4.0, 8.0];
        // np.percentile([1, 2, 4, 8], [0, 50, 99.5, 100]) = 1, 3, 7.94, 8
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert!((percentile(&v, 99.5) - 7.94).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 8.0);
        assert_eq!(percentile(&[5.0], 0.5), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn moments_merge_to_those_of_the_whole() {
        let all: Vec<f64> = (0..1000).map(|i| ((i * 37) % 101) as f64 * 0.5 - 7.0).collect();
        let mut m = Moments::new();
        for chunk in all.chunks(77) {
            m.merge(&Moments::of(chunk));
        }
        let whole = Moments::of(&all);
        assert_eq!(m.n, whole.n);
        assert!((m.mean - whole.mean).abs() < 1e-12);
        assert!((m.m2 - whole.m2).abs() < 1e-9 * whole.m2);
        assert_eq!((m.min, m.max), (whole.min, whole.max));
    }
}
