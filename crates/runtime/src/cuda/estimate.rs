//! Device-memory estimates, so that a model that does not fit is refused before any upload.

use mimo_kernels::Fp4Format;

use super::error::GpuError;
use super::weights::Gpu;
use crate::config::ModelConfig;

/// Bytes of a `[n, k]` weight: BF16, or packed FP4 plus one scale byte per block.
fn matrix(n: usize, k: usize, fp4: Option<Fp4Format>) -> usize {
    match fp4 {
        Some(f) => n * k / 2 + n * (k / f.block_size()),
        None => n * k * 2,
    }
}

/// Weight bytes of `c` on the device: Linear layers in FP4 where `fp4` is set (the lm_head too
/// with `fp4_head`), embedding, routers and norms BF16/F32.
pub fn weight_bytes(c: &ModelConfig, fp4: Option<Fp4Format>, fp4_head: bool) -> usize {
    let (h, d) = (c.hidden_size, c.head_dim);
    let attn =
        matrix((c.num_heads + 2 * c.num_kv_heads) * d, h, fp4) + matrix(h, c.num_heads * d, fp4);
    let mut total = c.vocab_size * h * 2;
    if !c.tie_word_embeddings {
        total += matrix(c.vocab_size, h, if fp4_head { fp4 } else { None });
    }
    for l in 0..c.num_layers {
        total += attn + 2 * h * 4;
        total += match (&c.moe, c.moe_layers.get(l).copied().unwrap_or(false)) {
            (Some(m), true) => {
                let ei = m.expert_intermediate_size;
                m.num_experts * (matrix(2 * ei, h, fp4) + matrix(h, ei, fp4))
                    + m.num_experts * h * 2
                    + m.shared_expert_intermediate_size
                        .map_or(0, |si| matrix(2 * si, h, fp4) + matrix(h, si, fp4) + h * 2)
            }
            _ => matrix(2 * c.intermediate_size, h, fp4) + matrix(h, c.intermediate_size, fp4),
        };
    }
    total
}

/// Refuses with [`GpuError::OutOfMemory`] where `need` bytes (plus a 512 MiB margin for
/// workspaces) exceed the free device memory.
pub fn check_fits(gpu: &Gpu, what: &str, need: usize) -> Result<(), GpuError> {
    let (free, total) = gpu.mem_info()?;
    let margin = 512usize << 20;
    if need + margin > free {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Err(GpuError::OutOfMemory {
            what: what.to_string(),
            need_gib: gib(need + margin),
            free_gib: gib(free),
            total_gib: gib(total),
            device: gpu.ctx.device_name().to_string(),
        });
    }
    Ok(())
}
