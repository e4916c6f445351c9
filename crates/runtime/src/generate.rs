//! Sampling and the generation loop: greedy, or temperature with nucleus (top-p) sampling from a
//! seeded ChaCha stream, so a seed gives the same tokens on any machine and thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{ForwardError, Logits, Model};

pub mod nucleus;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to at least top_p.
    pub top_p: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt leaves no room to generate within the context.
    #[error("the prompt has {prompt} tokens but the context is {context}: it must be shorter than the context (use a shorter prompt or a larger --ctx)")]
    PromptTooLong {
        /// prompt tokens
        prompt: usize,
        /// context length
        context: usize,
    },
    /// The prompt is empty.
    #[error("the prompt encodes to no tokens")]
    EmptyPrompt,
    /// Invalid sampling parameters.
    #[error("invalid sampling parameters: {0}")]
    Params(String),
    /// A forward pass failed.
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Picks tokens from logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Checks a temperature and a top_p (the host sampler's and the GPU's common rules); the
/// message names the offending value.
pub fn check_sampling(temperature: f32, top_p: f32) -> Result<(), String> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(format!("temperature {temperature} must be finite and >= 0"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(format!("top_p {top_p} must be in (0, 1]"));
    }
    Ok(())
}

impl Sampler {
    /// A sampler; checks the parameters.
    pub fn new(params: SamplingParams) -> Result<Sampler, GenerateError> {
        check_sampling(params.temperature, params.top_p).map_err(GenerateError::Params)?;
        Ok(Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        })
    }

    /// The next token for one row of logits.
    ///
    /// With temperature `T > 0`: `p_i = exp((l_i - max) / T)` in f64 and `S = sum p_i` (in id
    /// order); tokens ranked by `p` descending, ties to the lower id; the nucleus is the shortest
    /// prefix of that ranking whose running sum of `p / S` reaches top_p (all tokens where it
    /// never does, and for top_p = 1); `r = u * K` with one uniform draw `u` and `K` the nucleus's mass (its running sum
    /// in rank order, or `S` for all tokens); the token is where `r` falls walking the nucleus in
    /// rank order. Only as much of the ranking is sorted as the walk needs (a few hundred
    /// tokens for peaked distributions, instead of sorting the whole vocabulary per token).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 || logits.is_empty() {
            return argmax(logits) as u32;
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f64> = logits
            .iter()
            .map(|&l| (((l - max) / t) as f64).exp())
            .collect();
        let total: f64 = p.iter().sum();
        let mut rank = Ranking::new(&p);
        let n = p.len();
        let top_p = self.params.top_p as f64;
        let mut keep = n;
        let mut acc = 0.0;
        let mut mass = 0.0;
        // top_p = 1 keeps every token without ranking them all.
        for i in 0..if top_p < 1.0 { n } else { 0 } {
            let pi = p[rank.at(i)];
            acc += pi / total;
            mass += pi;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        let kept = if keep < n { mass } else { total };
        let mut r = self.rng.random::<f64>() * kept;
        for i in 0..keep {
            let id = rank.at(i);
            if r < p[id] {
                return id as u32;
            }
            r -= p[id];
        }
        rank.at(keep - 1) as u32
    }
}

/// Token ids ranked by probability (descending, ties to the lower id), sorted lazily: the
/// first `sorted` entries are final; asking for a later rank selects and sorts a larger prefix.
struct Ranking<'a> {
    p: &'a [f64],
    ids: Vec<usize>,
    sorted: usize,
}

impl<'a> Ranking<'a> {
    fn new(p: &'a [f64]) -> Self {
        Ranking {
            p,
            ids: (0..p.len()).collect(),
            sorted: 0,
        }
    }

    /// The id at rank `i` (< len).
    fn at(&mut self, i: usize) -> usize {
        if i >= self.sorted {
            let n = self.ids.len();
            let want = (i + 1).max(4 * self.sorted).max(256).min(n);
            let p = self.p;
            let order = |a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
            let rest = &mut self.ids[self.sorted..];
            if want < n {
                rest.select_nth_unstable_by(want - self.sorted - 1, order);
            }
            rest[..want - self.sorted].sort_unstable_by(order);
            self.sorted = want;
        }
        self.ids[i]
    }
}

/// Index of the largest value (first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Timing of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Seconds spent on the prompt (prefill).
    pub prefill_s: f64,
    /// Seconds spent generating after the first token.
    pub decode_s: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Generated tokens per second (decode steps only).
    pub decode_tok_s: f64,
    /// Whether generation stopped at an end-of-sequence token.
    pub stopped_at_eos: bool,
}

impl GenerationStats {
    /// The stats of `generated` tokens after `prompt` ones: the first generated token comes with
    /// the prefill, so decode speed counts the `generated - 1` steps after it.
    pub fn new(
        prompt: usize,
        generated: usize,
        prefill_s: f64,
        decode_s: f64,
        stopped_at_eos: bool,
    ) -> GenerationStats {
        let steps = generated.saturating_sub(1);
        GenerationStats {
            prompt_tokens: prompt,
            generated_tokens: generated,
            prefill_s,
            decode_s,
            prefill_tok_s: prompt as f64 / prefill_s.max(1e-9),
            decode_tok_s: if steps > 0 {
                steps as f64 / decode_s.max(1e-9)
            } else {
                0.0
            },
            stopped_at_eos,
        }
    }
}

