//! Perplexity over a token stream with a context length and stride (the Hugging Face
//! sliding-window recipe), and the comparison of a candidate model with a reference model on the
//! same windows: both perplexities, mean KL(reference || candidate), top-1 agreement and the
//! positions where they disagree most.

use crate::cpu::log_softmax;
use crate::generate::argmax;
use crate::model::{ForwardError, Logits, Model};

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Too few tokens to score anything.
    #[error("the text has {0} tokens; at least 2 are needed to measure perplexity")]
    TooShort(usize),
    /// Invalid context/stride.
    #[error("invalid window: ctx {ctx}, stride {stride} (need 2 <= ctx, 1 <= stride <= ctx)")]
    Window {
        /// context
        ctx: usize,
        /// stride
        stride: usize,
    },
    /// The two models have different vocabularies.
    #[error("reference and candidate vocabularies differ ({0} vs {1})")]
    VocabMismatch(usize, usize),
    /// A forward pass failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The backend running the windows failed (e.g. the GPU).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// A model the evaluation can run, on whatever backend: the next-token logits of every position
/// of one window of tokens, each window a fresh context.
pub trait WindowModel {
    /// Vocabulary size (logit row length).
    fn vocab(&self) -> usize;
    /// Longest context the model takes.
    fn max_context(&self) -> usize;
    /// Row-major `[tokens.len(), vocab]` logits, position i predicting token i + 1.
    fn window_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError>;
}

/// The CPU runtime as a [`WindowModel`].
pub struct CpuWindows<'a>(pub &'a Model);

impl WindowModel for CpuWindows<'_> {
    fn vocab(&self) -> usize {
        self.0.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.0.config.max_position_embeddings
    }

    fn window_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EvalError> {
        let mut cache = self.0.new_cache(tokens.len());
        Ok(self.0.forward(tokens, &mut cache, Logits::All)?)
    }
}

/// One evaluation window: run tokens `[begin, end)`, score the targets `[score_from, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First token fed.
    pub begin: usize,
    /// One past the last token fed.
    pub end: usize,
    /// First token scored (each scored token is predicted from the logits before it).
    pub score_from: usize,
}

/// Windows of at most `ctx` tokens every `stride` tokens; each token is scored at most once, with
/// as much left context as its window gives it (all tokens from 1 on when stride < ctx).
pub fn windows(len: usize, ctx: usize, stride: usize) -> Result<Vec<Window>, EvalError> {
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(EvalError::Window { ctx, stride });
    }
    if len < 2 {
        return Err(EvalError::TooShort(len));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    loop {
        let end = (begin + ctx).min(len);
        out.push(Window {
            begin,
            end,
            score_from: prev_end.max(begin + 1),
        });
        prev_end = end;
        if end == len {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

/// Result of a perplexity run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Mean negative log-likelihood (nats).
    pub mean_nll: f64,
    /// Scored tokens.
    pub tokens: usize,
    /// Windows run.
    pub windows: usize,
    /// Context length used (the requested one, capped at the model's maximum).
    pub ctx: usize,
}

/// Log-probabilities of each scored target of window `w`, row by row:
/// calls `f(position, log_softmax row)` for each predicted position.
fn for_each_scored(
    model: &mut dyn WindowModel,
    tokens: &[u32],
    w: Window,
    mut f: impl FnMut(usize, &[f32]),
) -> Result<(), EvalError> {
    let logits = model.window_logits(&tokens[w.begin..w.end])?;
    let v = model.vocab();
    for pos in w.score_from..w.end {
        // Token `pos` is predicted by the logits of position pos - 1.
        let r = pos - 1 - w.begin;
        let lp = log_softmax(&logits[r * v..(r + 1) * v]);
        f(pos, &lp);
    }
    Ok(())
}

/// Perplexity of `model` (CPU runtime) on `tokens`.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
) -> Result<Perplexity, EvalError> {
    perplexity_on(&mut CpuWindows(model), tokens, ctx, stride)
}

/// Perplexity of any [`WindowModel`] on `tokens`.
pub fn perplexity_on(
    model: &mut dyn WindowModel,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
) -> Result<Perplexity, EvalError> {
    let (ctx, stride) = cap_window(ctx, stride, model.max_context());
    let ws = windows(tokens.len(), ctx, stride)?;
    let mut nll = 0.0f64;
    let mut n = 0usize;
    for &w in &ws {
        for_each_scored(model, tokens, w, |pos, lp| {
            nll -= lp[tokens[pos] as usize] as f64;
            n += 1;
        })?;
    }
    let mean = nll / n as f64;
    Ok(Perplexity {
        ppl: mean.exp(),
        mean_nll: mean,
        tokens: n,
        windows: ws.len(),
        ctx,
    })
}

/// Caps the context at the model's maximum; a stride that fit the requested context is capped
/// with it (a stride larger than the requested context stays an error).
fn cap_window(ctx: usize, stride: usize, max: usize) -> (usize, usize) {
    if ctx > max {
        (max, stride.min(max))
    } else {
        (ctx, stride)
    }
}

/// A position where the candidate departs most from the reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Divergence {
    /// Index of the predicted token in the text.
    pub position: usize,
    /// The actual token there.
    pub token: u32,
    /// KL(reference || candidate) of the next-token distributions (nats).
    pub kl: f64,
    /// Reference's most likely token.
    pub reference_top1: u32,
    /// Candidate's most likely token.
    pub candidate_top1: u32,
}

