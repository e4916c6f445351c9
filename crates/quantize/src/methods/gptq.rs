//! GPTQ for block-scaled FP4 (Frantar et al., "GPTQ", 2022), with the FP4 format in the loop.
//!
//! Columns are quantized in order; the error of column j is spread over the columns not yet
//! quantized through the upper Cholesky factor `U` of the inverse damped Hessian
//! (`H^-1 = U^T U`): `w[t] -= (w[j] - q[j]) / U[j][j] * U[j][t]` for t > j. Block scales are
//! fixed per block when its first column is reached, from the block's current (error-updated)
//! weights, by the same weighted scale search as [`super::mse`] with `d = diag(H)`.
//!
//! `H = sum_tokens x x^T` (f64, [k, k]); damping adds `damp * mean(diag H)` to the diagonal
//! (default 0.01, as the reference GPTQ); a column no calibration token touched (`H[j][j] = 0`)
//! gets `H[j][j] = 1` so the factorization exists, and is then quantized like RTN. If the
//! factorization still fails the damping is raised tenfold, up to four times. Everything is in
//! f64 with a fixed order; rows are independent and run in parallel, so the output does not
//! depend on the thread count.

use mimo_kernels::e2m1;
use mimo_kernels::fp4::{block_multiplier, Fp4Format, Fp4Matrix};
use rayon::prelude::*;

use super::mse::search_block;
use super::{check_finite_f32, check_finite_f64, check_len, check_shape, encode_elem, MethodError};

/// Default relative damping (fraction of the mean Hessian diagonal).
pub const DEFAULT_DAMP: f64 = 0.01;

/// Lower Cholesky factor of the symmetric `a` ([k, k]) in place (upper part left as is); the
/// failing column and pivot on a non-positive pivot.
fn cholesky_lower(a: &mut [f64], k: usize) -> Result<(), (usize, f64)> {
    for j in 0..k {
        let mut s = a[j * k + j];
        for p in 0..j {
            s -= a[j * k + p] * a[j * k + p];
        }
        if !(s > 0.0 && s.is_finite()) {
            return Err((j, s));
        }
        let l = s.sqrt();
        a[j * k + j] = l;
        for i in j + 1..k {
            let mut t = a[i * k + j];
            for p in 0..j {
                t -= a[i * k + p] * a[j * k + p];
            }
            a[i * k + j] = t / l;
        }
    }
    Ok(())
}

