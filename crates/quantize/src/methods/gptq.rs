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

use super::factor::{cholesky_lower, gram_of_inverse, lower_inverse};
use super::mse::{candidates, search_block};
use super::refine::{refine_row, RowProblem};
use super::{check_finite_f32, check_finite_f64, check_len, check_shape, encode_elem, MethodError};

/// Weight rows GPTQ walks together (see `quantize_gptq_factored`).
const ROW_TILE: usize = 8;

/// Default relative damping (fraction of the mean Hessian diagonal).
pub const DEFAULT_DAMP: f64 = 0.01;

/// The Hessian GPTQ factorizes: columns no token touched (`H[j][j] <= 0`) get `H[j][j] = 1`,
/// then `rel * mean(diag)` is added to the diagonal.
fn damped_hessian(h: &[f64], k: usize, rel: f64) -> Vec<f64> {
    let mut a = h.to_vec();
    for j in 0..k {
        if a[j * k + j] <= 0.0 {
            a[j * k + j] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|j| a[j * k + j]).sum::<f64>() / k as f64;
    for j in 0..k {
        a[j * k + j] += rel * mean_diag;
    }
    a
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
    let mut rel = damp;
    let mut last = (0usize, 0.0f64);
    for _attempt in 0..5 {
        let mut a = damped_hessian(h, k, rel);
        match cholesky_lower(&mut a, k) {
            Ok(()) => {
                // H^-1 = L^-T L^-1 (methods::factor: the plain loops' arithmetic, in parallel).
                let linv = lower_inverse(&a, k);
                let mut hinv = gram_of_inverse(&linv, k);
                drop(linv);
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

/// Asymmetric calibration's target: the weight `W'` whose outputs on the drifted inputs `x`
/// best match the unquantized outputs `W xf` in least squares,
/// `W' = W (H + C) (H + λI)^-1 = W + W C (H + λI)^-1`, with `H = sum x x^T`,
/// `C = sum (xf - x) x^T` ([k, k], row-major) and the same damping as GPTQ. Quantizing `W'` with
/// GPTQ on `H` minimises `||W xf - Q x||^2` (the squared error splits into `||(W' - Q) x||^2`
/// plus a term without Q). `alpha` scales the correction (`W + alpha W C (H + λI)^-1`; 1 is the
/// least-squares weight; GPTAQ's reference code scales its correction by 0.25). f64, rows
/// independent.
pub fn asymmetric_target(
    w: &[f32],
    n: usize,
    k: usize,
    hessian: &[f64],
    cross: &[f64],
    damp: f64,
    alpha: f64,
) -> Result<Vec<f32>, MethodError> {
    check_len("weight", n * k, w.len())?;
    check_len("cross term", k * k, cross.len())?;
    check_finite_f64("cross term", cross)?;
    let (u, _) = inverse_hessian_factor(hessian, k, damp)?;
    let mut out = vec![0f32; n * k];
    out.par_chunks_mut(k)
        .zip(w.par_chunks(k))
        .for_each(|(o, row)| {
            // a = w C; b = a U^T; w' = w + b U  (H^-1 = U^T U).
            let mut a = vec![0f64; k];
            for (i, &wi) in row.iter().enumerate() {
                if wi == 0.0 {
                    continue;
                }
                for (aj, &c) in a.iter_mut().zip(&cross[i * k..(i + 1) * k]) {
                    *aj += alpha * wi as f64 * c;
                }
            }
            let b: Vec<f64> = (0..k)
                .map(|i| (i..k).map(|j| a[j] * u[i * k + j]).sum())
                .collect();
            for (c, oc) in o.iter_mut().enumerate() {
                let mut s = row[c] as f64;
                for (i, &bi) in b.iter().enumerate().take(c + 1) {
                    s += bi * u[i * k + c];
                }
                *oc = s as f32;
            }
        });
    Ok(out)
}

/// How GPTQ picks each block's scale when it reaches the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockScale {
    /// The candidate with the smallest `diag(H)`-weighted squared error on the block's current
    /// weights (the MSE search of [`super::mse`]), ignoring the feedback inside the block.
    #[default]
    Diag,
    /// The candidate with the smallest GPTQ loss over the block, `sum_j ((w_j - q_j) / U_jj)^2`,
    /// with the error feedback between the block's own columns simulated for every candidate.
    Loss,
}

/// GPTQ options beyond the damping.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GptqOptions {
    /// Relative damping (fraction of the mean Hessian diagonal).
    pub damp: f64,
    /// Activation order: blocks in decreasing `sum diag(H)` over the block (and columns inside
    /// a block in decreasing `diag(H)`), so that the columns that matter most are quantized
    /// first and the later ones absorb their error. Blocks stay whole, so every block's scale
    /// is still fixed once, when the block is reached.
    pub act_order: bool,
    /// Scale choice per block.
    pub block_scale: BlockScale,
    /// Passes of coordinate-descent refinement after GPTQ (`methods::refine`); 0 = none.
    pub refine: usize,
    /// NVFP4 with sequential calibration, `mse` or `gptq`: search each fused set's tensor scale
    /// ([`super::mse::search_global_scale`]); gptq then quantizes with the chosen scale.
    pub mse_scale_search: bool,
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
    let opts = GptqOptions {
        damp,
        ..GptqOptions::default()
    };
    quantize_gptq_with(w, n, k, format, global_scale, hessian, &opts)
}

/// The column order: identity, or act order by whole blocks.
fn column_order(diag: &[f64], block: usize, act_order: bool) -> Vec<usize> {
    let k = diag.len();
    if !act_order {
        return (0..k).collect();
    }
    let mut blocks: Vec<usize> = (0..k / block).collect();
    let weight = |b: usize| diag[b * block..(b + 1) * block].iter().sum::<f64>();
    // Ties keep the lower index: deterministic.
    blocks.sort_by(|&a, &b| weight(b).total_cmp(&weight(a)).then(a.cmp(&b)));
    let mut order = Vec::with_capacity(k);
    for b in blocks {
        let mut cols: Vec<usize> = (b * block..(b + 1) * block).collect();
        cols.sort_by(|&i, &j| diag[j].total_cmp(&diag[i]).then(i.cmp(&j)));
        order.extend(cols);
    }
    order
}

/// GPTQ loss of quantizing `xb` (a block's current weights, in processing order) with scale
/// `mult`, feeding each column's error to the block's later columns through `u` (the permuted
/// inverse factor, [k, k]; the block starts at column `c0`).
fn block_loss(xb: &[f64], mult: f32, u: &[f64], k: usize, c0: usize, tmp: &mut [f64]) -> f64 {
    let b = xb.len();
    tmp[..b].copy_from_slice(xb);
    let mut loss = 0.0;
    for j in 0..b {
        let q = (e2m1::decode(encode_elem(tmp[j] as f32, mult)) * mult) as f64;
        let row = (c0 + j) * k + c0;
        let e = (tmp[j] - q) / u[row + j];
        loss += e * e;
        crate::f64ops::sub_scaled(&mut tmp[j + 1..b], e, &u[row + j + 1..row + b]);
    }
    loss
}

/// What GPTQ derives from a Hessian alone, so that the Linears reading the same input (q/k/v,
/// gate/up) share one factorization: the column order, the upper inverse factor in that order,
/// the damping actually used, the diagonal in that order and, for the refinement, the damped
/// Hessian in the original order.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    k: usize,
    format: Fp4Format,
    order: Vec<usize>,
    u: Vec<f64>,
    hd: Vec<f64>,
    diag: Vec<f64>,
}

/// Factors `hessian` (`[k, k]`, f64) for [`quantize_gptq_factored`] with `opts` (its damping,
/// act order and refinement) and `format`'s block size.
pub fn gptq_factor(
    hessian: &[f64],
    k: usize,
    format: Fp4Format,
    opts: &GptqOptions,
) -> Result<GptqFactor, MethodError> {
    check_len("hessian", k * k, hessian.len())?;
    let block = format.block_size();
    if k == 0 {
        return Err(mimo_kernels::fp4::Fp4Error::BadShape { n: 1, k }.into());
    }
    if k % block != 0 {
        return Err(mimo_kernels::fp4::Fp4Error::NotBlockMultiple { format, k, block }.into());
    }
    let diag_all: Vec<f64> = (0..k).map(|j| hessian[j * k + j].max(0.0)).collect();
    let order = column_order(&diag_all, block, opts.act_order);
    // The Hessian in processing order.
    let mut hp = vec![0.0f64; k * k];
    for (i, &oi) in order.iter().enumerate() {
        for (j, &oj) in order.iter().enumerate() {
            hp[i * k + j] = hessian[oi * k + oj];
        }
    }
    let (u, rel) = inverse_hessian_factor(&hp, k, opts.damp)?;
    // The refinement works on the same damped loss, in the original column order.
    let hd = if opts.refine > 0 {
        damped_hessian(hessian, k, rel)
    } else {
        Vec::new()
    };
    let diag: Vec<f64> = order.iter().map(|&o| diag_all[o]).collect();
    Ok(GptqFactor {
        k,
        format,
        order,
        u,
        hd,
        diag,
    })
}

/// [`quantize_gptq`] with act order and the choice of block scale.
pub fn quantize_gptq_with(
    w: &[f32],
    n: usize,
    k: usize,
    format: Fp4Format,
    global_scale: f32,
    hessian: &[f64],
    opts: &GptqOptions,
) -> Result<Fp4Matrix, MethodError> {
    check_shape(format, n, k, global_scale)?;
    check_len("weight", n * k, w.len())?;
    check_finite_f32("weight", w)?;
    let f = gptq_factor(hessian, k, format, opts)?;
    Ok(gptq_rows(w, n, k, global_scale, &f, opts))
}

/// GPTQ of `w` (`[n, k]`, row-major) with a factor from [`gptq_factor`] (made with the same
/// `opts`); `global_scale` is the NVFP4 tensor scale (ignored for MXFP4).
pub fn quantize_gptq_factored(
    w: &[f32],
    n: usize,
    k: usize,
    global_scale: f32,
    f: &GptqFactor,
    opts: &GptqOptions,
) -> Result<Fp4Matrix, MethodError> {
    check_shape(f.format, n, k, global_scale)?;
    check_len("weight", n * k, w.len())?;
    check_len("factor", f.k, k)?;
    check_finite_f32("weight", w)?;
    Ok(gptq_rows(w, n, k, global_scale, f, opts))
}

/// The GPTQ column walk of checked inputs (see [`quantize_gptq_factored`]).
fn gptq_rows(
    w: &[f32],
    n: usize,
    k: usize,
    global_scale: f32,
    f: &GptqFactor,
    opts: &GptqOptions,
) -> Fp4Matrix {
    let format = f.format;
    let block = format.block_size();
    let (order, u, hd, diag) = (&f.order, &f.u, &f.hd, &f.diag);
    // A block no token touched would have all weights 0 in the scale search: use uniform ones.
    let gs = match format {
        Fp4Format::Nvfp4 => global_scale,
        Fp4Format::Mxfp4 => 1.0,
    };
    let problem = RowProblem {
        h: hd,
        k,
        format,
        gs,
    };
    let bpr = k / block;
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * bpr];
    // Rows in tiles of ROW_TILE, walked column by column together: each row's arithmetic is the
    // same as alone, but every row of `u` is read once per tile instead of once per row (for
    // k = 8192 the factor is 512 MB, so a row at a time streams it from memory n times).
    packed
        .par_chunks_mut(ROW_TILE * k / 2)
        .zip(scales.par_chunks_mut(ROW_TILE * bpr))
        .zip(w.par_chunks(ROW_TILE * k))
        .for_each(|((p, s), rows)| {
            // The rows in processing order.
            let mut rs: Vec<Vec<f64>> = rows
                .chunks(k)
                .map(|row| order.iter().map(|&o| row[o] as f64).collect())
                .collect();
            let mut codes = vec![vec![0u8; k]; rs.len()];
            let mut mults = vec![0f32; rs.len()];
            let mut xb = vec![0f32; block];
            let mut xbd = vec![0f64; block];
            let mut tmp = vec![0f64; block];
            let mut cands = Vec::with_capacity(24);
            let ones = vec![1.0f64; block];
            for pb in 0..bpr {
                let c0 = pb * block;
                // The original block this processing block holds (blocks stay whole).
                let ob = order[c0] / block;
                let db = &diag[c0..c0 + block];
                let db = if db.iter().all(|&v| v == 0.0) {
                    &ones[..]
                } else {
                    db
                };
                for (ri, r) in rs.iter().enumerate() {
                    for (x, &v) in xb.iter_mut().zip(&r[c0..c0 + block]) {
                        *x = v as f32;
                    }
                    let code = match opts.block_scale {
                        BlockScale::Diag => search_block(&xb, db, format, gs).0,
                        BlockScale::Loss => {
                            candidates(&xb, format, gs, &mut cands);
                            xbd.copy_from_slice(&r[c0..c0 + block]);
                            let mut best = (cands[0], f64::INFINITY);
                            for &c in cands.iter() {
                                let mult = block_multiplier(format, c, gs);
                                let l = block_loss(&xbd, mult, u, k, c0, &mut tmp);
                                if l < best.1 {
                                    best = (c, l);
                                }
                            }
                            best.0
                        }
                    };
                    s[ri * bpr + ob] = code;
                    mults[ri] = block_multiplier(format, code, gs);
                }
                for j in c0..c0 + block {
                    let ujj = u[j * k + j];
                    let useg = &u[j * k + j + 1..(j + 1) * k];
                    for ((r, cr), &mult) in rs.iter_mut().zip(codes.iter_mut()).zip(&mults) {
                        let c = encode_elem(r[j] as f32, mult);
                        cr[order[j]] = c;
                        let q = (e2m1::decode(c) * mult) as f64;
                        let e = (r[j] - q) / ujj;
                        crate::f64ops::sub_scaled(&mut r[j + 1..k], e, useg);
                    }
                }
            }
            for (ri, (row, cr)) in rows.chunks(k).zip(codes.iter_mut()).enumerate() {
                let srow = &mut s[ri * bpr..(ri + 1) * bpr];
                if opts.refine > 0 {
                    refine_row(&problem, row, cr, srow, opts.refine);
                }
                for (i, pb) in p[ri * k / 2..(ri + 1) * k / 2].iter_mut().enumerate() {
                    *pb = e2m1::pack(cr[2 * i], cr[2 * i + 1]);
                }
            }
        });
    Fp4Matrix {
        format,
        n,
        k,
        packed,
        scales,
        global_scale: gs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_order_keeps_blocks_whole_and_sorts_them() {
        let block = 4;
        let diag = [1.0, 5.0, 2.0, 0.0, 9.0, 9.0, 9.0, 9.0, 3.0, 0.5, 0.5, 0.5];
        assert_eq!(
            column_order(&diag, block, false),
            (0..12).collect::<Vec<_>>()
        );
        // Block sums 8, 36, 4.5: block 1, then 0, then 2; inside, decreasing diag, ties by index.
        assert_eq!(
            column_order(&diag, block, true),
            vec![4, 5, 6, 7, 1, 2, 0, 3, 8, 9, 10, 11]
        );
    }

    /// Refinement after GPTQ never raises the damped loss of any row, and lowers the total.
    #[test]
    fn refinement_lowers_the_gptq_loss() {
        use super::super::refine::{row_loss, row_values};
        use mimo_kernels::fp4::dequantize_row;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (n, k, m) = (12usize, 64usize, 96usize);
        // Correlated inputs: a shared factor per token plus noise.
        let mut x = vec![0f64; m * k];
        for t in 0..m {
            let common = rng.random::<f64>() * 2.0 - 1.0;
            for j in 0..k {
                x[t * k + j] = common * (1.0 + j as f64 / k as f64) + rng.random::<f64>() - 0.5;
            }
        }
        let mut h = vec![0f64; k * k];
        for t in 0..m {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += x[t * k + i] * x[t * k + j];
                }
            }
        }
        let w: Vec<f32> = (0..n * k)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        for (format, gs) in [(Fp4Format::Nvfp4, 2000.0f32), (Fp4Format::Mxfp4, 1.0)] {
            let base = GptqOptions {
                damp: 0.1,
                act_order: true,
                ..GptqOptions::default()
            };
            let plain = quantize_gptq_with(&w, n, k, format, gs, &h, &base).unwrap();
            let refined =
                quantize_gptq_with(&w, n, k, format, gs, &h, &GptqOptions { refine: 4, ..base })
                    .unwrap();
            let (_, rel) = inverse_hessian_factor(&h, k, 0.1).unwrap();
            let hd = damped_hessian(&h, k, rel);
            let p = RowProblem {
                h: &hd,
                k,
                format,
                gs: plain.global_scale,
            };
            let (mut total_plain, mut total_refined) = (0.0, 0.0);
            for r in 0..n {
                let mut q = [vec![0f32; k], vec![0f32; k]];
                for (qi, mat) in q.iter_mut().zip([&plain, &refined]) {
                    dequantize_row(mat, r, qi).unwrap();
                }
                let row = &w[r * k..(r + 1) * k];
                let lp = row_loss(&p, row, &q[0].iter().map(|&v| v as f64).collect::<Vec<_>>());
                let lr = row_loss(&p, row, &q[1].iter().map(|&v| v as f64).collect::<Vec<_>>());
                // The refinement's own view of the values equals the dequantizer's.
                let (codes, scales) = row_codes(&refined, r);
                let mine = row_values(&p, &codes, &scales);
                assert!(mine.iter().zip(&q[1]).all(|(a, &b)| *a == b as f64));
                assert!(lr <= lp * (1.0 + 1e-12), "{format:?} row {r}: {lp} -> {lr}");
                total_plain += lp;
                total_refined += lr;
            }
            assert!(
                total_refined < 0.99 * total_plain,
                "{format:?}: {total_plain} -> {total_refined}"
            );
        }
    }

    fn row_codes(m: &Fp4Matrix, r: usize) -> (Vec<u8>, Vec<u8>) {
        let mut codes = Vec::with_capacity(m.k);
        for &b in &m.packed[r * m.k / 2..(r + 1) * m.k / 2] {
            let (lo, hi) = e2m1::unpack(b);
            codes.push(lo);
            codes.push(hi);
        }
        let bpr = m.k / m.format.block_size();
        (codes, m.scales[r * bpr..(r + 1) * bpr].to_vec())
    }

    #[test]
    fn block_loss_with_an_identity_factor_is_the_plain_squared_error() {
        let k = 8;
        let mut u = vec![0.0f64; k * k];
        for j in 0..k {
            u[j * k + j] = 1.0;
        }
        let x = [0.3f64, -1.2, 2.6, 5.1];
        let mult = 1.0f32;
        let mut tmp = [0.0f64; 4];
        let l = block_loss(&x, mult, &u, k, 4, &mut tmp);
        // E2M1 nearest: 0.3 -> 0.5, -1.2 -> -1.0, 2.6 -> 3.0, 5.1 -> 6.0 (ties not involved).
        let want = 0.2f64.powi(2) + 0.2f64.powi(2) + 0.4f64.powi(2) + 0.9f64.powi(2);
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
    }
}
