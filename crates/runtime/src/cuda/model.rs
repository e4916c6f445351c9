//! The decoder on the GPU: weights resident (FP4 packed or BF16), KV cache on the device,
//! prefill as one pass over the prompt, decode as a CUDA graph replayed per token with sampling
//! on the device (greedy, temperature, nucleus; no host synchronisation inside a token).
//!
//! Launches per layer at decode: residual+RMSNorm, QKV GEMM, attention (q/k-norm, RoPE and the
//! KV-cache write fused in), o_proj, residual+RMSNorm, then either gate/up GEMM, SwiGLU, down
//! GEMM (dense) or router+top-k (one kernel) and the grouped MoE (three launches of the kernels
//! crate for FP4; two grouped GEMVs for BF16 whose combine is fused into the next RMSNorm).

// A model holds a few dozen of these enums, built once: boxing the larger variants would buy
// nothing.
#![allow(clippy::large_enum_variant)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaSlice};
use half::bf16;
use mimo_kernels::cuda::{MoeRoute, MoeWeights, MoeWorkspace, PdlGraph};

use super::error::{drv, GpuError};
use super::ops::TopPBufs;
use super::ops::{
    prefill_attention_on_mma, ARGMAX_CHUNK, MAX_CONTEXT, MAX_EXPERTS, MAX_HEAD_DIM, SPLIT_LEN,
};
use super::weights::{Gpu, GpuLinear};
use crate::config::ModelConfig;
use crate::cpu::Rope;
use crate::generate::nucleus;
use crate::model::ForwardError;

mod fold;
mod layer;
mod load;
mod walk;

/// Gate and up projections: one fused weight `[2 * inter, k]` or two.
pub(crate) enum GateUp {
    Fused(GpuLinear),
    Split(GpuLinear, GpuLinear),
}

/// A SwiGLU MLP on the device.
pub(crate) struct Mlp {
    pub gate_up: GateUp,
    pub down: GpuLinear,
    pub inter: usize,
}

impl Mlp {
    fn bytes(&self) -> usize {
        self.down.bytes()
            + match &self.gate_up {
                GateUp::Fused(l) => l.bytes(),
                GateUp::Split(g, u) => g.bytes() + u.bytes(),
            }
    }

    /// `out = down(silu(gate(x)) * up(x))`.
    fn forward(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        m: usize,
        b: &mut MlpBufs,
        out: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let i = self.inter;
        match (&self.gate_up, &mut b.up) {
            // One launch where the fused FP4 gate/up applies SwiGLU in its epilogue
            // (`Tuning::dense_swiglu`), else the product and the SwiGLU kernel.
            (GateUp::Fused(l), _) => {
                if !l.forward_swiglu(gpu, x, m, &mut b.act)? {
                    l.forward(gpu, x, m, &mut b.gate)?;
                    gpu.ops.swiglu(
                        &gpu.ctx,
                        &b.gate.slice(..),
                        &b.gate.slice(i..),
                        2 * i,
                        &mut b.act,
                        m,
                        i,
                    )?;
                }
            }
            (GateUp::Split(g, u), Some(ub)) => {
                g.forward(gpu, x, m, &mut b.gate)?;
                u.forward(gpu, x, m, ub)?;
                gpu.ops.swiglu(
                    &gpu.ctx,
                    &b.gate.slice(..),
                    &ub.slice(..),
                    i,
                    &mut b.act,
                    m,
                    i,
                )?;
            }
            (GateUp::Split(..), None) => {
                return Err(GpuError::Unsupported(
                    "MLP buffers without an up buffer".into(),
                ))
            }
        }
        self.down.forward(gpu, &b.act, m, out)
    }
}

/// Scratch of one MLP for `m` tokens.
pub(crate) struct MlpBufs {
    gate: CudaSlice<bf16>,
    up: Option<CudaSlice<bf16>>,
    act: CudaSlice<bf16>,
}

impl MlpBufs {
    fn new(gpu: &Gpu, mlp: &Mlp, m: usize) -> Result<MlpBufs, GpuError> {
        let i = mlp.inter;
        let (gate, up) = match &mlp.gate_up {
            GateUp::Fused(_) => (zeros::<bf16>(gpu, m * 2 * i)?, None),
            GateUp::Split(..) => (zeros(gpu, m * i)?, Some(zeros(gpu, m * i)?)),
        };
        Ok(MlpBufs {
            gate,
            up,
            act: zeros(gpu, m * i)?,
        })
    }
}

/// Routed experts on the device.
pub(crate) enum Experts {
    /// Packed FP4 stacks, computed by the kernels crate's grouped MoE.
    Fp4(MoeWeights),
    /// BF16 stacks `[E][2I][h]` (gate rows, then up rows) and `[E][h][I]`.
    Bf16 {
        gate_up: CudaSlice<bf16>,
        down: CudaSlice<bf16>,
    },
}

/// A mixture-of-experts block.
pub(crate) struct Moe {
    pub router: CudaSlice<bf16>,
    pub experts: Experts,
    pub shared: Option<(Mlp, GpuLinear)>,
    pub n_experts: usize,
    pub top_k: usize,
    pub renorm: bool,
    pub inter: usize,
}

pub(crate) enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// The q/k/v projections of a layer.
pub(crate) enum Qkv {
    /// One `[q + 2 kv, hidden]` matrix (the three share a format).
    Fused(GpuLinear),
    /// q apart and k, v in one `[2 kv, hidden]` matrix: a mixed checkpoint whose k/v are kept
    /// in another format than q (one launch fewer than `Split`).
    QKv(GpuLinear, GpuLinear),
    /// Three matrices.
    Split(GpuLinear, GpuLinear, GpuLinear),
}

