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

use mimo_runtime::cuda::{generate as gpu_generate, GpuError, GpuModel};
use mimo_runtime::generate::{check_sampling, generate, GenerateError, SamplingParams};
use mimo_runtime::model::Model;
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use rayon::prelude::*;

use super::data::Sample;

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
    let mut z = seed
        .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes the model's own continuations for a self-generated recipe.
pub trait Continuer {
    /// Each sample replaced by its prompt ([`prompt_of`]) and the model's continuation, sampled
    /// with seed [`sample_seed`]`(seed, i)`; same order and sets.
    fn continue_samples(
        &mut self,
        tok: &TextTokenizer,
        samples: &[Sample],
        g: &SelfGenerate,
        seed: u64,
    ) -> Result<Vec<Sample>, SelfGenError>;
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

fn eos_ids(config_eos: &[u32], tok: &TextTokenizer) -> Vec<u32> {
    let mut eos = config_eos.to_vec();
    eos.extend(tok.eos_id());
    eos
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
    fn continue_samples(
        &mut self,
        tok: &TextTokenizer,
        samples: &[Sample],
        g: &SelfGenerate,
        seed: u64,
    ) -> Result<Vec<Sample>, SelfGenError> {
        let (ids, ctx) = prompts(tok, samples, g)?;
        let eos = eos_ids(&self.model.config.eos_token_ids, tok);
        let done = AtomicUsize::new(0);
        let (model, progress) = (self.model, self.progress);
        samples
            .par_iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, (s, prompt))| {
                if prompt.is_empty() {
                    // Nothing to continue (an empty text): the sample stays as it is.
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, samples.len());
                    return Ok(s.clone());
                }
                let (out, _) = generate(
                    model,
                    prompt,
                    g.new_tokens,
                    ctx,
                    params(g, seed, i),
                    &eos,
                    |_| {},
                )
                .map_err(|source| SelfGenError::Generate { sample: i, source })?;
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, samples.len());
                with_continuation(tok, s, i, g, &out, &eos)
            })
            .collect()
    }
}

/// Continuations from the GPU, one sample at a time (device sampling: another random stream
/// than the CPU's, so other text than [`CpuContinuer`]'s for the same seed).
pub struct GpuContinuer<'a> {
    /// The BF16 model on the GPU.
    pub model: &'a mut GpuModel,
    /// `progress(done, total)` after each sample.
    pub progress: &'a dyn Fn(usize, usize),
}

impl Continuer for GpuContinuer<'_> {
    fn continue_samples(
        &mut self,
        tok: &TextTokenizer,
        samples: &[Sample],
        g: &SelfGenerate,
        seed: u64,
    ) -> Result<Vec<Sample>, SelfGenError> {
        let (ids, ctx) = prompts(tok, samples, g)?;
        let eos = eos_ids(&self.model.config.eos_token_ids, tok);
        let mut out = Vec::with_capacity(samples.len());
        for (i, (s, prompt)) in samples.iter().zip(&ids).enumerate() {
            if prompt.is_empty() {
                // Nothing to continue (an empty text): the sample stays as it is.
                out.push(s.clone());
                (self.progress)(i + 1, samples.len());
                continue;
            }
            let (cont, _) = gpu_generate(
                self.model,
                prompt,
                g.new_tokens,
                ctx,
                params(g, seed, i),
                &eos,
                |_| {},
            )
            .map_err(|source| SelfGenError::Gpu {
                sample: i,
                source: Box::new(source),
            })?;
            out.push(with_continuation(tok, s, i, g, &cont, &eos)?);
            (self.progress)(i + 1, samples.len());
        }
        Ok(out)
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
