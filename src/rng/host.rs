//! A small, fast, seeded random generator (xoshiro256**) for sampling, augmentation and
//! synthetic data; streams are keyed by a seed and a path of integers, so a batch or a case can
//! be drawn by any thread in any order and still come out the same.

use super::mix::{key, splitmix64_nth};

/// xoshiro256** seeded through SplitMix64. Not cryptographic; plenty for shuffles and noise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    /// The generator's 256-bit state (never all zero).
    s: [u64; 4],
}

/// Purposes that separate independent streams drawn from one seed.
pub mod stream {
    /// The per-epoch permutation of labelled cases.
    pub const LABELLED: u64 = 1;
    /// The endless reshuffle of unlabelled cases.
    pub const UNLABELLED: u64 = 2;
    /// The augmentation of one patch.
    pub const AUGMENT: u64 = 3;
    /// One synthetic case.
    pub const SYNTH: u64 = 4;
    /// The crop margins of one imported case.
    pub const MARGIN: u64 = 5;
    /// The labelled subset drawn by a raw import's `--labelled` fraction.
    pub const LABELLED_SUBSET: u64 = 6;
    /// The step randomness (noise, dropout) of one rank of a data-parallel run.
    pub const RANK: u64 = 7;
}

impl Rng {
    /// A generator seeded from one 64-bit value.
    pub fn new(seed: u64) -> Self {
        Rng { s: [0, 1, 2, 3].map(|i| splitmix64_nth(seed, i)) }
    }

    /// The generator for the stream named by `path` under `seed` (e.g. `[stream::AUGMENT, iter, slot]`).
    pub fn keyed(seed: u64, path: &[u64]) -> Self {
        Rng::new(key(seed, path))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` without modulo bias (Lemire's method); 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `lo..hi` (half open); `lo` when the range is empty.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi.saturating_sub(lo) as u64) as usize
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// A standard normal sample (Box-Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Shuffles `v` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// A uniformly random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        self.shuffle(&mut p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_repeat_a_stream_for_the_same_key() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::keyed(7, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::keyed(7, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::keyed(7, &[1, 3]);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn should_draw_below_bound_and_permute() {
        let mut r = Rng::new(1);
        let mut hits = [0usize; 5];
        for _ in 0..5000 {
            let v = r.below(5) as usize;
            assert!(v < 5);
            hits[v] += 1;
        }
        assert!(hits.iter().all(|&h| h > 800), "{hits:?}");
        let mut p = r.permutation(10);
        p.sort_unstable();
        assert_eq!(p, (0..10).collect::<Vec<_>>());
    }
}
