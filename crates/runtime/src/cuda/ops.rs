//! The runtime's own kernels (crates/runtime/cuda/ops.cu: embedding, residual + RMSNorm, SwiGLU,
//! router top-k, calibration sums, sampling (greedy, temperature, nucleus), random fills;
//! crates/runtime/cuda/attention.cu: decode and prefill attention) and their launchers. Every
//! launcher only queues work on the context's stream.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use half::bf16;
use mimo_kernels::cuda::{
    arg_or_null, load_source, on_load, GpuContext, L2Ranges, Tuning, NULL_PTR,
};

use super::error::{drv, GpuError};
use crate::generate::nucleus::{KEYS, MAX_VOCAB};

/// The embedded kernel source: ops.cu, then attention.cu (one NVRTC program; the attention
/// kernels use ops.cu's reductions and short names).
pub const OPS_SRC: (&str, &str) = (
    "ops.cu",
    concat!(
        include_str!("../../cuda/ops.cu"),
        "\n",
        include_str!("../../cuda/attention.cu")
    ),
);

/// Keys per attention split (flash-decoding): a block scores at most this many keys.
pub const SPLIT_LEN: usize = 64;
/// Threads of an attention block; RoPE uses one thread per rotated pair, so head_dim <= 256.
pub const ATTN_THREADS: u32 = 128;
/// Longest context the attention kernels take: their split combine keeps one factor per split
/// in shared memory, 8 per thread of a block (and `attention_w`'s 1024-float scratch).
pub const MAX_CONTEXT: usize = SPLIT_LEN * 8 * ATTN_THREADS as usize;
/// Largest head dimension the attention kernel takes.
pub const MAX_HEAD_DIM: usize = 256;
/// Most experts the router and the BF16 expert kernel take (shared-memory tables).
pub const MAX_EXPERTS: usize = 1024;
/// Logits per argmax block.
pub const ARGMAX_CHUNK: usize = 4096;
/// Keys per `topp_threshold` block (`TOPP_SPAN` in ops.cu).
const TOPP_SPAN: usize = 1024;

/// Whether prefill attention runs on the tensor-core kernel (`attention_prefill_d64/_d128`),
/// which needs no split partials: head_dim 64 or 128 with `Tuning::prefill_attention_mma`.
pub fn prefill_attention_on_mma(t: Tuning, d: usize) -> bool {
    t.prefill_attention_mma && (d == 64 || d == 128)
}

/// Whether a decode step of `m` tokens runs the grouped tensor-core attention kernel
/// (`attention_gqa_*` in attention.cu): several tokens with at least [`GQA_MIN_PAIRS`] (token, KV
/// head) pairs (one token keeps the latency-tuned warp kernel, a few the per-head kernel with
/// its many more blocks), head_dim 64 or 128, at most 16 query heads per KV head.
pub fn gqa_applies(t: Tuning, m: usize, n_kv: usize, d: usize, group: usize) -> bool {
    t.gqa_attention
        && m >= 2
        && m * n_kv >= GQA_MIN_PAIRS
        && (d == 64 || d == 128)
        && (1..=16).contains(&group)
}

/// Fewest (token, KV head) pairs of a decode step for the grouped attention kernel. H100,
/// Qwen3-30B-A3B NVFP4 (4 KV heads) after a 512-token prompt: batch 2 (8 pairs) 498 vs 526
/// tokens/s with the per-head kernel, batch 4 (16 pairs) 803 vs 779.
pub const GQA_MIN_PAIRS: usize = 16;

/// Keys per split of a decode step's attention. The grouped kernel takes longer splits as the
/// batch's (token, KV head) pairs fill the GPU by themselves (fewer partial results to
/// combine, fewer blocks in the chain): 64 keys below 32 pairs, 128 below 64, 256 below 128,
/// else 512 (`Tuning::gqa_split` overrides); the other kernels take [`SPLIT_LEN`]. H100,
/// NVFP4, after a 512-token prompt (tokens/s at 64 / 128 / 256 / 512 keys; 64 and 128 before
/// the next chunk's loads overlapped the current one's products): Qwen3-30B-A3B (4 KV heads)
/// batch 8 1,156 / 1,252 / 1,231 / 1,187, batch 32 2,368 / 2,568 / 2,678 / 2,769; MiMo-7B
/// (8 KV heads) batch 8 2,110 / 2,245 / 2,442 / 2,313, batch 32 3,470 / 3,892 / 4,094 / 4,188.
pub fn decode_split_len(t: Tuning, m: usize, n_kv: usize, d: usize, group: usize) -> usize {
    if !gqa_applies(t, m, n_kv, d, group) {
        return SPLIT_LEN;
    }
    if t.gqa_split != 0 {
        return (t.gqa_split as usize).next_multiple_of(64);
    }
    match m * n_kv {
        0..=31 => 64,
        32..=63 => 128,
        64..=127 => 256,
        _ => 512,
    }
}

