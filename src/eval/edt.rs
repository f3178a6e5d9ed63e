//! Exact Euclidean distance transform with anisotropic voxel spacing: the separable
//! squared-distance algorithm of Felzenszwalb and Huttenlocher (2012), one pass per axis, each
//! pass the lower envelope of parabolas along every line. Linear in the number of voxels.
//!
//! Agrees with `scipy.ndimage.distance_transform_edt(~feature, sampling=spacing)` (scipy measures
//! from each non-zero voxel to the nearest zero one; here the zero voxels are the `feature`s).

/// Squared Euclidean distance from every voxel to the nearest `feature` voxel, in the units of
/// `spacing` (millimetres for a volume's spacing, voxels for `[1, 1, 1]`); `f64::INFINITY`
/// everywhere when there is no feature. `feature` is x fastest, `dims` is `[X, Y, Z]`.
///
/// Panics if `feature.len()` differs from the product of `dims` (a caller's bug, not data).
pub fn squared_edt(feature: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [nx, ny, nz] = dims;
    assert_eq!(feature.len(), nx * ny * nz, "feature mask does not match dims {dims:?}");
    let mut d = vec![f64::INFINITY; feature.len()];
    if d.is_empty() {
        return d;
    }
    // Along x: distance to the nearest feature on the same line, by a forward and a backward scan.
    for (line, out) in feature.chunks_exact(nx).zip(d.chunks_exact_mut(nx)) {
        nearest_on_line(line, spacing[0], out);
    }
    // Along y and z: lower envelopes of the parabolas `d(q) + (s (p - q))^2`.
    let mut env = Envelope::with_capacity(ny.max(nz));
    let mut buf = vec![0.0; ny.max(nz)];
    for z in 0..nz {
        for x in 0..nx {
            let start = x + nx * ny * z;
            env.transform_strided(&mut d, start, nx, ny, spacing[1], &mut buf);
        }
    }
    if nz > 1 {
        for y in 0..ny {
            for x in 0..nx {
                env.transform_strided(&mut d, x + nx * y, nx * ny, nz, spacing[2], &mut buf);
            }
        }
    }
    d
}

/// Euclidean distance to the nearest `feature` voxel: the square root of [`squared_edt`].
pub fn edt(feature: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d = squared_edt(feature, dims, spacing);
    d.iter_mut().for_each(|v| *v = v.sqrt());
    d
}

/// One line along x: squared distance to the nearest feature of the line, or infinity.
fn nearest_on_line(line: &[bool], s: f64, out: &mut [f64]) {
    let mut last: Option<usize> = None;
    for (i, &f) in line.iter().enumerate() {
        if f {
            last = Some(i);
        }
        out[i] = last.map_or(f64::INFINITY, |j| sq((i - j) as f64 * s));
    }
    let mut next: Option<usize> = None;
    for i in (0..line.len()).rev() {
        if line[i] {
            next = Some(i);
        }
        if let Some(j) = next {
            out[i] = out[i].min(sq((j - i) as f64 * s));
        }
    }
}

#[inline]
fn sq(v: f64) -> f64 {
    v * v
}

/// Scratch space of the one-dimensional lower-envelope transform.
struct Envelope {
    /// Sites (line indices) of the parabolas forming the envelope.
    v: Vec<usize>,
    /// Boundaries between consecutive envelope parabolas, in the spacing's units.
    z: Vec<f64>,
}

impl Envelope {
    fn with_capacity(n: usize) -> Self {
        Envelope { v: vec![0; n], z: vec![0.0; n + 1] }
    }

    /// Transforms the `n` values of `d` at `start, start + stride, ...` in place.
    fn transform_strided(&mut self, d: &mut [f64], start: usize, stride: usize, n: usize, s: f64, buf: &mut [f64]) {
        let f = &mut buf[..n];
        for (i, v) in f.iter_mut().enumerate() {
            *v = d[start + i * stride];
        }
        let (v, z) = (&mut self.v, &mut self.z);
        // Build the lower envelope from the finite parabolas only.
        let mut k: usize = 0; // number of parabolas in the envelope
        for q in 0..n {
            if f[q].is_infinite() {
                continue;
            }
            let pq = q as f64 * s;
            let mut cut = f64::NEG_INFINITY;
            while k > 0 {
                let p = v[k - 1];
                let pp = p as f64 * s;
                cut = ((f[q] + pq * pq) - (f[p] + pp * pp)) / (2.0 * (pq - pp));
                if cut <= z[k - 1] {
                    k -= 1;
                    cut = f64::NEG_INFINITY;
                } else {
                    break;
                }
            }
            v[k] = q;
            z[k] = cut;
            k += 1;
            z[k] = f64::INFINITY;
        }
        if k == 0 {
            return; // no feature reachable on this line: all stay infinite
        }
        let mut j = 0;
        for q in 0..n {
            let pq = q as f64 * s;
            while z[j + 1] < pq {
                j += 1;
            }
            let p = v[j];
            d[start + q * stride] = sq((q as f64 - p as f64) * s) + f[p];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: the minimum over all features.
    fn brute(feature: &[bool], dims: [usize; 3], s: [f64; 3]) -> Vec<f64> {
        let idx = |i: usize| [i % dims[0], (i / dims[0]) % dims[1], i / (dims[0] * dims[1])];
        (0..feature.len())
            .map(|i| {
                let a = idx(i);
                (0..feature.len())
                    .filter(|&j| feature[j])
                    .map(|j| {
                        let b = idx(j);
                        (0..3).map(|k| sq((a[k] as f64 - b[k] as f64) * s[k])).sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    #[test]
    fn should_equal_brute_force_on_sparse_anisotropic_masks() {
        let dims = [7, 5, 6];
        let s = [0.7, 1.3, 2.1];
        let mut state = 12345u64;
        for density in [1, 5, 30] {
            let feature: Vec<bool> = (0..dims.iter().product::<usize>())
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 33) % 100 < density
                })
                .collect();
            let got = squared_edt(&feature, dims, s);
            let want = brute(&feature, dims, s);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-9 * w.max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn should_be_infinite_without_features() {
        assert!(squared_edt(&[false; 8], [2, 2, 2], [1.0; 3]).iter().all(|v| v.is_infinite()));
    }
}
