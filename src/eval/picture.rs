//! A picture per case to look at: a few axial slices, one row each. Left panel: the image in
//! grey (windowed to its 0.5-99.5 % intensity percentiles) with the reference contour in green
//! and the prediction contour in red. Right panel (when an uncertainty map is given): the
//! uncertainty as a heat map (black -> red -> yellow -> white, 0 to ln C nats) with the contour of
//! the mask `uncertainty < threshold` (where UA-MT's consistency counts) in cyan.
//!
//! The picture says what it shows: a header names the contours in their colours, the view
//! (axial, x to the right, y up) and, over the uncertainty panel, a colour bar from 0 to the
//! saturation value in nats and the mask's threshold; each row is labelled with its slice
//! (`Z 23/44`: slice 23 of 44, counted from 0). Text is drawn with a small built-in bitmap font.
//!
//! Orientation: x to the right, y upwards (anterior up for RAS volumes), slices along z. The
//! slices are spread evenly over the z range of the reference's foreground (the prediction's
//! without a reference, the whole volume when both are empty). Small volumes are enlarged by an
//! integer factor so that a panel is at least [`PictureOptions::min_panel_width`] pixels wide.
//!
//! Also the reliability diagram of an evaluation ([`reliability_picture`]).

use super::calibration::{Reliability, BINS};
use crate::data::Volume;
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use std::path::Path;

/// Colours, RGB.
const REFERENCE: [u8; 3] = [0, 220, 0];
const PREDICTION: [u8; 3] = [255, 40, 40];
const MASK: [u8; 3] = [0, 230, 230];
const GAP: [u8; 3] = [40, 40, 40];
/// Pixels between panels and rows.
const GAP_PX: usize = 4;
const TEXT: [u8; 3] = [235, 235, 235];
const LABEL_BOX: [u8; 3] = [0, 0, 0];
/// Text is the font's 3x5 cells enlarged this many times.
const TEXT_SCALE: usize = 2;
/// Height of one line of text with its spacing, in pixels.
const LINE_PX: usize = 8 * TEXT_SCALE;

/// A 3x5 bitmap font: five rows of three bits (4 = left column) per character.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '<' => [1, 2, 4, 2, 1],
        '>' => [4, 2, 1, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '(' => [2, 4, 4, 4, 2],
        ')' => [2, 1, 1, 1, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '%' => [5, 1, 2, 4, 5],
        ' ' => [0; 5],
        _ => [7, 5, 5, 5, 7], // unknown: a box
    }
}

/// Width in pixels of `text` drawn by [`Picture::text`].
fn text_width(text: &str) -> usize {
    text.chars().count() * 4 * TEXT_SCALE
}

/// What a picture shows.
#[derive(Debug, Clone, PartialEq)]
pub struct PictureOptions {
    /// Axial slices (rows).
    pub slices: usize,
    /// Panels narrower than this are enlarged by an integer factor.
    pub min_panel_width: usize,
    /// Uncertainty at which the heat map saturates (ln C for the entropy of C classes).
    pub max_uncertainty: f64,
    /// The mask drawn on the uncertainty panel is `uncertainty < threshold` (UA-MT's final
    /// threshold is ln 2 for two classes).
    pub threshold: f64,
}

impl Default for PictureOptions {
    fn default() -> Self {
        let ln2 = std::f64::consts::LN_2;
        PictureOptions { slices: 3, min_panel_width: 256, max_uncertainty: ln2, threshold: ln2 }
    }
}

/// An RGB image, 8 bits per channel, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

impl Picture {
    fn filled(width: usize, height: usize, c: [u8; 3]) -> Self {
        Picture { width, height, rgb: c.iter().copied().cycle().take(width * height * 3).collect() }
    }

    fn set(&mut self, u: usize, v: usize, c: [u8; 3]) {
        let i = 3 * (u + self.width * v);
        self.rgb[i..i + 3].copy_from_slice(&c);
    }

