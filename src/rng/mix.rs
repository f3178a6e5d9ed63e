//! SplitMix64 and the stream keys derived from it: what both generators build on.

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a well-mixed 64-bit value from `x` (the generator's output for state `x`, i.e. the
/// finaliser applied to `x` plus the golden-ratio increment).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th output (from 0) of a SplitMix64 stream started at state `seed`.
pub fn splitmix64_nth(seed: u64, i: u64) -> u64 {
    splitmix64(seed.wrapping_add(GOLDEN.wrapping_mul(i)))
}

/// A key for one stream, derived from a seed and a path of integers (iteration, purpose, ...).
pub fn key(seed: u64, path: &[u64]) -> u64 {
    path.iter().fold(splitmix64(seed), |k, p| splitmix64(k ^ splitmix64(*p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stateful SplitMix64 as it is usually written, to check the stateless form against.
    fn stateful(state: &mut u64) -> u64 {
        *state = state.wrapping_add(GOLDEN);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn should_match_the_stateful_splitmix64_stream() {
        for seed in [0u64, 1, 42, u64::MAX, 0x1234_5678_9ABC_DEF0] {
            let mut s = seed;
            for i in 0..6 {
                assert_eq!(splitmix64_nth(seed, i), stateful(&mut s), "seed {seed} output {i}");
            }
        }
    }

    #[test]
    fn should_give_the_published_first_output_for_seed_zero() {
        // The first SplitMix64 output for state 0 (Vigna's reference implementation).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
