//! NVFP4 / MXFP4 quantization: hand-computed vectors, zero and tiny blocks, errors, and
//! properties on random data.

use mimo_kernels::fp4::{
    self, mxfp4_scale_code, nvfp4_block_scale_code, Fp4Error, Fp4Format, Fp4Matrix,
};
use mimo_kernels::{e2m1, e4m3, e8m0, SrcDType};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn codes(packed: &[u8]) -> Vec<u8> {
    packed
        .iter()
        .flat_map(|&b| {
            let (lo, hi) = e2m1::unpack(b);
            [lo, hi]
        })
        .collect()
}

#[test]
fn nvfp4_hand_vector_exact_scales() {
    // Row of 3 blocks, global scale 448 (tensor amax 6).
    // Block 0: amax 6 -> local 1 -> scale 448 (0x7E); multiplier 448/448 = 1, so elements are
    // rounded as they are: ties to even, -0.25 -> -0 (code 8), 5.1 -> 6.
    // Block 1: amax 3 -> local 0.5 -> 224 = 1.75 * 2^7 (0x76); multiplier 0.5.
    // Block 2: amax 1 -> local 1/6 -> 74.67 -> E4M3 72 (0x69); multiplier 72/448 = 0.160714...
    //   1.0 / 0.1607 = 6.22 -> clamp 6 (code 7); 0.5 / 0.1607 = 3.11 -> 3 (code 5);
    //   -0.3 / 0.1607 = -1.87 -> -2 (code 12); 0.1 / 0.1607 = 0.622 -> 0.5 (code 1).
    let gs = fp4::nvfp4_global_scale(6.0);
    assert_eq!(gs, 448.0);
    let mut row = vec![
        6.0, 3.0, -1.5, 0.75, 0.25, -0.25, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, -6.0, 0.5, 4.0, 0.0,
    ];
    row.extend([
        3.0, -0.3, 0.75, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0,
    ]);
    row.extend([
        1.0, 0.5, -0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    ]);
    let mut packed = vec![0u8; 24];
    let mut scales = vec![0u8; 3];
    fp4::quantize_row_nvfp4(&row, gs, &mut packed, &mut scales).unwrap();
    assert_eq!(scales, vec![0x7E, 0x76, 0x69]);
    let c = codes(&packed);
    assert_eq!(
        &c[..16],
        &[7, 5, 11, 2, 0, 8, 2, 4, 4, 6, 6, 7, 15, 1, 6, 0]
    );
    // Block 1, multiplier 0.5: 3/0.5 = 6 -> 7; -0.3/0.5 = -0.6 -> -0.5 (9);
    // 0.75/0.5 = 1.5 -> 3; 1/0.5 = 2 -> 4; -3 -> 15.
    assert_eq!(&c[16..20], &[7, 9, 3, 4]);
    assert_eq!(c[31], 15);
    assert_eq!(&c[32..36], &[7, 5, 12, 1]);
    // Low nibble first: the first byte holds 6.0 (7) low and 3.0 (5) high.
    assert_eq!(packed[0], 0x57);

    // Dequantized values: code value * e4m3(scale) / global_scale.
    let m = Fp4Matrix {
        format: Fp4Format::Nvfp4,
        n: 1,
        k: 48,
        packed,
        scales,
        global_scale: gs,
    };
    let d = fp4::dequantize(&m).unwrap();
    assert_eq!(&d[..4], &[6.0, 3.0, -1.5, 1.0]);
    assert_eq!(&d[16..20], &[3.0, -0.25, 0.75, 1.0]);
    let mult = 72.0f32 / 448.0;
    assert_eq!(
        &d[32..36],
        &[6.0 * mult, 3.0 * mult, -2.0 * mult, 0.5 * mult]
    );
}

#[test]
fn nvfp4_block_scale_op_order() {
    // global_scale * (amax / 6), then E4M3: check against an explicit computation.
    let gs = 2688.0f32 / 0.37;
    for amax in [0.37f32, 0.1, 0.01234, 0.2999] {
        let local = amax / 6.0;
        let want = e4m3::encode(gs * local);
        assert_eq!(nvfp4_block_scale_code(amax, gs, SrcDType::F32), want);
    }
    // With bf16 arithmetic the local scale is rounded to bf16 first.
    let amax = 0.2999f32;
    let local_bf16 = half::bf16::from_f32(amax / 6.0).to_f32();
    assert_eq!(
        nvfp4_block_scale_code(amax, gs, SrcDType::BF16),
        e4m3::encode(gs * local_bf16)
    );
}

