//! The probe's results on the CPU (the products and attention it checks against) and the split
//! of a launch's stamps into where each stage's time went.

use half::bf16;

use super::stages::{ProbeKind, ProbeStage};
use crate::cuda::error::CudaError;
use crate::fp4::{dequantize_row, Fp4Matrix};

/// Where one stage's time went, from a launch's stamps (microseconds; medians over the blocks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTiming {
    /// From the previous stage's last store (stage 0: the first block's start) to this
    /// stage's last store.
    pub span_us: f64,
    /// From the previous stage's last store to this block's input row in shared memory: the
    /// grid barrier and the input's load.
    pub input_us: f64,
    /// From the input row in shared memory to the weights in shared memory (0 when they were
    /// there first).
    pub weights_wait_us: f64,
    /// From both in shared memory to the block's outputs stored.
    pub compute_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Splits a launch's stamps ([`StageChain::stamps`](super::StageChain::stamps): `[stage][block][top, input, weights,
/// stored]`, nanoseconds) into [`StageTiming`]s.
pub fn stage_timings(stamps: &[u64], grid: usize, stages: usize) -> Vec<StageTiming> {
    let at = |s: usize, b: usize, i: usize| stamps[(s * grid + b) * 4 + i] as f64 * 1e-3;
    let mut prev_end = (0..grid).map(|b| at(0, b, 0)).fold(f64::INFINITY, f64::min);
    let mut out = Vec::with_capacity(stages);
    for s in 0..stages {
        let end = (0..grid).map(|b| at(s, b, 3)).fold(0.0, f64::max);
        out.push(StageTiming {
            span_us: end - prev_end,
            input_us: median((0..grid).map(|b| at(s, b, 1) - prev_end).collect()),
            weights_wait_us: median((0..grid).map(|b| at(s, b, 2) - at(s, b, 1)).collect()),
            compute_us: median((0..grid).map(|b| at(s, b, 3) - at(s, b, 2)).collect()),
        });
        prev_end = end;
    }
    out
}

/// One stage on the CPU from its bf16 input: the f64 sums of the dequantized weights times the
/// input, or for a gated stage silu(gate) * up of the sums rounded to bf16 (`swiglu_bf16`); the
/// kernel stores these rounded to bf16.
pub fn stage_reference(
    st: &ProbeStage,
    m: &Fp4Matrix,
    input: &[bf16],
) -> Result<Vec<f64>, CudaError> {
    if st.kind != ProbeKind::Product || input.len() < st.k || (m.n, m.k) != (st.n, st.k) {
        return Err(CudaError::Mismatch {
            what: "stage_reference",
            reason: format!(
                "[{}, {}] matrix, input of {}, for a stage [{}, {}]",
                m.n,
                m.k,
                input.len(),
                st.n,
                st.k
            ),
        });
    }
    let x: Vec<f64> = input[..st.k].iter().map(|v| v.to_f64()).collect();
    let mut row = vec![0f32; st.k];
    let mut y = vec![0f64; st.n];
    for (r, yr) in y.iter_mut().enumerate() {
        dequantize_row(m, r, &mut row).map_err(|source| CudaError::Fp4 {
            name: "stage_reference".into(),
            source,
        })?;
        *yr = row.iter().zip(&x).map(|(w, x)| *w as f64 * x).sum();
    }
    if !st.gated {
        return Ok(y);
    }
    Ok((0..st.n / 2)
        .map(|o| {
            let (j, rr) = (o / 16, o % 16);
            let gate = bf16::from_f64(y[32 * j + rr]).to_f32();
            let up = bf16::from_f64(y[32 * j + 16 + rr]).to_f32();
            (gate / (1.0 + (-gate).exp()) * up) as f64
        })
        .collect())
}

/// Decode attention on the CPU: for each head, softmax(q k^T / sqrt(128)) v over the
/// `context` keys of its KV head (`[kv_heads][context][128]` caches), in f64 from the bf16
/// inputs; `heads * 128` values.
pub fn attention_reference(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: usize,
    kv_heads: usize,
    context: usize,
) -> Vec<f64> {
    let f = |x: &bf16| x.to_f64();
    let mut out = vec![0f64; heads * 128];
    for h in 0..heads {
        let kv = h / (heads / kv_heads);
        let qh: Vec<f64> = q[h * 128..h * 128 + 128].iter().map(f).collect();
        let row = |p: usize| (kv * context + p) * 128;
        let scores: Vec<f64> = (0..context)
            .map(|p| {
                let r = row(p);
                k[r..r + 128]
                    .iter()
                    .zip(&qh)
                    .map(|(a, b)| f(a) * b)
                    .sum::<f64>()
                    / 128f64.sqrt()
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = w.iter().sum();
        for (p, wp) in w.iter().enumerate() {
            let r = row(p);
            for d in 0..128 {
                out[h * 128 + d] += wp * f(&v[r + d]) / sum;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_timings_split_the_stamps() {
        // Two blocks, two stages (ns): block 0 starts at 1000, block 1 at 1500.
        let stamps = [
            1000, 2000, 2500, 4000, // stage 0, block 0
            1500, 2100, 2100, 5000, // stage 0, block 1
            4100, 6000, 6000, 9000, // stage 1, block 0
            5100, 7000, 8000, 8500, // stage 1, block 1
        ];
        let t = stage_timings(&stamps, 2, 2);
        assert_eq!(t.len(), 2);
        assert!((t[0].span_us - 4.0).abs() < 1e-9, "{t:?}");
        // medians of two blocks take the upper one
        assert!((t[0].input_us - 1.1).abs() < 1e-9, "{t:?}");
        assert!((t[0].weights_wait_us - 0.5).abs() < 1e-9, "{t:?}");
        assert!((t[0].compute_us - 2.9).abs() < 1e-9, "{t:?}");
        assert!((t[1].span_us - 4.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].input_us - 2.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].weights_wait_us - 1.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].compute_us - 3.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn attention_reference_weights_values_by_their_scores() {
        // Two query heads on one KV head, two keys. Head 0's q is zero: equal scores, the mean
        // of the values. Head 1's q favours key 1 by a score gap of ln(3) (q . k1 = ln(3) *
        // sqrt(128) through one element): weights 1/4 and 3/4.
        let (heads, kv_heads, context) = (2, 1, 2);
        let gap = 3f64.ln() * 128f64.sqrt();
        let mut q = vec![bf16::ZERO; heads * 128];
        q[128] = bf16::from_f64(gap);
        let mut k = vec![bf16::ZERO; context * 128];
        k[128] = bf16::ONE; // key 1, element 0
        let v: Vec<bf16> = (0..context * 128)
            .map(|i| bf16::from_f32(if i < 128 { 1.0 } else { 5.0 }))
            .collect();
        let out = attention_reference(&q, &k, &v, heads, kv_heads, context);
        // The score gap as bf16 rounds it.
        let g = bf16::from_f64(gap).to_f64() / 128f64.sqrt();
        let w1 = g.exp() / (1.0 + g.exp());
        for d in 0..128 {
            assert!(
                (out[d] - 3.0).abs() < 1e-12,
                "head 0, element {d}: {}",
                out[d]
            );
            let want = (1.0 - w1) + 5.0 * w1;
            assert!((out[128 + d] - want).abs() < 1e-12, "head 1, element {d}");
        }
        assert!((w1 - 0.75).abs() < 0.01);
    }
}
