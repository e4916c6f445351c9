//! Self-generated calibration text: each selected sample of a recipe is cut to its first few
//! words, and the BF16 model's own sampled continuation replaces the rest.
//!
//! Why: calibration works best on text of the kind the model sees (on the embedded model,
//! calibrating on text like its training data lowered the held-out KL by 14-16 % against our
//! broad set; bench/README.md, "Quality"). A user often has no such text; the model's own
//! samples are of its kind by construction, and our set's openings keep them varied.
//!
//! Generation runs on the calibration's own model: on the CPU runtime (seeded sampler, samples
//! in parallel) the text, and everything calibrated on it, is the same on every machine and
//! thread count; on the GPU (`--calib-device cuda`) it is drawn by the device's sampler.

use std::sync::atomic::{AtomicUsize, Ordering};

use mimo_runtime::cuda::{GpuError, GpuModel};
use mimo_runtime::generate::{
    check_sampling, generate, generation_context, GenerateError, Sampler, SamplingParams,
};
use mimo_runtime::model::Model;
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use rayon::prelude::*;

use super::data::{splitmix, Sample};

/// How a recipe's samples become the model's own text (the recipe's `generate` object).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfGenerate {
    /// Words of each sample kept as the prompt.
    #[serde(default = "default_prompt_words")]
    pub prompt_words: usize,
    /// Tokens the model adds to each prompt (fewer where it ends the text itself).
    #[serde(default = "default_new_tokens")]
    pub new_tokens: usize,
    /// Sampling temperature (1: the model's own distribution).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus threshold (1: no cut).
    #[serde(default = "default_top_p")]
    pub top_p: f32,
}

fn default_prompt_words() -> usize {
    6
}
fn default_new_tokens() -> usize {
    96
}
fn default_temperature() -> f32 {
    1.0
}
fn default_top_p() -> f32 {
    1.0
}

impl Default for SelfGenerate {
    fn default() -> Self {
        SelfGenerate {
            prompt_words: default_prompt_words(),
            new_tokens: default_new_tokens(),
            temperature: default_temperature(),
            top_p: default_top_p(),
        }
    }
}

impl SelfGenerate {
    /// Why these settings cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.prompt_words == 0 {
            return Err("generate.prompt_words must be at least 1".into());
        }
        if !(1..=8192).contains(&self.new_tokens) {
            return Err(format!(
                "generate.new_tokens {} must be in 1..=8192",
                self.new_tokens
            ));
        }
        if self.temperature <= 0.0 {
            // Greedy continuations repeat themselves: no use as calibration text.
            return Err("generate.temperature must be above 0 (sampled text)".into());
        }
        check_sampling(self.temperature, self.top_p).map_err(|e| format!("generate: {e}"))
    }
}

/// Errors of generating calibration text.
#[derive(Debug, thiserror::Error)]
pub enum SelfGenError {
    /// Tokenizing a prompt or decoding a continuation failed.
    #[error("calibration sample {sample}: {source}")]
    Tokenizer {
        /// 0-based index among the selected samples
        sample: usize,
        /// the tokenizer's error
        source: TokenizerError,
    },
    /// Generation on the CPU runtime failed.
    #[error("calibration sample {sample}: generating its continuation: {source}")]
    Generate {
        /// 0-based index among the selected samples
        sample: usize,
        /// the runtime's error
        source: GenerateError,
    },
    /// Generation on the GPU failed.
    #[error("calibration sample {sample}: generating its continuation on the GPU: {source}")]
    Gpu {
        /// 0-based index among the selected samples
        sample: usize,
        /// the CUDA backend's error (boxed: it is large)
        source: Box<GpuError>,
    },
}

/// The first `words` whitespace-separated words of `text`, as a slice of it (inner spacing
/// kept); the whole text if it has fewer.
pub fn prompt_of(text: &str, words: usize) -> &str {
    let t = text.trim_start();
    let mut seen = 0;
    let mut in_word = false;
    for (i, c) in t.char_indices() {
        if c.is_whitespace() {
            if in_word {
                seen += 1;
                if seen == words {
                    return &t[..i];
                }
            }
            in_word = false;
        } else {
            in_word = true;
        }
    }
    t
}

/// The sampler's seed of sample `index` of a recipe seeded `seed` (splitmix64 of both, so that
/// neighbouring samples get unrelated streams).
pub fn sample_seed(seed: u64, index: usize) -> u64 {
    let mut state = seed.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    splitmix(&mut state)
}

/// Writes the model's own continuations for a self-generated recipe.
pub trait Continuer {
    /// The model's end-of-text token ids (the config's).
    fn eos_token_ids(&self) -> Vec<u32>;