/// One decoder layer.
pub(crate) struct Layer {
    pub in_norm: CudaSlice<f32>,
    pub post_norm: CudaSlice<f32>,
    pub qkv: Qkv,
    pub biases: [Option<CudaSlice<f32>>; 3],
    pub q_norm: Option<CudaSlice<f32>>,
    pub k_norm: Option<CudaSlice<f32>>,
    pub o: GpuLinear,
    pub window: usize,
    pub ffn: Ffn,
}

/// Keys and values of every layer on the device, `[seq][layer][kv_head][capacity][head_dim]`.
pub struct GpuKvCache {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    seqs: usize,
    capacity: usize,
}

impl GpuKvCache {
    /// Number of sequences.
    pub fn seqs(&self) -> usize {
        self.seqs
    }
    /// Positions per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// q/k/v output rows of one pass, for each form of [`Qkv`] the layers use.
#[derive(Default)]
struct QkvBufs {
    /// `[m, q + 2 kv]` (`Qkv::Fused`).
    fused: Option<CudaSlice<bf16>>,
    /// `[m, q]` (`Qkv::QKv`, `Qkv::Split`).
    q: Option<CudaSlice<bf16>>,
    /// `[m, 2 kv]` (`Qkv::QKv`).
    kv: Option<CudaSlice<bf16>>,
    /// `[m, kv]` each (`Qkv::Split`).
    k: Option<CudaSlice<bf16>>,
    v: Option<CudaSlice<bf16>>,
}

struct MoeBufs {
    logits: CudaSlice<f32>,
    counters: CudaSlice<i32>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    fp4: Option<MoeWorkspace>,
    pair_gu: Option<CudaSlice<bf16>>,
    pair_dn: Option<CudaSlice<bf16>>,
    /// BF16 experts: the tiled kernels' table (prefill-sized batches, `moe_tiled_batch`).
    route: Option<MoeRoute>,
    shared: Option<(MlpBufs, CudaSlice<bf16>, CudaSlice<bf16>)>,
}

/// Device buffers of one forward pass over `m` token rows (the kernels check exact lengths,
/// so there is one workspace per row count).
struct Ws {
    m: usize,
    rows_out: usize,
    tok: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    seq: CudaSlice<i32>,
    bad: CudaSlice<i32>,
    x: CudaSlice<f32>,
    h: CudaSlice<bf16>,
    qkv: QkvBufs,
    attn: CudaSlice<bf16>,
    delta: CudaSlice<bf16>,
    /// Attention output left pending for the next add_rmsnorm (fused norm + router layers).
    attn_delta: CudaSlice<bf16>,
    /// Partial sums of squares of a folded norm (fold.rs), one per producer block.
    fold_parts: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    part_o: CudaSlice<f32>,
    attn_cnt: CudaSlice<i32>,
    dense: Option<MlpBufs>,
    moe: Option<MoeBufs>,
    head_in: CudaSlice<bf16>,
    logits: CudaSlice<bf16>,
    am_v: CudaSlice<f32>,
    am_i: CudaSlice<i32>,
    am_cnt: CudaSlice<i32>,
    hist: CudaSlice<i32>,
    hist_cap: usize,
    /// Nucleus sampling buffers, allocated on the first nucleus-sampled decode of this
    /// workspace (decode workspaces only: 256 KiB per row).
    topp: Option<TopPBufs>,
}

/// A decode step for a batch, captured as a CUDA graph (or run eagerly where capture failed).
struct DecodeSession {
    ws: Ws,
    graph: Option<PdlGraph>,
    /// Largest position the next step writes (steps past the cache are refused).
    next_pos: usize,
    /// Whether the step (and its graph) includes the nucleus kernels.
    nucleus: bool,
}

/// What the residual stream still has to add before the next norm.
#[derive(Clone, Copy, Default)]
struct Pend {
    delta: bool,
    pairs: bool,
    shared: bool,
    /// `attn_delta` (a fused norm + router layer's attention output) is still to be added,
    /// before the FFN output.
    attn: bool,
}

impl Pend {
    /// Only `delta` (a dense FFN's or an unfused attention output's product) is pending.
    const DELTA: Pend = Pend {
        delta: true,
        pairs: false,
        shared: false,
        attn: false,
    };
}

/// (token, head, split) slots of the split partials the per-head attention kernels of `m`
/// tokens use over a cache of `capacity` positions (splits of [`SPLIT_LEN`] keys, the most any
/// kernel takes): `part_ml` holds 2 floats per slot, `part_o` head_dim.
fn split_partials(m: usize, heads: usize, capacity: usize) -> usize {
    m * heads * capacity.div_ceil(SPLIT_LEN)
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    len: usize,
) -> Result<CudaSlice<T>, GpuError> {
    gpu.ctx
        .stream()
        .alloc_zeros::<T>(len.max(1))
        .map_err(drv("alloc workspace"))
}

/// A decoder resident on the GPU.
pub struct GpuModel {
    /// Its configuration.
    pub config: ModelConfig,
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) embed: CudaSlice<bf16>,
    pub(crate) lm_head: Option<GpuLinear>,
    pub(crate) final_norm: CudaSlice<f32>,
    pub(crate) layers: Vec<Layer>,
    /// Whether the layers can fold their norms at batch 1 (fold.rs) with FP4 consumers only,
    /// and with BF16 q/k/v consumers allowed (`Tuning::bf16_fold`).
    fold: [bool; 2],
    pub(crate) inv_freq: CudaSlice<f32>,
    pub(crate) attn_factor: f32,
    pub(crate) rot_dim: usize,
    cache: Option<GpuKvCache>,
    workspaces: HashMap<(usize, usize), Ws>,
    sessions: HashMap<usize, DecodeSession>,
    /// `ops::sampling_words` of the decode steps' next-token kernel (zeros: greedy).
    samp: CudaSlice<u32>,
    /// Whether decode steps sample from a nucleus (temperature > 0 and top_p < 1): the step
    /// then runs the top-p kernels before the next-token kernel.
    nucleus: bool,
    /// Events recorded after each op while profiling an eager step.
    prof: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
    /// Calibration statistics summed on the device (between `begin_device_sums` and
    /// `take_device_sums`).
    device_sums: Option<walk::DeviceSums>,
    /// A stage every layer leaves out (`bench --stage-costs`; timing only).
    skipped: Option<Stage>,
}

