//! Counter-based random numbers made of tensor ops, so they are computed on the tensor's own
//! device and depend only on a key, never on which thread draws first. libtorch's generator is
//! global and shared by all threads; these streams are what make the pipeline reproducible.
//!
//! Each element is a hash of its index mixed with the key (two rounds of a 32-bit integer hash,
//! Wellons' "lowbias32" constants), computed in int64 without overflow.

use tch::{Device, Kind, Tensor};

use super::splitmix64;

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
    let w = words(key, n, device).bitwise_right_shift_tensor_scalar(8);
    (w.to_kind(Kind::Float) * (1.0 / 16_777_216.0)).reshape(shape)
}

/// Standard normal floats (Box-Muller on two uniform streams derived from `key`).
pub fn normal(key: u64, shape: &[i64], device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let u1 = (words(splitmix64(key ^ 1), n, device).bitwise_right_shift_tensor_scalar(8) + 1).to_kind(Kind::Float)
        * (1.0 / 16_777_216.0); // (0, 1]
    let u2 = uniform(splitmix64(key ^ 2), &[n], device);
    let r = (u1.log() * -2.0).sqrt();
    (r * (u2 * (2.0 * std::f64::consts::PI)).cos()).reshape(shape)
}
