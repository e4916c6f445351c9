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
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaSlice};
use half::bf16;
use mimo_kernels::cuda::{
    moe_bf16_grouped, moe_bf16_pairs, moe_bf16_pairs_supported, moe_layer, GpuFp4Weight,
    MoeWeights, MoeWorkspace, NormOut, PdlGraph,
};
use mimo_kernels::Fp4Matrix;

use super::error::{drv, GpuError};
use super::ops::TopPBufs;
use super::ops::{
    AttnArgs, RouterIn, Rows, ARGMAX_CHUNK, MAX_CONTEXT, MAX_EXPERTS, MAX_FUSED_ROUTER_HIDDEN,
    MAX_HEAD_DIM, SPLIT_LEN,
};
use super::weights::{linear_to_bf16, Gpu, GpuLinear};
use crate::arch::Names;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cpu::Rope;
use crate::generate::nucleus;
use crate::linear::{Linear, Weight};
use crate::model::{ForwardError, Site};
use crate::weights::Loader;

mod fold;
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

pub(crate) enum Qkv {
    Fused(GpuLinear),
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

enum QkvBufs {
    Fused(CudaSlice<bf16>),
    Split(CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<bf16>),
}

struct MoeBufs {
    logits: CudaSlice<f32>,
    counters: CudaSlice<i32>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    fp4: Option<MoeWorkspace>,
    pair_gu: Option<CudaSlice<bf16>>,
    pair_dn: Option<CudaSlice<bf16>>,
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
    /// Whether the layers can fold their norms at batch 1 (fold.rs).
    fold: bool,
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
        let fold = fold::fold_capable(&layers, gpu.ctx.sm_count());
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

    /// Loads a checkpoint folder onto the GPU.
    pub fn load(gpu: Arc<Gpu>, dir: &Path) -> Result<GpuModel, GpuError> {
        let ck = Checkpoint::open(dir).map_err(crate::weights::LoadError::from)?;
        GpuModel::from_checkpoint(gpu, &ck)
    }

