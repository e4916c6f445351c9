//! `mimo-run bench -m DIR` on the CPU, and the speeds both backends report.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;

use super::load_model;
use crate::model::Logits;

pub(super) fn run_bench(
    dir: &Path,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    json_out: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let model = load_model(dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = bench_prompt(prompt_tokens, model.config.vocab_size)?;
    let ctx = prompt_tokens + decode_tokens + 1;
    let mut speeds = BenchSpeeds::new(prompt_tokens, decode_tokens, runs);
    let mut best_decode_cpu = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let mut cache = model.new_cache(ctx);
        if cache.capacity() < ctx {
            bail!(
                "prompt + decode tokens ({ctx}) exceed the model's context {}",
                cache.capacity()
            );
        }
        let t = Instant::now();
        let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
        speeds.prefill_took(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let cpu0 = process_cpu_seconds();
        for _ in 0..decode_tokens {
            let next = crate::generate::argmax(&logits) as u32;
            logits = model.forward(&[next], &mut cache, Logits::Last)?;
        }
        speeds.decode_took(t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, process_cpu_seconds()) {
            best_decode_cpu = best_decode_cpu.min(b - a);
        }
    }
    // CPU seconds per decoded token (all threads, stalls on memory included): on a shared,
    // loaded machine this is steadier than wall time. Only meaningful with --threads 1, since
    // idle rayon workers spin for a while before they sleep.
    let decode_cpu_s_per_token = (decode_tokens > 0 && best_decode_cpu.is_finite())
        .then(|| best_decode_cpu / decode_tokens as f64);
    let (prefill_tok_s, decode_tok_s) = (speeds.prefill_tok_s(), speeds.decode_tok_s());
    let threads = rayon::current_num_threads();
    if json_out {
        let j = json!({
            "model": dir, "architecture": model.config.arch.model_type(), "weight_bytes": model.weight_bytes(),
            "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs,
            "load_s": load_s, "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
            "decode_cpu_s_per_token": decode_cpu_s_per_token,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        let arch = model.config.arch.model_type();
        let place = format!(", {threads} threads");
        let line = speeds.line(dir, arch, model.weight_bytes(), &place, "");
        crate::outln!("{line}");
    }
    Ok(())
}

/// What `bench -m` measured (best of `runs`), reported alike by the CPU and the GPU backend.
pub(super) struct BenchSpeeds {
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    /// Best prefill wall time, seconds.
    best_prefill: f64,
    /// Best decode wall time, seconds.
    best_decode: f64,
}

impl BenchSpeeds {
    /// No run timed yet (best times infinite).
    pub(super) fn new(prompt_tokens: usize, decode_tokens: usize, runs: usize) -> BenchSpeeds {
        BenchSpeeds {
            prompt_tokens,
            decode_tokens,
            runs,
            best_prefill: f64::INFINITY,
            best_decode: f64::INFINITY,
        }
    }

    /// Records one prefill's wall time (seconds).
    pub(super) fn prefill_took(&mut self, s: f64) {
        self.best_prefill = self.best_prefill.min(s);
    }

    /// Records one decode's wall time (seconds).
    pub(super) fn decode_took(&mut self, s: f64) {
        self.best_decode = self.best_decode.min(s);
    }

    /// Prefill tokens per second.
    pub(super) fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.best_prefill
    }

    /// Decode tokens per second (0 when no token is decoded).
    pub(super) fn decode_tok_s(&self) -> f64 {
        if self.decode_tokens > 0 {
            self.decode_tokens as f64 / self.best_decode
        } else {
            0.0
        }
    }

    /// The one-line text report: `place` follows the weight size (", N threads" or
    /// " on DEVICE"), `decode_note` the decode speed.
    pub(super) fn line(
        &self,
        dir: &Path,
        arch: &str,
        weight_bytes: usize,
        place: &str,
        decode_note: &str,
    ) -> String {
        format!(
            "{}: {} weights {:.1} MiB{place} | prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.2} tok/s{decode_note} (best of {})",
            dir.display(),
            arch,
            weight_bytes as f64 / (1 << 20) as f64,
            self.prompt_tokens,
            self.prefill_tok_s(),
            self.decode_tokens,
            self.decode_tok_s(),
            self.runs.max(1)
        )
    }
}

/// The fixed pseudo-random prompt of `bench -m` (CPU and GPU): benchmark numbers do not depend
/// on a tokenizer.
pub(super) fn bench_prompt(prompt_tokens: usize, vocab: usize) -> Result<Vec<u32>> {
    if prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    Ok((0..prompt_tokens)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect())
}

/// User + system CPU time of this process in seconds (Linux /proc; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux target we build for.
    Some(ticks / 100.0)
}
