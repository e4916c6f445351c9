//! Exhaustive tables and hand-checked cases for the E2M1, E4M3 and E8M0 codecs.

use mimo_kernels::{e2m1, e4m3, e8m0};
use proptest::prelude::*;

#[test]
fn e2m1_decode_all_16_codes() {
    let expected = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    for (c, &e) in expected.iter().enumerate() {
        let v = e2m1::decode(c as u8);
        assert_eq!(v.to_bits(), f32::to_bits(e), "code {c}");
        // From the bit fields: sign, 2-bit exponent (bias 1), 1-bit mantissa.
        let (s, ex, m) = ((c >> 3) & 1, (c >> 1) & 3, c & 1);
        let mag = if ex == 0 {
            m as f32 * 0.5
        } else {
            (1.0 + m as f32 * 0.5) * 2f32.powi(ex as i32 - 1)
        };
        assert_eq!(v.abs(), mag, "code {c} fields");
        assert_eq!(v.is_sign_negative(), s == 1, "code {c} sign");
    }
}

#[test]
fn e2m1_encode_decode_roundtrip_every_code() {
    for c in 0u8..16 {
        let back = e2m1::encode(e2m1::decode(c));
        // -0.0 has no sign for torch.sign / `x < 0`, so it encodes to +0 (code 0).
        let want = if c == 8 { 0 } else { c };
        assert_eq!(back, want, "code {c}");
    }
}

#[test]
fn e2m1_ties_go_to_even_mantissa() {
    // (input, expected magnitude) at every midpoint between neighbouring values.
    let ties = [
        (0.25, 0.0),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
    ];
    for (x, want) in ties {
        assert_eq!(e2m1::decode(e2m1::encode(x)), want, "+{x}");
        assert_eq!(e2m1::decode(e2m1::encode(-x)), -want, "-{x}");
    }
    // Just off the ties, the nearest value wins.
    let near = [
        (0.2500001, 0.5),
        (0.7499999, 0.5),
        (1.2500001, 1.5),
        (1.7499999, 1.5),
        (2.5000002, 3.0),
        (3.4999998, 3.0),
        (5.0000005, 6.0),
    ];
    for (x, want) in near {
        assert_eq!(e2m1::decode(e2m1::encode(x)), want, "{x}");
    }
}

#[test]
fn e2m1_saturates_and_signs() {
    assert_eq!(e2m1::encode(6.0), 7);
    assert_eq!(e2m1::encode(100.0), 7);
    assert_eq!(e2m1::encode(f32::INFINITY), 7);
    assert_eq!(e2m1::encode(-1e30), 15);
    // Small negatives round to -0 (code 8), as torch.sign(x) * 0 gives -0.0.
    assert_eq!(e2m1::encode(-0.1), 8);
    assert_eq!(e2m1::encode(0.1), 0);
    assert_eq!(e2m1::encode(-0.0), 0);
}

#[test]
fn e2m1_pack_unpack_every_byte() {
    for b in 0..=255u8 {
        let (lo, hi) = e2m1::unpack(b);
        assert_eq!(e2m1::pack(lo, hi), b);
        assert_eq!(lo, b & 0xF);
        assert_eq!(hi, b >> 4);
        let [vlo, vhi] = e2m1::BYTE_LUT[b as usize];
        assert_eq!(vlo.to_bits(), e2m1::decode(lo).to_bits());
        assert_eq!(vhi.to_bits(), e2m1::decode(hi).to_bits());
    }
    // Element 2i in the low nibble: [1.0, -6.0] -> 0xF2.
    assert_eq!(e2m1::pack(e2m1::encode(1.0), e2m1::encode(-6.0)), 0xF2);
}

