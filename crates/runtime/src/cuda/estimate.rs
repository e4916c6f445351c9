//! Device-memory estimates, so that a model that does not fit is refused before any upload.

use mimo_kernels::Fp4Format;

use super::error::GpuError;
use super::weights::Gpu;
use crate::arch::Names;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::weights::Loader;

/// Bytes of a `[n, k]` weight: BF16, or packed FP4 plus one scale byte per block.
fn matrix(n: usize, k: usize, fp4: Option<Fp4Format>) -> usize {
    match fp4 {
        Some(f) => n * k / 2 + n * (k / f.block_size()),
        None => n * k * 2,
    }
}

/// How each part of a model's Linear weights is stored on the device: an FP4 format, or BF16
/// (`None`). Mixed layouts are what `mimo-quant convert --experts-only` and `--ignore` write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// q_proj.
    pub q: Option<Fp4Format>,
    /// k_proj and v_proj.
    pub kv: Option<Fp4Format>,
    /// o_proj.
    pub o: Option<Fp4Format>,
    /// Dense MLPs and shared experts.
    pub mlp: Option<Fp4Format>,
    /// Routed experts.
    pub experts: Option<Fp4Format>,
    /// The lm_head (when not tied to the embedding).
    pub head: Option<Fp4Format>,
}

impl Formats {
    /// Every Linear in `fp4` (BF16 for `None`), the lm_head too with `fp4_head`.
    pub fn uniform(fp4: Option<Fp4Format>, fp4_head: bool) -> Formats {
        Formats {
            q: fp4,
            kv: fp4,
            o: fp4,
            mlp: fp4,
            experts: fp4,
            head: if fp4_head { fp4 } else { None },
        }
    }

    /// Whether any Linear outside the routed experts is FP4 (what the FP8 prefill paths
    /// convert).
    pub fn dense_fp4(&self) -> bool {
        self.q.is_some()
            || self.kv.is_some()
            || self.o.is_some()
            || self.mlp.is_some()
            || self.head.is_some()
    }

    /// The dense (non-expert) FP4 weights of one layer, as `[n, k]` shapes with multiplicity:
    /// what the prefill paths convert or keep FP8 copies of. q/k/v count as one fused matrix
    /// where they share a format (the runtime fuses them then).
    fn dense_fp4_shapes(&self, c: &ModelConfig, moe_layer: bool) -> Vec<(usize, usize)> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
        let mut v = Vec::new();
        match (self.q, self.kv) {
            (Some(_), Some(_)) if self.q == self.kv => v.push((qn + 2 * kvn, h)),
            _ => {
                if self.q.is_some() {
                    v.push((qn, h));
                }
                if self.kv.is_some() {
                    v.extend([(kvn, h), (kvn, h)]);
                }
            }
        }
        if self.o.is_some() {
            v.push((h, qn));
        }
        if self.mlp.is_some() {
            let inter = if moe_layer {
                c.moe
                    .as_ref()
                    .and_then(|m| m.shared_expert_intermediate_size)
            } else {
                Some(c.intermediate_size)
            };
            if let Some(i) = inter {
                v.extend([(2 * i, h), (h, i)]);
            }
        }
        v
    }
}

/// Whether layer `l` of `c` is a MoE layer.
fn is_moe_layer(c: &ModelConfig, l: usize) -> bool {
    c.moe.is_some() && c.moe_layers.get(l).copied().unwrap_or(false)
}

/// Weight bytes of `c` on the device with its Linear layers stored as `f`; embedding, routers
/// and norms BF16/F32.
pub fn weight_bytes(c: &ModelConfig, f: &Formats) -> usize {
    let (h, d) = (c.hidden_size, c.head_dim);
    let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
    let attn = matrix(qn, h, f.q) + 2 * matrix(kvn, h, f.kv) + matrix(h, qn, f.o);
    let mut total = c.vocab_size * h * 2;
    if !c.tie_word_embeddings {
        total += matrix(c.vocab_size, h, f.head);
    }
    for l in 0..c.num_layers {
        total += attn + 2 * h * 4;
        total += match (&c.moe, is_moe_layer(c, l)) {
            (Some(m), true) => {
                let ei = m.expert_intermediate_size;
                m.num_experts * (matrix(2 * ei, h, f.experts) + matrix(h, ei, f.experts))
                    + m.num_experts * h * 2
                    + m.shared_expert_intermediate_size.map_or(0, |si| {
                        matrix(2 * si, h, f.mlp) + matrix(h, si, f.mlp) + h * 2
                    })
            }
            _ => matrix(2 * c.intermediate_size, h, f.mlp) + matrix(h, c.intermediate_size, f.mlp),
        };
    }
    total
}

