//! Resampling a volume to another voxel size with its geometry kept right: trilinear
//! interpolation for images, nearest neighbour for labels. Output voxel j along an axis of n
//! input voxels resampled to m sits at input coordinate `(j + 0.5) * n / m - 0.5`, so the field
//! of view (the outer faces of the outer voxels) is unchanged and the affine is updated to match:
//! halving the resolution of an even-sized axis averages each 2 x 2 x 2 block exactly.

use super::error::{DataError, Result};
use super::parallel;
use super::volume::{voxel_count, Geometry, Volume};

/// How values between voxel centres are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    /// Trilinear (images).
    Linear,
    /// The nearest voxel (labels).
    Nearest,
}

/// The output shape for resampling `dims` with voxel `spacing` to `target` spacing:
/// `round(n * spacing / target)`, at least 1.
pub fn resampled_dims(dims: [usize; 3], spacing: [f64; 3], target: [f64; 3]) -> Result<[usize; 3]> {
    let mut out = [0; 3];
    for a in 0..3 {
        let (s, t) = (spacing[a], target[a]);
        if !(s.is_finite() && s > 0.0 && t.is_finite() && t > 0.0) {
            return Err(DataError::invalid(
                "spacing",
                format!("spacing {spacing:?} and target {target:?} must be positive"),
            ));
        }
        let n = (dims[a] as f64 * s / t).round();
        if !(1.0..=65_536.0).contains(&n.max(1.0)) {
            return Err(DataError::invalid(
                "spacing",
                format!("resampling {dims:?} to {target:?} mm gives {n} voxels"),
            ));
        }
        out[a] = (n as usize).max(1);
    }
    voxel_count(out, "resampled shape")?;
    Ok(out)
}

/// The geometry of the volume of `out` voxels that covers the same field of view as `dims`.
pub fn resampled_geometry(g: &Geometry, dims: [usize; 3], out: [usize; 3]) -> Geometry {
    let mut r = *g;
    for j in 0..3 {
        let s = dims[j] as f64 / out[j] as f64;
        let shift = (s - 1.0) / 2.0;
        for i in 0..3 {
            r.affine[i][3] += g.affine[i][j] * shift;
            r.affine[i][j] = g.affine[i][j] * s;
        }
    }
    r
}

/// Input coordinate and interpolation weights along one axis: for each output index, the two
/// neighbouring input indices and the weight of the second.
fn axis_plan(n: usize, m: usize) -> Vec<(usize, usize, f64)> {
    let s = n as f64 / m as f64;
    (0..m)
        .map(|j| {
            let x = ((j as f64 + 0.5) * s - 0.5).clamp(0.0, (n - 1) as f64);
            let lo = x.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            (lo, hi, x - lo as f64)
        })
        .collect()
}

/// Resamples an image to `out` voxels over the same field of view (trilinear), on every core
/// (see [`resample_linear_with`]).
pub fn resample_linear(v: &Volume<f32>, out: [usize; 3]) -> Result<Volume<f32>> {
    resample_linear_with(v, out, parallel::threads())
}

/// Resamples an image to `out` voxels over the same field of view (trilinear), the output's
/// z slices split over `threads` threads: every voxel is computed alike on whichever thread, so
/// the result has the same bits for any thread count.
pub fn resample_linear_with(v: &Volume<f32>, out: [usize; 3], threads: usize) -> Result<Volume<f32>> {
    if v.dims.contains(&0) {
        return Err(DataError::invalid("volume", "cannot resample an empty volume"));
    }
    let [px, py, pz] = [0, 1, 2].map(|a| axis_plan(v.dims[a], out[a]));
    let mut data = vec![0f32; voxel_count(out, "resampled shape")?];
    let plane = out[0] * out[1];
    parallel::for_each_chunk(&mut data, plane, threads, |first, part| {
        for (k, slice) in part.chunks_mut(plane.max(1)).enumerate() {
            let (z0, z1, wz) = pz[first / plane + k];
            let mut i = 0;
            for &(y0, y1, wy) in &py {
                for &(x0, x1, wx) in &px {
                    let at = |x, y, z| v.data[v.index(x, y, z)] as f64;
                    let lerp = |a: f64, b: f64, w: f64| a + (b - a) * w;
                    let c00 = lerp(at(x0, y0, z0), at(x1, y0, z0), wx);
                    let c10 = lerp(at(x0, y1, z0), at(x1, y1, z0), wx);
                    let c01 = lerp(at(x0, y0, z1), at(x1, y0, z1), wx);
                    let c11 = lerp(at(x0, y1, z1), at(x1, y1, z1), wx);
                    slice[i] = lerp(lerp(c00, c10, wy), lerp(c01, c11, wy), wz) as f32;
                    i += 1;
                }
            }
        }
    });
    Volume::new(out, data)
}

/// Resamples a label map to `out` voxels over the same field of view (nearest neighbour), on
/// every core (see [`resample_nearest_with`]).
pub fn resample_nearest<T: Copy + Default + Send + Sync>(v: &Volume<T>, out: [usize; 3]) -> Result<Volume<T>> {
    resample_nearest_with(v, out, parallel::threads())
}

