//! Counter-based random numbers made of tensor ops, so they are computed on the tensor's own
//! device and depend only on a key, never on which thread draws first. libtorch's generator is
//! global and shared by all threads; these streams are what make the pipeline reproducible.
//!
//! Each element is a hash of its index mixed with the key (two rounds of a 32-bit integer hash,
//! Wellons' "lowbias32" constants), computed in int64 without overflow.

use tch::{Device, Kind, Tensor};

use super::mix::splitmix64;

const MASK32: i64 = 0xFFFF_FFFF;

/// `x * c mod 2^32` for `0 <= x < 2^32`, split in 16-bit halves of `c` so int64 never overflows.
fn mul32(x: &Tensor, c: u32) -> Tensor {
    let (hi, lo) = ((c >> 16) as i64, (c & 0xFFFF) as i64);
    let high = (x * hi).bitwise_and(0xFFFF).bitwise_left_shift_tensor_scalar(16);
    (x * lo + high).bitwise_and(MASK32)
}

fn xorshift(x: &Tensor, s: i64) -> Tensor {
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(s))
}

/// Wellons' lowbias32 integer hash on 32-bit values held in int64.
fn hash32(x: &Tensor) -> Tensor {
    let x = mul32(&xorshift(x, 16), 0x7feb_352d);
    let x = mul32(&xorshift(&x, 15), 0x846c_a68b);
    xorshift(&x, 16)
}

/// The same hash on one 32-bit value, on the host.
fn hash32_host(x: u32) -> u32 {
    let x = (x ^ (x >> 16)).wrapping_mul(0x7feb_352d);
    let x = (x ^ (x >> 15)).wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The 24-bit values `(word >> 8) + offset` of the stream of `key`, as floats scaled by 2^-24,
/// computed on the host: the same numbers as the tensor ops give (the words are integers and the
/// conversion and scaling are exact), at a fraction of the cost of some twenty int64 passes.
fn scaled_host(key: u64, numel: i64, offset: u32) -> Tensor {
    let (k0, k1) = ((key & 0xFFFF_FFFF) as u32, (key >> 32) as u32);
    let v: Vec<f32> = (0..numel.max(0) as u64)
        .map(|i| {
            let w = hash32_host(hash32_host(i as u32 ^ k0) ^ k1);
            ((w >> 8) + offset) as f32 * (1.0 / 16_777_216.0)
        })
        .collect();
    Tensor::from_slice(&v)
}

/// Whether the host path computes the words for `device` (the CPU, and counters that fit 32 bits
/// as the tensor ops' do).
fn on_host(numel: i64, device: Device) -> bool {
    device == Device::Cpu && numel <= u32::MAX as i64
}

/// 32-bit random words `[numel]` (int64 in 0..2^32) for `key`.
fn words(key: u64, numel: i64, device: Device) -> Tensor {
    let (k0, k1) = ((key & 0xFFFF_FFFF) as i64, (key >> 32) as i64);
    let counter = Tensor::arange(numel, (Kind::Int64, device));
    let x = hash32(&counter.bitwise_xor(k0));
    hash32(&x.bitwise_xor(k1))
}

/// Uniform floats in `[0, 1)` with 24 random bits each.
pub fn uniform(key: u64, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    if on_host(n, device) {
        return scaled_host(key, n, 0).reshape(shape);
    }
    let w = words(key, n, device).bitwise_right_shift_tensor_scalar(8);
    (w.to_kind(Kind::Float) * (1.0 / 16_777_216.0)).reshape(shape)
}

/// Standard normal floats (Box-Muller on two uniform streams derived from `key`).
pub fn normal(key: u64, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let u1 = if on_host(n, device) {
        scaled_host(splitmix64(key ^ 1), n, 1)
    } else {
        (words(splitmix64(key ^ 1), n, device).bitwise_right_shift_tensor_scalar(8) + 1).to_kind(Kind::Float)
            * (1.0 / 16_777_216.0)
    }; // (0, 1]
    let u2 = uniform(splitmix64(key ^ 2), &[n], device);
    let r = (u1.log() * -2.0).sqrt();
    (r * (u2 * (2.0 * std::f64::consts::PI)).cos()).reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor-op path on the CPU, as it runs on other devices.
    fn uniform_ops(key: u64, n: i64) -> Tensor {
        let w = words(key, n, Device::Cpu).bitwise_right_shift_tensor_scalar(8);
        w.to_kind(Kind::Float) * (1.0 / 16_777_216.0)
    }

    #[test]
    fn the_host_path_gives_the_tensor_ops_numbers_bit_for_bit() {
        for key in [0u64, 1, 0xDEAD_BEEF_0123_4567, u64::MAX] {
            let n = 100_003;
            let host = uniform(key, &[n], Device::Cpu);
            assert!(host.equal(&uniform_ops(key, n)), "key {key:#x}");
            let u1_ops = (words(key, n, Device::Cpu).bitwise_right_shift_tensor_scalar(8) + 1).to_kind(Kind::Float)
                * (1.0 / 16_777_216.0);
            assert!(scaled_host(key, n, 1).equal(&u1_ops), "key {key:#x}");
        }
    }

    #[test]
    fn normals_have_the_moments_of_a_standard_normal() {
        let z = normal(42, &[200_000], Device::Cpu);
        let (m, s) = (z.mean(Kind::Double).double_value(&[]), z.std(true).double_value(&[]));
        assert!(m.abs() < 0.01 && (s - 1.0).abs() < 0.01, "mean {m}, std {s}");
        assert!(z.isfinite().all().int64_value(&[]) == 1);
    }
}
