//! Synthetic LA-like volumes for the demo and the tests: a lumpy blob (the atrium) with four
//! tube-like veins, a distracting second blood pool, a torso, MRI-like intensities with an
//! enhanced wall, a smooth multiplicative bias field and Rician noise, z-scored like the real
//! data. Deterministic by (seed, case index); any size; anisotropic spacing by default.

use super::dataset::Manifest;
use super::error::{DataError, Result};
use super::import::{entry_for, ext, report, write_case, ImportReport, Staging};
use super::volume::{Geometry, Volume};
use crate::check::{self, limits};
use crate::rng::{stream, Rng};
use std::path::Path;

/// Settings of a synthetic dataset: the config file's `[data.synth]` section and `uamt synth`'s
/// defaults. The default is a small set that trains in minutes on a CPU.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Training cases.
    pub cases: usize,
    /// Of which the first this many are labelled.
    pub labelled: usize,
    /// Test cases (all with labels).
    pub test: usize,
    /// `[X, Y, Z]` of every volume.
    pub size: [usize; 3],
    /// Voxel size in millimetres.
    pub spacing: [f64; 3],
    /// Seed: the same seed gives the same files.
    pub seed: u64,
    /// Write `.nii.gz` instead of `.nii`.
    pub gzip: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            cases: 10,
            labelled: 2,
            test: 2,
            size: [48, 48, 32],
            spacing: [0.625, 0.625, 1.25],
            seed: 7,
            gzip: false,
        }
    }
}

impl SynthConfig {
    /// Checks every value; errors name the key under `prefix` (`data.synth.size`).
    pub fn validate(&self, prefix: &str) -> crate::Result<()> {
        let k = |name| check::key(prefix, name);
        check::range(&k("cases"), self.cases, 1, limits::SYNTH_CASES)?;
        check::range(&k("labelled"), self.labelled, 1, self.cases)?;
        check::range(&k("test"), self.test, 0, limits::SYNTH_CASES)?;
        check::sides(&k("size"), self.size, limits::SYNTH_SIDE)?;
        for s in self.spacing {
            check::positive_f(&k("spacing"), s)?;
        }
        Ok(())
    }
}

type V3 = [f64; 3];

fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn lerp(a: V3, b: V3, t: f64) -> V3 {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

/// Distance from `p` to the segment `a`-`b`.
fn seg_dist(p: V3, a: V3, b: V3) -> f64 {
    let ab = sub(b, a);
    let t = (dot(sub(p, a), ab) / dot(ab, ab).max(1e-12)).clamp(0.0, 1.0);
    let d = sub(p, lerp(a, b, t));
    dot(d, d).sqrt()
}

/// A lumpy ellipsoid: inside where `|q| < 1 + sum_m amp_m sin(freq_m . q/|q| + phase_m)`.
#[derive(Debug, Clone)]
struct Blob {
    centre: V3,
    radii: V3,
    lumps: Vec<(V3, f64, f64)>,
}

impl Blob {
    fn draw(rng: &mut Rng, centre: V3, radii: V3, amp: f64) -> Self {
        let lumps = (0..3)
            .map(|_| {
                let f = [rng.uniform_in(-3.0, 3.0), rng.uniform_in(-3.0, 3.0), rng.uniform_in(-3.0, 3.0)];
                (f, amp * rng.uniform_in(0.5, 1.0), rng.uniform_in(0.0, std::f64::consts::TAU))
            })
            .collect();
        Blob { centre, radii, lumps }
    }

    /// Signed "radial" distance: < 0 inside, in units of the radius.
    fn level(&self, p: V3) -> f64 {
        let q = [0, 1, 2].map(|i| (p[i] - self.centre[i]) / self.radii[i]);
        let r = dot(q, q).sqrt();
        let dir = if r > 1e-9 { q.map(|v| v / r) } else { [1.0, 0.0, 0.0] };
        let bound = 1.0 + self.lumps.iter().map(|(f, a, ph)| a * (dot(*f, dir) + ph).sin()).sum::<f64>();
        r - bound
    }
}

/// A vein: a bent tube (quadratic Bezier as a polyline) with a tapering radius.
#[derive(Debug, Clone)]
struct Tube {
    points: Vec<V3>,
    radius: f64,
}

impl Tube {
    fn contains(&self, p: V3) -> bool {
        let n = self.points.len().saturating_sub(1).max(1) as f64;
        self.points
            .windows(2)
            .enumerate()
            .any(|(k, s)| seg_dist(p, s[0], s[1]) < self.radius * (1.0 - 0.35 * k as f64 / n))
    }
}

/// Generates case `index` of the stream `seed`: `(image, label)`, image z-scored float32.
pub fn synth_case(size: [usize; 3], spacing: [f64; 3], seed: u64, index: u64) -> (Volume<f32>, Volume<u8>) {
    let mut rng = Rng::keyed(seed, &[stream::SYNTH, index]);
    let ext = [0, 1, 2].map(|i| size[i] as f64 * spacing[i]);
    let jitter = |rng: &mut Rng, i: usize| ext[i] * (0.5 + rng.uniform_in(-0.08, 0.08));
    let centre = [jitter(&mut rng, 0), jitter(&mut rng, 1), jitter(&mut rng, 2)];
    let radii = [0, 1, 2].map(|i| ext[i] * rng.uniform_in(0.16, 0.22));
    let atrium = Blob::draw(&mut rng, centre, radii, 0.1);
    let mean_r = (radii[0] + radii[1] + radii[2]) / 3.0;
    let tubes: Vec<Tube> = (0..4)
        .map(|t| {
            // Two veins to each side in x, spread in y and z, as the pulmonary veins enter.
            let side = if t % 2 == 0 { 1.0 } else { -1.0 };
            let u = [side, rng.uniform_in(-0.7, 0.2), if t < 2 { 0.5 } else { -0.5 } + rng.uniform_in(-0.2, 0.2)];
            let norm = dot(u, u).sqrt();
            let u = u.map(|v| v / norm);
            let at = |k: f64| [0, 1, 2].map(|i| centre[i] + k * radii[i] * u[i]);
            let (a, b) = (at(0.5), at(rng.uniform_in(1.7, 2.3)));
            let bend = [0, 1, 2].map(|i| rng.uniform_in(-0.3, 0.3) * radii[i]);
            let ctrl = [0, 1, 2].map(|i| (a[i] + b[i]) / 2.0 + bend[i]);
            let points = (0..=8).map(|k| {
                let s = k as f64 / 8.0;
                lerp(lerp(a, ctrl, s), lerp(ctrl, b, s), s)
            });
            Tube { points: points.collect(), radius: mean_r * rng.uniform_in(0.18, 0.26) }
        })
        .collect();
    // A second blood pool (ventricle-like), bright but not labelled, below and in front.
    let v_centre =
        [centre[0] + rng.uniform_in(-0.3, 0.3) * radii[0], centre[1] + 1.7 * radii[1], centre[2] - 1.2 * radii[2]];
    let ventricle = Blob::draw(&mut rng, v_centre, radii.map(|r| r * 1.1), 0.08);
    let torso = Blob::draw(
        &mut rng,
        [ext[0] / 2.0, ext[1] / 2.0, ext[2] / 2.0],
        [ext[0] * 0.47, ext[1] * 0.42, ext[2] * 4.0],
        0.04,
    );
    let texture: Vec<(V3, f64, f64)> = (0..4)
        .map(|_| {
            (
                [0, 1, 2].map(|i| rng.uniform_in(-12.0, 12.0) / ext[i].max(1e-6)),
                rng.uniform_in(0.02, 0.05),
                rng.uniform_in(0.0, 6.3),
            )
        })
        .collect();
    let bias_dir = [0, 1, 2].map(|i| rng.uniform_in(-0.5, 0.5) / ext[i].max(1e-6));
    let bias_quad = rng.uniform_in(-0.4, 0.0);
    let wall = 1.5 / mean_r.max(1e-6); // ~1.5 mm of enhanced wall, in units of the radius
    let (blood, wall_level, tissue, air, noise) = (0.55, rng.uniform_in(0.7, 0.9), 0.28, 0.03, 0.045);

    let mut image = Volume::<f32>::zeros(size);
    let mut label = Volume::<u8>::zeros(size);
    for z in 0..size[2] {
        for y in 0..size[1] {
            for x in 0..size[0] {
                let p = [(x as f64 + 0.5) * spacing[0], (y as f64 + 0.5) * spacing[1], (z as f64 + 0.5) * spacing[2]];
                let level = atrium.level(p);
                let inside = level < 0.0 || tubes.iter().any(|t| t.contains(p));
                let mut s = if inside {
                    blood
                } else if level < wall {
                    // Patchy enhancement of the wall, as late gadolinium shows scar.
                    let patch = (dot(p, [0.9, 0.5, 0.3]) / mean_r.max(1e-6) * 3.0).sin();
                    if patch > 0.2 {
                        wall_level
                    } else {
                        tissue + 0.05
                    }
                } else if ventricle.level(p) < 0.0 {
                    blood * 0.9
                } else if torso.level(p) < 0.0 {
                    tissue + texture.iter().map(|(f, a, ph)| a * (dot(*f, p) + ph).sin()).sum::<f64>()
                } else {
                    air
                };
                let d = sub(p, centre);
                let rel = [0, 1, 2].map(|i| d[i] / ext[i].max(1e-6));
                s *= (dot(bias_dir, d) + bias_quad * dot(rel, rel)).exp();
                let (n1, n2) = (rng.normal() * noise, rng.normal() * noise);
                let o = image.index(x, y, z);
                image.data[o] = ((s + n1).powi(2) + n2 * n2).sqrt() as f32;
                label.data[o] = inside as u8;
            }
        }
    }
    let n = image.data.len().max(1) as f64;
    let mean = image.data.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (image.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt().max(1e-6);
    for v in image.data.iter_mut() {
        *v = ((*v as f64 - mean) / std) as f32;
    }
    (image, label)
}

/// Writes a synthetic dataset folder (training cases `synth_000...`, test cases after them).
pub fn write_synth(out: &Path, cfg: &SynthConfig, force: bool) -> Result<ImportReport> {
    write_synth_with(out, cfg, force, &mut |_, _, _| {})
}

/// [`write_synth`], calling `progress(done, total, id)` after each case.
pub fn write_synth_with(
    out: &Path,
    cfg: &SynthConfig,
    force: bool,
    progress: super::import::Progress<'_>,
) -> Result<ImportReport> {
    if let Err(e) = cfg.validate("") {
        let crate::Error::Invalid { key, why } = e else { return Err(DataError::invalid("synth", e.to_string())) };
        return Err(DataError::invalid(key, why));
    }
    let staging = Staging::new(out, force, "uamt synth", &[])?;
    let geometry = Geometry::from_spacing(cfg.spacing);
    let (mut training, mut test) = (Vec::new(), Vec::new());
    for i in 0..cfg.cases + cfg.test {
        let id = format!("synth_{i:03}");
        let is_test = i >= cfg.cases;
        let (image, label) = synth_case(cfg.size, cfg.spacing, cfg.seed, i as u64);
        let entry = entry_for(&id, is_test, i < cfg.labelled, ext(cfg.gzip));
        write_case(staging.dir(), &entry, &image, &label, &geometry)?;
        if is_test {
            test.push(entry)
        } else {
            training.push(entry)
        }
        progress(i + 1, cfg.cases + cfg.test, &id);
    }
    let description =
        format!("synthetic LA-like volumes, size {:?}, spacing {:?} mm, seed {}", cfg.size, cfg.spacing, cfg.seed);
    report(staging, Manifest::new("synthetic-LA", &description, "MRI", &["background", "left atrium"], training, test))
}