    /// Draws `text` with its top-left corner at `(u, v)` (clipped to the picture); returns the
    /// column after it.
    fn text(&mut self, u: usize, v: usize, text: &str, c: [u8; 3]) -> usize {
        let mut x = u;
        for ch in text.chars() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) == 0 {
                        continue;
                    }
                    for dy in 0..TEXT_SCALE {
                        for dx in 0..TEXT_SCALE {
                            let (pu, pv) = (x + col * TEXT_SCALE + dx, v + row * TEXT_SCALE + dy);
                            if pu < self.width && pv < self.height {
                                self.set(pu, pv, c);
                            }
                        }
                    }
                }
            }
            x += 4 * TEXT_SCALE;
        }
        x
    }

    /// Fills the rectangle `[u, u + w) x [v, v + h)` (clipped).
    fn rect(&mut self, u: usize, v: usize, w: usize, h: usize, c: [u8; 3]) {
        for pv in v..(v + h).min(self.height) {
            for pu in u..(u + w).min(self.width) {
                self.set(pu, pv, c);
            }
        }
    }

    /// The pixel at column `u`, row `v`.
    pub fn get(&self, u: usize, v: usize) -> [u8; 3] {
        let i = 3 * (u + self.width * v);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Writes the picture as an 8-bit RGB PNG, atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let (w, h) = (self.width as u32, self.height as u32);
        Ok(write_atomic(path, |out| {
            let mut enc = png::Encoder::new(out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().map_err(std::io::Error::other)?;
            writer.write_image_data(&self.rgb).map_err(std::io::Error::other)?;
            writer.finish().map_err(std::io::Error::other)
        })?)
    }
}

/// The z range `[lo, hi)` holding foreground of `labels`, if any.
fn z_extent(labels: &Volume<u8>) -> Option<(usize, usize)> {
    let plane = labels.dims[0] * labels.dims[1];
    let zs: Vec<usize> = labels
        .data
        .chunks(plane.max(1))
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&l| l != 0))
        .map(|(z, _)| z)
        .collect();
    Some((*zs.first()?, *zs.last()? + 1))
}

/// `n` slice indices spread evenly inside `[lo, hi)`: `lo + (hi - lo) (k + 1) / (n + 1)`.
fn spread(lo: usize, hi: usize, n: usize) -> Vec<usize> {
    (0..n).map(|k| (lo + (hi - lo) * (k + 1) / (n + 1)).min(hi - 1)).collect()
}

/// `(lo, hi)` intensity percentiles 0.5 and 99.5 of `image` (nearest rank).
fn window(image: &Volume<f32>) -> (f32, f32) {
    let mut v: Vec<f32> = image.data.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let n = v.len() - 1;
    let mut at = |q: f64| *v.select_nth_unstable_by((q * n as f64).round() as usize, f32::total_cmp).1;
    let (lo, hi) = (at(0.005), at(0.995));
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

/// Heat colour of `t` in [0, 1].
fn heat(t: f64) -> [u8; 3] {
    let c = |x: f64| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(3.0 * t), c(3.0 * t - 1.0), c(3.0 * t - 2.0)]
}

/// One axial panel being drawn at `(u0, v0)` of a picture with enlargement `scale`.
struct Panel {
    u0: usize,
    v0: usize,
    scale: usize,
    dims: [usize; 3],
    z: usize,
}

impl Panel {
    /// The voxel index shown at panel pixel `(u, v)`.
    fn voxel(&self, u: usize, v: usize) -> usize {
        let (x, y) = (u / self.scale, self.dims[1] - 1 - v / self.scale);
        x + self.dims[0] * (y + self.dims[1] * self.z)
    }

    fn size(&self) -> (usize, usize) {
        (self.dims[0] * self.scale, self.dims[1] * self.scale)
    }

    /// Fills the panel with `colour(voxel index)`.
    fn paint(&self, pic: &mut Picture, colour: impl Fn(usize) -> [u8; 3]) {
        let (w, h) = self.size();
        for v in 0..h {
            for u in 0..w {
                pic.set(self.u0 + u, self.v0 + v, colour(self.voxel(u, v)));
            }
        }
    }

    /// Draws the one-pixel contour of `inside(voxel index)` at display resolution: pixels inside
    /// with a 4-neighbour pixel outside (or off the panel).
    fn contour(&self, pic: &mut Picture, inside: impl Fn(usize) -> bool, c: [u8; 3]) {
        let (w, h) = self.size();
        let at = |u: isize, v: isize| {
            u >= 0 && v >= 0 && (u as usize) < w && (v as usize) < h && inside(self.voxel(u as usize, v as usize))
        };
        for v in 0..h as isize {
            for u in 0..w as isize {
                if at(u, v) && !(at(u - 1, v) && at(u + 1, v) && at(u, v - 1) && at(u, v + 1)) {
                    pic.set(self.u0 + u as usize, self.v0 + v as usize, c);
                }
            }
        }
    }
}