/// Scalar arguments of the attention kernels (mirrors `AttnArgs` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    pub n_heads: i32,
    pub n_kv: i32,
    pub d: i32,
    pub rot_dim: i32,
    pub capacity: i32,
    pub layers: i32,
    pub layer: i32,
    pub window: i32,
    pub split_len: i32,
    pub max_splits: i32,
    pub fused_new: i32,
    pub eps: f32,
    pub attn_factor: f32,
    pub scale: f32,
}

// SAFETY: plain-old-data, #[repr(C)], the same field order and types as the CUDA struct.
unsafe impl DeviceRepr for AttnArgs {}

/// A head-major activation buffer: element (t, i) of a view at `ptr[t * stride + off + i]`.
pub struct Rows<'a> {
    pub buf: &'a CudaSlice<bf16>,
    pub off: i32,
    pub stride: i32,
}

/// MoE pairs to combine: per-pair outputs `[m * top_k, hidden]`, their weights and expert ids
/// (`[m * top_k]`), top_k, number of experts.
pub type PairsArg<'a> = (
    &'a CudaSlice<bf16>,
    &'a CudaSlice<f32>,
    &'a CudaSlice<i32>,
    usize,
    usize,
);

/// Largest hidden size of the fused residual + RMSNorm + router kernel (its row sits in 48 KiB
/// of shared memory next to the 4 KiB probability table).
pub const MAX_FUSED_ROUTER_HIDDEN: usize = 10240;

/// The router's input: rows already normalized, or (fused) the residual stream and the
/// attention output, normalized inside the router kernel, which also stores the rows in `h`.
pub enum RouterIn<'a> {
    /// `[m, hidden]` bf16 rows.
    Rows(&'a CudaSlice<bf16>),
    /// Residual `x` `[m, hidden]` f32 plus `d1` (bf16, optional), RMSNorm weight `norm`.
    Fused {
        /// residual stream (read only: the next add_rmsnorm adds d1 to it)
        x: &'a CudaSlice<f32>,
        /// pending attention output
        d1: Option<&'a CudaSlice<bf16>>,
        /// RMSNorm weight
        norm: &'a CudaSlice<f32>,
        /// RMSNorm epsilon
        eps: f32,
        /// normalized rows out
        h: &'a mut CudaSlice<bf16>,
    },
}

/// Loaded runtime kernels.
///
/// The KV cache is passed to the attention kernels by shared reference although they write
/// it: it is device memory the host never reads while kernels run, and every launch is
/// ordered on the one stream.
pub struct Ops {
    _module: Arc<CudaModule>,
    embed_gather: CudaFunction,
    add_rmsnorm: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    attention_w: CudaFunction,
    /// Tensor-core batched decode attention, one block per KV group: head_dim 64 and 128, up
    /// to 8 query heads per KV head, then the same for up to 16.
    attention_gqa: [CudaFunction; 4],
    /// Tensor-core prefill attention for head_dim 64 and 128.
    attention_prefill: [CudaFunction; 2],
    swiglu: CudaFunction,
    add_bias: CudaFunction,
    router_topk: CudaFunction,
    argmax_next: CudaFunction,
    topp_histogram: CudaFunction,
    topp_threshold: CudaFunction,
    fill_bf16: CudaFunction,
    fill_f32: CudaFunction,
    fill_i32: CudaFunction,
    calib_gather: CudaFunction,
    calib_amax: CudaFunction,
}

/// The architecture name NVRTC is asked to compile for.
pub fn arch_of(gpu: &GpuContext) -> Result<String, GpuError> {
    let (major, minor) = gpu
        .context()
        .compute_capability()
        .map_err(drv("compute capability"))?;
    Ok(if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    })
}

/// The four words of the device sampling buffer read by `argmax_next` and `topp_threshold`:
/// the bits of `1 / T` (0: greedy), the seed's low and high halves, and the bits of top_p
/// (used only where the nucleus kernels run, see `Ops::top_p_threshold`).
pub fn sampling_words(temperature: f32, top_p: f32, seed: u64) -> [u32; 4] {
    let inv_t = crate::generate::nucleus::inverse_temperature(temperature);
    [
        inv_t.to_bits(),
        seed as u32,
        (seed >> 32) as u32,
        top_p.to_bits(),
    ]
}

/// Device buffers of nucleus (top-p) sampling for `rows` logit rows: a 65,536-bin key histogram
/// per row (256 KiB) and the per-row maximum key, both left zeroed after each step (so a CUDA
/// graph replays them as they are), the threshold blocks' partial sums and arrival counters,
/// and the threshold key per row. See crates/runtime/src/generate/nucleus.rs for the rule.
pub struct TopPBufs {
    /// `[rows, 65536]` token counts per logit key.
    pub hist: CudaSlice<u32>,
    /// `[rows]` highest key present (reset by `topp_threshold`).
    pub kmax: CudaSlice<u32>,
    /// `[rows, 64]` mass of each threshold block.
    pub part: CudaSlice<u64>,
    /// `[rows]` last-block counters of `topp_threshold`.
    pub counters: CudaSlice<i32>,
    /// `[rows]` threshold key of each row (tokens with a smaller key are excluded).
    pub thr: CudaSlice<u32>,
    /// Rows the buffers hold.
    pub rows: usize,
}

