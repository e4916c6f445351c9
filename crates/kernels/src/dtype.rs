//! Source dtypes of dense tensors and little-endian conversion of raw tensor bytes to f32.

use half::{bf16, f16};

/// Dense floating-point dtypes a source checkpoint may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SrcDType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

/// Errors of the raw-bytes conversion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DTypeError {
    /// The byte slice does not hold exactly the requested number of elements.
    #[error("{dtype:?} row: expected {expected} bytes for {elems} elements, got {got}")]
    Length {
        /// dtype of the bytes
        dtype: SrcDType,
        /// number of output elements
        elems: usize,
        /// byte count required
        expected: usize,
        /// byte count given
        got: usize,
    },
}

impl SrcDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SrcDType::F32 => 4,
            SrcDType::F16 | SrcDType::BF16 => 2,
        }
    }

    /// safetensors dtype name ("F32", "F16", "BF16").
    pub fn name(self) -> &'static str {
        match self {
            SrcDType::F32 => "F32",
            SrcDType::F16 => "F16",
            SrcDType::BF16 => "BF16",
        }
    }

    /// Rounds an f32 to this dtype (round to nearest even) and back: models arithmetic that a
    /// reference tool performs in the tensor's own dtype.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            SrcDType::F32 => x,
            SrcDType::F16 => f16::from_f32(x).to_f32(),
            SrcDType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// Converts little-endian raw bytes of `dtype` into `out` (one f32 per element). `bytes` must
/// hold exactly `out.len()` elements; alignment of `bytes` does not matter.
pub fn convert_row(dtype: SrcDType, bytes: &[u8], out: &mut [f32]) -> Result<(), DTypeError> {
    let expected = out.len() * dtype.size();
    if bytes.len() != expected {
        return Err(DTypeError::Length {
            dtype,
            elems: out.len(),
            expected,
            got: bytes.len(),
        });
    }
    match dtype {
        SrcDType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        SrcDType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        SrcDType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                // bf16 -> f32 is a 16-bit shift; exact.
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
    }
    Ok(())
}

/// Converts a whole byte slice of `dtype` to a new f32 vector; the length must be a multiple of
/// the element size.
pub fn convert_to_vec(dtype: SrcDType, bytes: &[u8]) -> Result<Vec<f32>, DTypeError> {
    if bytes.len() % dtype.size() != 0 {
        return Err(DTypeError::Length {
            dtype,
            elems: bytes.len() / dtype.size(),
            expected: bytes.len() / dtype.size() * dtype.size(),
            got: bytes.len(),
        });
    }
    let mut out = vec![0.0f32; bytes.len() / dtype.size()];
    convert_row(dtype, bytes, &mut out)?;
    Ok(out)
}

/// Little-endian raw bytes of `vals` in `dtype`, each value rounded to it (round to nearest
/// even): the inverse of [`convert_to_vec`] up to that rounding.
pub fn encode_vec(dtype: SrcDType, vals: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * dtype.size());
    for &v in vals {
        match dtype {
            SrcDType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            SrcDType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            SrcDType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_is_the_rounded_inverse_of_convert() {
        // Known bytes: 1.0 and -2.5 in each dtype.
        assert_eq!(
            encode_vec(SrcDType::BF16, &[1.0, -2.5]),
            [0x80, 0x3F, 0x20, 0xC0]
        );
        assert_eq!(
            encode_vec(SrcDType::F16, &[1.0, -2.5]),
            [0x00, 0x3C, 0x00, 0xC1]
        );
        assert_eq!(
            encode_vec(SrcDType::F32, &[1.0]),
            1.0f32.to_le_bytes().to_vec()
        );
        // Random values over many binades, and the round-to-nearest-even tie of bf16.
        let mut state = 0x9E37_79B9u32;
        let vals: Vec<f32> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                f32::from_bits(state & 0xBFFF_FFFF) // |exponent| bounded: finite values
            })
            .chain([f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)])
            .collect();
        for dtype in [SrcDType::F32, SrcDType::F16, SrcDType::BF16] {
            let bytes = encode_vec(dtype, &vals);
            assert_eq!(bytes.len(), vals.len() * dtype.size());
            let back = convert_to_vec(dtype, &bytes).unwrap();
            for (v, b) in vals.iter().zip(&back) {
                assert_eq!(dtype.round(*v).to_bits(), b.to_bits(), "{dtype:?} {v}");
            }
        }
    }
}
