//! A model of a real architecture with random weights, built directly on the GPU (benchmarks of
//! shapes whose checkpoints cannot be shipped here). Throughput does not depend on the values;
//! quality numbers never come from such a model.
//!
//! BF16 weights are filled on the device (uniform, variance 1/k). FP4 weights are uploaded
//! from one host pool of random packed bytes (every nibble value, so every E2M1 code occurs)
//! with random block scales around 1 and a global scale that gives the weights variance ~1/k.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use half::bf16;
use mimo_kernels::cuda::{GpuFp4Weight, MoeWeights};
use mimo_kernels::Fp4Format;

use super::error::{drv, GpuError};
use super::estimate::{self, Formats};
use super::model::{check_config, Experts, Ffn, GateUp, GpuModel, Layer, Mlp, Moe, Qkv};
use super::weights::{Gpu, GpuLinear};
use crate::config::ModelConfig;

/// How the Linear layers of a random model are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    /// BF16 everywhere.
    Bf16,
    /// FP4 Linear layers (attention, MLP, experts); embedding and routers BF16.
    Fp4(Fp4Format),
    /// FP4 routed experts, every other Linear BF16: the layout of `mimo-quant convert
    /// --experts-only` (MoE models; a dense model is all BF16 in it).
    Fp4Experts(Fp4Format),
    /// FP4 everywhere but k_proj and v_proj, kept BF16: `--ignore '*k_proj*' --ignore
    /// '*v_proj*'`.
    Fp4DenseKv(Fp4Format),
    /// FP4 everywhere but k_proj, v_proj and o_proj, kept BF16 (q_proj the only FP4 attention
    /// Linear): `--ignore '*k_proj*' --ignore '*v_proj*' --ignore '*o_proj*'`.
    Fp4DenseKvO(Fp4Format),
    /// FP4 everywhere but q_proj, k_proj and v_proj, kept BF16 (one whole fused set, as vLLM
    /// and SGLang require): `--ignore '*q_proj*' --ignore '*k_proj*' --ignore '*v_proj*'`.
    Fp4DenseQkv(Fp4Format),
}

impl WeightKind {
    /// The FP4 format of its FP4 parts (`None` for BF16).
    pub fn fp4(self) -> Option<Fp4Format> {
        match self {
            WeightKind::Bf16 => None,
            WeightKind::Fp4(f)
            | WeightKind::Fp4Experts(f)
            | WeightKind::Fp4DenseKv(f)
            | WeightKind::Fp4DenseKvO(f)
            | WeightKind::Fp4DenseQkv(f) => Some(f),
        }
    }

    /// Each part's storage; the lm_head takes the FP4 format only with `fp4_head`.
    pub fn formats(self, fp4_head: bool) -> Formats {
        let f = self.fp4();
        let head = if fp4_head { f } else { None };
        match self {
            WeightKind::Bf16 | WeightKind::Fp4(_) => Formats::uniform(f, fp4_head),
            WeightKind::Fp4Experts(_) => Formats {
                experts: f,
                head,
                ..Formats::default()
            },
            WeightKind::Fp4DenseKv(_) => Formats {
                kv: None,
                ..Formats::uniform(f, fp4_head)
            },
            WeightKind::Fp4DenseKvO(_) => Formats {
                kv: None,
                o: None,
                ..Formats::uniform(f, fp4_head)
            },
            WeightKind::Fp4DenseQkv(_) => Formats {
                q: None,
                kv: None,
                ..Formats::uniform(f, fp4_head)
            },
        }
    }
}

/// Root-mean-square of a uniformly random E2M1 code (values 0, .5, 1, 1.5, 2, 3, 4, 6 and signs).
const E2M1_RMS: f32 = 2.926;

struct Builder<'a> {
    gpu: &'a Arc<Gpu>,
    seed: u64,
    pool: Vec<u8>,
}

