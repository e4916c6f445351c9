//! FP8 E4M3 ("fn" variant: bias 7, max 448, no infinities, 0x7F/0xFF are NaN): decode and a
//! saturating round-to-nearest-even encode.
//!
//! compressed-tensors casts block scales with `round_to_quantized_type_dtype`
//! (vllm-project/compressed-tensors, src/compressed_tensors/quantization/quant_args.py):
//! `torch.clamp(tensor, finfo.min, finfo.max).to(float8_e4m3fn)`, i.e. clamp to +-448 and then
//! PyTorch's round-to-nearest-even cast (with subnormals). [`encode`] does exactly that, so it
//! never produces NaN for a non-NaN input. ModelOpt casts without the clamp (values above 448
//! would become NaN there); its block scales never exceed 448 by construction, and we saturate.

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// Code of the canonical NaN (0xFF is the negative NaN).
pub const NAN_CODE: u8 = 0x7F;

/// True for the two NaN codes.
#[inline]
pub fn is_nan_code(code: u8) -> bool {
    code & 0x7F == 0x7F
}

/// Value of a code (NaN for 0x7F / 0xFF).
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
        t[c] = decode_const(c as u8);
        c += 1;
    }
    t
}

const fn decode_const(code: u8) -> f32 {
    let neg = code & 0x80 != 0;
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 0x7) as u32;
    let mag = if e == 0xF && m == 7 {
        f32::NAN
    } else if e == 0 {
        // Subnormal: m * 2^-9 (exact in f32).
        m as f32 / 512.0
    } else {
        // (8 + m) * 2^(e - 10), built from bits: exponent e - 7 + 127, mantissa m << 20.
        f32::from_bits((((e - 7 + 127) as u32) << 23) | (m << 20))
    };
    if neg {
        -mag
    } else {
        mag
    }
}

/// Saturating encode: clamp to +-448, then round to nearest, ties to even. NaN gives
/// [`NAN_CODE`] (the quantizers reject NaN input before they get here). -0.0 gives 0x80.
///
/// Bit-level: E4M3 normals (|x| >= 2^-6) keep the f32 exponent (rebiased by 120) and the top 3
/// mantissa bits after round-to-nearest-even on the 20 dropped bits (a carry moves into the
/// exponent, as it should; 448 is the largest value reached, so no carry can produce the NaN
/// code). Subnormals (m * 2^-9) are `|x| * 512` rounded to an integer by the f32 adder itself
/// (adding 2^23 rounds to nearest even); m = 8 is code 0x08 = 2^-6, the first normal.
/// Checked against [`encode_reference`] (tests/codecs.rs; exhaustive run in tests/e4m3_exhaustive.rs).
#[inline(always)]
pub fn encode(x: f32) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs().min(E4M3_MAX);
    let bits = a.to_bits();
    let normal = (bits + 0x7_FFFF + ((bits >> 20) & 1)) >> 20;
    let normal = normal.wrapping_sub(120 << 3);
    let sub = (a * 512.0 + 8_388_608.0).to_bits() - 0x4B00_0000;
    let code = if bits >= 0x3C80_0000 { normal } else { sub };
    sign | code as u8
}

/// Scalar reference of [`encode`]: binary search over the decoded values and an explicit
/// midpoint comparison (slow, obviously right). Tests check the bit-level encoder against it.
pub fn encode_reference(x: f32) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(E4M3_MAX);
    // Positive finite codes 0..=0x7E are increasing in value: binary search for the largest code
    // whose value is <= a, then compare with the midpoint to the next code.
    let (mut lo, mut hi) = (0u8, 0x7Eu8);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if DECODE_LUT[mid as usize] <= a {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let c = lo;
    let v = DECODE_LUT[c as usize];
    if v == a || c == 0x7E {
        return sign | c;
    }
    let next = DECODE_LUT[c as usize + 1];
    // Neighbouring values have at most 4 significant bits, so the midpoint is exact in f32.
    let midpoint = (v + next) * 0.5;
    let up = if a > midpoint {
        true
    } else if a < midpoint {
        false
    } else {
        // Tie: the even code (even mantissa LSB) wins.
        c & 1 == 1
    };
    sign | if up { c + 1 } else { c }
}
