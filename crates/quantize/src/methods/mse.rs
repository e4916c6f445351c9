//! MSE scale search: for every block, try a set of candidate scales and keep the one with the
//! smallest activation-weighted squared error `sum_j d_j (w_j - q_j)^2`, where `d_j` is the
//! second moment of input channel j (uniform when there is no calibration).
//!
//! Candidates. NVFP4: every E4M3 code from `amax/8` to `amax/4` (in the global-scale convention),
//! i.e. mapping the block maximum anywhere between the E2M1 value 4 and past 6 (the "4-or-6"
//! choice and the codes between them), plus the RTN code. MXFP4: the RTN code (compressed-
//! tensors' rounded power of two), and the E8M0 exponent `floor(log2 amax) - 2` and that plus one
//! (mapping the maximum into [4, 8) with clipping above 6, or into [2, 4)). Elements are rounded
//! to nearest under the chosen scale (optimal per element for a fixed scale, since the weighted
//! error is separable), with compressed-tensors' element rule, so the RTN candidate reproduces
//! RTN exactly and the result is never worse than RTN on the weighted error. Ties keep the
//! earlier candidate, which is the RTN code: output is deterministic.
//!
//! The tensor's global scale (NVFP4) is taken as given: fused sets (q/k/v, gate/up) must share
//! it, which the converter decides.

use mimo_kernels::dtype::SrcDType;
use mimo_kernels::e2m1;
use mimo_kernels::e4m3;
use mimo_kernels::e8m0;
use mimo_kernels::fp4::{
    amax, block_multiplier, mxfp4_scale_code, nvfp4_block_scale_code, Fp4Format, Fp4Matrix,
};
use rayon::prelude::*;

use super::{check_finite_f32, check_finite_f64, check_len, check_shape, encode_elem, MethodError};

/// Weighted squared error of block `x` quantized with scale `code`, and nothing written.
fn block_error(x: &[f32], d: &[f64], format: Fp4Format, code: u8, gs: f32) -> f64 {
    let mult = block_multiplier(format, code, gs);
    let mut err = 0.0f64;
    for (&v, &dj) in x.iter().zip(d) {
        let q = e2m1::decode(encode_elem(v, mult)) * mult;
        let e = (v - q) as f64;
        err += dj * e * e;
    }
    err
}