/// The picture of one case. `reference` and `uncertainty`, when given, must have the image's shape.
pub fn case_picture(
    image: &Volume<f32>,
    reference: Option<&Volume<u8>>,
    prediction: &Volume<u8>,
    uncertainty: Option<&Volume<f32>>,
    opts: &PictureOptions,
) -> Result<Picture> {
    let dims = image.dims;
    for (what, d) in [
        ("reference", reference.map(|r| r.dims)),
        ("prediction", Some(prediction.dims)),
        ("uncertainty", uncertainty.map(|u| u.dims)),
    ] {
        if let Some(d) = d.filter(|d| *d != dims) {
            return Err(Error::shape(what, format!("the image's shape {dims:?}"), d));
        }
    }
    if opts.slices == 0 || dims.contains(&0) {
        return Err(Error::invalid("picture.slices", "at least one slice of a non-empty volume is needed"));
    }
    let (zlo, zhi) = reference.and_then(z_extent).or_else(|| z_extent(prediction)).unwrap_or((0, dims[2]));
    let zs = spread(zlo, zhi, opts.slices);
    let scale = opts.min_panel_width.div_ceil(dims[0]).max(1);
    let (pw, ph) = (dims[0] * scale, dims[1] * scale);
    let panels = if uncertainty.is_some() { 2 } else { 1 };
    let width = panels * pw + (panels + 1) * GAP_PX;
    let header = 2 * LINE_PX + GAP_PX;
    let height = header + zs.len() * ph + (zs.len() + 1) * GAP_PX;
    let mut pic = Picture::filled(width, height, GAP);
    // The header: which contour is which and the view over the left panel; the colour bar, its
    // scale in nats and the mask's threshold over the right one.
    let (u, v) = (GAP_PX, GAP_PX);
    let mut x = u;
    if reference.is_some() {
        x = pic.text(x, v, "REFERENCE", REFERENCE);
        x = pic.text(x, v, "  ", TEXT);
    }
    pic.text(x, v, "PREDICTION", PREDICTION);
    pic.text(u, v + LINE_PX, &format!("AXIAL Z/{}, X RIGHT, Y UP", dims[2]), TEXT);
    if uncertainty.is_some() {
        let u = 2 * GAP_PX + pw;
        let x = pic.text(u, v, "UNCERTAINTY, NATS  ", TEXT);
        pic.text(x, v, &format!("U<{:.2}", opts.threshold), MASK);
        let x = pic.text(u, v + LINE_PX, "0 ", TEXT);
        let top = format!(" {:.2}", opts.max_uncertainty);
        let bar = pw.saturating_sub(x - u + text_width(&top)).max(8);
        for i in 0..bar {
            let t = i as f64 / (bar - 1) as f64;
            pic.rect(x + i, v + LINE_PX, 1, 5 * TEXT_SCALE, heat(t));
        }
        pic.text(x + bar, v + LINE_PX, &top, TEXT);
    }
    let (lo, hi) = window(image);
    let grey = |i: usize| {
        let g = (((image.data[i] - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8;
        [g, g, g]
    };
    for (row, &z) in zs.iter().enumerate() {
        let v0 = header + GAP_PX + row * (ph + GAP_PX);
        let left = Panel { u0: GAP_PX, v0, scale, dims, z };
        left.paint(&mut pic, grey);
        if let Some(r) = reference {
            left.contour(&mut pic, |i| r.data[i] != 0, REFERENCE);
        }
        left.contour(&mut pic, |i| prediction.data[i] != 0, PREDICTION);
        let label = format!("Z {z}/{}", dims[2]);
        pic.rect(GAP_PX, v0, text_width(&label) + 2 * TEXT_SCALE, 7 * TEXT_SCALE, LABEL_BOX);
        pic.text(GAP_PX + TEXT_SCALE, v0 + TEXT_SCALE, &label, TEXT);
        if let Some(u) = uncertainty {
            let right = Panel { u0: 2 * GAP_PX + pw, v0, scale, dims, z };
            right.paint(&mut pic, |i| heat(u.data[i] as f64 / opts.max_uncertainty));
            right.contour(&mut pic, |i| (u.data[i] as f64) < opts.threshold, MASK);
        }
    }
    Ok(pic)
}

/// Colours of the reliability diagram, on white.
const PAPER: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];
const GRID: [u8; 3] = [225, 225, 225];
const DIAGONAL: [u8; 3] = [140, 140, 140];
const OBSERVED: [u8; 3] = [30, 90, 200];
const MISS: [u8; 3] = [220, 40, 40];
const COUNTS: [u8; 3] = [110, 110, 110];
/// Side of the diagram's square plot, pixels.
const PLOT: usize = 420;
/// Left edge of the plot (room for the tick labels).
const PLOT_LEFT: usize = 48;
/// Top edge of the plot (room for four lines of legend and axis title, and the top tick label).
const PLOT_TOP: usize = GAP_PX + 5 * LINE_PX + GAP_PX;
/// Height of the bin-count panel under the plot.
const COUNT_PANEL: usize = 90;
/// Half the side of a bin's marker.
const MARKER: usize = 4;

/// Where the reliability diagram puts the point `(x, y)` of the unit square (x right, y up).
fn plot_pixel(x: f64, y: f64) -> (usize, usize) {
    let side = (PLOT - 1) as f64;
    let u = PLOT_LEFT + (x.clamp(0.0, 1.0) * side).round() as usize;
    let v = PLOT_TOP + PLOT - 1 - (y.clamp(0.0, 1.0) * side).round() as usize;
    (u, v)
}

/// Top edge of the bin-count panel.
fn count_top() -> usize {
    PLOT_TOP + PLOT + 3 * LINE_PX + 2 * GAP_PX
}

impl Picture {
    /// A one-pixel line from `(u0, v0)` to `(u1, v1)` (clipped).
    fn line(&mut self, (u0, v0): (usize, usize), (u1, v1): (usize, usize), c: [u8; 3]) {
        let (du, dv) = (u1 as f64 - u0 as f64, v1 as f64 - v0 as f64);
        let steps = du.abs().max(dv.abs()).max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (u, v) = ((u0 as f64 + t * du).round() as usize, (v0 as f64 + t * dv).round() as usize);
            if u < self.width && v < self.height {
                self.set(u, v, c);
            }
        }
    }
}

/// The reliability diagram of `bins`: in a unit square, for every non-empty bin a blue square at
/// (mean predicted foreground probability, observed foreground frequency), joined bin to bin,
/// a red line from the diagonal (perfect calibration, grey) to it; under the square, the voxels
/// of each bin as bars on a log scale. A legend above gives the voxels and the ECE of the pooled
/// bins (not the mean of the cases' ECEs).
pub fn reliability_picture(bins: &Reliability) -> Result<Picture> {
    let width = PLOT_LEFT + PLOT + 3 * GAP_PX + text_width("1.0");
    let height = count_top() + COUNT_PANEL + LINE_PX + GAP_PX;
    let mut pic = Picture::filled(width, height, PAPER);
    // Legend.
    let total = bins.total();
    let ece = bins.ece().map_or("-".into(), |e| format!("{e:.4}"));
    let (u, v) = (GAP_PX, GAP_PX);
    pic.text(u, v, &format!("RELIABILITY, ALL CASES POOLED, {BINS} BINS"), INK);
    pic.text(u, v + LINE_PX, &format!("{total} VOXELS, POOLED ECE {ece}"), INK);
    let x = pic.text(u, v + 2 * LINE_PX, "DIAGONAL: CALIBRATED", DIAGONAL);
    let x = pic.text(x, v + 2 * LINE_PX, "  ", INK);
    let x = pic.text(x, v + 2 * LINE_PX, "BINS", OBSERVED);
    pic.text(x, v + 2 * LINE_PX, "  GAP", MISS);
    pic.text(u, v + 3 * LINE_PX, "Y: OBSERVED FOREGROUND FREQUENCY", INK);
    // Grid, ticks and frame.
    for t in 0..=5 {
        let f = t as f64 / 5.0;
        let label = format!("{f:.1}");
        let (gu, gv) = plot_pixel(f, f);
        pic.line(plot_pixel(f, 0.0), plot_pixel(f, 1.0), GRID);
        pic.line(plot_pixel(0.0, f), plot_pixel(1.0, f), GRID);
        pic.text(PLOT_LEFT - GAP_PX - text_width(&label), gv.saturating_sub(5 * TEXT_SCALE / 2), &label, INK);
        let lu = (gu + 1).saturating_sub(text_width(&label) / 2);
        pic.text(lu, PLOT_TOP + PLOT + GAP_PX, &label, INK);
    }
    pic.text(PLOT_LEFT, PLOT_TOP + PLOT + GAP_PX + LINE_PX, "X: PREDICTED FOREGROUND PROBABILITY", INK);
    for (a, b) in
        [((0.0, 0.0), (1.0, 0.0)), ((1.0, 0.0), (1.0, 1.0)), ((1.0, 1.0), (0.0, 1.0)), ((0.0, 1.0), (0.0, 0.0))]
    {
        pic.line(plot_pixel(a.0, a.1), plot_pixel(b.0, b.1), INK);
    }
    pic.line(plot_pixel(0.0, 0.0), plot_pixel(1.0, 1.0), DIAGONAL);
    // The bins: gaps first, then the curve, then the markers on top.
    let points: Vec<(f64, f64)> =
        (0..BINS).filter_map(|k| Some((bins.mean_probability(k)?, bins.frequency(k)?))).collect();
    for &(p, f) in &points {
        pic.line(plot_pixel(p, p), plot_pixel(p, f), MISS);
    }
    for w in points.windows(2) {
        pic.line(plot_pixel(w[0].0, w[0].1), plot_pixel(w[1].0, w[1].1), OBSERVED);
    }
    for &(p, f) in &points {
        let (mu, mv) = plot_pixel(p, f);
        pic.rect(mu.saturating_sub(MARKER), mv.saturating_sub(MARKER), 2 * MARKER + 1, 2 * MARKER + 1, OBSERVED);
    }
    // Voxels per bin, log scale: a bar of full height holds the largest bin.
    let top = count_top();
    let most = bins.voxels.iter().copied().max().unwrap_or(0);
    pic.text(PLOT_LEFT, top - LINE_PX, &format!("VOXELS PER BIN, LOG SCALE, 1 TO {most}"), INK);
    for k in 0..BINS {
        let n = bins.voxels[k];
        if n == 0 {
            continue;
        }
        let h = ((1.0 + (n as f64).ln()) / (1.0 + (most as f64).ln()) * COUNT_PANEL as f64).round() as usize;
        let (u0, _) = plot_pixel(k as f64 / BINS as f64, 0.0);
        let (u1, _) = plot_pixel((k + 1) as f64 / BINS as f64, 0.0);
        pic.rect(u0 + 1, top + COUNT_PANEL - h, (u1 - u0).saturating_sub(1).max(1), h, COUNTS);
    }
    pic.line((PLOT_LEFT, top + COUNT_PANEL), (PLOT_LEFT + PLOT - 1, top + COUNT_PANEL), INK);
    Ok(pic)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels of colour `c` in the rectangle `[u, u + w) x [v, v + h)`.
    fn count(p: &Picture, (u, v, w, h): (usize, usize, usize, usize), c: [u8; 3]) -> usize {
        (v..v + h).flat_map(|y| (u..u + w).map(move |x| (x, y))).filter(|&(x, y)| p.get(x, y) == c).count()
    }

    #[test]
    fn the_picture_says_what_it_shows() {
        let dims = [32, 24, 10];
        let image = Volume::new(dims, (0..dims.iter().product::<usize>()).map(|i| i as f32).collect()).unwrap();
        let mut label = Volume::<u8>::zeros(dims);
        for z in 3..7 {
            for y in 8..16 {
                for x in 10..20 {
                    let i = label.index(x, y, z);
                    label.data[i] = 1;
                }
            }
        }
        let unc = Volume::new(dims, vec![0.3f32; dims.iter().product()]).unwrap();
        let opts = PictureOptions::default();
        let p = case_picture(&image, Some(&label), &label, Some(&unc), &opts).unwrap();
        let scale = 256 / 32;
        let pw = 32 * scale;
        let header = 2 * LINE_PX + GAP_PX;
        assert_eq!(p.width, 2 * pw + 3 * GAP_PX);
        assert_eq!(p.height, header + 3 * 24 * scale + 4 * GAP_PX);
        // The legend names the contours in their colours, the bar runs black to white in nats.
        let line1 = (GAP_PX, GAP_PX, pw, 5 * TEXT_SCALE);
        assert!(count(&p, line1, REFERENCE) > 20 && count(&p, line1, PREDICTION) > 20);
        let right = (2 * GAP_PX + pw, GAP_PX, pw, 5 * TEXT_SCALE);
        assert!(count(&p, right, TEXT) > 50 && count(&p, right, MASK) > 10, "title and threshold");
        let bar_row = GAP_PX + LINE_PX + 1;
        let bar: Vec<[u8; 3]> = (2 * GAP_PX + pw..p.width).map(|u| p.get(u, bar_row)).collect();
        let first = bar.iter().position(|&c| c == heat(0.0)).expect("the bar starts black");
        assert!(bar[first..].contains(&heat(1.0)), "and ends white");
        let reds = bar.iter().filter(|c| c[0] > 100 && c[1] < 60 && c[2] == 0).count();
        assert!(reds > 5, "through red");
        // Each row is labelled with its slice: different slices, different labels.
        let row_label = |row: usize| {
            let v0 = header + GAP_PX + row * (24 * scale + GAP_PX);
            (0..7 * TEXT_SCALE)
                .flat_map(|dv| (0..text_width("Z 00/10")).map(move |du| (du, dv)))
                .map(|(du, dv)| p.get(GAP_PX + du, v0 + dv) == TEXT)
                .collect::<Vec<bool>>()
        };
        let labels: Vec<_> = (0..3).map(row_label).collect();
        assert!(labels.iter().all(|l| l.iter().filter(|&&b| b).count() > 20));
        assert_ne!(labels[0], labels[1]);
        assert_ne!(labels[1], labels[2]);
    }

    #[test]
    fn the_reliability_diagram_puts_each_bin_where_it_belongs() {
        // Bin 1 (p in [1/15, 2/15)): 10 voxels of mean p 0.1, 3 foreground: a point at (0.1, 0.3).
        // Bin 13: 1000 voxels of mean p 0.9, all foreground: (0.9, 1.0).
        let mut bins = Reliability::default();
        bins.voxels[1] = 10;
        bins.probability_sum[1] = 1.0;
        bins.foreground[1] = 3;
        bins.voxels[13] = 1000;
        bins.probability_sum[13] = 900.0;
        bins.foreground[13] = 1000;
        let p = reliability_picture(&bins).unwrap();
        assert_eq!(
            (p.width, p.height),
            (PLOT_LEFT + PLOT + 3 * GAP_PX + text_width("1.0"), count_top() + COUNT_PANEL + LINE_PX + GAP_PX)
        );
        let at = |x: f64, y: f64| {
            let (u, v) = plot_pixel(x, y);
            p.get(u, v)
        };
        assert_eq!(at(0.1, 0.3), OBSERVED);
        assert_eq!(at(0.9, 1.0), OBSERVED);
        assert_eq!(at(0.9, 0.95), MISS, "the gap under bin 13's point, above the diagonal");
        assert_eq!(at(0.5, 0.5), DIAGONAL);
        assert_eq!(at(0.3, 0.7), PAPER);
        // Count bars: bin 13 full height, bin 1 shorter (log scale), bin 7 none.
        let column = |k: usize| {
            let (u, _) = plot_pixel((k as f64 + 0.5) / BINS as f64, 0.0);
            (count_top()..count_top() + COUNT_PANEL).filter(|&v| p.get(u, v) == COUNTS).count()
        };
        assert_eq!(column(13), COUNT_PANEL);
        assert!(column(1) > 10 && column(1) < COUNT_PANEL / 2, "{}", column(1));
        assert_eq!(column(7), 0);
        // An evaluation without voxels still draws its axes.
        let empty = reliability_picture(&Reliability::default()).unwrap();
        assert_eq!(empty.width, p.width);
    }

    #[test]
    fn every_character_of_the_font_is_distinct() {
        let chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:=<>/()-+% ";
        let glyphs: std::collections::HashSet<[u8; 5]> = chars.chars().map(glyph).collect();
        assert_eq!(glyphs.len(), chars.chars().count());
    }

    #[test]
    fn should_spread_slices_inside_the_extent() {
        assert_eq!(spread(10, 20, 3), vec![12, 15, 17]);
        assert_eq!(spread(5, 6, 3), vec![5, 5, 5]);
    }
}