#[test]
fn nvfp4_zero_and_underflowing_blocks_dequantize_to_zero() {
    // An all-zero block: compressed-tensors replaces scale 0 by eps 0.125 (code 0x20).
    let gs = 448.0;
    let mut row = vec![0.0f32; 32];
    // Second block: values so small that gs * amax / 6 underflows E4M3 (< 2^-10).
    for (i, v) in row[16..].iter_mut().enumerate() {
        *v = if i % 2 == 0 { 1e-6 } else { -1e-6 };
    }
    let mut packed = vec![0u8; 16];
    let mut scales = vec![0u8; 2];
    fp4::quantize_row_nvfp4(&row, gs, &mut packed, &mut scales).unwrap();
    assert_eq!(scales, vec![0x20, 0x20]);
    assert_eq!(e4m3::decode(0x20), 0.125);
    let m = Fp4Matrix {
        format: Fp4Format::Nvfp4,
        n: 1,
        k: 32,
        packed,
        scales,
        global_scale: gs,
    };
    assert!(fp4::dequantize(&m).unwrap().iter().all(|&v| v == 0.0));

    // A stored scale byte of 0 (written by another tool) dequantizes to 0 as well.
    let m0 = Fp4Matrix {
        format: Fp4Format::Nvfp4,
        n: 1,
        k: 16,
        packed: vec![0x77; 8],
        scales: vec![0x00],
        global_scale: 1.0,
    };
    assert!(fp4::dequantize(&m0).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn mxfp4_hand_vectors() {
    // amax 6 = 1.5 * 2^2: mantissa < 1.75 -> power of two 4 -> exponent 127 + 2 - 2 = 127.
    assert_eq!(mxfp4_scale_code(6.0), 127);
    // amax 7 = 1.75 * 2^2 rounds UP to 8 (compressed-tensors round_to_power_2) -> 128.
    assert_eq!(mxfp4_scale_code(7.0), 128);
    assert_eq!(mxfp4_scale_code(6.99), 127);
    // amax 1 -> 2^0 -> 125; amax 0.1 = 1.6 * 2^-4 -> 127 - 4 - 2 = 121.
    assert_eq!(mxfp4_scale_code(1.0), 125);
    assert_eq!(mxfp4_scale_code(0.1), 121);
    // Zero block: log2(0) = -inf, clamped to 0.
    assert_eq!(mxfp4_scale_code(0.0), 0);
    // Huge amax: clamped below the NaN code.
    assert_eq!(mxfp4_scale_code(f32::MAX), 254);

    let mut row = vec![0.0f32; 64];
    // Block 0 (scale 2^1 since amax 7): 7/2 = 3.5 -> 4 (tie to even), -1/2 = -0.5, 2.5/2 = 1.25 -> 1.
    row[0] = 7.0;
    row[1] = -1.0;
    row[2] = 2.5;
    // Block 1 stays zero.
    let mut packed = vec![0u8; 32];
    let mut scales = vec![0u8; 2];
    fp4::quantize_row_mxfp4(&row, &mut packed, &mut scales).unwrap();
    assert_eq!(scales, vec![128, 0]);
    let c = codes(&packed);
    assert_eq!(&c[..3], &[6, 9, 2]);
    assert!(c[32..].iter().all(|&x| x == 0));
    let m = fp4::quantize_mxfp4(&row, 1, 64).unwrap();
    assert_eq!(m.global_scale, 1.0);
    let d = fp4::dequantize(&m).unwrap();
    assert_eq!(&d[..3], &[8.0, -1.0, 2.0]);
    assert!(d[32..].iter().all(|&v| v == 0.0));
}

#[test]
fn modelopt_hand_vector() {
    // Tensor amax 6: weight_scale_2 = 6 / 2688; a block with amax 6 gets scale 448.
    let ws2 = fp4::modelopt_weight_scale_2(6.0);
    assert_eq!(ws2, 6.0f32 / 2688.0);
    let mut row = vec![0.0f32; 16];
    row[..4].copy_from_slice(&[6.0, -2.0, 1.0, 3.0]);
    let mut packed = vec![0u8; 8];
    let mut scales = vec![0u8; 1];
    fp4::quantize_row_nvfp4_modelopt(&row, ws2, &mut packed, &mut scales).unwrap();
    assert_eq!(scales[0], 0x7E);
    assert_eq!(&codes(&packed)[..4], &[7, 12, 2, 5]);
    // A zero block gets scale 1.0 (0x38), as ModelOpt sets.
    let z = vec![0.0f32; 16];
    fp4::quantize_row_nvfp4_modelopt(&z, ws2, &mut packed, &mut scales).unwrap();
    assert_eq!(scales[0], 0x38);
    // Whole-matrix helper agrees with the row function.
    let (m, ws2b) = fp4::quantize_nvfp4_modelopt(&row, 1, 16).unwrap();
    assert_eq!(ws2b, ws2);
    assert_eq!(m.scales, vec![0x7E]);
}

#[test]
fn errors_instead_of_panics() {
    let mut p = vec![0u8; 8];
    let mut s = vec![0u8; 1];
    let mut row = vec![1.0f32; 16];
    row[3] = f32::NAN;
    assert!(matches!(
        fp4::quantize_row_nvfp4(&row, 1.0, &mut p, &mut s),
        Err(Fp4Error::NonFinite { index: 3, .. })
    ));
    row[3] = f32::INFINITY;
    assert!(matches!(
        fp4::quantize_row_mxfp4(&[1.0; 32], &mut p, &mut s),
        Err(Fp4Error::Length { .. })
    ));
    assert!(matches!(
        fp4::quantize_nvfp4(&row, 1, 16, 1.0),
        Err(Fp4Error::NonFinite { index: 3, .. })
    ));
    assert!(matches!(
        fp4::quantize_nvfp4(&[0.0; 24], 1, 24, 1.0),
        Err(Fp4Error::NotBlockMultiple {
            k: 24,
            block: 16,
            ..
        })
    ));
    assert!(matches!(
        fp4::quantize_mxfp4(&[0.0; 48], 3, 16),
        Err(Fp4Error::NotBlockMultiple {
            k: 16,
            block: 32,
            ..
        })
    ));
    assert!(matches!(
        fp4::quantize_nvfp4(&[0.0; 32], 1, 16, 1.0),
        Err(Fp4Error::Length { .. })
    ));
    for gs in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            fp4::quantize_nvfp4(&[0.0; 16], 1, 16, gs),
            Err(Fp4Error::BadGlobalScale(_))
        ));
    }
    // compressed-tensors replaces an infinite global scale by 1.0.
    assert_eq!(fp4::nvfp4_global_scale(0.0), 1.0);
    assert_eq!(fp4::nvfp4_global_scale_in(1e-38, SrcDType::BF16), Ok(1.0));
    assert_eq!(fp4::nvfp4_global_scale_in(1e-3, SrcDType::F16), Ok(1.0));
    // Corrupt scales and bad shapes in a matrix.
    let mut m = fp4::quantize_nvfp4(&[1.0; 32], 2, 16, 448.0).unwrap();
    let mut out = vec![0.0; 16];
    assert!(matches!(
        fp4::dequantize_row(&m, 2, &mut out),
        Err(Fp4Error::RowOutOfRange { row: 2, n: 2 })
    ));
    m.scales[1] = 0x7F;
    assert!(matches!(
        fp4::dequantize(&m),
        Err(Fp4Error::NanScale {
            row: 1,
            block: 0,
            code: 0x7F
        })
    ));
    assert!(fp4::dequantize_row(&m, 1, &mut out).is_err());
    m.scales.pop();
    assert!(matches!(fp4::dequantize(&m), Err(Fp4Error::Length { .. })));
    let mx = Fp4Matrix {
        format: Fp4Format::Mxfp4,
        n: 1,
        k: 32,
        packed: vec![0; 16],
        scales: vec![255],
        global_scale: 1.0,
    };
    assert!(matches!(
        fp4::dequantize(&mx),
        Err(Fp4Error::NanScale { .. })
    ));
}