/// Resamples a label map to `out` voxels over the same field of view (nearest neighbour), the
/// output's z slices split over `threads` threads.
pub fn resample_nearest_with<T: Copy + Default + Send + Sync>(
    v: &Volume<T>,
    out: [usize; 3],
    threads: usize,
) -> Result<Volume<T>> {
    if v.dims.contains(&0) {
        return Err(DataError::invalid("volume", "cannot resample an empty volume"));
    }
    let nearest = |n: usize, m: usize| -> Vec<usize> {
        axis_plan(n, m).into_iter().map(|(lo, hi, w)| if w >= 0.5 { hi } else { lo }).collect()
    };
    let [nx, ny, nz] = [0, 1, 2].map(|a| nearest(v.dims[a], out[a]));
    let mut data = vec![T::default(); voxel_count(out, "resampled shape")?];
    let plane = out[0] * out[1];
    parallel::for_each_chunk(&mut data, plane, threads, |first, part| {
        for (k, slice) in part.chunks_mut(plane.max(1)).enumerate() {
            let z = nz[first / plane + k];
            for (j, &y) in ny.iter().enumerate() {
                let row = &mut slice[j * nx.len()..(j + 1) * nx.len()];
                for (o, &x) in row.iter_mut().zip(&nx) {
                    *o = v.data[v.index(x, y, z)];
                }
            }
        }
    });
    Volume::new(out, data)
}

/// Resamples an image and (optionally) its label map from `g`'s spacing to `target`: the image
/// trilinearly, the label by nearest neighbour, the geometry updated so that world coordinates
/// of the field of view are kept.
pub fn resample_case(
    image: &Volume<f32>,
    label: Option<&Volume<u8>>,
    g: &Geometry,
    target: [f64; 3],
) -> Result<(Volume<f32>, Option<Volume<u8>>, Geometry)> {
    let out = resampled_dims(image.dims, g.spacing(), target)?;
    let img = resample_linear(image, out)?;
    let lab = label.map(|l| resample_nearest(l, out)).transpose()?;
    Ok((img, lab, resampled_geometry(g, image.dims, out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_an_even_axis_averages_blocks_and_keeps_the_field_of_view() {
        let v = Volume::new([4, 2, 2], (0..16).map(|i| i as f32).collect()).unwrap();
        let g = Geometry::from_spacing([0.5, 0.5, 0.5]);
        let (img, _, g2) = resample_case(&v, None, &g, [1.0, 1.0, 1.0]).unwrap();
        assert_eq!(img.dims, [2, 1, 1]);
        // Block x 0..1, all y, z: mean of {0,1,4,5,8,9,12,13} = 6.5; x 2..3: 8.5.
        assert_eq!(img.data, vec![6.5, 8.5]);
        assert_eq!(g2.spacing(), [1.0, 1.0, 1.0]);
        // The first output voxel's centre sits between input voxels 0 and 1: world 0.25.
        assert!((g2.affine[0][3] - 0.25).abs() < 1e-12);
    }

    #[test]
    fn labels_take_the_nearest_voxel_and_keep_their_values() {
        let l = Volume::new([4, 1, 1], vec![0u8, 0, 2, 2]).unwrap();
        let out = resample_nearest(&l, [2, 1, 1]).unwrap();
        assert_eq!(out.data, vec![0, 2]);
        let up = resample_nearest(&l, [8, 1, 1]).unwrap();
        assert_eq!(up.data, vec![0, 0, 0, 0, 2, 2, 2, 2]);
    }

    #[test]
    fn more_threads_give_the_same_bits() {
        let dims = [23, 17, 29];
        let data: Vec<f32> = (0..23 * 17 * 29).map(|i| ((i * 7919) % 1009) as f32 * 0.013 - 3.0).collect();
        let v = Volume::new(dims, data).unwrap();
        let l = Volume::new(dims, v.data.iter().map(|&x| (x > 0.0) as u8 + (x > 5.0) as u8).collect()).unwrap();
        for out in [[11, 9, 14], [40, 31, 57], [23, 17, 1]] {
            let one = resample_linear_with(&v, out, 1).unwrap();
            let lone = resample_nearest_with(&l, out, 1).unwrap();
            for t in [2, 4, 64] {
                let many = resample_linear_with(&v, out, t).unwrap();
                assert_eq!(many.dims, out);
                assert!(one.data.iter().zip(&many.data).all(|(a, b)| a.to_bits() == b.to_bits()), "{out:?}, {t}");
                assert_eq!(resample_nearest_with(&l, out, t).unwrap(), lone, "{out:?}, {t}");
            }
        }
    }

    #[test]
    fn bad_spacings_are_refused() {
        assert!(resampled_dims([4, 4, 4], [1.0; 3], [0.0, 1.0, 1.0]).is_err());
        assert!(resampled_dims([4, 4, 4], [f64::NAN, 1.0, 1.0], [1.0; 3]).is_err());
        assert!(resampled_dims([4, 4, 4], [1.0; 3], [1e-9, 1.0, 1.0]).is_err());
    }
}
