//! E8M0 exponent scale (OCP Microscaling v1.0): value 2^(e - 127), bias 127, code 255 is NaN.

/// Code of NaN.
pub const NAN_CODE: u8 = 255;

/// Exponent bias.
pub const BIAS: i32 = 127;

/// Value of a code: 2^(code - 127) (code 0 is 2^-127, an f32 subnormal); NaN for 255.
#[inline]
pub fn decode(code: u8) -> f32 {
    DECODE_LUT[code as usize]
}

/// Table of all 256 decoded values.
pub static DECODE_LUT: [f32; 256] = build_decode_lut();

const fn build_decode_lut() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = if c == 255 {
            f32::NAN
        } else if c == 0 {
            // 2^-127 is the f32 subnormal with mantissa bit 22 set.
            f32::from_bits(1 << 22)
        } else {
            f32::from_bits((c as u32) << 23)
        };
        c += 1;
    }
    t
}

/// floor(log2(x)) for a finite x > 0, exact (subnormals included).
pub fn floor_log2(x: f32) -> i32 {
    let bits = x.to_bits() & 0x7FFF_FFFF;
    let field = (bits >> 23) as i32;
    if field == 0 {
        // Subnormal: value = mantissa * 2^-149.
        let m = bits & 0x7F_FFFF;
        31 - m.leading_zeros() as i32 - 149
    } else {
        field - 127
    }
}

/// Code of the power of two at or below `x`: clamp(floor(log2(x)) + 127, 0, 254). Zero, negative
/// and NaN inputs give 0; +inf gives 254. Never returns the NaN code.
pub fn encode_floor(x: f32) -> u8 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    if x.is_infinite() {
        return 254;
    }
    (floor_log2(x) + BIAS).clamp(0, 254) as u8
}

/// Code of 2^`exp`, clamped to the representable codes 0..=254.
pub fn encode_exponent(exp: i32) -> u8 {
    (exp.saturating_add(BIAS)).clamp(0, 254) as u8
}
