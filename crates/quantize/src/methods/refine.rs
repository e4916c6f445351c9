//! Coordinate-descent refinement of a quantized row (after GPTQ), in the spirit of CDQuant
//! (Nair and Suggala, "CDQuant: Greedy Coordinate Descent for Accurate LLM Quantization", 2024).
//!
//! GPTQ fixes each column once, greedily, with the error feedback as a local approximation.
//! Starting from its result, this module lowers the same quadratic loss further by exact moves:
//! for one output row with target weights `w` and quantized values `q`,
//! `L(q) = (q - w)^T H (q - w)` (H: the damped Hessian GPTQ factorized). Keeping `g = H (q - w)`,
//! a change `δ` of one element j costs `2 δ g_j + δ^2 H_jj`, and a change `δ_B` of a whole
//! block (its scale moved to a neighbouring code, the element codes kept) costs
//! `2 δ_B · g_B + δ_B^T H_BB δ_B`; a move is taken only if it lowers the loss, and `g` is
//! updated by `δ H[j, :]`. Moves, per pass and per block in column order: each element to the
//! neighbouring E2M1 values (magnitude one step up or down, through zero to the other sign),
//! then the block's scale one code up or down (E4M3 for NVFP4, E8M0 for MXFP4). Passes stop when
//! none improves, or after the given number.
//!
//! Every step is an f64 computation in a fixed order on one row, so the result does not depend on
//! the thread count. Quantized values are the f32 products `e2m1 * multiplier` the dequantizer
//! forms, so the loss describes the weights that are written.

use mimo_kernels::e2m1;
use mimo_kernels::e4m3;
use mimo_kernels::e8m0;
use mimo_kernels::fp4::{block_multiplier, Fp4Format};

/// The damped Hessian of one Linear's input and the format a row is quantized in.
pub(crate) struct RowProblem<'a> {
    /// `H + λ I` in the original column order, row-major `[k, k]`.
    pub h: &'a [f64],
    /// Input width.
    pub k: usize,
    /// FP4 format.
    pub format: Fp4Format,
    /// NVFP4 global scale (1 for MXFP4).
    pub gs: f32,
}

/// What a refinement did to one row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RefineOutcome {
    /// Loss before the first pass.
    pub before: f64,
    /// Loss after the last pass (tracked incrementally).
    pub after: f64,
    /// Moves taken.
    pub moves: usize,
}

/// The E2M1 codes whose values neighbour `code`'s: magnitude one step up and one step down
/// (from magnitude 0, the smallest value of either sign).
fn element_neighbours(code: u8) -> [Option<u8>; 2] {
    let sign = code & e2m1::SIGN_BIT;
    let mag = code & 0x7;
    match mag {
        0 => [Some(1), Some(e2m1::SIGN_BIT | 1)],
        7 => [Some(sign | 6), None],
        m => [Some(sign | (m - 1)), Some(sign | (m + 1))],
    }
}

/// The scale codes next to `code` in value order that are valid positive scales.
fn scale_neighbours(format: Fp4Format, code: u8) -> [Option<u8>; 2] {
    // Positive E4M3 and all E8M0 codes are ordered like their values.
    let (lo, hi) = match format {
        Fp4Format::Nvfp4 => (1u8, e4m3::NAN_CODE - 1),
        Fp4Format::Mxfp4 => (0u8, e8m0::NAN_CODE - 1),
    };
    let down = (code > lo && code <= hi).then(|| code - 1);
    let up = (code >= lo && code < hi).then(|| code + 1);
    [down, up]
}

#[inline]
fn value(code: u8, mult: f32) -> f64 {
    (e2m1::decode(code) * mult) as f64
}

/// `(q - w)^T H (q - w)` computed directly, for the tests to check the tracked loss against.
#[cfg(test)]
pub(crate) fn row_loss(p: &RowProblem<'_>, w: &[f32], q: &[f64]) -> f64 {
    let k = p.k;
    let e: Vec<f64> = q.iter().zip(w).map(|(&qi, &wi)| qi - wi as f64).collect();
    let mut loss = 0.0;
    for i in 0..k {
        if e[i] == 0.0 {
            continue;
        }
        let hr = &p.h[i * k..(i + 1) * k];
        loss += e[i] * hr.iter().zip(&e).map(|(a, b)| a * b).sum::<f64>();
    }
    loss
}

/// The quantized values of a row from its codes (`k`) and block scale codes (`k / block`).
pub(crate) fn row_values(p: &RowProblem<'_>, codes: &[u8], scales: &[u8]) -> Vec<f64> {
    let block = p.format.block_size();
    codes
        .iter()
        .enumerate()
        .map(|(j, &c)| value(c, block_multiplier(p.format, scales[j / block], p.gs)))
        .collect()
}

