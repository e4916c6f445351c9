//! Generation on the GPU: the prefill, then decode steps replayed as CUDA graphs with the
//! sampling on the device.

use std::time::Instant;

use super::{GpuError, GpuModel};
use crate::generate::{generation_context, GenerationStats, Sampler, SamplingParams};

/// Same contract as `crate::generate::generate`, on the GPU. The first token comes
/// from the prefill's logits (read back once) through the CPU runtime's sampler; every
/// later one is drawn on the device inside the replayed decode graph (greedy, temperature
/// and nucleus sampling alike: `GpuModel::set_sampling`), read back in growing chunks (the
/// tokens after an end-of-sequence token in a chunk are dropped). Nucleus ties at the
/// boundary are all kept on the device (see `generate::nucleus`); the samples differ from
/// the CPU's for the same seed (different random streams).
pub fn generate(
    model: &mut GpuModel,
    prompt: &[u32],
    max_tokens: usize,
    ctx: usize,
    params: SamplingParams,
    eos: &[u32],
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats), GpuError> {
    let context = generation_context(prompt.len(), ctx, model.config.max_position_embeddings)?;
    // Greedy, temperature and nucleus sampling all run inside the decode graph: the next
    // token is picked on the device, with no per-token read-back.
    let mut sampler = Sampler::new(params)?;
    model.set_sampling(params.temperature, params.top_p, params.seed)?;
    model.alloc_cache(1, context)?;
    let cap = model.cache().map_or(context, |c| c.capacity());
    let p = prompt.len();
    let t0 = Instant::now();
    let logits = model.forward(prompt, 0, 0, false)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut stopped_at_eos = false;
    let first = sampler.sample(&logits);
    out.push(first);
    on_token(first);
    if eos.contains(&first) {
        stopped_at_eos = true;
    } else {
        // Step i runs the token at position p + i - 1 and writes its successor to the
        // history at p + i; the cache holds positions < cap.
        model.decode_start(&[first], &[p], true)?;
        let mut done = 0usize;
        let mut chunk = 1usize;
        'outer: while out.len() < max_tokens {
            let n = chunk.min(max_tokens - out.len()).min(cap - p - done);
            if n == 0 {
                break;
            }
            model.decode_steps(1, n)?;
            let toks = model.decode_tokens(1, p + 1 + done, p + 1 + done + n)?;
            done += n;
            chunk = (chunk * 2).min(32);
            for &t in toks.first().map_or(&[][..], |v| &v[..]) {
                out.push(t);
                on_token(t);
                if eos.contains(&t) {
                    stopped_at_eos = true;
                    break 'outer;
                }
            }
        }
    }
    // Later decode steps of this model are greedy again unless asked otherwise.
    model.set_sampling(0.0, 1.0, 0)?;
    let bad = model.bad_token_count()?;
    if bad != 0 {
        return Err(GpuError::DeviceCheck(format!(
            "the GPU saw {bad} token ids outside the vocabulary"
        )));
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let stats = GenerationStats::new(p, out.len(), prefill_s, decode_s, stopped_at_eos);
    Ok((out, stats))
}
