//! Decoding voxels straight from a file's bytes: any supported data type and byte order, a
//! strided run of elements, the intensity scaling applied in f64 as nibabel applies it.

use super::header::{DType, Scale};

/// Conversion from a decoded voxel value (f64, scaling applied) into an output element.
pub trait FromVoxel: Copy + Default {
    /// The element for `v`; integer targets saturate and map NaN to 0.
    fn from_f64(v: f64) -> Self;
}

macro_rules! from_voxel {
    ($($t:ty),*) => {$(
        impl FromVoxel for $t {
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    )*};
}
from_voxel!(f32, f64, u8, i64);

/// Decodes `out.len()` voxels at element indices `start, start + step, ...` from `raw`.
/// `None` if an index falls outside `raw`.
pub(crate) fn decode_line<T: FromVoxel>(
    raw: &[u8],
    dtype: DType,
    big_endian: bool,
    scale: Scale,
    start: usize,
    step: isize,
    out: &mut [T],
) -> Option<()> {
    macro_rules! walk {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            let read = |b: &[u8]| -> Option<f64> {
                let b: [u8; N] = b.try_into().ok()?;
                Some((if big_endian { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }) as f64)
            };
            let identity = scale.is_identity();
            let (slope, inter) = (scale.slope, scale.inter);
            if step == 1 {
                let end = start.checked_add(out.len())?.checked_mul(N)?;
                let chunk = raw.get(start.checked_mul(N)?..end)?;
                for (o, b) in out.iter_mut().zip(chunk.chunks_exact(N)) {
                    let v = read(b)?;
                    *o = T::from_f64(if identity { v } else { v * slope + inter });
                }
            } else {
                let mut e = start as isize;
                for o in out.iter_mut() {
                    let i = usize::try_from(e).ok()?.checked_mul(N)?;
                    let v = read(raw.get(i..i + N)?)?;
                    *o = T::from_f64(if identity { v } else { v * slope + inter });
                    e += step;
                }
            }
        }};
    }
    match dtype {
        DType::Uint8 => walk!(u8),
        DType::Int16 => walk!(i16),
        DType::Uint16 => walk!(u16),
        DType::Int32 => walk!(i32),
        DType::Float32 => walk!(f32),
        DType::Float64 => walk!(f64),
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_decode_strided_big_endian_scaled() {
        let raw: Vec<u8> = [1i16, -2, 3, -4].iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut out = [0f32; 2];
        decode_line(&raw, DType::Int16, true, Scale { slope: 2.0, inter: 1.0 }, 3, -2, &mut out).unwrap();
        assert_eq!(out, [-7.0, -3.0]);
        assert!(decode_line(&raw, DType::Int16, true, Scale::IDENTITY, 3, 1, &mut out).is_none());
    }
}