/// The context a generation runs in: `ctx` within the model's `max_positions`, refusing an
/// empty prompt or one that leaves no position for a new token (both backends' rule).
pub fn generation_context(
    prompt_len: usize,
    ctx: usize,
    max_positions: usize,
) -> Result<usize, GenerateError> {
    let context = ctx.min(max_positions);
    if prompt_len == 0 {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt_len >= context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt_len,
            context,
        });
    }
    Ok(context)
}

/// Generates up to `max_tokens` after `prompt` within a context of `ctx` positions, calling
/// `on_token` with each new token as it is produced. Stops at any of `eos`.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    ctx: usize,
    params: SamplingParams,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats), GenerateError> {
    let context = generation_context(prompt.len(), ctx, model.config.max_position_embeddings)?;
    let mut sampler = Sampler::new(params)?;
    let mut cache = model.new_cache(context);
    let t0 = std::time::Instant::now();
    let mut logits = model.forward(prompt, &mut cache, Logits::Last)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut out = Vec::new();
    let mut stopped_at_eos = false;
    while out.len() < max_tokens {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next);
        if eos.contains(&next) {
            stopped_at_eos = true;
            break;
        }
        if out.len() == max_tokens || cache.len() >= cache.capacity() {
            break;
        }
        logits = model.forward(&[next], &mut cache, Logits::Last)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let stats = GenerationStats::new(prompt.len(), out.len(), prefill_s, decode_s, stopped_at_eos);
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_stats_count_decode_steps_after_the_first_token() {
        // 10 generated tokens: the first comes with the prefill, 9 decode steps in 0.5 s.
        let s = GenerationStats::new(40, 10, 0.25, 0.5, true);
        assert_eq!((s.prompt_tokens, s.generated_tokens), (40, 10));
        assert!(
            (s.prefill_tok_s - 160.0).abs() < 1e-9,
            "{}",
            s.prefill_tok_s
        );
        assert!((s.decode_tok_s - 18.0).abs() < 1e-9, "{}", s.decode_tok_s);
        assert!(s.stopped_at_eos);
        // One token or none: no decode step, so no decode speed (not an infinity).
        for generated in [0, 1] {
            let s = GenerationStats::new(3, generated, 0.0, 0.0, false);
            assert_eq!(s.decode_tok_s, 0.0);
            assert!(s.prefill_tok_s.is_finite());
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_seed_repeats() {
        let logits = [5.0f32, 4.9, -10.0, -10.0, -10.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 42,
        };
        let mut a = Sampler::new(p).unwrap();
        let mut b = Sampler::new(p).unwrap();
        let xs: Vec<u32> = (0..200).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..200).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 2), "sampled outside the nucleus");
        assert!(
            xs.contains(&0) && xs.contains(&1),
            "both nucleus tokens should appear"
        );
        // top_p small enough keeps only the best token.
        let mut c = Sampler::new(SamplingParams { top_p: 0.1, ..p }).unwrap();
        assert!((0..50).all(|_| c.sample(&logits) == 0));
    }

    /// The definition of `Sampler::sample`, with the whole vocabulary sorted up front.
    fn sample_reference(params: SamplingParams, rng: &mut ChaCha8Rng, logits: &[f32]) -> u32 {
        let t = params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f64> = logits
            .iter()
            .map(|&l| (((l - max) / t) as f64).exp())
            .collect();
        let total: f64 = p.iter().sum();
        let mut ids: Vec<usize> = (0..p.len()).collect();
        ids.sort_by(|a, b| p[*b].total_cmp(&p[*a]).then(a.cmp(b)));
        let (mut keep, mut acc, mut mass) = (ids.len(), 0.0, 0.0);
        let walk = if params.top_p < 1.0 { ids.len() } else { 0 };
        for (i, &id) in ids.iter().enumerate().take(walk) {
            acc += p[id] / total;
            mass += p[id];
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let kept = if keep < ids.len() { mass } else { total };
        let mut r = rng.random::<f64>() * kept;
        for &id in &ids[..keep] {
            if r < p[id] {
                return id as u32;
            }
            r -= p[id];
        }
        ids[keep - 1] as u32
    }

    /// The lazy ranking gives exactly the tokens of the fully sorted definition: peaked and flat
    /// distributions (the flat ones walk past the first sorted block), ties, every top_p.
    #[test]
    fn lazy_ranking_samples_like_the_full_sort() {
        let mut g = ChaCha8Rng::seed_from_u64(3);
        for case in 0..24 {
            let v = [7usize, 300, 5000, 20000][case % 4];
            let spread = [0.5f32, 4.0, 12.0][case % 3];
            let logits: Vec<f32> = (0..v)
                .map(|i| {
                    // a few repeated values make ties
                    let x: f32 = g.random::<f32>() * spread;
                    if i % 17 == 0 {
                        1.0
                    } else {
                        x
                    }
                })
                .collect();
            for (temperature, top_p) in [(1.0f32, 1.0f32), (0.7, 0.95), (1.5, 0.5), (1.0, 0.1)] {
                let params = SamplingParams {
                    temperature,
                    top_p,
                    seed: case as u64,
                };
                let mut s = Sampler::new(params).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(case as u64);
                for _ in 0..20 {
                    let want = sample_reference(params, &mut rng, &logits);
                    assert_eq!(
                        s.sample(&logits),
                        want,
                        "case {case} T {temperature} top_p {top_p}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_params_are_errors() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}