/// xorshift64* bytes (fast, deterministic for a seed).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Builder<'_> {
    fn next_seed(&mut self) -> u64 {
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.seed
    }

    fn bf16(&mut self, len: usize, amp: f32) -> Result<CudaSlice<bf16>, GpuError> {
        let mut w = self
            .gpu
            .ctx
            .stream()
            .alloc_zeros::<bf16>(len)
            .map_err(drv("alloc random weights"))?;
        let seed = self.next_seed();
        self.gpu.ops.fill_bf16(&self.gpu.ctx, &mut w, seed, amp)?;
        Ok(w)
    }

    fn norm(&mut self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        let mut w = self
            .gpu
            .ctx
            .stream()
            .alloc_zeros::<f32>(len)
            .map_err(drv("alloc random norm"))?;
        let seed = self.next_seed();
        self.gpu
            .ops
            .fill_f32(&self.gpu.ctx, &mut w, seed, 1.0, 0.1)?;
        Ok(w)
    }

    /// `experts` stacked FP4 matrices `[n, k]`.
    fn fp4(
        &mut self,
        format: Fp4Format,
        n: usize,
        k: usize,
        experts: usize,
    ) -> Result<GpuFp4Weight, GpuError> {
        let packed_len = n * k / 2 * experts;
        if self.pool.len() < packed_len {
            let seed = self.next_seed();
            self.pool = random_bytes(packed_len, seed);
        }
        let blocks = n * (k / format.block_size()) * experts;
        let target = 1.0 / (k as f32).sqrt();
        let noise = random_bytes(blocks, self.next_seed());
        let (scales, gs): (Vec<u8>, f32) = match format {
            // E4M3 codes 0x30..=0x3F: 0.5 .. 0.9375 and 1.0 .. 1.875 (mean ~1).
            Fp4Format::Nvfp4 => (
                noise.iter().map(|b| 0x30 | (b & 0x0F)).collect(),
                E2M1_RMS / target,
            ),
            // E8M0: 2^e with e around log2(target / rms), jittered by one step.
            Fp4Format::Mxfp4 => {
                let e = (target / E2M1_RMS).log2().round() as i32 + 127;
                (
                    noise
                        .iter()
                        .map(|b| (e - i32::from(b & 1)).clamp(1, 254) as u8)
                        .collect(),
                    1.0,
                )
            }
        };
        Ok(GpuFp4Weight::from_parts(
            &self.gpu.ctx,
            format,
            n,
            k,
            experts,
            &self.pool[..packed_len],
            &scales,
            &vec![gs; experts],
        )?)
    }

    /// A `[n, k]` Linear in `fp4`, or BF16 for `None`.
    fn linear(
        &mut self,
        fp4: Option<Fp4Format>,
        n: usize,
        k: usize,
    ) -> Result<GpuLinear, GpuError> {
        Ok(match fp4 {
            None => GpuLinear::Bf16 {
                w: self.bf16(n * k, (3.0 / k as f32).sqrt())?,
                n,
                k,
                bias: None,
            },
            Some(f) => GpuLinear::Fp4 {
                w: self.fp4(f, n, k, 1)?,
                bias: None,
                fp8: Mutex::new(None),
            },
        })
    }

    fn bias(&mut self, len: usize) -> Result<CudaSlice<f32>, GpuError> {
        let mut b = self
            .gpu
            .ctx
            .stream()
            .alloc_zeros::<f32>(len)
            .map_err(drv("alloc random bias"))?;
        let seed = self.next_seed();
        self.gpu
            .ops
            .fill_f32(&self.gpu.ctx, &mut b, seed, 0.0, 0.05)?;
        Ok(b)
    }
}

/// A random lm_head for the model's shape, in `fp4` (BF16 for `None`).
pub(crate) fn random_head(
    gpu: &Arc<Gpu>,
    c: &ModelConfig,
    fp4: Option<Fp4Format>,
    seed: u64,
) -> Result<GpuLinear, GpuError> {
    let mut b = Builder {
        gpu,
        seed,
        pool: Vec::new(),
    };
    b.linear(fp4, c.vocab_size, c.hidden_size)
}