    /// The new tokens of every non-empty prompt of `ids` (None for an empty one), at most
    /// `g.new_tokens` each, ending at the first of `eos`, within a context of `ctx` positions;
    /// prompt `i` sampled with seed [`sample_seed`]`(seed, i)`.
    fn continue_prompts(
        &mut self,
        ids: &[Vec<u32>],
        ctx: usize,
        g: &SelfGenerate,
        seed: u64,
        eos: &[u32],
    ) -> Result<Vec<Option<Vec<u32>>>, SelfGenError>;

    /// Each sample replaced by its prompt ([`prompt_of`]) and the model's continuation; same
    /// order and sets. A sample with nothing to continue (an empty text) stays as it is.
    fn continue_samples(
        &mut self,
        tok: &TextTokenizer,
        samples: &[Sample],
        g: &SelfGenerate,
        seed: u64,
    ) -> Result<Vec<Sample>, SelfGenError> {
        let (ids, ctx) = prompts(tok, samples, g)?;
        let eos = tok.end_ids(&self.eos_token_ids());
        let conts = self.continue_prompts(&ids, ctx, g, seed, &eos)?;
        samples
            .iter()
            .zip(conts)
            .enumerate()
            .map(|(i, (s, cont))| match cont {
                Some(cont) => with_continuation(tok, s, i, g, &cont, &eos),
                None => Ok(s.clone()),
            })
            .collect()
    }
}

/// The prompts' token ids, and the context every generation runs in (the longest prompt plus
/// the new tokens: one size, so the GPU keeps one cache and one decode graph).
fn prompts(
    tok: &TextTokenizer,
    samples: &[Sample],
    g: &SelfGenerate,
) -> Result<(Vec<Vec<u32>>, usize), SelfGenError> {
    let ids = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tok.encode(prompt_of(&s.text, g.prompt_words), true)
                .map_err(|source| SelfGenError::Tokenizer { sample: i, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    Ok((ids, longest + g.new_tokens))
}

/// Sample `i` with its continuation `out` (end-of-text tokens dropped: the samples are joined
/// by blank lines).
fn with_continuation(
    tok: &TextTokenizer,
    s: &Sample,
    i: usize,
    g: &SelfGenerate,
    out: &[u32],
    eos: &[u32],
) -> Result<Sample, SelfGenError> {
    let body: Vec<u32> = out.iter().copied().filter(|t| !eos.contains(t)).collect();
    let text = tok
        .decode(&body)
        .map_err(|source| SelfGenError::Tokenizer { sample: i, source })?;
    Ok(Sample {
        set: s.set.clone(),
        text: format!("{}{text}", prompt_of(&s.text, g.prompt_words)),
    })
}

fn params(g: &SelfGenerate, seed: u64, i: usize) -> SamplingParams {
    SamplingParams {
        temperature: g.temperature,
        top_p: g.top_p,
        seed: sample_seed(seed, i),
    }
}

/// Continuations from the CPU runtime, samples in parallel: the text does not depend on the
/// thread count, and is the same on every machine.
pub struct CpuContinuer<'a> {
    /// The BF16 model.
    pub model: &'a Model,
    /// `progress(done, total)` as samples finish (from worker threads).
    pub progress: &'a (dyn Fn(usize, usize) + Sync),
}

impl Continuer for CpuContinuer<'_> {
    fn eos_token_ids(&self) -> Vec<u32> {
        self.model.config.eos_token_ids.clone()
    }

    fn continue_prompts(
        &mut self,
        ids: &[Vec<u32>],
        ctx: usize,
        g: &SelfGenerate,
        seed: u64,
        eos: &[u32],
    ) -> Result<Vec<Option<Vec<u32>>>, SelfGenError> {
        let done = AtomicUsize::new(0);
        let (model, progress) = (self.model, self.progress);
        ids.par_iter()
            .enumerate()
            .map(|(i, prompt)| {
                let out = if prompt.is_empty() {
                    None
                } else {
                    let params = params(g, seed, i);
                    let (out, _) = generate(model, prompt, g.new_tokens, ctx, params, eos, |_| {})
                        .map_err(|source| SelfGenError::Generate { sample: i, source })?;
                    Some(out)
                };
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, ids.len());
                Ok(out)
            })
            .collect()
    }
}

/// Sequences the GPU decodes together.
pub const GPU_BATCH: usize = 32;