/// Upper edges (nats) of the reference-margin bins of [`Comparison::top1_by_margin`]; the last
/// bin is open.
pub const MARGIN_EDGES: [f64; 4] = [0.1, 0.5, 1.0, 2.0];

/// Top-1 agreement over the positions whose reference margin (log-probability of the
/// reference's most likely token minus that of its second) falls in `[lo, hi)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MarginBin {
    /// Lower edge of the margin (nats).
    pub lo: f64,
    /// Upper edge (nats); None for the open last bin.
    pub hi: Option<f64>,
    /// Scored positions in the bin.
    pub positions: usize,
    /// Of those, positions where both models' argmax agree.
    pub agree: usize,
}

/// The bin index of a reference margin.
fn margin_bin(margin: f64) -> usize {
    MARGIN_EDGES
        .iter()
        .position(|&e| margin < e)
        .unwrap_or(MARGIN_EDGES.len())
}

/// Log-probability gap between the largest and the second largest entry of `lp` (0 for fewer
/// than two entries; NaN entries are ignored).
fn top2_margin(lp: &[f32]) -> f64 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in lp {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    if b == f32::NEG_INFINITY {
        0.0
    } else {
        (a - b) as f64
    }
}

/// Entropy (nats) of the distribution whose log-probabilities are `lp`; entries of probability
/// zero (log-probability -inf) add nothing.
fn entropy(lp: &[f32]) -> f64 {
    -lp.iter()
        .filter(|v| v.is_finite())
        .map(|&v| (v as f64).exp() * v as f64)
        .sum::<f64>()
}

/// Result of comparing a candidate model with a reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Reference perplexity.
    pub reference: Perplexity,
    /// Candidate perplexity.
    pub candidate: Perplexity,
    /// Mean KL(reference || candidate) over scored positions (nats).
    pub mean_kl: f64,
    /// Fraction of positions where both models' argmax agree.
    pub top1_agreement: f64,
    /// Mean entropy of the reference's next-token distributions (nats).
    pub reference_entropy: f64,
    /// Mean entropy of the candidate's (nats). Below the reference's: the candidate is the
    /// more confident of the two, which raises its perplexity on text where the reference is
    /// already over-confident even at equal KL.
    pub candidate_entropy: f64,
    /// Top-1 agreement by the reference's own margin between its first and second choice
    /// ([`MARGIN_EDGES`]): shows whether the candidate's different choices are near-ties of the
    /// reference or confident predictions it overturned.
    pub top1_by_margin: Vec<MarginBin>,
    /// Positions with the largest KL, largest first.
    pub worst: Vec<Divergence>,
}

/// Compares `candidate` with `reference` (CPU runtime) on the same windows of `tokens`.
pub fn compare(
    reference: &Model,
    candidate: &Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    worst_n: usize,
) -> Result<Comparison, EvalError> {
    compare_on(
        &mut CpuWindows(reference),
        &mut CpuWindows(candidate),
        tokens,
        ctx,
        stride,
        worst_n,
    )
}