/// Scratch of the prefill GEMMs of dense FP4 weights (allocated on the first prefill, kept):
/// the FP8 path holds one E4M3 copy of the largest dense FP4 weight (`n * k` bytes); without
/// FP8 the bf16 path holds a dequantized copy per weight shape (`2 * n * k` bytes each). BF16
/// weights and routed experts need none.
pub fn prefill_scratch_bytes(c: &ModelConfig, f: &Formats, fp8: bool) -> usize {
    let mut shapes: Vec<(usize, usize)> = (0..c.num_layers)
        .flat_map(|l| f.dense_fp4_shapes(c, is_moe_layer(c, l)))
        .collect();
    if f.head.is_some() && !c.tie_word_embeddings {
        shapes.push((c.vocab_size, c.hidden_size));
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
/// of every dense FP4 Linear (attention, dense and shared-expert MLPs, the lm_head when FP4;
/// routed experts use the grouped FP4 kernels and keep none).
pub fn resident_fp8_bytes(c: &ModelConfig, f: &Formats) -> usize {
    let mut total: usize = (0..c.num_layers)
        .flat_map(|l| f.dense_fp4_shapes(c, is_moe_layer(c, l)))
        .map(|(n, k)| n * k)
        .sum();
    if f.head.is_some() && !c.tie_word_embeddings {
        total += c.vocab_size * c.hidden_size;
    }
    total
}

/// All three estimates for a model of `c` stored as `f` on `gpu` (the resident FP8 copies only
/// where the GPU has FP8 and `Tuning::fp8_resident` is on).
pub fn model_bytes(gpu: &Gpu, c: &ModelConfig, f: &Formats) -> usize {
    weight_bytes(c, f)
        + prefill_scratch_bytes(c, f, gpu.has_fp8())
        + if gpu.has_fp8() && gpu.ctx.tuning().fp8_resident {
            resident_fp8_bytes(c, f)
        } else {
            0
        }
}

/// How the checkpoint stores each part of its Linear layers, read from the first layer that
/// has the part: a converted checkpoint may keep some of them dense (`--experts-only`,
/// `--ignore`), and those take BF16's bytes on the device. Where the layers differ (a
/// per-layer `--ignore`) the first one's storage is counted for all: too much where it is the
/// dense one.
pub(crate) fn stored_formats(c: &ModelConfig, names: &Names, ld: &Loader<'_>) -> Formats {
    let moe_layer = (0..c.num_layers).find(|&l| is_moe_layer(c, l));
    let dense_layer = (0..c.num_layers).find(|&l| !is_moe_layer(c, l));
    let shared = c
        .moe
        .as_ref()
        .and_then(|m| m.shared_expert_intermediate_size)
        .and(moe_layer);
    let [mlp_gate, ..] = match (dense_layer, shared) {
        (Some(l), _) => names.mlp(l),
        (None, Some(l)) => names.shared_expert(l),
        (None, None) => [String::new(), String::new(), String::new()],
    };
    // k and v stored in two ways (`--ignore '*v_proj*'` alone) count as dense: the estimate
    // may only err on the safe side.
    let pair = |a: &str, b: &str| {
        ld.fp4_format(&names.attn(0, a))
            .and(ld.fp4_format(&names.attn(0, b)))
    };
    Formats {
        q: ld.fp4_format(&names.attn(0, "q_proj")),
        kv: pair("k_proj", "v_proj"),
        o: ld.fp4_format(&names.attn(0, "o_proj")),
        mlp: ld.fp4_format(&mlp_gate),
        experts: moe_layer.and_then(|l| ld.fp4_format(&names.expert(l, 0)[0])),
        head: if c.tie_word_embeddings {
            None
        } else {
            ld.fp4_format(&names.lm_head())
        },
    }
}

/// How the checkpoint `ck` stores each part of its Linear layers on the device (see
/// [`Formats`]): what the load-time memory check counts.
pub fn checkpoint_formats(ck: &Checkpoint) -> Result<Formats, GpuError> {
    let c = ModelConfig::from_json(ck.config(), &ck.root().join("config.json"))?;
    let ld = Loader::new(ck)?;
    Ok(stored_formats(&c, &Names::new(c.arch), &ld))
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
        let all = |fp4_head| Formats::uniform(Some(Fp4Format::Nvfp4), fp4_head);
        let none = Formats::uniform(None, true);
        assert_eq!(prefill_scratch_bytes(&c, &none, true), 0);
        let max = dense.iter().copied().max().unwrap();
        assert_eq!(prefill_scratch_bytes(&c, &all(false), true), max);
        assert_eq!(prefill_scratch_bytes(&c, &all(true), true), max.max(head));
        let sum: usize = dense.iter().map(|b| 2 * b).sum();
        assert_eq!(prefill_scratch_bytes(&c, &all(false), false), sum);
        // The fixture's lm_head [256, 64] has gate_up's shape: the bf16 path shares one scratch
        // per shape (Gpu keys them by (n, k)), so the head adds nothing here.
        assert_eq!((c.vocab_size, h), (2 * i, h));
        assert_eq!(prefill_scratch_bytes(&c, &all(true), false), sum);
        // Resident E4M3 copies: every layer's dense weights (and the head), one byte each.
        let per_layer: usize = dense.iter().sum();
        assert_eq!(resident_fp8_bytes(&c, &none), 0);
        assert_eq!(
            resident_fp8_bytes(&c, &all(true)),
            c.num_layers * per_layer + head
        );
    }

    #[test]
    fn mixed_layouts_count_each_part_in_its_own_format() {
        let d = tempfile::tempdir().unwrap();
        write_fixture(d.path(), Arch::Qwen3Moe, 1).unwrap();
        let c = ModelConfig::from_dir(d.path()).unwrap();
        let m = c.moe.clone().unwrap();
        assert!(c.moe_layers.iter().all(|&x| x) && !c.tie_word_embeddings);
        let nv = Some(Fp4Format::Nvfp4);
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qn, kvn, ei) = (
            c.num_heads * hd,
            c.num_kv_heads * hd,
            m.expert_intermediate_size,
        );
        // Packed bytes plus one E4M3 scale per 16 elements, or two bytes per BF16 weight.
        let fp4 = |n: usize, k: usize| n * k / 2 + n * k / 16;
        let bf = |n: usize, k: usize| 2 * n * k;
        let fixed = c.vocab_size * h * 2 + c.num_layers * (2 * h * 4 + m.num_experts * h * 2);
        let experts = m.num_experts * (fp4(2 * ei, h) + fp4(h, ei));
        // `--experts-only`: attention and lm_head BF16, no dense FP4 weight to convert.
        let experts_only = Formats {
            experts: nv,
            ..Formats::default()
        };
        let attn_bf16 = bf(qn, h) + 2 * bf(kvn, h) + bf(h, qn);
        assert_eq!(
            weight_bytes(&c, &experts_only),
            fixed + bf(c.vocab_size, h) + c.num_layers * (attn_bf16 + experts)
        );
        assert_eq!(prefill_scratch_bytes(&c, &experts_only, true), 0);
        assert_eq!(resident_fp8_bytes(&c, &experts_only), 0);
        // k/v kept BF16: q and o FP4 apart (not one fused q/k/v matrix).
        let kv_bf16 = Formats {
            kv: None,
            ..Formats::uniform(nv, false)
        };
        let attn = fp4(qn, h) + 2 * bf(kvn, h) + fp4(h, qn);
        assert_eq!(
            weight_bytes(&c, &kv_bf16),
            fixed + bf(c.vocab_size, h) + c.num_layers * (attn + experts)
        );
        assert_eq!(
            prefill_scratch_bytes(&c, &kv_bf16, true),
            (qn * h).max(h * qn)
        );
        assert_eq!(resident_fp8_bytes(&c, &kv_bf16), c.num_layers * 2 * qn * h);
        // k/v and o kept BF16: q the only FP4 attention matrix.
        let kvo_bf16 = Formats {
            kv: None,
            o: None,
            ..Formats::uniform(nv, false)
        };
        let attn = fp4(qn, h) + 2 * bf(kvn, h) + bf(h, qn);
        assert_eq!(
            weight_bytes(&c, &kvo_bf16),
            fixed + bf(c.vocab_size, h) + c.num_layers * (attn + experts)
        );
        assert_eq!(resident_fp8_bytes(&c, &kvo_bf16), c.num_layers * qn * h);
        // Uniform FP4 counts the same bytes as the three parts added up.
        let uni = Formats::uniform(nv, true);
        let attn4 = fp4(qn + 2 * kvn, h) + fp4(h, qn);
        assert_eq!(
            weight_bytes(&c, &uni),
            fixed + fp4(c.vocab_size, h) + c.num_layers * (attn4 + experts)
        );
    }
}