/// Continuations from the GPU, [`GPU_BATCH`] samples at a time: each prompt's prefill, its first
/// token drawn by the CPU sampler from the prefill's logits (seed [`sample_seed`]`(seed, i)`),
/// then one batched decode with the device sampler (seeded per batch; its noise is hashed from
/// the seed, the sequence's row and its position). Other text than [`CpuContinuer`]'s for the
/// same recipe, the same text on every run of one machine.
pub struct GpuContinuer<'a> {
    /// The BF16 model on the GPU.
    pub model: &'a mut GpuModel,
    /// `progress(done, total)` after each batch.
    pub progress: &'a dyn Fn(usize, usize),
}

/// A sequence's new tokens from a batched decode: `first` (drawn from the prefill), then the
/// `n - 1` tokens the decode wrote after position `p` (the prompt's length), out of `row`, the
/// sequence's tokens at positions `lo..`; cut after the first end-of-text token.
fn batch_continuation(
    first: u32,
    row: &[u32],
    lo: usize,
    p: usize,
    n: usize,
    eos: &[u32],
) -> Vec<u32> {
    let from = (p + 1).saturating_sub(lo).min(row.len());
    let to = (from + n.saturating_sub(1)).min(row.len());
    let mut out: Vec<u32> = std::iter::once(first)
        .chain(row[from..to].iter().copied())
        .collect();
    if let Some(e) = out.iter().position(|t| eos.contains(t)) {
        out.truncate(e + 1);
    }
    out
}

/// Decode steps after the prefill's token for a batch whose longest prompt has `longest`
/// tokens: `new_tokens - 1`, fewer where the cache of `cap` positions ends first (the step at
/// position q needs q < cap; the CPU stops at the same place).
fn decode_steps_within(cap: usize, longest: usize, new_tokens: usize) -> usize {
    new_tokens
        .saturating_sub(1)
        .min(cap.saturating_sub(longest))
}

impl GpuContinuer<'_> {
    /// The new tokens of the samples `batch` (indices into `ids`, non-empty prompts, at most
    /// [`GPU_BATCH`]), in order.
    fn decode_batch(
        &mut self,
        ids: &[Vec<u32>],
        batch: &[usize],
        g: &SelfGenerate,
        seed: u64,
        eos: &[u32],
    ) -> Result<Vec<Vec<u32>>, SelfGenError> {
        let gpu = |sample: usize| {
            move |source: GpuError| SelfGenError::Gpu {
                sample,
                source: Box::new(source),
            }
        };
        let model = &mut *self.model;
        // The cache holds positions < cap: each prompt must leave room for a new token (the
        // CPU's rule, `generation_context`).
        let cap = model.cache().map_or(0, |c| c.capacity());
        for &i in batch {
            generation_context(ids[i].len(), cap, model.config.max_position_embeddings)
                .map_err(|source| SelfGenError::Generate { sample: i, source })?;
        }
        let mut firsts = Vec::with_capacity(batch.len());
        for (row, &i) in batch.iter().enumerate() {
            let logits = model.forward(&ids[i], row, 0, false).map_err(gpu(i))?;
            let mut sampler = Sampler::new(params(g, seed, i))
                .map_err(|source| SelfGenError::Generate { sample: i, source })?;
            firsts.push(sampler.sample(&logits));
        }
        let positions: Vec<usize> = batch.iter().map(|&i| ids[i].len()).collect();
        let longest = positions.iter().copied().max().unwrap_or(0);
        let steps = decode_steps_within(cap, longest, g.new_tokens);
        let lo = positions.iter().min().map_or(0, |p| p + 1);
        let hi = longest + 1 + steps;
        let rows = if steps > 0 {
            model
                .decode_start(&firsts, &positions, true)
                .map_err(gpu(batch[0]))?;
            model
                .decode_steps(batch.len(), steps)
                .map_err(gpu(batch[0]))?;
            model
                .decode_tokens(batch.len(), lo, hi)
                .map_err(gpu(batch[0]))?
        } else {
            vec![Vec::new(); batch.len()]
        };
        Ok(firsts
            .iter()
            .zip(&rows)
            .zip(&positions)
            .map(|((&f, row), &p)| batch_continuation(f, row, lo, p, steps + 1, eos))
            .collect())
    }
}