    /// Loads an opened checkpoint onto the GPU, refusing before any upload if the weights and
    /// the prefill scratch do not fit in the free device memory.
    pub fn from_checkpoint(gpu: Arc<Gpu>, ck: &Checkpoint) -> Result<GpuModel, GpuError> {
        let c = ModelConfig::from_json(ck.config(), &ck.root().join("config.json"))?;
        check_config(&c)?;
        let names = Names::new(c.arch);
        let ld = Loader::new(ck)?;
        let fp4 = ld.layout.map(|l| l.format());
        let need = super::estimate::weight_bytes(&c, fp4, fp4.is_some())
            + super::estimate::prefill_scratch_bytes(&c, fp4, fp4.is_some(), gpu.has_fp8())
            + if gpu.has_fp8() && gpu.ctx.tuning().fp8_resident {
                super::estimate::resident_fp8_bytes(&c, fp4, fp4.is_some())
            } else {
                0
            };
        super::estimate::check_fits(&gpu, &format!("{}", ck.root().display()), need)?;
        let (hd, d) = (c.hidden_size, c.head_dim);
        let embed_l = ld.linear(&names.embed(), c.vocab_size, hd, false)?;
        let embed = gpu.upload(&linear_to_bf16(&embed_l), "upload embedding")?;
        drop(embed_l);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let l = ld.linear(&names.lm_head(), c.vocab_size, hd, false)?;
            Some(GpuLinear::upload(&gpu, "lm_head", &l)?)
        };
        let final_norm = gpu.upload(&ld.vector(&names.final_norm(), hd)?, "upload norm")?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let att = |p: &str| names.attn(l, p);
            let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
            let q = ld.linear(&att("q_proj"), qn, hd, c.qkv_bias)?;
            let k = ld.linear(&att("k_proj"), kvn, hd, c.qkv_bias)?;
            let v = ld.linear(&att("v_proj"), kvn, hd, c.qkv_bias)?;
            let o = ld.linear(&att("o_proj"), hd, qn, c.o_bias)?;
            let qkv = match GpuLinear::fuse(&gpu, &att("qkv"), &[&q, &k, &v], false)? {
                Some(f) => Qkv::Fused(f),
                None => Qkv::Split(
                    single(&gpu, &att("q_proj"), &q, false)?,
                    single(&gpu, &att("k_proj"), &k, false)?,
                    single(&gpu, &att("v_proj"), &v, false)?,
                ),
            };
            let up_bias = |lin: &Linear| -> Result<Option<CudaSlice<f32>>, GpuError> {
                lin.bias
                    .as_ref()
                    .map(|b| gpu.upload(b, "upload bias"))
                    .transpose()
            };
            let biases = [up_bias(&q)?, up_bias(&k)?, up_bias(&v)?];
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(gpu.upload(
                        &ld.vector(&format!("{}.weight", att("q_norm")), d)?,
                        "upload q_norm",
                    )?),
                    Some(gpu.upload(
                        &ld.vector(&format!("{}.weight", att("k_norm")), d)?,
                        "upload k_norm",
                    )?),
                )
            } else {
                (None, None)
            };
            let ffn = if c.moe_layers[l] {
                let mc = c.moe.clone().ok_or_else(|| {
                    GpuError::Unsupported(format!("layer {l}: MoE layer without MoE parameters"))
                })?;
                let ei = mc.expert_intermediate_size;
                let mut experts = Vec::with_capacity(mc.num_experts);
                for e in 0..mc.num_experts {
                    let [g, u, dn] = names.expert(l, e);
                    experts.push([
                        ld.linear(&g, ei, hd, false)?,
                        ld.linear(&u, ei, hd, false)?,
                        ld.linear(&dn, hd, ei, false)?,
                    ]);
                }
                let experts = upload_experts(&gpu, &format!("layer {l} experts"), &experts)?;
                let shared = match mc.shared_expert_intermediate_size {
                    Some(si) => {
                        let [g, u, dn] = names.shared_expert(l);
                        let (g, u, dn) = (
                            ld.linear(&g, si, hd, false)?,
                            ld.linear(&u, si, hd, false)?,
                            ld.linear(&dn, hd, si, false)?,
                        );
                        let gate = ld.linear(&names.shared_expert_gate(l), 1, hd, false)?;
                        Some((
                            mlp(&gpu, &format!("layer {l} shared expert"), &g, &u, &dn, si)?,
                            GpuLinear::Bf16 {
                                w: gpu.upload(&linear_to_bf16(&gate), "upload shared gate")?,
                                n: 1,
                                k: hd,
                                bias: None,
                            },
                        ))
                    }
                    None => None,
                };
                let router = ld.linear(&names.router(l), mc.num_experts, hd, false)?;
                Ffn::Moe(Moe {
                    router: gpu.upload(&linear_to_bf16(&router), "upload router")?,
                    experts,
                    shared,
                    n_experts: mc.num_experts,
                    top_k: mc.top_k,
                    renorm: mc.norm_topk_prob,
                    inter: ei,
                })
            } else {
                let [g, u, dn] = names.mlp(l);
                let i = c.intermediate_size;
                let (g, u, dn) = (
                    ld.linear(&g, i, hd, c.mlp_bias)?,
                    ld.linear(&u, i, hd, c.mlp_bias)?,
                    ld.linear(&dn, hd, i, c.mlp_bias)?,
                );
                Ffn::Dense(mlp(&gpu, &format!("layer {l} mlp"), &g, &u, &dn, i)?)
            };
            layers.push(Layer {
                in_norm: gpu.upload(&ld.vector(&names.input_norm(l), hd)?, "upload norm")?,
                post_norm: gpu.upload(
                    &ld.vector(&names.post_attention_norm(l), hd)?,
                    "upload norm",
                )?,
                qkv,
                biases,
                q_norm,
                k_norm,
                o: GpuLinear::upload(&gpu, &att("o_proj"), &o)?,
                window: c.sliding_window[l].unwrap_or(0),
                ffn,
            });
        }
        GpuModel::assemble(c, gpu, embed, lm_head, final_norm, layers)
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
        let cap = self.cache.as_ref().map_or(1, |k| k.capacity);
        let splits = cap.div_ceil(SPLIT_LEN);
        let qkv = match self.layers.first().map(|l| &l.qkv) {
            Some(Qkv::Split(..)) => QkvBufs::Split(
                zeros(g, m * h * d)?,
                zeros(g, m * kv * d)?,
                zeros(g, m * kv * d)?,
            ),
            _ => QkvBufs::Fused(zeros(g, m * (h + 2 * kv) * d)?),
        };
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
                let (fp4, pair_gu, pair_dn) = match &moe.experts {
                    Experts::Fp4(w) => (
                        Some(MoeWorkspace::new(&g.ctx, w, m, moe.top_k)?),
                        None,
                        None,
                    ),
                    Experts::Bf16 { .. } => (
                        None,
                        Some(zeros(g, p * 2 * moe.inter)?),
                        Some(zeros(g, p * hd)?),
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
            part_ml: zeros(g, m * h * splits * 2)?,
            part_o: zeros(g, m * h * splits * d)?,
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

    /// Queues decoder layer `li` over the rows of `ws`, whose normalized input is in `ws.h`
    /// (the residual stream in `ws.x`); returns what the residual stream still has to add.
    /// `tap` (calibration, never inside a graph) sees every Linear's input: read back for a host
    /// observer, or summed on the device.
    fn layer_pass(
        &self,
        ws: &mut Ws,
        li: usize,
        decode: bool,
        mut tap: Option<&mut walk::Tap<'_>>,
    ) -> Result<Pend, GpuError> {
        let c = &self.config;
        let gpu = &*self.gpu;
        let g = &gpu.ctx;
        let ops = &gpu.ops;
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| GpuError::Unsupported("no KV cache allocated".into()))?;
        let (hd, d, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let m = ws.m;
        let eps = c.rms_norm_eps as f32;
        let splits = cache.capacity.div_ceil(SPLIT_LEN);
        let layer = &self.layers[li];
        if let Some(t) = tap.as_deref_mut() {
            t.site(self, Site::Qkv(li), &ws.h, m, hd)?;
        }
        // Attention. Folded norms: after the first layer the input is the previous down
        // projection's unnormalised row, scaled here.
        let fold = tap.is_none() && self.folds(m);
        let fold_in = match li.checked_sub(1).map(|p| &self.layers[p].ffn) {
            Some(Ffn::Dense(prev)) if fold => Some(self.fold_input(&ws.fold_parts, &prev.down)?),
            _ => None,
        };
        match (&layer.qkv, &mut ws.qkv, fold_in) {
            _ if !self.runs(Stage::Qkv) => {}
            (Qkv::Fused(l), QkvBufs::Fused(buf), Some(input)) => {
                l.forward_norm_in(gpu, &ws.h, input, buf)?
            }
            (Qkv::Split(lq, lk, lv), QkvBufs::Split(bq, bk, bv), Some(input)) => {
                lq.forward_norm_in(gpu, &ws.h, input, bq)?;
                lk.forward_norm_in(gpu, &ws.h, input, bk)?;
                lv.forward_norm_in(gpu, &ws.h, input, bv)?;
            }
            (Qkv::Fused(l), QkvBufs::Fused(buf), None) => l.forward(gpu, &ws.h, m, buf)?,
            (Qkv::Split(lq, lk, lv), QkvBufs::Split(bq, bk, bv), None) => {
                lq.forward(gpu, &ws.h, m, bq)?;
                lk.forward(gpu, &ws.h, m, bk)?;
                lv.forward(gpu, &ws.h, m, bv)?;
            }
            _ => {
                return Err(GpuError::Unsupported(
                    "mixed fused/split q,k,v layers".into(),
                ))
            }
        }
        let a = AttnArgs {
            n_heads: nh as i32,
            n_kv: nkv as i32,
            d: d as i32,
            rot_dim: self.rot_dim as i32,
            capacity: cache.capacity as i32,
            layers: self.layers.len() as i32,
            layer: li as i32,
            window: layer.window as i32,
            split_len: SPLIT_LEN as i32,
            max_splits: splits as i32,
            fused_new: i32::from(decode),
            eps,
            attn_factor: self.attn_factor,
            scale: 1.0 / (d as f32).sqrt(),
        };
        self.mark("qkv")?;
        let w = ((nh + 2 * nkv) * d) as i32;
        let (q, k, v) = match &ws.qkv {
            QkvBufs::Fused(b) => (
                Rows {
                    buf: b,
                    off: 0,
                    stride: w,
                },
                Rows {
                    buf: b,
                    off: (nh * d) as i32,
                    stride: w,
                },
                Rows {
                    buf: b,
                    off: ((nh + nkv) * d) as i32,
                    stride: w,
                },
            ),
            QkvBufs::Split(bq, bk, bv) => (
                Rows {
                    buf: bq,
                    off: 0,
                    stride: (nh * d) as i32,
                },
                Rows {
                    buf: bk,
                    off: 0,
                    stride: (nkv * d) as i32,
                },
                Rows {
                    buf: bv,
                    off: 0,
                    stride: (nkv * d) as i32,
                },
            ),
        };
        let [qb, kb, vb] = &layer.biases;
        if !decode {
            ops.kv_write(
                g,
                &k,
                &v,
                kb.as_ref(),
                vb.as_ref(),
                layer.k_norm.as_ref(),
                &self.inv_freq,
                &ws.pos,
                &ws.seq,
                &cache.k,
                &cache.v,
                a,
                m,
            )?;
            self.mark("kv_write")?;
        }
        if self.runs(Stage::Attention) {
            ops.attention(
                g,
                &q,
                &k,
                &v,
                [qb.as_ref(), kb.as_ref(), vb.as_ref()],
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                &self.inv_freq,
                &ws.pos,
                &ws.seq,
                &cache.k,
                &cache.v,
                &mut ws.part_ml,
                &mut ws.part_o,
                &mut ws.attn_cnt,
                &mut ws.attn,
                a,
                m,
            )?;
        }
        self.mark("attention")?;
        if let Some(t) = tap.as_deref_mut() {
            t.site(self, Site::O(li), &ws.attn, m, nh * d)?;
        }
        // MoE layers without a shared expert: the post-attention add + RMSNorm runs inside
        // the router kernel, and the attention output waits in attn_delta for the next norm.
        let fuse = tap.is_none()
            && gpu.ctx.tuning().norm_router
            && hd <= MAX_FUSED_ROUTER_HIDDEN
            && matches!(&layer.ffn, Ffn::Moe(moe) if moe.shared.is_none());
        if self.runs(Stage::OProj) {
            if fold {
                let out = NormOut {
                    resid: &mut ws.x,
                    weight: &layer.post_norm,
                    h: &mut ws.h,
                    parts: &mut ws.fold_parts,
                };
                layer.o.forward_norm_out(gpu, &ws.attn, out)?;
            } else {
                let o_out = if fuse {
                    &mut ws.attn_delta
                } else {
                    &mut ws.delta
                };
                layer.o.forward(gpu, &ws.attn, m, o_out)?;
            }
        }
        self.mark("o_proj")?;
        if !fuse && !fold {
            if self.runs(Stage::PostNorm) {
                self.add_norm(
                    ws,
                    Pend {
                        delta: true,
                        ..Pend::default()
                    },
                    &layer.post_norm,
                    false,
                )?;
            }
            self.mark("norm")?;
        }
        // Feed-forward.
        let pend = match &layer.ffn {
            _ if !self.runs(Stage::Ffn) => Pend::default(),
            Ffn::Dense(mlp) if fold => {
                let bufs = ws
                    .dense
                    .as_mut()
                    .ok_or_else(|| GpuError::Unsupported("dense buffers".into()))?;
                let GateUp::Fused(gu) = &mlp.gate_up else {
                    return Err(GpuError::Unsupported("folded norm: split gate/up".into()));
                };
                let input = self.fold_input(&ws.fold_parts, &layer.o)?;
                gu.forward_swiglu_norm_in(gpu, &ws.h, input, &mut bufs.act)?;
                self.mark("mlp")?;
                // The down projection folds the next layer's input norm; the last layer's
                // output goes to the final norm as usual.
                match self.layers.get(li + 1) {
                    Some(next) => {
                        let out = NormOut {
                            resid: &mut ws.x,
                            weight: &next.in_norm,
                            h: &mut ws.h,
                            parts: &mut ws.fold_parts,
                        };
                        mlp.down.forward_norm_out(gpu, &bufs.act, out)?;
                        Pend::default()
                    }
                    None => {
                        mlp.down.forward(gpu, &bufs.act, m, &mut ws.delta)?;
                        Pend {
                            delta: true,
                            ..Pend::default()
                        }
                    }
                }
            }
            Ffn::Dense(mlp) => {
                let bufs = ws
                    .dense
                    .as_mut()
                    .ok_or_else(|| GpuError::Unsupported("dense buffers".into()))?;
                mlp.forward(gpu, &ws.h, m, bufs, &mut ws.delta)?;
                self.mark("mlp")?;
                if let Some(t) = tap.as_deref_mut() {
                    t.site(self, Site::GateUp(li), &ws.h, m, hd)?;
                    t.site(self, Site::Down(li), &bufs.act, m, mlp.inter)?;
                }
                Pend {
                    delta: true,
                    ..Pend::default()
                }
            }
            Ffn::Moe(moe) => {
                let mb = ws
                    .moe
                    .as_mut()
                    .ok_or_else(|| GpuError::Unsupported("MoE buffers".into()))?;
                let input = if fuse {
                    RouterIn::Fused {
                        x: &ws.x,
                        d1: Some(&ws.attn_delta),
                        norm: &layer.post_norm,
                        eps,
                        h: &mut ws.h,
                    }
                } else {
                    RouterIn::Rows(&ws.h)
                };
                if self.runs(Stage::Router) {
                    ops.router_topk(
                        g,
                        input,
                        &moe.router,
                        &mut mb.logits,
                        &mut mb.counters,
                        &mut mb.ids,
                        &mut mb.weights,
                        m,
                        hd,
                        moe.n_experts,
                        moe.top_k,
                        moe.renorm,
                    )?;
                }
                self.mark("router")?;
                if let Some(t) = tap.as_deref_mut() {
                    t.site(self, Site::MoeInput(li), &ws.h, m, hd)?;
                }
                let p = m * moe.top_k;
                let mut out = Pend {
                    attn: fuse,
                    ..Pend::default()
                };
                match (&moe.experts, &mut mb.fp4, &mut mb.pair_gu, &mut mb.pair_dn) {
                    (Experts::Fp4(w), Some(fws), _, _) => {
                        if tap.is_some() {
                            return Err(GpuError::Unsupported(
                                "observing FP4 experts (calibration needs a BF16 model)".into(),
                            ));
                        }
                        moe_layer(
                            g,
                            w,
                            &ws.h,
                            &mb.ids,
                            &mb.weights,
                            m,
                            moe.top_k,
                            fws,
                            &mut ws.delta,
                        )?;
                        self.mark("experts")?;
                        out.delta = true;
                    }
                    (Experts::Bf16 { gate_up, down }, _, Some(pgu), Some(pdn)) => {
                        // One token: every pair has its own expert, so one pass per pair
                        // (moe_bf16_pairs); else the grouped kernel, which reads each expert
                        // once for all its pairs.
                        let direct = m == 1
                            && g.tuning().moe_direct
                            && moe_bf16_pairs_supported(2 * moe.inter, hd, false)
                            && moe_bf16_pairs_supported(hd, moe.inter, true);
                        let ids = &mb.ids;
                        let experts = |w: &CudaSlice<bf16>,
                                       x: &CudaSlice<bf16>,
                                       y: &mut CudaSlice<bf16>,
                                       (n, k, in_div, swiglu): (usize, usize, usize, bool)|
                         -> Result<(), GpuError> {
                            if direct {
                                moe_bf16_pairs(
                                    g,
                                    w,
                                    x,
                                    y,
                                    n,
                                    k,
                                    ids,
                                    p,
                                    moe.n_experts,
                                    in_div,
                                    swiglu,
                                )?;
                                Ok(())
                            } else {
                                moe_bf16_grouped(
                                    g,
                                    w,
                                    x,
                                    y,
                                    n,
                                    k,
                                    ids,
                                    p,
                                    moe.n_experts,
                                    in_div,
                                    swiglu,
                                )?;
                                Ok(())
                            }
                        };
                        experts(gate_up, &ws.h, pgu, (2 * moe.inter, hd, moe.top_k, false))?;
                        self.mark("experts")?;
                        experts(down, pgu, pdn, (hd, moe.inter, 1, true))?;
                        self.mark("experts")?;
                        out.pairs = true;
                        if let Some(t) = tap.as_deref_mut() {
                            t.experts(self, li, moe, &ws.h, &mb.ids, pgu, m)?;
                        }
                    }
                    _ => return Err(GpuError::Unsupported("MoE buffers".into())),
                }
                if let (Some((mlp, gate)), Some((sb, sout, sgate))) = (&moe.shared, &mut mb.shared)
                {
                    mlp.forward(gpu, &ws.h, m, sb, sout)?;
                    self.mark("shared_expert")?;
                    if let Some(t) = tap {
                        t.site(self, Site::SharedGateUp(li), &ws.h, m, hd)?;
                        t.site(self, Site::SharedDown(li), &sb.act, m, mlp.inter)?;
                    }
                    gate.forward(gpu, &ws.h, m, sgate)?;
                    self.mark("shared_expert")?;
                    out.shared = true;
                }
                out
            }
        };
        Ok(pend)
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

    /// Adds what is pending to the residual stream and normalises it into `ws.h` (or, for the
    /// final norm, the last `rows_out` rows into `ws.head_in`).
    fn add_norm(
        &self,
        ws: &mut Ws,
        pend: Pend,
        w: &CudaSlice<f32>,
        last: bool,
    ) -> Result<(), GpuError> {
        let c = &self.config;
        let gpu = &*self.gpu;
        let m = ws.m;
        let moe = ws.moe.as_ref();
        let top_k_e = self.layers.iter().find_map(|l| match &l.ffn {
            Ffn::Moe(moe) => Some((moe.top_k, moe.n_experts)),
            Ffn::Dense(_) => None,
        });
        let pairs = match (pend.pairs, moe, top_k_e) {
            (true, Some(mb), Some((k, e))) => mb
                .pair_dn
                .as_ref()
                .map(|pdn| (pdn, &mb.weights, &mb.ids, k, e)),
            _ => None,
        };
        let (d2, g2) = match (pend.shared, moe.and_then(|mb| mb.shared.as_ref())) {
            (true, Some((_, sout, sgate))) => (Some(sout), Some(sgate)),
            _ => (None, None),
        };
        // A fused norm + router layer (never one with a shared expert) leaves its attention
        // output pending: it goes first (d1), the FFN output second (d2, gate 1), the order in
        // which the unfused path adds them.
        let (d1, d2, g2) = if pend.attn {
            (Some(&ws.attn_delta), pend.delta.then_some(&ws.delta), None)
        } else {
            (pend.delta.then_some(&ws.delta), d2, g2)
        };
        let (out, row_begin) = if last {
            (&mut ws.head_in, m - ws.rows_out)
        } else {
            (&mut ws.h, 0)
        };
        gpu.ops.add_rmsnorm(
            &gpu.ctx,
            &mut ws.x,
            d1,
            pairs,
            d2,
            g2,
            w,
            out,
            m,
            c.hidden_size,
            c.rms_norm_eps as f32,
            row_begin,
        )
    }
}

/// One Linear uploaded alone (biases optional).
fn single(gpu: &Gpu, name: &str, l: &Linear, with_bias: bool) -> Result<GpuLinear, GpuError> {
    GpuLinear::fuse(gpu, name, &[l], with_bias)?
        .ok_or_else(|| GpuError::Unsupported(format!("{name}: cannot upload")))
}

fn mlp(
    gpu: &Gpu,
    name: &str,
    g: &Linear,
    u: &Linear,
    d: &Linear,
    inter: usize,
) -> Result<Mlp, GpuError> {
    let gate_up = match GpuLinear::fuse(gpu, name, &[g, u], true)? {
        Some(f) => GateUp::Fused(f),
        None => GateUp::Split(single(gpu, name, g, true)?, single(gpu, name, u, true)?),
    };
    Ok(Mlp {
        gate_up,
        down: single(gpu, name, d, true)?,
        inter,
    })
}

/// Stacks the experts of one layer: FP4 where every expert's gate and up share a format and a
/// global scale (so that one matrix holds both), BF16 otherwise (FP4 dequantized).
fn upload_experts(gpu: &Gpu, name: &str, experts: &[[Linear; 3]]) -> Result<Experts, GpuError> {
    let fp4: Option<Vec<(Fp4Matrix, &Fp4Matrix)>> = experts
        .iter()
        .map(|[g, u, d]| match (&g.weight, &u.weight, &d.weight) {
            (Weight::Fp4(g), Weight::Fp4(u), Weight::Fp4(d))
                if g.format == u.format && g.global_scale == u.global_scale =>
            {
                Some((
                    Fp4Matrix {
                        format: g.format,
                        n: g.n + u.n,
                        k: g.k,
                        packed: [g.packed.as_slice(), u.packed.as_slice()].concat(),
                        scales: [g.scales.as_slice(), u.scales.as_slice()].concat(),
                        global_scale: g.global_scale,
                    },
                    d,
                ))
            }
            _ => None,
        })
        .collect();
    if let Some(v) = fp4 {
        let gu: Vec<Fp4Matrix> = v.iter().map(|p| p.0.clone()).collect();
        let dn: Vec<Fp4Matrix> = v.iter().map(|p| p.1.clone()).collect();
        let w = MoeWeights {
            gate_up: GpuFp4Weight::upload_experts(&gpu.ctx, &format!("{name} gate_up"), &gu)?,
            down: GpuFp4Weight::upload_experts(&gpu.ctx, &format!("{name} down"), &dn)?,
        };
        w.dims()?;
        return Ok(Experts::Fp4(w));
    }
    let mut gu: Vec<bf16> = Vec::new();
    let mut dn: Vec<bf16> = Vec::new();
    for [g, u, d] in experts {
        gu.extend(linear_to_bf16(g));
        gu.extend(linear_to_bf16(u));
        dn.extend(linear_to_bf16(d));
    }
    Ok(Experts::Bf16 {
        gate_up: gpu.upload(&gu, "upload experts")?,
        down: gpu.upload(&dn, "upload experts")?,
    })
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