fn random_matrix(seed: u64, n: usize, k: usize, spread: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * k)
        .map(|_| {
            // Log-uniform magnitudes over `spread` decades, random sign: exercises small blocks
            // (subnormal E4M3 scales) as well as large ones.
            let mag = 10f32.powf(rng.random_range(-spread..0.0));
            if rng.random_bool(0.5) {
                -mag
            } else {
                mag
            }
        })
        .collect()
}

/// Every element's code is a nearest E2M1 value of x / multiplier (after clamping to +-6);
/// `slop` allows for the bfloat16 step compressed-tensors takes before rounding.
fn assert_nearest(m: &Fp4Matrix, w: &[f32], slop: f32) {
    let block = m.format.block_size();
    let deq = fp4::dequantize(m).unwrap();
    for r in 0..m.n {
        let c = codes(m.row_packed(r));
        for j in 0..m.k {
            let mult = fp4::block_multiplier(m.format, m.row_scales(r)[j / block], m.global_scale);
            let x = w[r * m.k + j];
            let q = (x / mult).clamp(-6.0, 6.0);
            let got = e2m1::decode(c[j]);
            for g in e2m1::E2M1_LUT {
                assert!(
                    (q - got).abs() <= (q - g).abs() + slop * q.abs(),
                    "row {r} col {j}: x {x} q {q} got {got}, {g} is nearer"
                );
            }
            assert_eq!(deq[r * m.k + j].to_bits(), (got * mult).to_bits());
        }
    }
}