impl Continuer for GpuContinuer<'_> {
    fn eos_token_ids(&self) -> Vec<u32> {
        self.model.config.eos_token_ids.clone()
    }

    fn continue_prompts(
        &mut self,
        ids: &[Vec<u32>],
        ctx: usize,
        g: &SelfGenerate,
        seed: u64,
        eos: &[u32],
    ) -> Result<Vec<Option<Vec<u32>>>, SelfGenError> {
        let live: Vec<usize> = (0..ids.len()).filter(|&i| !ids[i].is_empty()).collect();
        let mut conts: Vec<Option<Vec<u32>>> = vec![None; ids.len()];
        let Some(&first) = live.first() else {
            return Ok(conts);
        };
        let gpu = |source: GpuError| SelfGenError::Gpu {
            sample: first,
            source: Box::new(source),
        };
        self.model
            .alloc_cache(live.len().min(GPU_BATCH), ctx)
            .map_err(gpu)?;
        for (c, batch) in live.chunks(GPU_BATCH).enumerate() {
            self.model
                .set_sampling(g.temperature, g.top_p, sample_seed(seed ^ 0x5EED, c))
                .map_err(gpu)?;
            for (&i, cont) in batch
                .iter()
                .zip(self.decode_batch(ids, batch, g, seed, eos)?)
            {
                conts[i] = Some(cont);
            }
            (self.progress)(c * GPU_BATCH + batch.len(), live.len());
        }
        // Later decode steps of this model are greedy again.
        self.model.set_sampling(0.0, 1.0, 0).map_err(gpu)?;
        let bad = self.model.bad_token_count().map_err(gpu)?;
        if bad != 0 {
            return Err(gpu(GpuError::DeviceCheck(format!(
                "the GPU saw {bad} token ids outside the vocabulary"
            ))));
        }
        Ok(conts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_keeps_the_first_words_with_their_spacing() {
        assert_eq!(prompt_of("  one two  three four", 2), "one two");
        assert_eq!(prompt_of("one\ttwo\nthree", 3), "one\ttwo\nthree");
        assert_eq!(prompt_of("one two", 5), "one two");
        assert_eq!(prompt_of("a  b  c", 2), "a  b");
        assert_eq!(prompt_of("", 3), "");
        // Multi-byte characters are never split.
        assert_eq!(prompt_of("größe wächst schnell", 2), "größe wächst");
    }

    #[test]
    fn sample_seeds_differ_between_samples_and_recipes() {
        let a: Vec<u64> = (0..64).map(|i| sample_seed(1234, i)).collect();
        let mut d = a.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), a.len());
        assert_ne!(sample_seed(1, 0), sample_seed(2, 0));
        assert_eq!(sample_seed(7, 3), sample_seed(7, 3));
        // Pinned: the seeds decide the generated text, so the calibration of every `self` run.
        assert_eq!(sample_seed(0, 0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn a_batched_decode_row_gives_each_sequence_its_own_tokens() {
        // Rows hold positions lo = 4.. ; a prompt of 5 tokens has its new tokens from position 6.
        let row = [40, 41, 42, 43, 44, 45, 46];
        assert_eq!(
            batch_continuation(9, &row, 4, 5, 4, &[0]),
            vec![9, 42, 43, 44]
        );
        // The shortest prompt (p = 3, lo = 4) starts at the row's first entry.
        assert_eq!(batch_continuation(9, &row, 4, 3, 3, &[0]), vec![9, 40, 41]);
        // Cut after the first end-of-text token, the first token included.
        assert_eq!(
            batch_continuation(9, &[40, 0, 41], 4, 3, 4, &[0]),
            vec![9, 40, 0]
        );
        assert_eq!(batch_continuation(0, &row, 4, 3, 4, &[0]), vec![0]);
        // One new token: the prefill's alone; a short row is not overrun.
        assert_eq!(batch_continuation(9, &[], 4, 3, 1, &[0]), vec![9]);
        assert_eq!(
            batch_continuation(9, &row[..2], 4, 3, 8, &[0]),
            vec![9, 40, 41]
        );
    }

    #[test]
    fn decode_steps_stop_where_the_cache_ends() {
        // Room for all: 95 steps after the first token.
        assert_eq!(decode_steps_within(128, 10, 96), 95);
        // The cache ends first: the last step runs position cap - 1.
        assert_eq!(decode_steps_within(64, 10, 96), 54);
        // One new token: the prefill's alone; a full cache: none.
        assert_eq!(decode_steps_within(128, 10, 1), 0);
        assert_eq!(decode_steps_within(10, 10, 96), 0);
    }

    #[test]
    fn settings_are_checked() {
        assert!(SelfGenerate::default().check().is_ok());
        let bad = [
            SelfGenerate {
                prompt_words: 0,
                ..Default::default()
            },
            SelfGenerate {
                new_tokens: 0,
                ..Default::default()
            },
            SelfGenerate {
                temperature: 0.0,
                ..Default::default()
            },
            SelfGenerate {
                temperature: f32::NAN,
                ..Default::default()
            },
            SelfGenerate {
                top_p: 1.5,
                ..Default::default()
            },
        ];
        for b in bad {
            assert!(b.check().is_err(), "{b:?} accepted");
        }
    }
}
