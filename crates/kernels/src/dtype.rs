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