/// E4M3 value from the bit fields, computed independently in f64.
fn e4m3_reference(c: u8) -> f64 {
    let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 3) & 0xF) as i32;
    let m = (c & 7) as f64;
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    if e == 0 {
        s * m / 8.0 * 2f64.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

#[test]
fn e4m3_decode_all_256_codes() {
    for c in 0..=255u8 {
        let r = e4m3_reference(c);
        let v = e4m3::decode(c);
        if r.is_nan() {
            assert!(v.is_nan(), "code {c:#x}");
            assert!(e4m3::is_nan_code(c));
        } else {
            assert_eq!(v as f64, r, "code {c:#x}");
            assert!(!e4m3::is_nan_code(c));
        }
    }
    // Spot values.
    assert_eq!(e4m3::decode(0x7E), 448.0);
    assert_eq!(e4m3::decode(0x38), 1.0);
    assert_eq!(e4m3::decode(0x01), 2f32.powi(-9));
    assert_eq!(e4m3::decode(0x08), 2f32.powi(-6));
    assert_eq!(e4m3::decode(0xFE), -448.0);
    assert!(e4m3::decode(0x80).is_sign_negative() && e4m3::decode(0x80) == 0.0);
}

#[test]
fn e4m3_encode_decode_roundtrip_every_non_nan_code() {
    for c in 0..=255u8 {
        if e4m3::is_nan_code(c) {
            continue;
        }
        assert_eq!(e4m3::encode(e4m3::decode(c)), c, "code {c:#x}");
    }
}

#[test]
fn e4m3_saturates_never_nan() {
    for x in [448.0, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(e4m3::encode(x), 0x7E, "{x}");
        assert_eq!(e4m3::encode(-x), 0xFE, "-{x}");
    }
}

#[test]
fn e4m3_ties_and_subnormals() {
    // 1.0625 is halfway between 1.0 (0x38, even) and 1.125 (0x39): even wins.
    assert_eq!(e4m3::encode(1.0625), 0x38);
    // 1.1875 is halfway between 1.125 (0x39) and 1.25 (0x3A, even).
    assert_eq!(e4m3::encode(1.1875), 0x3A);
    // Subnormal grid step 2^-9: 2^-10 is a tie between 0 and 2^-9 -> 0.
    assert_eq!(e4m3::encode(2f32.powi(-10)), 0x00);
    assert_eq!(e4m3::encode(2f32.powi(-10) * 1.0001), 0x01);
    // 3 * 2^-10 is a tie between codes 1 and 2 -> 2.
    assert_eq!(e4m3::encode(3.0 * 2f32.powi(-10)), 0x02);
    // 7.5 * 2^-9 is a tie between the largest subnormal (0x07) and the smallest normal (0x08).
    assert_eq!(e4m3::encode(7.5 * 2f32.powi(-9)), 0x08);
    // Far below the smallest subnormal: zero, keeping the sign.
    assert_eq!(e4m3::encode(1e-20), 0x00);
    assert_eq!(e4m3::encode(-1e-20), 0x80);
    // 74.666 lies between 72 (0x69) and 80 (0x6A): nearest is 72.
    assert_eq!(e4m3::encode(448.0 / 6.0), 0x69);
}

#[test]
fn e8m0_decode_encode_all_256_codes() {
    for c in 0..=255u8 {
        let v = e8m0::decode(c);
        if c == 255 {
            assert!(v.is_nan());
            continue;
        }
        assert_eq!(v as f64, 2f64.powi(c as i32 - 127), "code {c}");
        assert_eq!(e8m0::encode_floor(v), c, "code {c}");
        assert_eq!(e8m0::encode_exponent(c as i32 - 127), c);
        // Anything in [2^e, 2^(e+1)) floors to the same code.
        if c < 254 {
            assert_eq!(e8m0::encode_floor(v * 1.75), c, "1.75 * code {c}");
        }
    }
    assert_eq!(e8m0::encode_floor(0.0), 0);
    assert_eq!(e8m0::encode_floor(f32::INFINITY), 254);
    assert_eq!(e8m0::encode_exponent(1000), 254);
    assert_eq!(e8m0::encode_exponent(-1000), 0);
    assert_eq!(e8m0::floor_log2(f32::from_bits(1)), -149);
}

/// Nearest-even E4M3 code by brute force over all finite codes, in f64.
fn e4m3_brute(x: f32) -> u8 {
    let a = (x.abs() as f64).min(448.0);
    let mut best = 0u8;
    let mut best_d = f64::INFINITY;
    for c in 0..=0x7Eu8 {
        let d = (e4m3_reference(c) - a).abs();
        if d < best_d || (d == best_d && c & 1 == 0) {
            best = c;
            best_d = d;
        }
    }
    best | if x.is_sign_negative() { 0x80 } else { 0 }
}

proptest! {
    #[test]
    fn e4m3_encode_matches_brute_force(x in -600.0f32..600.0) {
        prop_assert_eq!(e4m3::encode(x), e4m3_brute(x));
    }

    #[test]
    fn e4m3_encode_matches_brute_force_small(e in -14i32..0, m in 1.0f32..2.0, neg: bool) {
        let x = m * 2f32.powi(e) * if neg { -1.0 } else { 1.0 };
        prop_assert_eq!(e4m3::encode(x), e4m3_brute(x));
    }

    #[test]
    fn e2m1_encode_is_nearest(x in -8.0f32..8.0) {
        let q = e2m1::decode(e2m1::encode(x));
        let c = x.clamp(-6.0, 6.0);
        for g in e2m1::E2M1_LUT {
            prop_assert!((c - q).abs() <= (c - g).abs(), "x {} -> {} but {} is nearer", x, q, g);
        }
    }
}