/// Compares two [`WindowModel`]s on the same windows of `tokens`.
pub fn compare_on(
    reference: &mut dyn WindowModel,
    candidate: &mut dyn WindowModel,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    worst_n: usize,
) -> Result<Comparison, EvalError> {
    let (vr, vc) = (reference.vocab(), candidate.vocab());
    if vr != vc {
        return Err(EvalError::VocabMismatch(vr, vc));
    }
    let max_ctx = reference.max_context().min(candidate.max_context());
    let (ctx, stride) = cap_window(ctx, stride, max_ctx);
    let ws = windows(tokens.len(), ctx, stride)?;
    let (mut nll_r, mut nll_c, mut kl_sum) = (0.0f64, 0.0f64, 0.0f64);
    let (mut ent_r, mut ent_c) = (0.0f64, 0.0f64);
    let (mut n, mut agree) = (0usize, 0usize);
    let mut all: Vec<Divergence> = Vec::new();
    let mut bins: Vec<MarginBin> = (0..=MARGIN_EDGES.len())
        .map(|i| MarginBin {
            lo: if i == 0 { 0.0 } else { MARGIN_EDGES[i - 1] },
            hi: MARGIN_EDGES.get(i).copied(),
            positions: 0,
            agree: 0,
        })
        .collect();
    for &w in &ws {
        // Reference rows first (one model's logits at a time bounds memory to one window).
        let mut ref_rows: Vec<Vec<f32>> = Vec::new();
        for_each_scored(reference, tokens, w, |_, lp| ref_rows.push(lp.to_vec()))?;
        let mut i = 0;
        for_each_scored(candidate, tokens, w, |pos, lc| {
            let lr = &ref_rows[i];
            i += 1;
            let t = tokens[pos] as usize;
            nll_r -= lr[t] as f64;
            nll_c -= lc[t] as f64;
            // KL and the reference's entropy from one pass over its probabilities.
            let (mut kl, mut h_r) = (0.0f64, 0.0f64);
            for (&a, &b) in lr.iter().zip(lc) {
                let (a, b) = (a as f64, b as f64);
                let p = a.exp();
                kl += p * (a - b);
                if a.is_finite() {
                    h_r -= p * a;
                }
            }
            let kl = kl.max(0.0);
            kl_sum += kl;
            ent_r += h_r;
            ent_c += entropy(lc);
            let (tr, tc) = (argmax(lr) as u32, argmax(lc) as u32);
            agree += usize::from(tr == tc);
            let bin = &mut bins[margin_bin(top2_margin(lr))];
            bin.positions += 1;
            bin.agree += usize::from(tr == tc);
            n += 1;
            all.push(Divergence {
                position: pos,
                token: t as u32,
                kl,
                reference_top1: tr,
                candidate_top1: tc,
            });
        })?;
    }
    all.sort_by(|a, b| b.kl.total_cmp(&a.kl).then(a.position.cmp(&b.position)));
    all.truncate(worst_n);
    let mk = |nll: f64| Perplexity {
        ppl: (nll / n as f64).exp(),
        mean_nll: nll / n as f64,
        tokens: n,
        windows: ws.len(),
        ctx,
    };
    Ok(Comparison {
        reference: mk(nll_r),
        candidate: mk(nll_c),
        mean_kl: kl_sum / n as f64,
        top1_agreement: agree as f64 / n as f64,
        reference_entropy: ent_r / n as f64,
        candidate_entropy: ent_c / n as f64,
        top1_by_margin: bins,
        worst: all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_known_distributions() {
        // Uniform over 8: ln 8; one certain outcome: 0; two outcomes 1/4, 3/4.
        let u = vec![-(8f32.ln()); 8];
        assert!((entropy(&u) - 8f64.ln()).abs() < 1e-6);
        assert_eq!(entropy(&[0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]), 0.0);
        let (a, b) = (0.25f64, 0.75f64);
        let want = -(a * a.ln() + b * b.ln());
        assert!((entropy(&[a.ln() as f32, b.ln() as f32]) - want).abs() < 1e-6);
    }

    #[test]
    fn margins_and_bins() {
        assert_eq!(top2_margin(&[-1.0, -3.0, -0.5]), 0.5);
        assert_eq!(top2_margin(&[-2.0, -2.0]), 0.0);
        assert_eq!(top2_margin(&[-1.0]), 0.0);
        assert_eq!(top2_margin(&[f32::NAN, -1.0, -1.25]), 0.25);
        assert_eq!(margin_bin(0.0), 0);
        assert_eq!(margin_bin(0.0999), 0);
        assert_eq!(margin_bin(0.1), 1);
        assert_eq!(margin_bin(1.5), 3);
        assert_eq!(margin_bin(2.0), 4);
        assert_eq!(margin_bin(50.0), 4);
    }

    #[test]
    fn windows_score_every_token_once() {
        for (len, ctx, stride) in [(10, 4, 2), (10, 4, 4), (3, 8, 8), (17, 5, 3), (2, 2, 1)] {
            let ws = windows(len, ctx, stride).unwrap();
            let mut scored = vec![0; len];
            for w in &ws {
                assert!(w.end - w.begin <= ctx && w.score_from > w.begin);
                for s in &mut scored[w.score_from..w.end] {
                    *s += 1;
                }
            }
            assert_eq!(scored[0], 0);
            // With stride == ctx, windows do not overlap and each window's first token has no
            // context to be predicted from; otherwise every token from 1 on is scored once.
            let expect = |i: usize| usize::from(if stride == ctx { i % ctx != 0 } else { i > 0 });
            let want: Vec<usize> = (0..len).map(expect).collect();
            assert_eq!(scored, want, "{len} {ctx} {stride}");
        }
        assert!(windows(10, 4, 5).is_err());
        assert!(windows(1, 4, 2).is_err());
    }

    #[test]
    fn context_is_capped_at_the_model_maximum() {
        assert_eq!(cap_window(512, 256, 1024), (512, 256));
        assert_eq!(cap_window(1200, 600, 1024), (1024, 600));
        assert_eq!(cap_window(2000, 1500, 1024), (1024, 1024));
        // A stride beyond the requested context is still rejected by `windows`.
        let (c, s) = cap_window(100, 200, 1024);
        assert!(windows(1000, c, s).is_err());
    }
}
