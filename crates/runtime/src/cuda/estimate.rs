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

/// Scratch of the prefill GEMMs of FP4 weights (allocated on the first prefill, kept): the FP8
/// path holds one E4M3 copy of the largest dense FP4 weight (`n * k` bytes); without FP8 the
/// bf16 path holds a dequantized copy per weight shape (`2 * n * k` bytes each). BF16 models
/// need none.
pub fn prefill_scratch_bytes(
    c: &ModelConfig,
    fp4: Option<Fp4Format>,
    fp4_head: bool,
    fp8: bool,
) -> usize {
    if fp4.is_none() {
        return 0;
    }
    let (h, d) = (c.hidden_size, c.head_dim);
    let mut shapes = vec![
        ((c.num_heads + 2 * c.num_kv_heads) * d, h),
        (h, c.num_heads * d),
    ];
    let dense = (0..c.num_layers).any(|l| !c.moe_layers.get(l).copied().unwrap_or(false));
    if dense || c.moe.is_none() {
        shapes.push((2 * c.intermediate_size, h));
        shapes.push((h, c.intermediate_size));
    }
    if let Some(si) = c
        .moe
        .as_ref()
        .and_then(|m| m.shared_expert_intermediate_size)
    {
        shapes.push((2 * si, h));
        shapes.push((h, si));
    }
    if fp4_head && !c.tie_word_embeddings {
        shapes.push((c.vocab_size, h));
    }
    shapes.sort_unstable();
    shapes.dedup();
    if fp8 {
        shapes.iter().map(|(n, k)| n * k).max().unwrap_or(0)
    } else {
        shapes.iter().map(|(n, k)| 2 * n * k).sum()
    }
}

/// E4M3 copies that `Tuning::fp8_resident` keeps after the first prefill: one byte per weight
/// of every dense FP4 Linear (attention, dense and shared-expert MLPs, the lm_head with
/// `fp4_head`; routed experts use the grouped FP4 kernels and keep none).
pub fn resident_fp8_bytes(c: &ModelConfig, fp4: Option<Fp4Format>, fp4_head: bool) -> usize {
    if fp4.is_none() {
        return 0;
    }
    let (h, d) = (c.hidden_size, c.head_dim);
    let attn = (c.num_heads + 2 * c.num_kv_heads) * d * h + h * c.num_heads * d;
    let mut total = 0;
    for l in 0..c.num_layers {
        total += attn;
        let moe_layer = c.moe.is_some() && c.moe_layers.get(l).copied().unwrap_or(false);
        total += match (&c.moe, moe_layer) {
            (Some(m), true) => m.shared_expert_intermediate_size.map_or(0, |si| 3 * si * h),
            _ => 3 * c.intermediate_size * h,
        };
    }
    if fp4_head && !c.tie_word_embeddings {
        total += c.vocab_size * h;
    }
    total
}

/// Buffers of nucleus (top-p) sampling for a decode batch of `batch` sequences, allocated on the
/// first nucleus-sampled `decode_start` of that batch size and kept: a 65,536-bin histogram per
/// row (256 KiB) plus a few words. Checked against the free memory (no margin) before
/// allocating; batch 32 needs about 8 MiB.
pub fn nucleus_bytes(batch: usize) -> usize {
    super::ops::TopPBufs::bytes(batch)
}

/// Refuses with [`GpuError::OutOfMemory`] where `need` bytes (plus a 512 MiB margin for
/// workspaces) exceed the free device memory.
pub fn check_fits(gpu: &Gpu, what: &str, need: usize) -> Result<(), GpuError> {
    check_fits_with_margin(gpu, what, need, 512 << 20)
}

/// [`check_fits`] with another margin: small buffers allocated after the model and cache (the
/// nucleus buffers: margin 0) must not be refused for the margin those reserved.
pub fn check_fits_with_margin(
    gpu: &Gpu,
    what: &str,
    need: usize,
    margin: usize,
) -> Result<(), GpuError> {
    let (free, total) = gpu.mem_info()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{write_fixture, Arch};

    #[test]
    fn nucleus_buffers_are_a_histogram_per_row() {
        // 65,536 u32 bins, max key, threshold, counter, 64 u64 block sums per row.
        assert_eq!(nucleus_bytes(1), 65536 * 4 + 3 * 4 + 64 * 8);
        assert_eq!(nucleus_bytes(32), 32 * nucleus_bytes(1));
        assert!(nucleus_bytes(32) < 9 << 20);
    }

    #[test]
    fn prefill_scratch_is_the_largest_fp8_weight_or_every_bf16_shape() {
        let d = tempfile::tempdir().unwrap();
        write_fixture(d.path(), Arch::Llama, 1).unwrap();
        let c = ModelConfig::from_dir(d.path()).unwrap();
        assert!(!c.tie_word_embeddings);
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let dense = [
            (c.num_heads + 2 * c.num_kv_heads) * hd * h,
            h * c.num_heads * hd,
            2 * i * h,
            h * i,
        ];
        let head = c.vocab_size * h;
        let f = Some(Fp4Format::Nvfp4);
        assert_eq!(prefill_scratch_bytes(&c, None, true, true), 0);
        let max = dense.iter().copied().max().unwrap();
        assert_eq!(prefill_scratch_bytes(&c, f, false, true), max);
        assert_eq!(prefill_scratch_bytes(&c, f, true, true), max.max(head));
        let sum: usize = dense.iter().map(|b| 2 * b).sum();
        assert_eq!(prefill_scratch_bytes(&c, f, false, false), sum);
        // The fixture's lm_head [256, 64] has gate_up's shape: the bf16 path shares one scratch
        // per shape (Gpu keys them by (n, k)), so the head adds nothing here.
        assert_eq!((c.vocab_size, h), (2 * i, h));
        assert_eq!(prefill_scratch_bytes(&c, f, true, false), sum);
        // Resident E4M3 copies: every layer's dense weights (and the head), one byte each.
        let per_layer: usize = dense.iter().sum();
        assert_eq!(resident_fp8_bytes(&c, None, true), 0);
        assert_eq!(
            resident_fp8_bytes(&c, f, true),
            c.num_layers * per_layer + head
        );
    }
}
