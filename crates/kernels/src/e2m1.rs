//! FP4 E2M1 element codes: value table, decode, encode (rounding as the reference tools do),
//! and nibble packing.
//!
//! A code is 4 bits: sign (bit 3), 2 exponent bits, 1 mantissa bit. Magnitudes of codes 0..7 are
//! 0, 0.5, 1, 1.5, 2, 3, 4, 6; codes 8..15 are their negatives (code 8 is -0).
//!
//! Rounding (confirmed from the reference code with the search tool):
//! - compressed-tensors `FP4_E2M1_DATA._cast_to_fp4` (vllm-project/compressed-tensors,
//!   src/compressed_tensors/quantization/quant_args.py) and `cast_to_fp4`
//!   (src/compressed_tensors/quantization/utils/fp4_utils.py) map |x| with the thresholds
//!   `<= 0.25 -> 0`, `< 0.75 -> 0.5`, `<= 1.25 -> 1`, `< 1.75 -> 1.5`, `<= 2.5 -> 2`, `< 3.5 -> 3`,
//!   `<= 5 -> 4`, else 6: round to nearest with ties to the EVEN mantissa (0.25 -> 0, 0.75 -> 1,
//!   1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), then multiply by `torch.sign(x)`, so a
//!   small negative value that rounds to zero becomes -0.0.
//! - The packer `pack_fp4_to_uint8` (compressors/quantized_compressors/fp4_quantized.py) uses an
//!   argmin (ties to the smaller magnitude), but it only ever sees values already on the E2M1
//!   grid (the compressor calls `quantize` first), so its tie rule never matters; it sets the sign
//!   bit from `torch.signbit`, so -0.0 is packed as code 8.
//! - ModelOpt `NVFP4QTensor._cast_fp4` (NVIDIA TensorRT-Model-Optimizer,
//!   modelopt/torch/quantization/qtensor/nvfp4_tensor.py) uses `searchsorted` on the bounds
//!   [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] plus one at 0.75/1.75/3.5: the same ties-to-even
//!   result, with the sign bit from `weight < 0`.
//!
//! Packing: element 2i in the LOW nibble, element 2i+1 in the HIGH nibble (compressed-tensors
//! `pack_fp4_to_uint8`: `indices[:, 0] | (indices[:, 1] << 4)`; ModelOpt the same).

/// Value of each of the 16 codes (code 8 is -0.0).
pub const E2M1_LUT: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest finite magnitude of E2M1.
pub const E2M1_MAX: f32 = 6.0;

/// Sign bit of a code.
pub const SIGN_BIT: u8 = 0x8;

/// Value of a 4-bit code (only the low 4 bits of `code` are used).
#[inline]
pub fn decode(code: u8) -> f32 {
    E2M1_LUT[(code & 0xF) as usize]
}

/// Magnitude code (0..=7) of |x| with round-to-nearest, ties to even mantissa; values above 6
/// saturate to 6. `a` must be non-negative (NaN maps to 0).
///
/// Branch-free: the code is the number of thresholds `a` lies above, counted on the f32 bit
/// patterns (non-negative floats order like their bits as integers). A `<=` threshold t of the
/// reference chain becomes `bits > bits(t)`, a `<` threshold becomes `bits > bits(t) - 1`, so the
/// ties land exactly where [`encode_magnitude_reference`] puts them; NaN has bits above every
/// threshold only with its sign cleared, so it is tested explicitly.
#[inline(always)]
pub fn encode_magnitude(a: f32) -> u8 {
    let b = a.to_bits();
    let mut code = 0u32;
    for t in MAGNITUDE_THRESHOLD_BITS {
        code += (b > t) as u32;
    }
    // NaN (any sign) and negative inputs: the reference chain gives 0 for NaN; a negative `a`
    // breaks the precondition, but its bits exceed every threshold, so clamp it to 0 as well.
    if b > 0x7F80_0000 {
        0
    } else {
        code as u8
    }
}

/// Bit patterns `t` such that `bits(a) > t` is exactly the reference chain's test for each
/// E2M1 magnitude step: `a > 0.25`, `a >= 0.75`, `a > 1.25`, `a >= 1.75`, `a > 2.5`, `a >= 3.5`,
/// `a > 5`.
pub const MAGNITUDE_THRESHOLD_BITS: [u32; 7] = [
    0x3E80_0000,     // 0.25: > (tie 0.25 -> 0, even)
    0x3F40_0000 - 1, // 0.75: >= (tie 0.75 -> 1.0, even)
    0x3FA0_0000,     // 1.25: > (tie -> 1.0)
    0x3FE0_0000 - 1, // 1.75: >= (tie -> 2.0)
    0x4020_0000,     // 2.5: > (tie -> 2.0)
    0x4060_0000 - 1, // 3.5: >= (tie -> 4.0)
    0x40A0_0000,     // 5.0: > (tie -> 4.0)
];

/// Scalar reference of [`encode_magnitude`]: the threshold chain of compressed-tensors
/// `_cast_to_fp4`, written as the reference code reads. Tests check the fast encoder against it.
pub fn encode_magnitude_reference(a: f32) -> u8 {
    // Thresholds exactly as compressed-tensors `_cast_to_fp4` (see module docs).
    if a <= 0.25 || a.is_nan() {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    }
}

/// Code of `x` (already divided by its scale): nearest E2M1 value, ties to even mantissa,
/// saturating at +-6. The sign bit is set for every `x < 0`, so a small negative value that
/// rounds to zero gives code 8 (-0), as in compressed-tensors and ModelOpt; -0.0 itself gives
/// code 0 (both tools take the sign from `x < 0` / `torch.sign`, which is 0 for -0.0).
#[inline(always)]
pub fn encode(x: f32) -> u8 {
    encode_magnitude(x.abs()) | (((x < 0.0) as u8) << 3)
}

/// Packs two codes into one byte: `lo` (element 2i) in the low nibble, `hi` (element 2i+1) in
/// the high nibble.
#[inline]
pub fn pack(lo: u8, hi: u8) -> u8 {
    (lo & 0xF) | ((hi & 0xF) << 4)
}

/// Splits a byte into (element 2i, element 2i+1) codes.
#[inline]
pub fn unpack(byte: u8) -> (u8, u8) {
    (byte & 0xF, byte >> 4)
}

/// Values of the two elements held in one packed byte, for every byte value: `[lo, hi]`.
/// Used by the dequantizing kernels to decode a whole byte with one table load.
pub static BYTE_LUT: [[f32; 2]; 256] = build_byte_lut();

const fn build_byte_lut() -> [[f32; 2]; 256] {
    let mut t = [[0.0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [E2M1_LUT[b & 0xF], E2M1_LUT[b >> 4]];
        b += 1;
    }
    t
}