impl GpuModel {
    /// Builds a model of `config`'s architecture with random weights on the GPU: Linear
    /// layers of `kind`, the lm_head FP4 only with `fp4_head`. Refused before any allocation
    /// if it does not fit.
    pub fn random(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        kind: WeightKind,
        fp4_head: bool,
        seed: u64,
    ) -> Result<GpuModel, GpuError> {
        let c = config;
        check_config(&c)?;
        let f = kind.formats(fp4_head);
        estimate::check_fits(
            &gpu,
            &format!("random {} model ({kind:?})", c.arch.model_type()),
            estimate::model_bytes(&gpu, &c, &f),
        )?;
        let mut b = Builder {
            gpu: &gpu,
            seed,
            pool: Vec::new(),
        };
        let (h, d) = (c.hidden_size, c.head_dim);
        let embed = b.bf16(c.vocab_size * h, 1.0)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(b.linear(f.head, c.vocab_size, h)?)
        };
        let final_norm = b.norm(h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
            // One fused q/k/v matrix where the three share a format, else q apart and k/v in
            // one, as the loader fuses them.
            let qkv = if f.q == f.kv {
                Qkv::Fused(b.linear(f.q, qn + 2 * kvn, h)?)
            } else {
                Qkv::QKv(b.linear(f.q, qn, h)?, b.linear(f.kv, 2 * kvn, h)?)
            };
            let biases = if c.qkv_bias {
                [Some(b.bias(qn)?), Some(b.bias(kvn)?), Some(b.bias(kvn)?)]
            } else {
                [None, None, None]
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (Some(b.norm(d)?), Some(b.norm(d)?))
            } else {
                (None, None)
            };
            let o = b.linear(f.o, h, qn)?;
            let mlp = |b: &mut Builder, inter: usize| -> Result<Mlp, GpuError> {
                Ok(Mlp {
                    gate_up: GateUp::Fused(b.linear(f.mlp, 2 * inter, h)?),
                    down: b.linear(f.mlp, h, inter)?,
                    inter,
                })
            };
            let ffn = match (&c.moe, c.moe_layers[l]) {
                (Some(mc), true) => {
                    let (e, ei) = (mc.num_experts, mc.expert_intermediate_size);
                    let experts = match f.experts {
                        None => Experts::Bf16 {
                            gate_up: b.bf16(e * 2 * ei * h, (3.0 / h as f32).sqrt())?,
                            down: b.bf16(e * h * ei, (3.0 / ei as f32).sqrt())?,
                        },
                        Some(ef) => Experts::Fp4(MoeWeights {
                            gate_up: b.fp4(ef, 2 * ei, h, e)?,
                            down: b.fp4(ef, h, ei, e)?,
                        }),
                    };
                    let shared = match mc.shared_expert_intermediate_size {
                        Some(si) => Some((mlp(&mut b, si)?, b.linear(None, 1, h)?)),
                        None => None,
                    };
                    Ffn::Moe(Moe {
                        // Logits of a few units: routing spreads over the experts.
                        router: b.bf16(e * h, 4.0 * (3.0 / h as f32).sqrt())?,
                        experts,
                        shared,
                        n_experts: e,
                        top_k: mc.top_k,
                        renorm: mc.norm_topk_prob,
                        inter: ei,
                    })
                }
                _ => Ffn::Dense(mlp(&mut b, c.intermediate_size)?),
            };
            layers.push(Layer {
                in_norm: b.norm(h)?,
                post_norm: b.norm(h)?,
                qkv,
                biases,
                q_norm,
                k_norm,
                o,
                window: c.sliding_window[l].unwrap_or(0),
                ffn,
            });
        }
        gpu.ctx.synchronize()?;
        GpuModel::assemble(c, gpu, embed, lm_head, final_norm, layers)
    }
}