#[test]
fn nvfp4_random_matrix_properties() {
    let (n, k) = (37, 160);
    for seed in 0..4 {
        let w = random_matrix(seed, n, k, 4.0);
        let gs = fp4::nvfp4_global_scale(fp4::amax(&w));
        let m = fp4::quantize_nvfp4(&w, n, k, gs).unwrap();
        m.validate().unwrap();
        assert_nearest(&m, &w, 2f32.powi(-7));
        // Row API gives the same bytes as the matrix API.
        let mut p = vec![0u8; k / 2];
        let mut s = vec![0u8; k / 16];
        fp4::quantize_row_nvfp4(&w[5 * k..6 * k], gs, &mut p, &mut s).unwrap();
        assert_eq!(p, m.row_packed(5));
        assert_eq!(s, m.row_scales(5));
        // The block holding the tensor amax gets the largest scale, 448.
        assert!(m.scales.contains(&0x7E));
    }
}

#[test]
fn mxfp4_random_matrix_properties() {
    let (n, k) = (29, 96);
    for seed in 10..14 {
        let w = random_matrix(seed, n, k, 6.0);
        let m = fp4::quantize_mxfp4(&w, n, k).unwrap();
        assert_nearest(&m, &w, 2f32.powi(-7));
        // amax / scale lies in [3.5, 7) (round-up-at-1.75 power of two, minus 2).
        for r in 0..n {
            for (b, &code) in m.row_scales(r).iter().enumerate() {
                let a = fp4::amax(&w[r * k + b * 32..r * k + (b + 1) * 32]);
                let ratio = a / e8m0::decode(code);
                assert!((3.5..7.0).contains(&ratio), "amax {a} code {code}");
            }
        }
    }
}

#[test]
fn quantization_is_identical_on_1_and_2_threads() {
    let (n, k) = (64, 256);
    let w = random_matrix(99, n, k, 3.0);
    let gs = fp4::nvfp4_global_scale(fp4::amax(&w));
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            (
                fp4::quantize_nvfp4(&w, n, k, gs).unwrap(),
                fp4::quantize_mxfp4(&w, n, k).unwrap(),
            )
        })
    };
    assert_eq!(run(1), run(2));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nvfp4_roundtrip_error_bound(
        vals in prop::collection::vec(-1.0f32..1.0, 64),
        scale_exp in -6i32..6,
    ) {
        // Random (non-zero in general) data scaled over several decades.
        let w: Vec<f32> = vals.iter().map(|v| v * 2f32.powi(scale_exp)).collect();
        let gs = fp4::nvfp4_global_scale(fp4::amax(&w));
        let m = fp4::quantize_nvfp4(&w, 2, 32, gs).unwrap();
        let d = fp4::dequantize(&m).unwrap();
        for (j, (&x, &y)) in w.iter().zip(&d).enumerate() {
            let mult = fp4::block_multiplier(m.format, m.scales[j / 16], gs);
            // Half the widest E2M1 gap (1.0) times the block multiplier, or the clamp error
            // when the E4M3 scale rounded down; plus the bfloat16 step.
            let bound = (1.0f32 * mult).max(x.abs() - 6.0 * mult) + x.abs() * 2f32.powi(-8);
            prop_assert!((x - y).abs() <= bound, "x {} y {} bound {}", x, y, bound);
        }
    }

    #[test]
    fn mxfp4_roundtrip_error_bound(
        vals in prop::collection::vec(-1.0f32..1.0, 64),
        scale_exp in -20i32..20,
    ) {
        let w: Vec<f32> = vals.iter().map(|v| v * 2f32.powi(scale_exp)).collect();
        let m = fp4::quantize_mxfp4(&w, 2, 32).unwrap();
        let d = fp4::dequantize(&m).unwrap();
        for (blk, (xs, ys)) in w.chunks(32).zip(d.chunks(32)).enumerate() {
            let a = fp4::amax(xs);
            let s = e8m0::decode(m.scales[blk]);
            for (&x, &y) in xs.iter().zip(ys) {
                // amax/s < 7, so the clamp costs at most 1 * s; rounding at most 1 * s.
                prop_assert!((x - y).abs() <= s * 1.0 + x.abs() * 2f32.powi(-8), "x {} y {} amax {}", x, y, a);
            }
        }
    }
}