/// The parts of a decoder layer that `bench --stage-costs` leaves out one at a time, to
/// measure what each adds to a graph-replayed decode step. With a stage left out the step's
/// output is wrong: the numbers are timings only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The residual add + RMSNorm before attention.
    InNorm,
    /// The q/k/v projection.
    Qkv,
    /// Attention (q/k norm, RoPE, KV write, scores, combine).
    Attention,
    /// The output projection.
    OProj,
    /// The residual add + RMSNorm after attention.
    PostNorm,
    /// MoE layers: the router and its top-k.
    Router,
    /// The feed-forward block (dense MLP, or the experts and any shared expert).
    Ffn,
}

impl Stage {
    /// Every stage, in layer order.
    pub const ALL: [Stage; 7] = [
        Stage::InNorm,
        Stage::Qkv,
        Stage::Attention,
        Stage::OProj,
        Stage::PostNorm,
        Stage::Router,
        Stage::Ffn,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::InNorm => "in_norm",
            Stage::Qkv => "qkv",
            Stage::Attention => "attention",
            Stage::OProj => "o_proj",
            Stage::PostNorm => "post_norm",
            Stage::Router => "router",
            Stage::Ffn => "ffn",
        }
    }
}

/// Checks the shapes the kernels handle.
pub(crate) fn check_config(c: &ModelConfig) -> Result<(), GpuError> {
    let bad = |s: String| Err(GpuError::Unsupported(s));
    if c.head_dim > MAX_HEAD_DIM || c.head_dim == 0 || c.head_dim % 8 != 0 {
        return bad(format!(
            "head_dim {} (a multiple of 8 up to {MAX_HEAD_DIM})",
            c.head_dim
        ));
    }
    if c.rope.rotary_dim > c.head_dim || c.rope.rotary_dim % 2 != 0 {
        return bad(format!("rotary dim {}", c.rope.rotary_dim));
    }
    if c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0 {
        return bad(format!(
            "{} heads over {} kv heads",
            c.num_heads, c.num_kv_heads
        ));
    }
    if let Some(m) = &c.moe {
        if m.num_experts > MAX_EXPERTS || m.top_k == 0 || m.top_k > m.num_experts.min(256) {
            return bad(format!(
                "{} experts top-{} (at most {MAX_EXPERTS} experts, top-k <= 256)",
                m.num_experts, m.top_k
            ));
        }
        if m.expert_intermediate_size % 8 != 0 || c.hidden_size % 8 != 0 {
            return bad("expert and hidden sizes must be multiples of 8".into());
        }
    }
    Ok(())
}

