//! E4M3 rows with one f32 scale per row: the CPU reference of the GPU's FP8 prefill path.
//!
//! Hopper has FP8 tensor cores but no FP4 ones, so large-M FP4 GEMMs can run as an FP8 GEMM
//! (cuBLASLt, per-row "outer vector" scales on both operands):
//! - weights: every FP4 element times its block scale, `e2m1 * s`, is exact in f32; the row is
//!   shifted by a power of two `2^-p` chosen so that the row's largest possible value
//!   (`6 * max s`) lands in `(224, 448]`, then rounded to E4M3 (round to nearest even,
//!   saturating). The row scale is `2^p / global_scale` (NVFP4) or `2^p` (MXFP4). MXFP4 rows
//!   are exact (power-of-two scales keep E2M1's one mantissa bit); NVFP4 elements whose
//!   product needs more than E4M3's 3 mantissa bits are rounded (relative error <= 2^-4).
//! - activations: each token row is scaled by `448 / amax(row)` and rounded to E4M3; its row
//!   scale is `amax / 448`.
//!
//! The GPU kernels (`fp4_to_e4m3_rows_*`, `bf16_rows_to_e4m3` in cuda/fp4_gemm.cu) perform the
//! same f32 operations in the same order, so their bytes and scales are compared bit-exactly
//! with these functions.

use half::bf16;

use crate::e2m1;
use crate::e4m3;
use crate::fp4::{Fp4Format, Fp4Matrix};

/// `(f, e)` with `x = f * 2^e` and `f` in `[0.5, 1)`, for finite `x > 0` (subnormals included).
pub fn frexp(x: f32) -> (f32, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32;
    if exp == 0 {
        // subnormal: scale into the normal range first (exact)
        let (f, e) = frexp(x * f32::from_bits((127 + 32) << 23));
        return (f, e - 32);
    }
    let f = f32::from_bits((bits & 0x807F_FFFF) | (126 << 23));
    (f, exp - 126)
}

/// `x * 2^n`, exact whenever the result is a normal f32 (done in steps so that no power of
/// two outside the f32 range is formed); like CUDA's `ldexpf`.
pub fn ldexp(mut x: f32, mut n: i32) -> f32 {
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    while n > 127 {
        x *= pow2(127);
        n -= 127;
    }
    while n < -126 {
        x *= pow2(-126);
        n += 126;
        if x == 0.0 {
            return x;
        }
    }
    x * pow2(n)
}

/// The power-of-two shift `p` of a weight row whose largest block scale is `smax`: the
/// smallest `p` with `6 * smax * 2^-p <= 448` (0 for an all-zero row).
pub fn weight_row_shift(smax: f32) -> i32 {
    if smax <= 0.0 || !smax.is_finite() {
        return 0;
    }
    // 6 * smax = 6f * 2^e with 6f in [3, 6): at p = e - 6 the maximum is 6f * 64 in [192, 384);
    // one step lower doubles it, which still fits when 6f * 128 <= 448.
    let (f, e) = frexp(smax);
    if 6.0 * f * 128.0 <= e4m3::E4M3_MAX {
        e - 7
    } else {
        e - 6
    }
}

/// E4M3 rows of an FP4 matrix: (`n * k` codes row-major, `n` f32 row scales) such that
/// `W[r][c] ~= e4m3(q[r][c]) * scale[r]`.
pub fn fp4_to_e4m3_rows(w: &Fp4Matrix) -> (Vec<u8>, Vec<f32>) {
    let block = w.format.block_size();
    let mut q = vec![0u8; w.n * w.k];
    let mut scales = vec![0f32; w.n];
    for r in 0..w.n {
        let codes = w.row_scales(r);
        let svals: Vec<f32> = codes.iter().map(|&c| w.format.decode_scale(c)).collect();
        let smax = svals.iter().fold(0.0f32, |a, &b| a.max(b));
        let p = weight_row_shift(smax);
        scales[r] = match w.format {
            Fp4Format::Nvfp4 => ldexp(1.0, p) / w.global_scale,
            Fp4Format::Mxfp4 => ldexp(1.0, p),
        };
        let packed = w.row_packed(r);
        let out = &mut q[r * w.k..(r + 1) * w.k];
        for (b, &s) in svals.iter().enumerate() {
            let mult = ldexp(s, -p);
            for i in b * block..(b + 1) * block {
                let code = (packed[i / 2] >> (4 * (i % 2))) & 0xF;
                out[i] = e4m3::encode(e2m1::decode(code) * mult);
            }
        }
    }
    (q, scales)
}

/// E4M3 rows of `m` activation rows of `k` bf16 values: (`m * k` codes, `m` row scales
/// `amax / 448`; 1.0 for an all-zero row).
pub fn bf16_rows_to_e4m3(x: &[bf16], m: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; m * k];
    let mut scales = vec![0f32; m];
    for r in 0..m {
        let row = &x[r * k..(r + 1) * k];
        let amax = row.iter().fold(0.0f32, |a, v| a.max(v.to_f32().abs()));
        let (inv, scale) = if amax > 0.0 {
            (e4m3::E4M3_MAX / amax, amax / e4m3::E4M3_MAX)
        } else {
            (1.0, 1.0)
        };
        scales[r] = scale;
        for (o, v) in q[r * k..(r + 1) * k].iter_mut().zip(row) {
            *o = e4m3::encode(v.to_f32() * inv);
        }
    }
    (q, scales)
}

