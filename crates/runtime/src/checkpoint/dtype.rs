//! The element types a safetensors header may name.

use std::fmt;

/// A safetensors element type, spelled as in the header (`"BF16"`, `"F8_E4M3"`, ...).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Boolean, one byte.
    BOOL,
    /// Unsigned 8-bit integer (also packed FP4 nibbles and E8M0 exponents).
    U8,
    /// Signed 8-bit integer.
    I8,
    /// FP8 E4M3 (fn: no infinities).
    F8_E4M3,
    /// FP8 E5M2.
    F8_E5M2,
    /// FP8 E8M0: exponent only (MX scales).
    F8_E8M0,
    /// Packed FP4 E2M1 (two per byte; safetensors >= 0.6 spelling).
    F4,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE double precision.
    F64,
}

impl DType {
    /// Every dtype, for parsing.
    pub const ALL: [DType; 17] = [
        DType::BOOL,
        DType::U8,
        DType::I8,
        DType::F8_E4M3,
        DType::F8_E5M2,
        DType::F8_E8M0,
        DType::F4,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::I64,
        DType::U64,
        DType::F64,
    ];

    /// The header spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
            DType::F8_E8M0 => "F8_E8M0",
            DType::F4 => "F4",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
        }
    }

    /// Parses the header spelling; `None` for a dtype we do not know.
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.as_str() == s)
    }

    /// Size of `numel` elements in bytes; `None` on overflow or, for `F4`, an odd count.
    pub fn byte_len(self, numel: u64) -> Option<u64> {
        match self {
            DType::F4 => (numel % 2 == 0).then_some(numel / 2),
            _ => numel.checked_mul(self.bits() / 8),
        }
    }

    /// Bits per element.
    pub fn bits(self) -> u64 {
        match self {
            DType::F4 => 4,
            DType::BOOL
            | DType::U8
            | DType::I8
            | DType::F8_E4M3
            | DType::F8_E5M2
            | DType::F8_E8M0 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::I64 | DType::U64 | DType::F64 => 64,
        }
    }

    /// True for the 16/32-bit float types the converter quantizes from.
    pub fn is_dense_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_every_dtype() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::parse("bf16"), None);
        assert_eq!(DType::parse("C64"), None);
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(DType::BF16.byte_len(6), Some(12));
        assert_eq!(DType::F32.byte_len(3), Some(12));
        assert_eq!(DType::F4.byte_len(6), Some(3));
        assert_eq!(DType::F4.byte_len(5), None);
        assert_eq!(DType::F64.byte_len(u64::MAX), None);
    }
}