impl GpuModel {
    pub(crate) fn assemble(
        config: ModelConfig,
        gpu: Arc<Gpu>,
        embed: CudaSlice<bf16>,
        lm_head: Option<GpuLinear>,
        final_norm: CudaSlice<f32>,
        layers: Vec<Layer>,
    ) -> Result<GpuModel, GpuError> {
        let rope = Rope::new(&config.rope);
        let inv_freq = gpu.upload(&rope.inv_freq, "upload rope frequencies")?;
        let samp = gpu.upload(&[0u32; 4], "upload sampling parameters")?;
        let fold = [
            fold::fold_capable(&layers, &gpu.ctx, false),
            fold::fold_capable(&layers, &gpu.ctx, true),
        ];
        Ok(GpuModel {
            fold,
            rot_dim: rope.rotary_dim,
            attn_factor: rope.attention_factor,
            config,
            gpu,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            cache: None,
            workspaces: HashMap::new(),
            sessions: HashMap::new(),
            samp,
            nucleus: false,
            prof: RefCell::new(None),
            device_sums: None,
            skipped: None,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes of all weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.embed.len() * 2 + self.lm_head.as_ref().map_or(0, GpuLinear::bytes);
        for l in &self.layers {
            b += self.attn_bytes(l);
            b += match &l.ffn {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => {
                    let e = match &m.experts {
                        Experts::Fp4(w) => {
                            w.gate_up.bytes_per_matrix() * w.gate_up.experts
                                + w.down.bytes_per_matrix() * w.down.experts
                        }
                        Experts::Bf16 { gate_up, down } => (gate_up.len() + down.len()) * 2,
                    };
                    e + m.router.len() * 2
                        + m.shared.as_ref().map_or(0, |s| s.0.bytes() + s.1.bytes())
                }
            };
        }
        b
    }

    fn attn_bytes(&self, l: &Layer) -> usize {
        l.o.bytes()
            + match &l.qkv {
                Qkv::Fused(f) => f.bytes(),
                Qkv::QKv(a, b) => a.bytes() + b.bytes(),
                Qkv::Split(a, b, c) => a.bytes() + b.bytes() + c.bytes(),
            }
    }

    /// Weight bytes one decode token reads at batch 1 (each MoE layer reads its router and
    /// `top_k` experts; the lm_head is read whole, the embedding one row).
    pub fn decode_weight_bytes(&self) -> usize {
        let mut b = self.config.hidden_size * 2
            + match &self.lm_head {
                Some(h) => h.bytes(),
                None => self.embed.len() * 2,
            };
        for l in &self.layers {
            b += self.attn_bytes(l);
            b += match &l.ffn {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => {
                    let per = match &m.experts {
                        Experts::Fp4(w) => w.gate_up.bytes_per_matrix() + w.down.bytes_per_matrix(),
                        Experts::Bf16 { gate_up, down } => {
                            (gate_up.len() + down.len()) * 2 / m.n_experts
                        }
                    };
                    per * m.top_k
                        + m.router.len() * 2
                        + m.shared.as_ref().map_or(0, |s| s.0.bytes() + s.1.bytes())
                }
            };
        }
        b
    }

    /// Bytes of K and V one decode token reads at context length `ctx`.
    pub fn kv_bytes_per_token(&self, ctx: usize) -> usize {
        let c = &self.config;
        self.layers.len() * c.num_kv_heads * c.head_dim * 2 * 2 * ctx
    }

    /// (Re)allocates the KV cache for `seqs` sequences of `capacity` positions; captured decode
    /// graphs are dropped (they point at the old cache).
    pub fn alloc_cache(&mut self, seqs: usize, capacity: usize) -> Result<(), GpuError> {
        self.sessions.clear();
        self.workspaces.clear();
        self.cache = None;
        let c = &self.config;
        let capacity = capacity.min(c.max_position_embeddings).max(1);
        if capacity > MAX_CONTEXT {
            return Err(GpuError::Unsupported(format!(
                "a context of {capacity} positions (the attention kernel takes {MAX_CONTEXT})"
            )));
        }
        let len = seqs * self.layers.len() * c.num_kv_heads * capacity * c.head_dim;
        super::estimate::check_fits(&self.gpu, "the KV cache", len * 4)?;
        self.cache = Some(GpuKvCache {
            k: zeros(&self.gpu, len)?,
            v: zeros(&self.gpu, len)?,
            seqs,
            capacity,
        });
        Ok(())
    }

    /// The KV cache, if allocated.
    pub fn cache(&self) -> Option<&GpuKvCache> {
        self.cache.as_ref()
    }

    fn new_ws(&self, m: usize, rows_out: usize) -> Result<Ws, GpuError> {
        let c = &self.config;
        let g = &*self.gpu;
        let (hd, d, h, kv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (seqs, cap) = self.cache.as_ref().map_or((1, 1), |k| (k.seqs, k.capacity));
        // Split partials (max, sum, out per token, head and split of 64 keys) serve the decode
        // kernels and the per-head prefill kernel. A workspace of more rows than sequences never
        // decodes, and where prefill attention runs on the tensor cores it needs none: a long
        // prompt would otherwise hold m * heads * capacity / 64 * head_dim floats (68 GB for a
        // 16k-token prompt of 32 heads of 128). layer_pass grows them if the per-head prefill
        // kernel runs after all (a tuning change).
        let parts = if m <= seqs || !prefill_attention_on_mma(g.ctx.tuning(), d) {
            split_partials(m, h, cap)
        } else {
            0
        };
        // Buffers for every q/k/v form present (layers may differ: `--ignore` of one layer).
        let mut qkv = QkvBufs::default();
        for l in &self.layers {
            match &l.qkv {
                Qkv::Fused(_) if qkv.fused.is_none() => {
                    qkv.fused = Some(zeros(g, m * (h + 2 * kv) * d)?)
                }
                Qkv::QKv(..) if qkv.kv.is_none() => qkv.kv = Some(zeros(g, m * 2 * kv * d)?),
                Qkv::Split(..) if qkv.k.is_none() => {
                    qkv.k = Some(zeros(g, m * kv * d)?);
                    qkv.v = Some(zeros(g, m * kv * d)?);
                }
                _ => {}
            }
            if !matches!(l.qkv, Qkv::Fused(_)) && qkv.q.is_none() {
                qkv.q = Some(zeros(g, m * h * d)?);
            }
        }
        let dense = match self.layers.iter().find_map(|l| match &l.ffn {
            Ffn::Dense(mlp) => Some(mlp),
            Ffn::Moe(_) => None,
        }) {
            Some(mlp) => Some(MlpBufs::new(g, mlp, m)?),
            None => None,
        };
        let moe = match self.layers.iter().find_map(|l| match &l.ffn {
            Ffn::Moe(moe) => Some(moe),
            Ffn::Dense(_) => None,
        }) {
            Some(moe) => {
                let p = m * moe.top_k;
                let (fp4, pair_gu, pair_dn, route) = match &moe.experts {
                    Experts::Fp4(w) => (
                        Some(MoeWorkspace::new(&g.ctx, w, m, moe.top_k)?),
                        None,
                        None,
                        None,
                    ),
                    Experts::Bf16 { .. } => (
                        None,
                        Some(zeros(g, p * 2 * moe.inter)?),
                        Some(zeros(g, p * hd)?),
                        if m > 1 {
                            Some(MoeRoute::new(&g.ctx, p, moe.n_experts)?)
                        } else {
                            None
                        },
                    ),
                };
                let shared = match &moe.shared {
                    Some((mlp, _)) => {
                        Some((MlpBufs::new(g, mlp, m)?, zeros(g, m * hd)?, zeros(g, m)?))
                    }
                    None => None,
                };
                Some(MoeBufs {
                    logits: zeros(g, m * moe.n_experts)?,
                    counters: zeros(g, m)?,
                    ids: zeros(g, p)?,
                    weights: zeros(g, p)?,
                    fp4,
                    pair_gu,
                    pair_dn,
                    route,
                    shared,
                })
            }
            None => None,
        };
        let chunks = c.vocab_size.div_ceil(ARGMAX_CHUNK);
        let hist_cap = cap + 1;
        Ok(Ws {
            m,
            rows_out,
            tok: zeros(g, m)?,
            pos: zeros(g, m)?,
            seq: zeros(g, m)?,
            bad: zeros(g, 1)?,
            x: zeros(g, m * hd)?,
            h: zeros(g, m * hd)?,
            qkv,
            attn: zeros(g, m * h * d)?,
            delta: zeros(g, m * hd)?,
            attn_delta: zeros(g, m * hd)?,
            // A producer's blocks hold 16 or 32 of its hidden-size outputs.
            fold_parts: zeros(g, hd.div_ceil(16))?,
            part_ml: zeros(g, parts * 2)?,
            part_o: zeros(g, parts * d)?,
            attn_cnt: zeros(g, m * h)?,
            dense,
            moe,
            head_in: zeros(g, rows_out * hd)?,
            logits: zeros(g, rows_out * c.vocab_size)?,
            am_v: zeros(g, rows_out * chunks)?,
            am_i: zeros(g, rows_out * chunks)?,
            am_cnt: zeros(g, rows_out)?,
            hist: zeros(g, rows_out * hist_cap)?,
            hist_cap,
            topp: None,
        })
    }

    /// Queues one forward pass over `ws.m` token rows whose ids, positions and sequences are
    /// already in `ws`. `decode`: every row is a different sequence with one new token (the
    /// attention kernel then writes the new keys itself) and sampling on the device (greedy,
    /// temperature, or with `self.nucleus` the top-p kernels first) advances the token and
    /// position buffers.
    fn run(&self, ws: &mut Ws, decode: bool) -> Result<(), GpuError> {
        let c = &self.config;
        let gpu = &*self.gpu;
        let g = &gpu.ctx;
        let ops = &gpu.ops;
        if self.cache.is_none() {
            return Err(GpuError::Unsupported("no KV cache allocated".into()));
        }
        let hd = c.hidden_size;
        let m = ws.m;
        self.mark("start")?;
        ops.embed_gather(
            g,
            &self.embed,
            &ws.tok,
            &mut ws.x,
            m,
            hd,
            c.vocab_size,
            &mut ws.bad,
        )?;
        self.mark("embedding")?;
        let mut pend = Pend::default();
        // With folded norms every layer after the first finds its input normalised already
        // (up to 1 / rms) by the previous layer's down projection.
        let fold = self.folds(m);
        for (li, layer) in self.layers.iter().enumerate() {
            if self.runs(Stage::InNorm) && !(fold && li > 0) {
                self.add_norm(ws, pend, &layer.in_norm, false)?;
            }
            self.mark("norm")?;
            pend = self.layer_pass(ws, li, decode, None)?;
        }
        self.add_norm(ws, pend, &self.final_norm, true)?;
        self.mark("final_norm")?;
        let rows = ws.rows_out;
        match &self.lm_head {
            Some(h) => h.forward(gpu, &ws.head_in, rows, &mut ws.logits)?,
            None => mimo_kernels::cuda::bf16_gemm(
                &gpu.blas,
                &self.embed,
                &ws.head_in,
                rows,
                c.vocab_size,
                hd,
                &mut ws.logits,
            )?,
        }
        self.mark("lm_head")?;
        if decode {
            let nucleus = if self.nucleus {
                let bufs = ws.topp.as_mut().ok_or_else(|| {
                    GpuError::Unsupported("nucleus sampling buffers not allocated".into())
                })?;
                ops.top_p_threshold(g, &ws.logits, rows, c.vocab_size, bufs, &self.samp)?;
                self.mark("top_p")?;
                Some(bufs)
            } else {
                None
            };
            ops.argmax_next(
                g,
                &ws.logits,
                rows,
                c.vocab_size,
                &mut ws.am_v,
                &mut ws.am_i,
                &mut ws.am_cnt,
                &mut ws.tok,
                &mut ws.pos,
                &mut ws.hist,
                ws.hist_cap,
                &self.samp,
                nucleus,
            )?;
            self.mark("argmax")?;
        }
        Ok(())
    }

    fn take_ws(&mut self, m: usize, rows_out: usize) -> Result<Ws, GpuError> {
        match self.workspaces.remove(&(m, rows_out)) {
            Some(ws) => Ok(ws),
            None => self.new_ws(m, rows_out),
        }
    }

    fn cache_dims(&self) -> Result<(usize, usize), GpuError> {
        self.cache
            .as_ref()
            .map(|c| (c.seqs, c.capacity))
            .ok_or_else(|| GpuError::Unsupported("no KV cache allocated (alloc_cache)".into()))
    }

    /// Runs `tokens` of sequence `seq` at positions `start..` (writing their keys and values to
    /// the cache) and returns the logits of the last token (`all_rows`: of every token,
    /// `[m, vocab]`). Synchronises once, to read the logits back.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        seq: usize,
        start: usize,
        all_rows: bool,
    ) -> Result<Vec<f32>, GpuError> {
        check_tokens(tokens, self.config.vocab_size)?;
        let (seqs, cap) = self.cache_dims()?;
        let m = tokens.len();
        if start + m > cap {
            return Err(ForwardError::ContextOverflow {
                cached: start,
                new: m,
                max: cap,
            }
            .into());
        }
        if seq >= seqs {
            return Err(GpuError::Unsupported(format!(
                "sequence {seq} of a cache for {seqs}"
            )));
        }
        let rows_out = if all_rows { m } else { 1 };
        let mut ws = self.take_ws(m, rows_out)?;
        let r = self.forward_in(&mut ws, tokens, seq, start);
        self.workspaces.insert((m, rows_out), ws);
        r
    }

    fn forward_in(
        &self,
        ws: &mut Ws,
        tokens: &[u32],
        seq: usize,
        start: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let s = self.gpu.ctx.stream();
        let tok: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (0..tokens.len()).map(|i| (start + i) as i32).collect();
        s.memcpy_htod(&tok, &mut ws.tok)
            .map_err(drv("upload tokens"))?;
        s.memcpy_htod(&pos, &mut ws.pos)
            .map_err(drv("upload positions"))?;
        s.memcpy_htod(&vec![seq as i32; tokens.len()], &mut ws.seq)
            .map_err(drv("upload sequence ids"))?;
        self.run(ws, false)?;
        let logits = s.clone_dtoh(&ws.logits).map_err(drv("read logits"))?;
        Ok(logits.iter().map(|v| v.to_f32()).collect())
    }

    /// Prepares batched decoding of `tokens.len()` sequences (sequence b holds `tokens[b]` at
    /// position `positions[b]`): the step is captured as a CUDA graph on first use for this
    /// batch size (`use_graph`; where capture fails the step runs eagerly), and the token and
    /// position buffers are set. Returns whether a graph is used.
    pub fn decode_start(
        &mut self,
        tokens: &[u32],
        positions: &[usize],
        use_graph: bool,
    ) -> Result<bool, GpuError> {
        check_tokens(tokens, self.config.vocab_size)?;
        let b = tokens.len();
        let (seqs, cap) = self.cache_dims()?;
        if positions.len() != b || b > seqs {
            return Err(GpuError::Unsupported(format!(
                "{b} tokens, {} positions, a cache for {seqs} sequences",
                positions.len()
            )));
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= cap) {
            return Err(ForwardError::ContextOverflow {
                cached: p,
                new: 1,
                max: cap,
            }
            .into());
        }
        // A session is (re)built for a new batch size, and where the sampling mode changed
        // since its graph was captured (the nucleus kernels are in the graph only when used).
        let stale = self
            .sessions
            .get(&b)
            .is_some_and(|sess| sess.nucleus != self.nucleus);
        if stale || !self.sessions.contains_key(&b) {
            let mut ws = match self.sessions.remove(&b) {
                Some(old) => old.ws,
                None => self.take_ws(b, b)?,
            };
            if self.nucleus && ws.topp.as_ref().is_none_or(|t| t.rows < b) {
                super::estimate::check_fits_with_margin(
                    &self.gpu,
                    "the nucleus sampling buffers",
                    super::estimate::nucleus_bytes(b),
                    0,
                )?;
                ws.topp = Some(TopPBufs::new(&self.gpu.ctx, b)?);
            }
            let s = self.gpu.ctx.stream().clone();
            let seq: Vec<i32> = (0..b as i32).collect();
            s.memcpy_htod(&seq, &mut ws.seq)
                .map_err(drv("upload sequence ids"))?;
            self.upload_step(&mut ws, tokens, positions)?;
            // One eager step first: lazy module loading and cuBLAS set-up happen outside the
            // capture. It writes the cache at `positions`, which the real steps overwrite.
            self.run(&mut ws, true)?;
            s.synchronize().map_err(drv("synchronize"))?;
            let graph = if use_graph {
                self.capture(&mut ws)?
            } else {
                None
            };
            self.sessions.insert(
                b,
                DecodeSession {
                    ws,
                    graph,
                    next_pos: 0,
                    nucleus: self.nucleus,
                },
            );
        }
        let mut sess = self
            .sessions
            .remove(&b)
            .ok_or_else(|| GpuError::Unsupported("decode session".into()))?;
        sess.next_pos = positions.iter().copied().max().unwrap_or(0);
        let r = self.upload_step(&mut sess.ws, tokens, positions);
        let graph = sess.graph.is_some();
        self.sessions.insert(b, sess);
        r.map(|_| graph)
    }

    fn upload_step(
        &self,
        ws: &mut Ws,
        tokens: &[u32],
        positions: &[usize],
    ) -> Result<(), GpuError> {
        let s = self.gpu.ctx.stream();
        let tok: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        s.memcpy_htod(&tok, &mut ws.tok)
            .map_err(drv("upload tokens"))?;
        s.memcpy_htod(&pos, &mut ws.pos)
            .map_err(drv("upload positions"))?;
        Ok(())
    }

    /// Captures one decode step; None (eager fallback, reported to stderr) where the driver
    /// refuses the capture. With `Tuning::pdl` the edges into our own kernels are made
    /// programmatic (mimo_kernels::cuda::PdlGraph): each kernel's launch and weight prefetch
    /// overlap the previous kernel's tail.
    fn capture(&self, ws: &mut Ws) -> Result<Option<PdlGraph>, GpuError> {
        let s = self.gpu.ctx.stream().clone();
        s.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(drv("begin graph capture"))?;
        let queued = self.run(ws, true);
        let mut aware: std::collections::HashSet<usize> =
            self.gpu.ctx.pdl_kernels().into_iter().collect();
        aware.extend(self.gpu.ops.pdl_kernels());
        let ended = PdlGraph::end_capture(&s, &aware, self.gpu.ctx.tuning().pdl);
        match (queued, ended) {
            (Ok(()), Ok(Some(g))) => {
                g.upload()?;
                Ok(Some(g))
            }
            (Err(e), _) => Err(e),
            (Ok(()), Ok(None)) => {
                eprintln!("CUDA graph capture returned no graph; decoding without a graph");
                Ok(None)
            }
            (Ok(()), Err(e)) => {
                eprintln!("CUDA graph capture failed ({e}); decoding without a graph");
                Ok(None)
            }
        }
    }

    /// (kernel -> kernel edges, of them programmatic) of the decode graph of `batch`, if one
    /// was captured.
    pub fn decode_graph_edges(&self, batch: usize) -> Option<(usize, usize)> {
        self.sessions
            .get(&batch)
            .and_then(|s| s.graph.as_ref())
            .map(|g| (g.kernel_edges, g.programmatic_edges))
    }

    /// Drops every decode session (and its graph): the next `decode_start` captures again,
    /// under the `Tuning` then in force.
    pub fn reset_decode_sessions(&mut self) {
        self.sessions.clear();
    }

    /// Leaves `stage` out of every layer from the next capture on (None: every stage runs), for
    /// `bench --stage-costs`. The model's outputs are wrong while a stage is left out.
    pub fn set_skipped_stage(&mut self, stage: Option<Stage>) {
        self.skipped = stage;
        self.reset_decode_sessions();
    }

    /// Whether `stage` runs (see [`GpuModel::set_skipped_stage`]).
    fn runs(&self, stage: Stage) -> bool {
        self.skipped != Some(stage)
    }

    /// Queues `n` decode steps of the batch set up by [`GpuModel::decode_start`] (graph
    /// replays; no host synchronisation).
    pub fn decode_steps(&mut self, batch: usize, n: usize) -> Result<(), GpuError> {
        let mut sess = self
            .sessions
            .remove(&batch)
            .ok_or_else(|| GpuError::Unsupported(format!("no decode session for batch {batch}")))?;
        if sess.nucleus != self.nucleus {
            self.sessions.insert(batch, sess);
            return Err(GpuError::Unsupported(
                "the sampling mode changed (set_sampling) since decode_start; call decode_start \
                 again"
                    .into(),
            ));
        }
        let cap = self.cache.as_ref().map_or(0, |c| c.capacity);
        if sess.next_pos + n > cap {
            let cached = sess.next_pos;
            self.sessions.insert(batch, sess);
            return Err(ForwardError::ContextOverflow {
                cached,
                new: n,
                max: cap,
            }
            .into());
        }
        sess.next_pos += n;
        let mut r = Ok(());
        for _ in 0..n {
            r = match &sess.graph {
                Some(g) => g.launch().map_err(GpuError::from),
                None => self.run(&mut sess.ws, true),
            };
            if r.is_err() {
                break;
            }
        }
        self.sessions.insert(batch, sess);
        r
    }

    /// Tokens generated so far by the decode session of `batch`: for each sequence, those at
    /// positions `from..to` (synchronises).
    pub fn decode_tokens(
        &self,
        batch: usize,
        from: usize,
        to: usize,
    ) -> Result<Vec<Vec<u32>>, GpuError> {
        let sess = self
            .sessions
            .get(&batch)
            .ok_or_else(|| GpuError::Unsupported(format!("no decode session for batch {batch}")))?;
        let ws = &sess.ws;
        let hist = self
            .gpu
            .ctx
            .stream()
            .clone_dtoh(&ws.hist)
            .map_err(drv("read tokens"))?;
        let to = to.min(ws.hist_cap);
        Ok((0..batch)
            .map(|b| {
                (from.min(to)..to)
                    .map(|p| hist[b * ws.hist_cap + p].max(0) as u32)
                    .collect()
            })
            .collect())
    }

    /// How decode steps pick the next token from now on, drawn on the device inside the decode
    /// step: greedy (`temperature` 0), a sample of `softmax(logits / temperature)` (Gumbel-max
    /// with noise hashed from `seed`, the sequence's row and its position: the same seed gives
    /// the same tokens), and with `top_p < 1` (and a temperature) the same over the nucleus
    /// only: the tokens whose logits reach the top-p threshold of
    /// `generate::nucleus` (ties at the boundary all in; Gumbel-max over the nucleus samples
    /// the renormalised nucleus distribution exactly).
    ///
    /// Switching nucleus sampling on or off changes the decode step: the next `decode_start`
    /// captures the graph again (a `decode_steps` before it is refused). Changing only the
    /// temperature, top_p or seed within a mode keeps the graph (they are read from a device
    /// buffer).
    pub fn set_sampling(
        &mut self,
        temperature: f32,
        top_p: f32,
        seed: u64,
    ) -> Result<(), GpuError> {
        crate::generate::check_sampling(temperature, top_p).map_err(GpuError::Unsupported)?;
        let nucleus = temperature > 0.0 && top_p < 1.0;
        if nucleus && self.config.vocab_size > nucleus::MAX_VOCAB {
            return Err(GpuError::Unsupported(format!(
                "nucleus sampling over a vocabulary of {} (at most {})",
                self.config.vocab_size,
                nucleus::MAX_VOCAB
            )));
        }
        let words = super::ops::sampling_words(temperature, top_p, seed);
        self.gpu
            .ctx
            .stream()
            .memcpy_htod(&words, &mut self.samp)
            .map_err(drv("upload sampling parameters"))?;
        self.nucleus = nucleus;
        Ok(())
    }

    /// Logits of the last decode step of `batch`, `[batch, vocab]` (synchronises).
    pub fn decode_logits(&self, batch: usize) -> Result<Vec<f32>, GpuError> {
        let sess = self
            .sessions
            .get(&batch)
            .ok_or_else(|| GpuError::Unsupported(format!("no decode session for batch {batch}")))?;
        let l = self
            .gpu
            .ctx
            .stream()
            .clone_dtoh(&sess.ws.logits)
            .map_err(drv("read logits"))?;
        Ok(l.iter().map(|v| v.to_f32()).collect())
    }

    /// Token ids outside the vocabulary seen by the embedding kernel so far (synchronises).
    pub fn bad_token_count(&self) -> Result<i32, GpuError> {
        let mut n = 0;
        let s = self.gpu.ctx.stream();
        for ws in self
            .workspaces
            .values()
            .chain(self.sessions.values().map(|x| &x.ws))
        {
            n += s.clone_dtoh(&ws.bad).map_err(drv("read status"))?[0];
        }
        Ok(n)
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.gpu.ctx.synchronize().map_err(GpuError::from)
    }

    /// Replaces the lm_head (benchmarks); captured graphs are dropped.
    pub(crate) fn set_lm_head(&mut self, head: Option<GpuLinear>) {
        self.sessions.clear();
        self.workspaces.clear();
        self.lm_head = head;
    }

    /// Records an event after an op while an eager step is profiled.
    fn mark(&self, name: &'static str) -> Result<(), GpuError> {
        if let Some(v) = self.prof.borrow_mut().as_mut() {
            // Timing events (cudarc's default disables timing).
            let e = self
                .gpu
                .ctx
                .context()
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("create event"))?;
            e.record(self.gpu.ctx.stream())
                .map_err(drv("record event"))?;
            v.push((name, e));
        }
        Ok(())
    }

    /// Runs one decode step of `batch` eagerly with an event after every op and returns the
    /// milliseconds spent per op kind (summed over layers; includes the host launch gaps of
    /// eager execution, which the graph removes). Advances the session by one token.
    pub fn profile_decode_step(&mut self, batch: usize) -> Result<Vec<(String, f64)>, GpuError> {
        let cap = self.cache.as_ref().map_or(0, |c| c.capacity);
        let mut sess = self
            .sessions
            .remove(&batch)
            .ok_or_else(|| GpuError::Unsupported(format!("no decode session for batch {batch}")))?;
        if sess.next_pos + 1 > cap {
            self.sessions.insert(batch, sess);
            return Err(GpuError::Unsupported(
                "no room in the cache to profile a step".into(),
            ));
        }
        sess.next_pos += 1;
        *self.prof.borrow_mut() = Some(Vec::new());
        let r = self.run(&mut sess.ws, true);
        let events = self.prof.borrow_mut().take().unwrap_or_default();
        self.sessions.insert(batch, sess);
        r?;
        self.synchronize()?;
        let mut out: Vec<(String, f64)> = Vec::new();
        for w in events.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1).map_err(drv("event time"))? as f64;
            match out.iter_mut().find(|(n, _)| n == w[1].0) {
                Some(e) => e.1 += ms,
                None => out.push((w[1].0.to_string(), ms)),
            }
        }
        Ok(out)
    }
}

/// Checks a forward pass's input on the host.
pub(crate) fn check_tokens(tokens: &[u32], vocab: usize) -> Result<(), ForwardError> {
    if tokens.is_empty() {
        return Err(ForwardError::Empty);
    }
    for (i, &t) in tokens.iter().enumerate() {
        if t as usize >= vocab {
            return Err(ForwardError::TokenOutOfRange {
                token: t,
                index: i,
                vocab,
            });
        }
    }
    Ok(())
}

/// The GPU model as an evaluation backend (`mimo-run ppl/compare --device cuda`): each window is
/// one prefill over a fresh cache of one sequence, every row's logits read back.
impl crate::eval::WindowModel for GpuModel {
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.config.max_position_embeddings.min(MAX_CONTEXT)
    }

    fn window_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, crate::eval::EvalError> {
        let boxed = |e: GpuError| crate::eval::EvalError::Backend(Box::new(e));
        let fits = matches!(self.cache_dims(), Ok((s, cap)) if s >= 1 && cap >= tokens.len());
        if !fits {
            self.alloc_cache(1, tokens.len()).map_err(boxed)?;
        }
        self.forward(tokens, 0, 0, true).map_err(boxed)
    }
}