/// Upper Cholesky factor `U` of `H^-1` (row-major [k, k], zeros below the diagonal), with the
/// damping actually used.
pub fn inverse_hessian_factor(
    h: &[f64],
    k: usize,
    damp: f64,
) -> Result<(Vec<f64>, f64), MethodError> {
    if !(damp.is_finite() && damp >= 0.0) {
        return Err(MethodError::BadDamping(damp));
    }
    check_len("hessian", k * k, h.len())?;
    check_finite_f64("hessian", h)?;
    let mut base = h.to_vec();
    for j in 0..k {
        if base[j * k + j] <= 0.0 {
            base[j * k + j] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|j| base[j * k + j]).sum::<f64>() / k as f64;
    let mut rel = damp;
    let mut last = (0usize, 0.0f64);
    for _attempt in 0..5 {
        let mut a = base.clone();
        for j in 0..k {
            a[j * k + j] += rel * mean_diag;
        }
        match cholesky_lower(&mut a, k) {
            Ok(()) => {
                // H^-1 = L^-T L^-1. Invert L (lower) by forward substitution, column by column.
                let mut linv = vec![0.0f64; k * k];
                for c in 0..k {
                    linv[c * k + c] = 1.0 / a[c * k + c];
                    for i in c + 1..k {
                        let mut s = 0.0;
                        for p in c..i {
                            s += a[i * k + p] * linv[p * k + c];
                        }
                        linv[i * k + c] = -s / a[i * k + i];
                    }
                }
                // hinv[i][j] = sum_p linv[p][i] linv[p][j], p >= max(i, j).
                let mut hinv = vec![0.0f64; k * k];
                for i in 0..k {
                    for j in 0..=i {
                        let mut s = 0.0;
                        for p in i..k {
                            s += linv[p * k + i] * linv[p * k + j];
                        }
                        hinv[i * k + j] = s;
                        hinv[j * k + i] = s;
                    }
                }
                cholesky_lower(&mut hinv, k).map_err(|(column, pivot)| {
                    MethodError::NotPositiveDefinite {
                        column,
                        pivot,
                        damp: rel,
                    }
                })?;
                // U = L2^T.
                let mut u = vec![0.0f64; k * k];
                for i in 0..k {
                    for j in 0..=i {
                        u[j * k + i] = hinv[i * k + j];
                    }
                }
                return Ok((u, rel));
            }
            Err(e) => {
                last = e;
                rel = if rel > 0.0 { rel * 10.0 } else { 1e-6 };
            }
        }
    }
    Err(MethodError::NotPositiveDefinite {
        column: last.0,
        pivot: last.1,
        damp: rel / 10.0,
    })
}

/// Quantizes `w` ([n, k], row-major) with GPTQ given `hessian = sum x x^T` ([k, k], f64) and the
/// relative damping `damp`. `global_scale` is the NVFP4 tensor scale (ignored for MXFP4).
pub fn quantize_gptq(
    w: &[f32],
    n: usize,
    k: usize,
    format: Fp4Format,
    global_scale: f32,
    hessian: &[f64],
    damp: f64,
) -> Result<Fp4Matrix, MethodError> {
    check_shape(format, n, k, global_scale)?;
    check_len("weight", n * k, w.len())?;
    check_finite_f32("weight", w)?;
    let (u, _) = inverse_hessian_factor(hessian, k, damp)?;
    let diag: Vec<f64> = (0..k).map(|j| hessian[j * k + j].max(0.0)).collect();
    // A block no token touched would have all weights 0 in the scale search: use uniform ones.
    let gs = match format {
        Fp4Format::Nvfp4 => global_scale,
        Fp4Format::Mxfp4 => 1.0,
    };
    let block = format.block_size();
    let bpr = k / block;
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * bpr];
    packed
        .par_chunks_mut(k / 2)
        .zip(scales.par_chunks_mut(bpr))
        .zip(w.par_chunks(k))
        .for_each(|((p, s), row)| {
            let mut r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let mut xb = vec![0f32; block];
            let ones = vec![1.0f64; block];
            for (bi, scale) in s.iter_mut().enumerate() {
                let c0 = bi * block;
                for (x, &v) in xb.iter_mut().zip(&r[c0..c0 + block]) {
                    *x = v as f32;
                }
                let db = &diag[c0..c0 + block];
                let db = if db.iter().all(|&v| v == 0.0) {
                    &ones[..]
                } else {
                    db
                };
                let (code, _) = search_block(&xb, db, format, gs);
                *scale = code;
                let mult = block_multiplier(format, code, gs);
                let mut codes = [0u8; 32];
                for j in c0..c0 + block {
                    let c = encode_elem(r[j] as f32, mult);
                    codes[j - c0] = c;
                    let q = (e2m1::decode(c) * mult) as f64;
                    let e = (r[j] - q) / u[j * k + j];
                    let urow = &u[j * k..(j + 1) * k];
                    for t in j + 1..k {
                        r[t] -= e * urow[t];
                    }
                }
                for (i, pb) in p[c0 / 2..(c0 + block) / 2].iter_mut().enumerate() {
                    *pb = e2m1::pack(codes[2 * i], codes[2 * i + 1]);
                }
            }
        });
    Ok(Fp4Matrix {
        format,
        n,
        k,
        packed,
        scales,
        global_scale: gs,
    })
}