/// `g += d * row` (one column of the symmetric H changes the gradient by that row).
fn add_scaled_row(g: &mut [f64], d: f64, row: &[f64]) {
    crate::f64ops::add_scaled(g, d, row);
}

/// Refines one row in place: `codes` (one E2M1 code per element, original order) and `scales`
/// (one code per block) of target row `w`, at most `passes` passes.
pub(crate) fn refine_row(
    p: &RowProblem<'_>,
    w: &[f32],
    codes: &mut [u8],
    scales: &mut [u8],
    passes: usize,
) -> RefineOutcome {
    let k = p.k;
    let block = p.format.block_size();
    let mut q = row_values(p, codes, scales);
    // g = H (q - w), and the loss (q - w) . g from it.
    let mut g = vec![0.0f64; k];
    let mut before = 0.0;
    for j in 0..k {
        let e = q[j] - w[j] as f64;
        if e != 0.0 {
            add_scaled_row(&mut g, e, &p.h[j * k..(j + 1) * k]);
        }
    }
    for j in 0..k {
        before += (q[j] - w[j] as f64) * g[j];
    }
    let mut loss = before;
    let mut moves = 0usize;
    let mut delta = vec![0.0f64; block];
    for _ in 0..passes {
        let mut improved = false;
        for (b, scale) in scales.iter_mut().enumerate() {
            let c0 = b * block;
            let mult = block_multiplier(p.format, *scale, p.gs);
            for j in c0..c0 + block {
                let hjj = p.h[j * k + j];
                let mut best: Option<(u8, f64, f64)> = None;
                for c in element_neighbours(codes[j]).into_iter().flatten() {
                    let d = value(c, mult) - q[j];
                    let cost = 2.0 * d * g[j] + d * d * hjj;
                    if cost < best.map_or(0.0, |b| b.2) {
                        best = Some((c, d, cost));
                    }
                }
                if let Some((c, d, cost)) = best {
                    codes[j] = c;
                    q[j] += d;
                    add_scaled_row(&mut g, d, &p.h[j * k..(j + 1) * k]);
                    loss += cost;
                    moves += 1;
                    improved = true;
                }
            }
            let mut best: Option<(u8, f64)> = None;
            for s in scale_neighbours(p.format, *scale).into_iter().flatten() {
                let m2 = block_multiplier(p.format, s, p.gs);
                if !(m2.is_finite() && m2 > 0.0) {
                    continue;
                }
                let mut cost = 0.0;
                for (i, j) in (c0..c0 + block).enumerate() {
                    delta[i] = value(codes[j], m2) - q[j];
                    cost += 2.0 * delta[i] * g[j];
                }
                for (i, j) in (c0..c0 + block).enumerate() {
                    if delta[i] == 0.0 {
                        continue;
                    }
                    let hr = &p.h[j * k + c0..j * k + c0 + block];
                    cost += delta[i] * hr.iter().zip(&delta).map(|(a, b)| a * b).sum::<f64>();
                }
                if cost < best.map_or(0.0, |b| b.1) {
                    best = Some((s, cost));
                }
            }
            if let Some((s, cost)) = best {
                let m2 = block_multiplier(p.format, s, p.gs);
                *scale = s;
                for j in c0..c0 + block {
                    let d = value(codes[j], m2) - q[j];
                    if d != 0.0 {
                        q[j] += d;
                        add_scaled_row(&mut g, d, &p.h[j * k..(j + 1) * k]);
                    }
                }
                loss += cost;
                moves += 1;
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    RefineOutcome {
        before,
        after: loss,
        moves,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A random symmetric positive-definite matrix `A A^T / m + 0.05 I` (A: k x m uniform in
    /// [-1, 1), m = k + 8): off-diagonal entries of order 1/sqrt(m), so moves interact through H
    /// as they do with real activations.
    fn random_spd(rng: &mut ChaCha8Rng, k: usize) -> Vec<f64> {
        let m = k + 8;
        let a: Vec<f64> = (0..k * m)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let mut h = vec![0.0f64; k * k];
        for i in 0..k {
            for j in 0..k {
                let mut s = 0.0;
                for t in 0..m {
                    s += a[i * m + t] * a[j * m + t];
                }
                h[i * k + j] = s / m as f64 + if i == j { 0.05 } else { 0.0 };
            }
        }
        h
    }

    /// RTN codes of a row (plain nearest under each block's amax-based scale).
    fn rtn_row(w: &[f32], format: Fp4Format, gs: f32) -> (Vec<u8>, Vec<u8>) {
        let block = format.block_size();
        let mut codes = vec![0u8; w.len()];
        let mut scales = vec![0u8; w.len() / block];
        for (b, s) in scales.iter_mut().enumerate() {
            let x = &w[b * block..(b + 1) * block];
            let mut cands = Vec::new();
            super::super::mse::candidates(x, format, gs, &mut cands);
            *s = cands[0];
            let mult = block_multiplier(format, *s, gs);
            for (j, &v) in x.iter().enumerate() {
                codes[b * block + j] = super::super::encode_elem(v, mult);
            }
        }
        (codes, scales)
    }

    #[test]
    fn neighbours_step_through_zero_and_stop_at_the_ends() {
        assert_eq!(element_neighbours(0), [Some(1), Some(9)]);
        assert_eq!(element_neighbours(8), [Some(1), Some(9)]);
        assert_eq!(element_neighbours(3), [Some(2), Some(4)]);
        assert_eq!(element_neighbours(0xF), [Some(0xE), None]);
        assert_eq!(scale_neighbours(Fp4Format::Nvfp4, 1), [None, Some(2)]);
        assert_eq!(scale_neighbours(Fp4Format::Nvfp4, 0x7E), [Some(0x7D), None]);
        assert_eq!(scale_neighbours(Fp4Format::Mxfp4, 0), [None, Some(1)]);
        assert_eq!(scale_neighbours(Fp4Format::Mxfp4, 254), [Some(253), None]);
    }

    /// The tracked loss equals the directly computed one, it never rises, and at the end no
    /// single move of the move set lowers the (directly computed) loss: a local minimum.
    #[test]
    fn refinement_lowers_the_loss_to_a_local_minimum() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (format, gs) in [
            (Fp4Format::Nvfp4, 448.0 * 6.0 / 2.5),
            (Fp4Format::Mxfp4, 1.0),
        ] {
            let k = 4 * format.block_size();
            let h = random_spd(&mut rng, k);
            let p = RowProblem {
                h: &h,
                k,
                format,
                gs,
            };
            let mut total_before = 0.0;
            let mut total_after = 0.0;
            for _row in 0..6 {
                let w: Vec<f32> = (0..k)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 2.5)
                    .collect();
                let (mut codes, mut scales) = rtn_row(&w, format, gs);
                let out = refine_row(&p, &w, &mut codes, &mut scales, 50);
                let q = row_values(&p, &codes, &scales);
                let direct = row_loss(&p, &w, &q);
                assert!(
                    (out.after - direct).abs() <= 1e-9 * out.before.max(1.0),
                    "{format:?}: tracked {} vs direct {direct}",
                    out.after
                );
                assert!(out.after <= out.before, "{format:?}: {out:?}");
                total_before += out.before;
                total_after += out.after;
                // Local minimum: try every single move directly.
                let block = format.block_size();
                for j in 0..k {
                    for c in element_neighbours(codes[j]).into_iter().flatten() {
                        let mut c2 = codes.clone();
                        c2[j] = c;
                        let l = row_loss(&p, &w, &row_values(&p, &c2, &scales));
                        assert!(
                            l >= direct - 1e-9 * direct.max(1.0),
                            "element {j}: {l} < {direct}"
                        );
                    }
                }
                for b in 0..k / block {
                    for s in scale_neighbours(format, scales[b]).into_iter().flatten() {
                        let mut s2 = scales.clone();
                        s2[b] = s;
                        let l = row_loss(&p, &w, &row_values(&p, &codes, &s2));
                        assert!(
                            l >= direct - 1e-9 * direct.max(1.0),
                            "scale {b}: {l} < {direct}"
                        );
                    }
                }
            }
            // With correlated inputs, RTN is far from the optimum: the refinement must gain a lot.
            assert!(
                total_after < 0.8 * total_before,
                "{format:?}: {total_before} -> {total_after}"
            );
        }
    }

    #[test]
    fn zero_passes_change_nothing() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let format = Fp4Format::Nvfp4;
        let k = 32;
        let h = random_spd(&mut rng, k);
        let p = RowProblem {
            h: &h,
            k,
            format,
            gs: 100.0,
        };
        let w: Vec<f32> = (0..k).map(|_| rng.random::<f32>() - 0.5).collect();
        let (codes0, scales0) = rtn_row(&w, format, 100.0);
        let (mut codes, mut scales) = (codes0.clone(), scales0.clone());
        let out = refine_row(&p, &w, &mut codes, &mut scales, 0);
        assert_eq!((codes, scales), (codes0, scales0));
        assert_eq!(out.moves, 0);
        assert_eq!(out.before, out.after);
    }
}