/// Candidate scale codes of one block, RTN's first.
pub(crate) fn candidates(x: &[f32], format: Fp4Format, gs: f32, out: &mut Vec<u8>) {
    out.clear();
    let a = amax(x);
    match format {
        Fp4Format::Nvfp4 => {
            let rtn = nvfp4_block_scale_code(a, gs, SrcDType::F32);
            out.push(rtn);
            if a > 0.0 {
                // E4M3 codes of positive values are ordered like the values.
                let lo = e4m3::encode(gs * (a / 8.0)).max(1);
                let hi = e4m3::encode(gs * (a / 4.0)).min(e4m3::NAN_CODE - 1);
                for c in lo..=hi {
                    if c != rtn {
                        out.push(c);
                    }
                }
            }
        }
        Fp4Format::Mxfp4 => {
            let rtn = mxfp4_scale_code(a);
            out.push(rtn);
            if a > 0.0 && a.is_finite() {
                let fl = e8m0::floor_log2(a) - 2;
                for e in [fl, fl + 1] {
                    let c = e8m0::encode_exponent(e);
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
    }
}

/// The scale code with the smallest weighted error for block `x` (weights `d`), and that error.
pub fn search_block(x: &[f32], d: &[f64], format: Fp4Format, gs: f32) -> (u8, f64) {
    let mut cands = Vec::with_capacity(16);
    candidates(x, format, gs, &mut cands);
    let mut best = (cands[0], block_error(x, d, format, cands[0], gs));
    for &c in &cands[1..] {
        let e = block_error(x, d, format, c, gs);
        if e < best.1 {
            best = (c, e);
        }
    }
    best
}

/// Writes block `x` with scale `code`: elements into `packed` (len x.len()/2).
pub(crate) fn encode_block(x: &[f32], format: Fp4Format, code: u8, gs: f32, packed: &mut [u8]) {
    let mult = block_multiplier(format, code, gs);
    for (p, pair) in packed.iter_mut().zip(x.chunks_exact(2)) {
        *p = e2m1::pack(encode_elem(pair[0], mult), encode_elem(pair[1], mult));
    }
}

/// Quantizes `w` ([n, k], row-major) with the per-block MSE scale search. `second_moment` holds
/// `d_j` per input channel (length k); `None` means uniform weights (plain MSE). `global_scale`
/// is the NVFP4 tensor scale (compressed-tensors convention; ignored for MXFP4). Rows are done
/// in parallel; the result does not depend on the thread count.
pub fn quantize_mse(
    w: &[f32],
    n: usize,
    k: usize,
    format: Fp4Format,
    global_scale: f32,
    second_moment: Option<&[f64]>,
) -> Result<Fp4Matrix, MethodError> {
    quantize_mse_error(w, n, k, format, global_scale, second_moment).map(|(m, _)| m)
}

/// [`quantize_mse`] and its weighted error `sum d_j (w_j - q_j)^2` over the whole matrix (the
/// chosen blocks' errors from the search, rows summed in order).
fn quantize_mse_error(
    w: &[f32],
    n: usize,
    k: usize,
    format: Fp4Format,
    global_scale: f32,
    second_moment: Option<&[f64]>,
) -> Result<(Fp4Matrix, f64), MethodError> {
    check_shape(format, n, k, global_scale)?;
    check_len("weight", n * k, w.len())?;
    check_finite_f32("weight", w)?;
    let uniform;
    let d = match second_moment {
        Some(d) => {
            check_len("second moment", k, d.len())?;
            check_finite_f64("second moment", d)?;
            d
        }
        None => {
            uniform = vec![1.0f64; k];
            &uniform
        }
    };
    let gs = match format {
        Fp4Format::Nvfp4 => global_scale,
        Fp4Format::Mxfp4 => 1.0,
    };
    let block = format.block_size();
    let bpr = k / block;
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * bpr];
    let row_errors: Vec<f64> = packed
        .par_chunks_mut(k / 2)
        .zip(scales.par_chunks_mut(bpr))
        .zip(w.par_chunks(k))
        .map(|((p, s), row)| {
            let mut err = 0.0f64;
            for (bi, x) in row.chunks_exact(block).enumerate() {
                let db = &d[bi * block..(bi + 1) * block];
                let (code, e) = search_block(x, db, format, gs);
                err += e;
                s[bi] = code;
                encode_block(
                    x,
                    format,
                    code,
                    gs,
                    &mut p[bi * block / 2..(bi + 1) * block / 2],
                );
            }
            err
        })
        .collect();
    let m = Fp4Matrix {
        format,
        n,
        k,
        packed,
        scales,
        global_scale: gs,
    };
    Ok((m, row_errors.iter().sum()))
}

/// One weight of a set searched together: `[n, k]` values and its input's second moments.
pub type ScaleMember<'a> = (&'a [f32], usize, usize, Option<&'a [f64]>);

/// Candidates of the NVFP4 tensor scale search: the stored scale moved by `2^(i/8)`,
/// `i = 0..GLOBAL_STEPS`, the way that lowers the kernel's global scale (so the largest blocks
/// never need an E4M3 scale past 448). Eight steps cover one octave: every alignment of the E4M3
/// grid (three mantissa bits) against the blocks' maxima.
pub const GLOBAL_STEPS: usize = 8;

/// The NVFP4 tensor (global) scale search of `mse`: for each candidate stored scale (see
/// [`GLOBAL_STEPS`]; `stored` is the converter's, in `layout`'s convention) every member of a
/// set that must share the scale (`members`: weight `[n, k]` and its input's second moments) is
/// quantized by [`quantize_mse`], and the candidate with the smallest summed
/// `sum_j d_j (w_j - q_j)^2` (the block search's own errors) is kept (ties: the smaller move;
/// the unmoved scale is a candidate, so the result is never worse than without the search).
/// Returns the stored scale chosen and the members' matrices. Deterministic: rows' errors are
/// summed in row order.
pub fn search_global_scale(
    members: &[ScaleMember<'_>],
    layout: mimo_runtime::format::Layout,
    stored: f32,
) -> Result<(f32, Vec<Fp4Matrix>), MethodError> {
    use mimo_runtime::format::Layout;
    let mut best: Option<(f64, f32, Vec<Fp4Matrix>)> = None;
    for i in 0..GLOBAL_STEPS {
        let f = 2f64.powf(i as f64 / GLOBAL_STEPS as f64);
        let cand = match layout {
            Layout::CtNvfp4 => (stored as f64 / f) as f32,
            Layout::ModelOptNvfp4 => (stored as f64 * f) as f32,
            Layout::CtMxfp4 => return Err(MethodError::NoTensorScale),
        };
        let gs = super::apply::kernel_global_scale(layout, Some(cand));
        let mut total = 0.0f64;
        let mut mats = Vec::with_capacity(members.len());
        for &(w, n, k, d) in members {
            let (m, err) = quantize_mse_error(w, n, k, Fp4Format::Nvfp4, gs, d)?;
            total += err;
            mats.push(m);
        }
        if best.as_ref().is_none_or(|b| total < b.0) {
            best = Some((total, cand, mats));
        }
    }
    let (_, s, mats) = best.ok_or(MethodError::NoTensorScale)?;
    Ok((s, mats))
}

#[cfg(test)]
mod global_scale_tests {
    use super::*;
    use mimo_runtime::format::Layout;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5) as f32
            })
            .collect()
    }

    fn weighted_err(w: &[f32], m: &Fp4Matrix, d: &[f64]) -> f64 {
        let k = m.k;
        let mut row = vec![0f32; k];
        let mut e = 0.0;
        for r in 0..m.n {
            mimo_kernels::dequantize_row(m, r, &mut row).unwrap();
            for j in 0..k {
                let x = w[r * k + j] as f64 - row[j] as f64;
                e += d[j] * x * x;
            }
        }
        e
    }

    #[test]
    fn the_searched_scale_is_never_worse_and_shared_by_the_set() {
        let (n, k) = (24, 64);
        let w1 = vals(n * k, 1);
        let w2: Vec<f32> = vals(n * k, 2).iter().map(|v| v * 3.0).collect();
        let d: Vec<f64> = vals(k, 3)
            .iter()
            .map(|v| (*v as f64 + 0.6).powi(2))
            .collect();
        let amax = w1.iter().chain(&w2).fold(0f32, |a, v| a.max(v.abs()));
        for layout in [Layout::CtNvfp4, Layout::ModelOptNvfp4] {
            let stored = match layout {
                Layout::CtNvfp4 => 448.0 * 6.0 / amax,
                _ => amax / (448.0 * 6.0),
            };
            let members = [(&w1[..], n, k, Some(&d[..])), (&w2[..], n, k, Some(&d[..]))];
            let (chosen, mats) = search_global_scale(&members, layout, stored).unwrap();
            let gs = super::super::apply::kernel_global_scale(layout, Some(chosen));
            assert!(mats
                .iter()
                .all(|m| m.global_scale.to_bits() == gs.to_bits()));
            let base_gs = super::super::apply::kernel_global_scale(layout, Some(stored));
            let base: f64 = [&w1, &w2]
                .iter()
                .map(|w| {
                    let m = quantize_mse(w, n, k, Fp4Format::Nvfp4, base_gs, Some(&d)).unwrap();
                    weighted_err(w, &m, &d)
                })
                .sum();
            let got: f64 = [&w1, &w2]
                .iter()
                .zip(&mats)
                .map(|(w, m)| weighted_err(w, m, &d))
                .sum();
            assert!(got <= base, "{layout:?}: {got} > {base}");
        }
        let r = search_global_scale(&[(&w1[..], n, k, None)], Layout::CtMxfp4, 1.0);
        assert!(matches!(r, Err(MethodError::NoTensorScale)));
    }
}