/// `y[m][n] = sum_k (xq[m][k] * xs[m]) * (wq[n][k] * ws[n])` in f64: the exact result the FP8
/// GEMM approximates (its products are exact; only the f32 sum and the bf16 output round).
pub fn e4m3_gemm_reference(
    xq: &[u8],
    xs: &[f32],
    wq: &[u8],
    ws: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        let xr: Vec<f64> = xq[i * k..(i + 1) * k]
            .iter()
            .map(|&c| e4m3::decode(c) as f64)
            .collect();
        for j in 0..n {
            let acc: f64 = wq[j * k..(j + 1) * k]
                .iter()
                .zip(&xr)
                .map(|(&c, &a)| e4m3::decode(c) as f64 * a)
                .sum();
            y[i * n + j] = acc * xs[i] as f64 * ws[j] as f64;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp4::{amax, dequantize, nvfp4_global_scale, quantize_mxfp4, quantize_nvfp4};

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        }
    }

    #[test]
    fn frexp_and_ldexp_are_exact() {
        for &x in &[
            1.0f32,
            0.75,
            448.0,
            3.0e-39,
            1.0e-45,
            2.0f32.powi(-127),
            6.0e37,
        ] {
            let (f, e) = frexp(x);
            assert!((0.5..1.0).contains(&f), "{x}: f = {f}");
            assert_eq!(ldexp(f, e), x, "{x}");
        }
        assert_eq!(ldexp(1.0, -133), 2.0f32.powi(-133));
        assert_eq!(ldexp(ldexp(3.0, 125), -125), 3.0);
        assert_eq!(ldexp(2.0f32.powi(-140), 150), 1024.0);
        assert_eq!(ldexp(2.0f32.powi(100), -200), 2.0f32.powi(-100));
    }

    #[test]
    fn row_shift_puts_the_row_maximum_in_the_top_binade() {
        for code in 1u8..0x7F {
            let s = e4m3::decode(code);
            let p = weight_row_shift(s);
            let top = 6.0 * ldexp(s, -p);
            assert!(top <= 448.0 && top > 224.0, "code {code}: {top}");
        }
        for code in 0u8..=254 {
            let s = crate::e8m0::decode(code);
            let top = 6.0 * ldexp(s, -weight_row_shift(s)) as f64;
            assert!(top <= 448.0 && top > 224.0, "e8m0 {code}: {top}");
        }
        assert_eq!(weight_row_shift(0.0), 0);
    }

    /// MXFP4 rows are exact in E4M3 (when the row's scales span less than E4M3's range);
    /// NVFP4 rows are within E4M3's rounding of the FP4 values.
    #[test]
    fn weight_rows_match_the_dequantized_matrix() {
        let (n, k) = (24, 256);
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        let w: Vec<f32> = (0..n * k)
            .map(|i| rng.f() * (1.0 + (i % 7) as f32))
            .collect();
        for (m, exact) in [
            (quantize_mxfp4(&w, n, k).unwrap(), true),
            (
                quantize_nvfp4(&w, n, k, nvfp4_global_scale(amax(&w))).unwrap(),
                false,
            ),
        ] {
            let dq = dequantize(&m).unwrap();
            let (q, s) = fp4_to_e4m3_rows(&m);
            let (mut worst, mut changed, mut sum, mut count) = (0.0f64, 0usize, 0.0f64, 0usize);
            for r in 0..n {
                for c in 0..k {
                    let a = dq[r * k + c] as f64;
                    let b = e4m3::decode(q[r * k + c]) as f64 * s[r] as f64;
                    if a != b {
                        changed += 1;
                    }
                    if a != 0.0 {
                        let rel = ((a - b) / a).abs();
                        worst = worst.max(rel);
                        sum += rel;
                        count += 1;
                    }
                }
            }
            if exact {
                assert_eq!(changed, 0, "MXFP4 must convert exactly");
            } else {
                assert!(changed > 0, "NVFP4 random rows should need some rounding");
                assert!(
                    worst <= 1.0 / 16.0 + 1e-6,
                    "NVFP4 worst relative error {worst}"
                );
                let mean = sum / count as f64;
                assert!(mean < 0.02, "NVFP4 mean relative error {mean}");
            }
        }
    }

    #[test]
    fn activation_rows_use_the_full_range() {
        let (m, k) = (5, 96);
        let mut rng = Rng(99);
        let mut x: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32(rng.f() * (i / k + 1) as f32 * 3.0))
            .collect();
        for v in &mut x[2 * k..3 * k] {
            *v = bf16::ZERO;
        }
        let (q, s) = bf16_rows_to_e4m3(&x, m, k);
        for r in 0..m {
            let row = &q[r * k..(r + 1) * k];
            if r == 2 {
                assert!(row.iter().all(|&c| c == 0) && s[r] == 1.0);
                continue;
            }
            assert!(row.iter().any(|&c| c & 0x7F == 0x7E), "row {r} reaches 448");
            for (c, v) in row.iter().zip(&x[r * k..(r + 1) * k]) {
                let back = e4m3::decode(*c) * s[r];
                let v = v.to_f32();
                assert!(
                    (back - v).abs() <= v.abs() / 16.0 + s[r] / 512.0,
                    "{v} -> {back}"
                );
            }
        }
    }
}