impl TopPBufs {
    /// Zeroed buffers for `rows` rows.
    pub fn new(gpu: &GpuContext, rows: usize) -> Result<TopPBufs, GpuError> {
        let s = gpu.stream();
        let n = rows.max(1);
        let z = "alloc top-p buffers";
        Ok(TopPBufs {
            hist: s.alloc_zeros(n * KEYS).map_err(drv(z))?,
            kmax: s.alloc_zeros(n).map_err(drv(z))?,
            part: s.alloc_zeros(n * (KEYS / TOPP_SPAN)).map_err(drv(z))?,
            counters: s.alloc_zeros(n).map_err(drv(z))?,
            thr: s.alloc_zeros(n).map_err(drv(z))?,
            rows,
        })
    }

    /// Device bytes of the buffers for `rows` rows.
    pub fn bytes(rows: usize) -> usize {
        rows.max(1) * (KEYS * 4 + 4 + (KEYS / TOPP_SPAN) * 8 + 4 + 4)
    }
}

fn grid1(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

impl Ops {
    /// Compiles (once per process) and loads ops.cu with attention.cu.
    pub fn load(gpu: &GpuContext) -> Result<Ops, GpuError> {
        let arch = arch_of(gpu)?;
        let module = load_source(gpu.context(), OPS_SRC.0, OPS_SRC.1, &arch)?;
        gpu.attach_trace(&module)?;
        let tuning = gpu.tuning();
        let f = |name: &str| -> Result<CudaFunction, GpuError> {
            let f = module
                .load_function(name)
                .map_err(drv("load ops function"))?;
            on_load(tuning, name, &f)?;
            Ok(f)
        };
        Ok(Ops {
            embed_gather: f("embed_gather")?,
            add_rmsnorm: f("add_rmsnorm")?,
            kv_write: f("kv_write")?,
            attention: f("attention")?,
            attention_w: f("attention_w")?,
            attention_gqa: [
                f("attention_gqa_d64")?,
                f("attention_gqa_d128")?,
                f("attention_gqa_d64_wide")?,
                f("attention_gqa_d128_wide")?,
            ],
            attention_prefill: [f("attention_prefill_d64")?, f("attention_prefill_d128")?],
            swiglu: f("swiglu")?,
            add_bias: f("add_bias")?,
            router_topk: f("router_topk")?,
            argmax_next: f("argmax_next")?,
            topp_histogram: f("topp_histogram")?,
            topp_threshold: f("topp_threshold")?,
            fill_bf16: f("fill_bf16")?,
            fill_f32: f("fill_f32")?,
            fill_i32: f("fill_i32")?,
            calib_gather: f("calib_gather")?,
            calib_amax: f("calib_amax")?,
            _module: module,
        })
    }

    /// Driver handles of this module's kernels: each begins with `pdl_enter`, so a decode
    /// graph may give them programmatic edges (mimo_kernels::cuda::PdlGraph).
    pub fn pdl_kernels(&self) -> Vec<usize> {
        [
            &self.embed_gather,
            &self.add_rmsnorm,
            &self.kv_write,
            &self.attention,
            &self.attention_w,
            &self.attention_gqa[0],
            &self.attention_gqa[1],
            &self.attention_gqa[2],
            &self.attention_gqa[3],
            &self.attention_prefill[0],
            &self.attention_prefill[1],
            &self.swiglu,
            &self.add_bias,
            &self.router_topk,
            &self.argmax_next,
            &self.topp_histogram,
            &self.topp_threshold,
            &self.fill_bf16,
            &self.fill_f32,
            &self.fill_i32,
        ]
        .iter()
        .map(|f| f.cu_function() as usize)
        .collect()
    }

    /// `x[t] = emb[tok[t]]` for `m` tokens; out-of-range ids are counted in `bad[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_gather(
        &self,
        gpu: &GpuContext,
        emb: &CudaSlice<bf16>,
        tok: &CudaSlice<i32>,
        x: &mut CudaSlice<f32>,
        m: usize,
        hidden: usize,
        vocab: usize,
        bad: &mut CudaSlice<i32>,
    ) -> Result<(), GpuError> {
        let (h, v) = (hidden as i32, vocab as i32);
        let mut b = gpu.stream().launch_builder(&self.embed_gather);
        b.arg(emb).arg(tok).arg(x).arg(&h).arg(&v).arg(bad);
        // SAFETY: emb is [vocab, hidden], tok holds m ids, x m * hidden.
        unsafe { b.launch(grid1(m as u32, 256, 0)) }.map_err(drv("launch embed_gather"))?;
        Ok(())
    }

    /// Residual add (plain delta, MoE pairs combine, gated shared expert) and RMSNorm of rows
    /// `row_begin..m` into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        gpu: &GpuContext,
        x: &mut CudaSlice<f32>,
        d1: Option<&CudaSlice<bf16>>,
        pairs: Option<PairsArg<'_>>,
        d2: Option<&CudaSlice<bf16>>,
        g2: Option<&CudaSlice<bf16>>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        m: usize,
        hidden: usize,
        eps: f32,
        row_begin: usize,
    ) -> Result<(), GpuError> {
        let (top_k, n_exp) = pairs.map_or((0i32, 0i32), |p| (p.3 as i32, p.4 as i32));
        let (h, rb) = (hidden as i32, row_begin as i32);
        let mut b = gpu.stream().launch_builder(&self.add_rmsnorm);
        b.arg(x);
        arg_or_null(&mut b, d1);
        arg_or_null(&mut b, pairs.map(|p| p.0));
        arg_or_null(&mut b, pairs.map(|p| p.1));
        arg_or_null(&mut b, pairs.map(|p| p.2));
        b.arg(&top_k).arg(&n_exp);
        arg_or_null(&mut b, d2);
        arg_or_null(&mut b, g2);
        b.arg(w).arg(out).arg(&h).arg(&eps).arg(&rb);
        // One block per row: few rows (decode) get wide blocks so that each thread has only a
        // few elements (the row is latency-bound, not bandwidth-bound).
        let threads = if m <= 64 { 1024 } else { 256 };
        // SAFETY: x, d1, d2 are [m, hidden]; pairs [m * top_k, hidden] with m * top_k weights
        // and ids; g2 [m]; out holds (m - row_begin) rows.
        unsafe { b.launch(grid1(m as u32, threads, 0)) }.map_err(drv("launch add_rmsnorm"))?;
        Ok(())
    }

    /// Writes the keys (bias, k-norm, RoPE) and values of `m` new tokens into the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        gpu: &GpuContext,
        k: &Rows<'_>,
        v: &Rows<'_>,
        k_bias: Option<&CudaSlice<f32>>,
        v_bias: Option<&CudaSlice<f32>>,
        k_norm: Option<&CudaSlice<f32>>,
        inv_freq: &CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        seq: &CudaSlice<i32>,
        kc: &CudaSlice<bf16>,
        vc: &CudaSlice<bf16>,
        a: AttnArgs,
        m: usize,
    ) -> Result<(), GpuError> {
        let mut b = gpu.stream().launch_builder(&self.kv_write);
        b.arg(k.buf).arg(&k.off).arg(&k.stride);
        b.arg(v.buf).arg(&v.off).arg(&v.stride);
        arg_or_null(&mut b, k_bias);
        arg_or_null(&mut b, v_bias);
        arg_or_null(&mut b, k_norm);
        b.arg(inv_freq).arg(pos).arg(seq).arg(kc).arg(vc).arg(&a);
        let cfg = LaunchConfig {
            grid_dim: (m as u32, a.n_kv as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: (a.d as u32) * 4,
        };
        // SAFETY: rows hold m tokens of the widths implied by the offsets; the cache holds
        // every (seq, layer, head, position) addressed (positions checked by the caller).
        unsafe { b.launch(cfg) }.map_err(drv("launch kv_write"))?;
        Ok(())
    }

    /// Causal attention of `m` tokens; see attention.cu `attention`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        gpu: &GpuContext,
        q: &Rows<'_>,
        k: &Rows<'_>,
        v: &Rows<'_>,
        biases: [Option<&CudaSlice<f32>>; 3],
        q_norm: Option<&CudaSlice<f32>>,
        k_norm: Option<&CudaSlice<f32>>,
        inv_freq: &CudaSlice<f32>,
        pos: &CudaSlice<i32>,
        seq: &CudaSlice<i32>,
        kc: &CudaSlice<bf16>,
        vc: &CudaSlice<bf16>,
        part_ml: &mut CudaSlice<f32>,
        part_o: &mut CudaSlice<f32>,
        counters: &mut CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        a: AttnArgs,
        l2: &L2Ranges,
        m: usize,
    ) -> Result<(), GpuError> {
        // Decode kernels: the grouped tensor-core one for steps of many (token, KV head) pairs
        // (gqa_applies); the warp kernel for one-sequence steps where the head fits its lane
        // layout (d / 4 elements per lane in 16-byte pieces, at most 128) and splits are its
        // 64 keys; else the thread-per-key kernel, whose lighter blocks win over the warp
        // kernel's with many in flight (H100: batch 8 / 32 decode 7 % / 13 %). The combine
        // scratch (1024 floats) bounds the splits: checked by alloc_cache against MAX_CONTEXT
        // (at most 1024 splits).
        // Prefill (keys and values already in the cache, one sequence at increasing positions:
        // GpuModel::forward) on the tensor cores where the head size has a kernel.
        let prefill_kernel = match a.d {
            64 => Some(&self.attention_prefill[0]),
            128 => Some(&self.attention_prefill[1]),
            _ => None,
        }
        .filter(|_| a.fused_new == 0 && prefill_attention_on_mma(gpu.tuning(), a.d as usize));
        if let Some(f) = prefill_kernel {
            let m_i = m as i32;
            let mut b = gpu.stream().launch_builder(f);
            b.arg(q.buf).arg(&q.off).arg(&q.stride);
            arg_or_null(&mut b, biases[0]);
            arg_or_null(&mut b, q_norm);
            b.arg(inv_freq)
                .arg(pos)
                .arg(seq)
                .arg(kc)
                .arg(vc)
                .arg(out)
                .arg(&a)
                .arg(&m_i);
            let cfg = LaunchConfig {
                grid_dim: (m.div_ceil(64) as u32, a.n_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as kv_write; the m tokens are one sequence whose positions the caller
            // checked against the cache; shared memory is static (< 48 KiB for d <= 128).
            unsafe { b.launch(cfg) }.map_err(drv("launch attention_prefill"))?;
            return Ok(());
        }
        let gqa = self.gqa_kernel(gpu.tuning(), m, a);
        let warp_kernel = gqa.is_none()
            && gpu.tuning().warp_attention
            && a.fused_new != 0
            && m == 1
            && a.d % 32 == 0
            && a.d <= 128
            && a.split_len == 64;
        let f = match gqa {
            Some(f) => f,
            None if warp_kernel => &self.attention_w,
            None => &self.attention,
        };
        let mut b = gpu.stream().launch_builder(f);
        b.arg(q.buf).arg(&q.off).arg(&q.stride);
        b.arg(k.buf).arg(&k.off).arg(&k.stride);
        b.arg(v.buf).arg(&v.off).arg(&v.stride);
        for bias in biases {
            arg_or_null(&mut b, bias);
        }
        arg_or_null(&mut b, q_norm);
        arg_or_null(&mut b, k_norm);
        b.arg(inv_freq)
            .arg(pos)
            .arg(seq)
            .arg(kc)
            .arg(vc)
            .arg(part_ml)
            .arg(part_o)
            .arg(counters)
            .arg(out)
            .arg(&a);
        if warp_kernel {
            b.arg(l2);
        }
        let cfg = if gqa.is_some() {
            // One block per (token, KV head, split); shared memory is static (< 48 KiB for
            // d <= 128 and up to 16 heads per KV head).
            LaunchConfig {
                grid_dim: (m as u32, a.n_kv as u32, a.max_splits as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            }
        } else if warp_kernel {
            // 4 warps x 16 keys; shared memory is static.
            LaunchConfig {
                grid_dim: (m as u32, a.n_heads as u32, a.max_splits as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: (m as u32, a.n_heads as u32, a.max_splits as u32),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: (3 * a.d as u32 + a.split_len as u32 + 8 * ATTN_THREADS) * 4,
            }
        };
        // SAFETY: as kv_write; part_ml/part_o hold m * heads * max_splits entries, counters
        // m * heads (the grouped kernel uses one per (token, KV head)).
        unsafe { b.launch(cfg) }.map_err(drv("launch attention"))?;
        Ok(())
    }

    /// The grouped decode kernel for this launch, where it applies: decode steps of several
    /// tokens (`Tuning::gqa_attention`), head_dim 64 or 128, at most 16 query heads per KV
    /// head, splits a multiple of 64 keys ([`decode_split_len`]).
    fn gqa_kernel(&self, t: Tuning, m: usize, a: AttnArgs) -> Option<&CudaFunction> {
        let (n_kv, d) = (a.n_kv.max(1) as usize, a.d as usize);
        let group = a.n_heads as usize / n_kv;
        if !gqa_applies(t, m, n_kv, d, group) || a.fused_new == 0 || a.split_len % 64 != 0 {
            return None;
        }
        let wide = usize::from(group > 8) * 2;
        Some(&self.attention_gqa[wide + usize::from(a.d == 128)])
    }

    /// `out = silu(g) * u` over `m` rows of `inter`, input rows `stride` apart.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu(
        &self,
        gpu: &GpuContext,
        g: &CudaView<'_, bf16>,
        u: &CudaView<'_, bf16>,
        stride: usize,
        out: &mut CudaSlice<bf16>,
        m: usize,
        inter: usize,
    ) -> Result<(), GpuError> {
        let (s, m_i, i_i) = (stride as i32, m as i32, inter as i32);
        let mut b = gpu.stream().launch_builder(&self.swiglu);
        b.arg(g).arg(u).arg(&s).arg(out).arg(&m_i).arg(&i_i);
        let n = (m * inter) as u32;
        // SAFETY: g and u views hold m rows of `stride`, out m * inter.
        unsafe { b.launch(grid1(n.div_ceil(256), 256, 0)) }.map_err(drv("launch swiglu"))?;
        Ok(())
    }

    /// Calibration: `dst[r] = src[idx[r] * stride + off ..][..width]` for `n` rows, or with
    /// `swiglu` the SwiGLU of a `[gate | up]` row (`width` each) as the grouped down kernel
    /// forms its input.
    #[allow(clippy::too_many_arguments)]
    pub fn calib_gather(
        &self,
        gpu: &GpuContext,
        src: &CudaSlice<bf16>,
        idx: &CudaView<'_, i32>,
        n: usize,
        width: usize,
        stride: usize,
        off: usize,
        swiglu: bool,
        dst: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let need = off + if swiglu { 2 * width } else { width };
        if idx.len() < n || dst.len() < n * width || need > stride {
            return Err(GpuError::Unsupported(format!(
                "calib_gather: {n} rows of {width} from rows of {stride} at {off}"
            )));
        }
        let [n_i, w_i, s_i, o_i, g_i] =
            [n, width, stride, off, usize::from(swiglu)].map(|v| v as i32);
        let mut b = gpu.stream().launch_builder(&self.calib_gather);
        b.arg(src)
            .arg(idx)
            .arg(&n_i)
            .arg(&w_i)
            .arg(&s_i)
            .arg(&o_i)
            .arg(&g_i)
            .arg(dst);
        let total = (n * width) as u32;
        // SAFETY: dst holds n * width, idx n rows; every idx[r] names a row of src (the caller
        // builds them from the routing of src's own rows).
        unsafe { b.launch(grid1(total.div_ceil(256), 256, 0)) }
            .map_err(drv("launch calib_gather"))?;
        Ok(())
    }

    /// Calibration: `out = max(out, max |x|)` over the first `n` values of `x` (f32 bits).
    pub fn calib_amax(
        &self,
        gpu: &GpuContext,
        x: &CudaSlice<bf16>,
        n: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<(), GpuError> {
        if n > x.len() || out.is_empty() {
            return Err(GpuError::Unsupported(format!(
                "calib_amax: {n} values of a buffer of {}",
                x.len()
            )));
        }
        let n_u = n as u64;
        let mut b = gpu.stream().launch_builder(&self.calib_amax);
        b.arg(x).arg(&n_u).arg(out);
        let blocks = (n.div_ceil(256) as u32).min(1024);
        // SAFETY: x holds at least n values, out one.
        unsafe { b.launch(grid1(blocks, 256, 0)) }.map_err(drv("launch calib_amax"))?;
        Ok(())
    }

    /// `y[t] += bias` (bf16 in place).
    pub fn add_bias(
        &self,
        gpu: &GpuContext,
        y: &mut CudaSlice<bf16>,
        bias: &CudaSlice<f32>,
        m: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        let (m_i, n_i) = (m as i32, n as i32);
        let mut b = gpu.stream().launch_builder(&self.add_bias);
        b.arg(y).arg(bias).arg(&m_i).arg(&n_i);
        let total = (m * n) as u32;
        // SAFETY: y is [m, n], bias [n].
        unsafe { b.launch(grid1(total.div_ceil(256), 256, 0)) }.map_err(drv("launch add_bias"))?;
        Ok(())
    }

    /// Router logits (f32), softmax, top-k and optional renormalisation for `m` tokens; with
    /// `select` false only the logits (the one-token expert kernels then take the top-k from
    /// them: mimo_kernels' `OneTokenRoute::Logits`), and `ids` / `weights` are left as they are.
    #[allow(clippy::too_many_arguments)]
    pub fn router_topk(
        &self,
        gpu: &GpuContext,
        input: RouterIn<'_>,
        w: &CudaSlice<bf16>,
        logits: &mut CudaSlice<f32>,
        counters: &mut CudaSlice<i32>,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
        m: usize,
        hidden: usize,
        n_experts: usize,
        top_k: usize,
        renorm: bool,
        select: bool,
    ) -> Result<(), GpuError> {
        let (h, e, k, r, sel) = (
            hidden as i32,
            n_experts as i32,
            top_k as i32,
            i32::from(renorm),
            i32::from(select),
        );
        let mut smem = 0u32;
        let mut b = gpu.stream().launch_builder(&self.router_topk);
        let tail = match input {
            RouterIn::Rows(x) => {
                b.arg(x);
                None
            }
            RouterIn::Fused {
                x,
                d1,
                norm,
                eps,
                h,
            } => {
                if hidden > MAX_FUSED_ROUTER_HIDDEN {
                    return Err(GpuError::Unsupported(format!(
                        "fused router: hidden {hidden} > {MAX_FUSED_ROUTER_HIDDEN}"
                    )));
                }
                smem = (hidden * 4) as u32;
                b.arg(&NULL_PTR);
                Some((x, d1, norm, eps, h))
            }
        };
        b.arg(w)
            .arg(logits)
            .arg(counters)
            .arg(ids)
            .arg(weights)
            .arg(&h)
            .arg(&e)
            .arg(&k)
            .arg(&r);
        let zero = 0f32;
        match &tail {
            Some((x, d1, norm, eps, hout)) => {
                b.arg(*x);
                arg_or_null(&mut b, *d1);
                b.arg(*norm).arg(eps).arg(&**hout);
            }
            None => {
                b.arg(&NULL_PTR)
                    .arg(&NULL_PTR)
                    .arg(&NULL_PTR)
                    .arg(&zero)
                    .arg(&NULL_PTR);
            }
        }
        b.arg(&sel);
        let cfg = LaunchConfig {
            grid_dim: (n_experts.div_ceil(8) as u32, m as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: x [m, hidden] (or null with the fused inputs: residual f32 and d1 [m, hidden],
        // norm [hidden], h [m, hidden]), w [experts, hidden], logits [m, experts], counters [m],
        // ids/weights [m, top_k]; experts <= 1024 and top_k <= 256 checked at load; the dynamic
        // shared memory holds `hidden` floats (<= MAX_FUSED_ROUTER_HIDDEN).
        unsafe { b.launch(cfg) }.map_err(drv("launch router_topk"))?;
        Ok(())
    }

    /// Zeroed nucleus buffers for `rows` logit rows (as [`TopPBufs::new`]; callers outside
    /// this module cannot name the type).
    pub fn top_p_bufs(&self, gpu: &GpuContext, rows: usize) -> Result<TopPBufs, GpuError> {
        TopPBufs::new(gpu, rows)
    }

    /// The nucleus threshold key of each of `rows` logit rows into `bufs.thr`, at the
    /// temperature and top_p of `samp` (see [`sampling_words`]; threshold 0, every token, for
    /// temperature 0, top_p >= 1 or a row of only -inf/NaN). Two kernels: the key histogram
    /// and the threshold. The histogram is left filled for [`Ops::argmax_next`], which must
    /// follow with the same `bufs` (it zeroes it for the next step).
    #[allow(clippy::too_many_arguments)]
    pub fn top_p_threshold(
        &self,
        gpu: &GpuContext,
        logits: &CudaSlice<bf16>,
        rows: usize,
        vocab: usize,
        bufs: &mut TopPBufs,
        samp: &CudaSlice<u32>,
    ) -> Result<(), GpuError> {
        if rows > bufs.rows || vocab > MAX_VOCAB || logits.len() < rows * vocab {
            return Err(GpuError::Unsupported(format!(
                "top-p over {rows} rows of {vocab} logits (buffers for {} rows, at most \
                 {MAX_VOCAB} logits a row)",
                bufs.rows
            )));
        }
        let (v_i, c_i) = (vocab as i32, ARGMAX_CHUNK as i32);
        let mut b = gpu.stream().launch_builder(&self.topp_histogram);
        b.arg(logits)
            .arg(&v_i)
            .arg(&c_i)
            .arg(&mut bufs.hist)
            .arg(&mut bufs.kmax);
        let cfg = LaunchConfig {
            grid_dim: (vocab.div_ceil(ARGMAX_CHUNK) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits [rows, vocab] (checked); hist [rows, KEYS], kmax [rows].
        unsafe { b.launch(cfg) }.map_err(drv("launch topp_histogram"))?;
        let mut b = gpu.stream().launch_builder(&self.topp_threshold);
        b.arg(&bufs.hist)
            .arg(&mut bufs.kmax)
            .arg(&mut bufs.part)
            .arg(&mut bufs.counters)
            .arg(&mut bufs.thr)
            .arg(samp);
        let cfg = LaunchConfig {
            grid_dim: ((KEYS / TOPP_SPAN) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: hist [rows, KEYS]; part [rows, KEYS / TOPP_SPAN]; kmax, counters, thr [rows];
        // samp [4].
        unsafe { b.launch(cfg) }.map_err(drv("launch topp_threshold"))?;
        Ok(())
    }

    /// Next token of each of `rows` logit rows, greedy or sampled at a temperature as `samp`
    /// says (see [`sampling_words`]); advances `tok`, `pos` and `hist`. With `nucleus` (after
    /// [`Ops::top_p_threshold`] on the same rows), only tokens whose key reaches the row's
    /// threshold are candidates, and the nucleus histogram is zeroed for the next step.
    #[allow(clippy::too_many_arguments)]
    pub fn argmax_next(
        &self,
        gpu: &GpuContext,
        logits: &CudaSlice<bf16>,
        rows: usize,
        vocab: usize,
        part_v: &mut CudaSlice<f32>,
        part_i: &mut CudaSlice<i32>,
        counters: &mut CudaSlice<i32>,
        tok: &mut CudaSlice<i32>,
        pos: &mut CudaSlice<i32>,
        hist: &mut CudaSlice<i32>,
        hist_cap: usize,
        samp: &CudaSlice<u32>,
        nucleus: Option<&mut TopPBufs>,
    ) -> Result<(), GpuError> {
        if let Some(n) = &nucleus {
            if rows > n.rows {
                return Err(GpuError::Unsupported(format!(
                    "top-p buffers for {} rows, {rows} rows sampled",
                    n.rows
                )));
            }
        }
        let (v_i, c_i, h_i) = (vocab as i32, ARGMAX_CHUNK as i32, hist_cap as i32);
        let mut b = gpu.stream().launch_builder(&self.argmax_next);
        b.arg(logits)
            .arg(&v_i)
            .arg(&c_i)
            .arg(part_v)
            .arg(part_i)
            .arg(counters)
            .arg(tok)
            .arg(pos)
            .arg(hist)
            .arg(&h_i)
            .arg(samp);
        match nucleus {
            Some(n) => {
                b.arg(&n.thr).arg(&mut n.hist);
            }
            None => {
                b.arg(&NULL_PTR).arg(&NULL_PTR);
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (vocab.div_ceil(ARGMAX_CHUNK) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits [rows, vocab]; part_* hold rows * ceil(vocab / chunk); counters, tok,
        // pos [rows]; hist [rows, hist_cap] (index checked in the kernel); samp [4]
        // (sampling_words); nucleus thr [rows] and hist [rows, KEYS] (rows checked) or null.
        unsafe { b.launch(cfg) }.map_err(drv("launch argmax_next"))?;
        Ok(())
    }

    /// Uniform random bf16 in [-amp, amp).
    pub fn fill_bf16(
        &self,
        gpu: &GpuContext,
        p: &mut CudaSlice<bf16>,
        seed: u64,
        amp: f32,
    ) -> Result<(), GpuError> {
        let n = p.len() as u64;
        let mut b = gpu.stream().launch_builder(&self.fill_bf16);
        b.arg(p).arg(&n).arg(&seed).arg(&amp);
        let blocks = (gpu.sm_count() * 16).min(n.div_ceil(256) as u32);
        // SAFETY: grid-stride loop over n elements.
        unsafe { b.launch(grid1(blocks, 256, 0)) }.map_err(drv("launch fill_bf16"))?;
        Ok(())
    }

    /// Uniform random f32 in [center - amp, center + amp).
    pub fn fill_f32(
        &self,
        gpu: &GpuContext,
        p: &mut CudaSlice<f32>,
        seed: u64,
        center: f32,
        amp: f32,
    ) -> Result<(), GpuError> {
        let n = p.len() as u64;
        let mut b = gpu.stream().launch_builder(&self.fill_f32);
        b.arg(p).arg(&n).arg(&seed).arg(&center).arg(&amp);
        let blocks = (gpu.sm_count() * 16).min(n.div_ceil(256) as u32);
        // SAFETY: grid-stride loop over n elements.
        unsafe { b.launch(grid1(blocks, 256, 0)) }.map_err(drv("launch fill_f32"))?;
        Ok(())
    }

    /// `p[i] = v + step * i`.
    pub fn fill_i32(
        &self,
        gpu: &GpuContext,
        p: &mut CudaSlice<i32>,
        v: i32,
        step: i32,
    ) -> Result<(), GpuError> {
        let n = p.len() as i32;
        let mut b = gpu.stream().launch_builder(&self.fill_i32);
        b.arg(p).arg(&n).arg(&v).arg(&step);
        // SAFETY: one thread per element.
        unsafe { b.launch(grid1((n as u32).div_ceil(256), 256, 0)) }
            .map_err(drv("launch fill_i32"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_split_len_follows_the_batch_and_the_kernel() {
        let on = Tuning::default();
        let off = Tuning {
            gqa_attention: false,
            ..on
        };
        // One token, few pairs, or a head the grouped kernel does not take: the per-head
        // kernels' 64.
        assert_eq!(decode_split_len(on, 1, 16, 128, 8), SPLIT_LEN);
        assert_eq!(decode_split_len(on, 2, 4, 128, 8), SPLIT_LEN);
        assert_eq!(decode_split_len(on, 8, 4, 96, 8), SPLIT_LEN);
        assert_eq!(decode_split_len(on, 32, 1, 128, 32), SPLIT_LEN);
        assert_eq!(decode_split_len(off, 32, 4, 128, 8), SPLIT_LEN);
        // Longer splits as the (token, KV head) pairs grow.
        assert_eq!(decode_split_len(on, 4, 4, 128, 8), 64);
        assert_eq!(decode_split_len(on, 8, 4, 128, 8), 128);
        assert_eq!(decode_split_len(on, 8, 8, 128, 4), 256);
        assert_eq!(decode_split_len(on, 32, 4, 64, 2), 512);
        // The override, rounded up to whole 64-key chunks.
        let fixed = Tuning {
            gqa_split: 100,
            ..on
        };
        assert_eq!(decode_split_len(fixed, 4, 4, 128, 8), 128);
        assert!(gqa_applies(on, 16, 1, 64, 16) && !gqa_applies(on, 16, 1, 64, 17));
    }
}
