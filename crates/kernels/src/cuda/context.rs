//! The GPU context: device, one capture-safe stream, and the kernel modules compiled by NVRTC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use half::bf16;

use super::compile::{load_source, FP4_GEMM_SRC, MOE_SRC, STAGE_PROBE_SRC};
use super::error::{drv, CudaError};
use super::trace::{TraceBuffer, TraceRecord};
use crate::fp4::Fp4Format;

/// Largest dense FP4 weight (packed + scales) that `Tuning::l2_prefetch_small` prefetches by
/// default (`Tuning::l2_prefetch_small_mib`): well under the H100's 50 MB of L2, above the
/// attention projections of MoE models (Qwen3-30B-A3B: 5.9 and 4.7 MB), below the dense 7B
/// model's (9.4 MB and up).
pub const L2_PREFETCH_SMALL_BYTES: usize = 8 << 20;

/// [`Tuning::attn_prefetch_mib`]'s default: the best of 0-64 MiB on the H100 (MiMo-7B NVFP4
/// batch 1, FP4 head: 440 tokens/s at 0, 443 at 9 (the output projection alone), 447 at 16,
/// 450 at 24, 453 at 32, 451 at 40, 444 at 48, 434 at 64: past ~32 MiB the head of the gate/up
/// no longer stays in L2 until it is read, and the prefetch only adds traffic).
pub const ATTN_PREFETCH_MIB: u32 = 32;

/// Latency features of the decode path, switchable for A/B measurements through the
/// environment at context creation (`MIMO_PDL`, `MIMO_L2_PREFETCH`, `MIMO_L2_PREFETCH_SMALL`,
/// `MIMO_MOE_DIRECT`, `MIMO_NORM_ROUTER`, `MIMO_DENSE_SWIGLU`, `MIMO_NORM_FOLD`,
/// `MIMO_EXPERT_TOPK`, `MIMO_X_STAGE`, `MIMO_SPREAD`, `MIMO_MOE_DOWN_PREFETCH`,
/// `MIMO_WARP_ATTENTION`, `MIMO_FP8_PREFILL`, `MIMO_PREFILL_ATTENTION_MMA`, `MIMO_TILED_GEMM`,
/// `MIMO_FP8_RESIDENT`, `MIMO_BULK_GEMM`:
/// `1` on, `0` off; `MIMO_L2_PREFETCH_SMALL_MIB`, `MIMO_ATTN_PREFETCH_MIB`,
/// `MIMO_GQA_SPLIT`, `MIMO_TILED_MIN_WORK`, `MIMO_BULK_MIN_MI`, `MIMO_BULK_MAX_TOKENS`: a
/// number) or later
/// through [`GpuContext::set_tuning`]. The defaults follow the H100 ablations of
/// docs/kernels-notes.md: the ones that did not pay there are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Programmatic dependent launch: captured decode graphs get programmatic edges between
    /// our kernels ([`super::PdlGraph`]), so a kernel starts during the previous kernel's tail;
    /// the FP4 GEMVs, the router, the one-token attention and MoE down projection issue their
    /// first weight / cached K/V loads before waiting on it (docs/kernels-notes.md round 5). On
    /// by default since that preamble: +3-6 % FP4 decode at batch 1 on the H100 (round 3,
    /// without it: no gain).
    pub pdl: bool,
    /// Dense FP4 kernels ask L2 for their block's weights before waiting on the previous
    /// kernel. Off by default: it slowed the M = 1 kernels (16.2 -> 19.7 us on 4096 x 14336).
    pub l2_prefetch: bool,
    /// Dense FP4 kernels of weights up to [`L2_PREFETCH_SMALL_BYTES`] ask L2 for their block's
    /// weights before waiting on the previous kernel (the l2_prefetch of every size slowed the
    /// large layers, which stream at full bandwidth anyway; the small ones of a MoE model's
    /// attention then load while the latency-bound kernel before them finishes).
    pub l2_prefetch_small: bool,
    /// The largest weight, in MiB (packed + scales), that `l2_prefetch_small` prefetches;
    /// [`L2_PREFETCH_SMALL_BYTES`] by default (`MIMO_L2_PREFETCH_SMALL_MIB`, a whole number;
    /// another value keeps the default). Raising it to MiMo-7B's o_proj (9 MiB) and beyond
    /// measured no gain or a loss (docs/kernels-notes.md round 10).
    pub l2_prefetch_small_mib: u32,
    /// One-token MoE layers take the direct path: gate/up per pair without the routing scan,
    /// then down with the weighted combine fused (two launches instead of three); BF16 experts
    /// go through [`super::moe_bf16_pairs`] (one block row per pair, SwiGLU formed once per
    /// block) instead of the runtime's grouped kernel.
    pub moe_direct: bool,
    /// MoE layers without a shared expert fold the post-attention residual add + RMSNorm into
    /// the router kernel (the runtime's; one launch less per layer). On by default since its
    /// prologue issues every load at once (H100, Qwen3-30B-A3B NVFP4 decode: 415 vs 401
    /// tokens/s; the first version, whose loads went one loop step at a time, lost 337 vs 349).
    pub norm_router: bool,
    /// Dense FP4 gate/up projections apply SwiGLU in their epilogue
    /// ([`super::fp4_gemm_swiglu`]) instead of a separate kernel: bit-identical output. On by
    /// default (H100, MiMo-7B NVFP4 decode: +2.3 % at batch 1, +3 % at 8, +8.5 % at 32).
    pub dense_swiglu: bool,
    /// Batch-1 decode steps of dense FP4 layers fold their RMSNorms into the products around
    /// them ([`super::fp4_gemm_norm_out`] / [`super::fp4_gemm_norm_in`]): the attention output
    /// and down projections update the residual and write the next norm's unnormalised input,
    /// q/k/v and gate/up scale by `1 / rms`; two `add_rmsnorm` launches per layer fewer. FP4 MoE
    /// layers without a shared expert fold their next input norm into the one-token down +
    /// combine kernel ([`super::moe_down_norm_out`], with `moe_direct`): one launch fewer.
    pub norm_fold: bool,
    /// With `norm_fold`, the one-token FP4 expert kernels of a folded MoE layer take the
    /// softmax and top-k from the router's logits themselves ([`super::OneTokenRoute::Logits`]),
    /// so the router ends once its logits are written: no last block gathering them, and
    /// no launch waiting for it; so does the one-token BF16 gate/up
    /// ([`super::moe_bf16_pairs_from_logits`], with `moe_direct`). On by default (H100, Qwen3-30B-A3B NVFP4 batch 1, with the
    /// top-k's rank pass reading four probabilities per load: 454 vs 439 tokens/s off; before
    /// that change of the rank pass, 442 either way).
    pub expert_topk: bool,
    /// FP4 GEMVs of 9 to 32 tokens stage their activations in shared memory (each warp its own
    /// next chunks, by cp.async, one iteration ahead) instead of reading fragments through L1
    /// (fp4_gemm.cu `stage_x`), where the buffers fit the default 48 KiB of a block; the dense
    /// SwiGLU GEMV too (16 tokens: MiMo-7B NVFP4 batch 16 +3.5 % on the H100). On by
    /// default (H100, 16 tokens: 4096 x 14336 22.5 -> 20.9 us, 2048 x 151936 113.6 -> 94.4 us;
    /// end to end neutral).
    pub x_stage: bool,
    /// One-token dense FP4 products pad their dynamic shared memory so that an SM holds at
    /// most `ceil(blocks / SMs)` of their blocks (unless their registers already cap it there:
    /// then the padding only kept the next kernel's early blocks off the SM; Qwen3-30B-A3B
    /// NVFP4 batch 1 lost 0.8-0.9 % to it, 0-0.4 % since), and every kernel loaded while it is on asks
    /// for the 100 KiB shared-memory carveout ([`super::spread_launch`], placement.rs; the
    /// staged 16-token kernels 132 KiB), so that the first SMs to drain do not take all of a
    /// launch. On by default (H100, MiMo-7B NVFP4 batch 1: 443 vs 435 tokens/s; Qwen3-30B-A3B,
    /// whose experts it leaves alone, unchanged).
    pub spread: bool,
    /// One-token decode attention (the runtime's warp kernel) asks L2 for the weights of the
    /// products after it, up to this many MiB (`MIMO_ATTN_PREFETCH_MIB`; 0: none): the output
    /// projection's whole weight (unless its own launches prefetch it, `l2_prefetch_small`),
    /// then the first rows of a dense FFN's fused FP4 gate/up (gate and up halves alike). Each
    /// block asks for its share once its own keys have arrived: attention's dependent chain
    /// then leaves DRAM nearly idle for several microseconds, and the products after it stream
    /// their first bytes from L2. H100, batch 1 (`bench/results/e2e-h100-attn-prefetch.json`):
    /// MiMo-7B NVFP4 440 -> 453 tokens/s (FP4 head), BF16 159 -> 162; Qwen3-30B-A3B BF16 248
    /// -> 252, NVFP4 unchanged (its output projection prefetches itself).
    pub attn_prefetch_mib: u32,
    /// The one-token FP4 expert gate/up blocks ask L2 for their expert's down-projection
    /// weights (each block its share) once their own loads are done, so that the down kernel
    /// after them reads those from L2 (`MIMO_MOE_DOWN_PREFETCH`). On by default (H100,
    /// Qwen3-30B-A3B NVFP4 batch 1: 462 vs 456 tokens/s with the FP4 head, 430 vs 425 with the
    /// BF16 head; the MoE layer alone in a PDL chain 16.4 -> 15.7 us).
    pub moe_down_prefetch: bool,
    /// Warps per (token, expert) pair in the one-token FP4 down + combine kernel, 1 or 2, each
    /// taking a share of the pair's K (`MIMO_MOE_DOWN_SPLIT`; 2 is lowered to 1 where `top_k`
    /// pairs of two warps exceed [`super::MOE_DOWN_T1_MAX_WARPS`]). 1: one warp walks a pair's
    /// whole K in dependent load rounds. 2 by default (Qwen3-30B-A3B NVFP4 batch 1, same
    /// process: H100 430 -> 439 tokens/s with the BF16 head, 460 -> 473 with the FP4 head;
    /// H200 448 -> 454 and 468 -> 475; docs/kernels-notes.md round 21).
    pub moe_down_split: u32,
    /// Batch-1 decode folds the input norm into BF16 q/k/v products too (`MIMO_BF16_FOLD`): the
    /// Linear layers a mixed checkpoint keeps dense (`mimo-quant convert --experts-only`,
    /// `--ignore`) run the programmatic `bf16_gemv_norm_in` instead of a norm launch and
    /// cuBLAS, so the rest of the model keeps its folded, programmatic chain.
    pub bf16_fold: bool,
    /// With `bf16_fold`, an FP4 q_proj and a BF16 k|v (`--ignore '*k_proj*' --ignore
    /// '*v_proj*'` output) run as one launch (`fp4_bf16_gemv_norm_in`) instead of two
    /// (`MIMO_BF16_TAIL`).
    pub bf16_tail: bool,
    /// One-sequence decode steps' attention through the runtime's warp kernel (`attention_w`:
    /// 4 warps x 16 keys, head_dim 32..=128 in steps of 32) instead of the thread-per-key one.
    pub warp_attention: bool,
    /// Decode steps of several tokens (16 or more (token, KV head) pairs) run the runtime's
    /// grouped tensor-core attention (`attention_gqa_*`: one block per token, KV head and
    /// split, every query head of the group sharing each key and value it loads) instead of
    /// the per-head thread-per-key kernel, where head_dim is 64 or 128 and a KV head serves at
    /// most 16 query heads (`MIMO_GQA_ATTENTION`). H100, batch 32: +24-33 % tokens/s.
    pub gqa_attention: bool,
    /// Keys per split of the grouped decode attention (`MIMO_GQA_SPLIT`, rounded up to a
    /// multiple of 64); 0: chosen from the batch (the runtime's `decode_split_len`).
    pub gqa_split: u32,
    /// Prefill GEMMs of FP4 weights (M >= the runtime's dequantization threshold) run on the
    /// FP8 tensor cores ([`super::fp4_gemm_fp8`]: weights and activations as E4M3 rows with
    /// per-row scales) instead of dequantizing to bf16 for cuBLAS. Where the GPU has no FP8
    /// (below sm_89) or a shape does not suit cuBLASLt, the bf16 path runs regardless.
    pub fp8_prefill: bool,
    /// Prefill attention (head_dim 64 or 128) through the runtime's tensor-core kernel
    /// (`attention_prefill_*`: 64 queries per block, 64-key tiles in shared memory, mma for
    /// Q K^T and P V) instead of the thread-per-key kernel, which re-reads every key per query.
    pub prefill_attention_mma: bool,
    /// Dense FP4 products of 17 to 63 tokens (the decode batches below the prefill paths)
    /// with enough work ([`super::tiled_preferred`]) through the tiled kernels
    /// ([`super::fp4_gemm_tiled`], [`super::fp4_gemm_swiglu_tiled`]: 256 weight rows per block
    /// sharing each chunk's activations in shared memory) instead of the decode kernels
    /// (`MIMO_TILED_GEMM`).
    pub tiled_gemm: bool,
    /// Row blocks x token blocks x K chunks from which `tiled_gemm` takes a product
    /// ([`super::TILED_MIN_WORK`] by default; `MIMO_TILED_MIN_WORK`).
    pub tiled_min_work: u32,
    /// With `fp8_prefill`: each dense FP4 weight keeps its E4M3 rows after its first prefill
    /// (one byte per weight more device memory, still under BF16's two), so later prefill
    /// GEMMs skip the per-call weight conversion. Off by default (memory).
    pub fp8_resident: bool,
    /// Dense FP4 products of 9 to `bulk_max_tokens` tokens with at least `bulk_min_mi` Mi
    /// weights (and, unless that is 0, [`super::BULK_MIN_ROWS`] rows) through the bulk-copy
    /// kernels ([`super::fp4_gemm_bulk`], [`super::fp4_gemm_swiglu_bulk`]: weights streamed by
    /// the copy engine into a shared-memory ring) instead of the decode or tiled kernels, on
    /// GPUs that have them (`MIMO_BULK_GEMM`).
    pub bulk_gemm: bool,
    /// Weights (in Mi elements, N x K) from which `bulk_gemm` takes a product
    /// ([`super::BULK_MIN_MI`] by default; `MIMO_BULK_MIN_MI`).
    pub bulk_min_mi: u32,
    /// The most tokens `bulk_gemm` takes (up to [`super::BULK_MAX_TOKENS`], the default;
    /// `MIMO_BULK_MAX_TOKENS`): from 17 tokens the products it leaves go through the tiled
    /// kernels.
    pub bulk_max_tokens: u32,
    /// FP4 MoE layers whose experts see at least `moe_tiled_min_pairs` (token, expert) pairs
    /// each on average (prefill) through the tiled grouped kernels ([`super::moe_layer_tiled`]:
    /// each expert's pairs sorted into tiles of 32, 256 weight rows per block sharing each
    /// chunk's activations in shared memory) instead of the grouped decode kernels
    /// (`MIMO_MOE_TILED`).
    pub moe_tiled: bool,
    /// Average pairs per expert from which `moe_tiled` takes a layer
    /// ([`super::MOE_TILED_MIN_PAIRS`] by default; `MIMO_MOE_TILED_MIN_PAIRS`).
    pub moe_tiled_min_pairs: u32,
    /// Dense FP4 products of [`super::WGMMA_MIN_TOKENS`] to `wgmma_max_tokens` tokens through
    /// the warpgroup kernels ([`super::fp4_gemm_wgmma`]: weights decoded in registers as the A
    /// operand of Hopper's `wgmma`) instead of the tiled kernels (below 64 tokens, where those
    /// would take them) and of the runtime's FP8 prefill path, which converts the weight and
    /// the activations on every call (`MIMO_WGMMA_GEMM`; sm_90 only).
    pub wgmma_gemm: bool,
    /// The most tokens `wgmma_gemm` takes ([`super::WGMMA_MAX_TOKENS`] by default;
    /// `MIMO_WGMMA_MAX_TOKENS`).
    pub wgmma_max_tokens: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            pdl: true,
            l2_prefetch: false,
            l2_prefetch_small: true,
            l2_prefetch_small_mib: (L2_PREFETCH_SMALL_BYTES >> 20) as u32,
            moe_direct: true,
            norm_router: true,
            dense_swiglu: true,
            norm_fold: true,
            expert_topk: true,
            x_stage: true,
            spread: true,
            attn_prefetch_mib: ATTN_PREFETCH_MIB,
            moe_down_prefetch: true,
            moe_down_split: 2,
            bf16_fold: true,
            bf16_tail: true,
            warp_attention: true,
            gqa_attention: true,
            gqa_split: 0,
            fp8_prefill: true,
            prefill_attention_mma: true,
            tiled_gemm: true,
            tiled_min_work: super::tiled::TILED_MIN_WORK as u32,
            fp8_resident: false,
            bulk_gemm: true,
            bulk_min_mi: super::bulk::BULK_MIN_MI as u32,
            bulk_max_tokens: super::bulk::BULK_MAX_TOKENS as u32,
            moe_tiled: true,
            moe_tiled_min_pairs: super::moe::MOE_TILED_MIN_PAIRS as u32,
            wgmma_gemm: true,
            wgmma_max_tokens: super::wgmma::WGMMA_MAX_TOKENS as u32,
        }
    }
}

impl Tuning {
    /// A switch's environment variable: None where unset, else on unless it is `0` (the one
    /// rule for every `MIMO_*` switch, here and in the tools).
    pub fn env_flag(key: &str) -> Option<bool> {
        std::env::var(key).ok().map(|v| v != "0")
    }

    /// The defaults, each overridden by its environment variable where set (`0` off, else on).
    pub fn from_env() -> Self {
        let d = Tuning::default();
        let flag = |k: &str, dflt: bool| Tuning::env_flag(k).unwrap_or(dflt);
        // A size (MiB, keys): a whole number, else the default.
        let mib = |k: &str, dflt: u32| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(dflt)
        };
        Tuning {
            pdl: flag("MIMO_PDL", d.pdl),
            l2_prefetch: flag("MIMO_L2_PREFETCH", d.l2_prefetch),
            l2_prefetch_small: flag("MIMO_L2_PREFETCH_SMALL", d.l2_prefetch_small),
            l2_prefetch_small_mib: mib("MIMO_L2_PREFETCH_SMALL_MIB", d.l2_prefetch_small_mib),
            moe_direct: flag("MIMO_MOE_DIRECT", d.moe_direct),
            norm_router: flag("MIMO_NORM_ROUTER", d.norm_router),
            dense_swiglu: flag("MIMO_DENSE_SWIGLU", d.dense_swiglu),
            norm_fold: flag("MIMO_NORM_FOLD", d.norm_fold),
            expert_topk: flag("MIMO_EXPERT_TOPK", d.expert_topk),
            x_stage: flag("MIMO_X_STAGE", d.x_stage),
            spread: flag("MIMO_SPREAD", d.spread),
            attn_prefetch_mib: mib("MIMO_ATTN_PREFETCH_MIB", d.attn_prefetch_mib),
            moe_down_prefetch: flag("MIMO_MOE_DOWN_PREFETCH", d.moe_down_prefetch),
            moe_down_split: mib("MIMO_MOE_DOWN_SPLIT", d.moe_down_split).clamp(1, 2),
            bf16_fold: flag("MIMO_BF16_FOLD", d.bf16_fold),
            bf16_tail: flag("MIMO_BF16_TAIL", d.bf16_tail),
            warp_attention: flag("MIMO_WARP_ATTENTION", d.warp_attention),
            gqa_attention: flag("MIMO_GQA_ATTENTION", d.gqa_attention),
            gqa_split: mib("MIMO_GQA_SPLIT", d.gqa_split),
            fp8_prefill: flag("MIMO_FP8_PREFILL", d.fp8_prefill),
            prefill_attention_mma: flag("MIMO_PREFILL_ATTENTION_MMA", d.prefill_attention_mma),
            tiled_gemm: flag("MIMO_TILED_GEMM", d.tiled_gemm),
            tiled_min_work: mib("MIMO_TILED_MIN_WORK", d.tiled_min_work),
            fp8_resident: flag("MIMO_FP8_RESIDENT", d.fp8_resident),
            bulk_gemm: flag("MIMO_BULK_GEMM", d.bulk_gemm),
            bulk_min_mi: mib("MIMO_BULK_MIN_MI", d.bulk_min_mi),
            bulk_max_tokens: mib("MIMO_BULK_MAX_TOKENS", d.bulk_max_tokens),
            moe_tiled: flag("MIMO_MOE_TILED", d.moe_tiled),
            moe_tiled_min_pairs: mib("MIMO_MOE_TILED_MIN_PAIRS", d.moe_tiled_min_pairs),
            wgmma_gemm: flag("MIMO_WGMMA_GEMM", d.wgmma_gemm),
            wgmma_max_tokens: mib("MIMO_WGMMA_MAX_TOKENS", d.wgmma_max_tokens),
        }
    }
}

/// One GPU with its own stream (cross-stream event tracking off, so work on it can be
/// captured into CUDA graphs) and the loaded kernel modules.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    gemm: Arc<CudaModule>,
    moe: Arc<CudaModule>,
    /// The stage-chain probe's program (compile.rs STAGE_PROBE_SRC), loaded on its first use.
    probe: Mutex<Option<Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    sm_count: u32,
    sm_shared: u32,
    /// Compute capability (major, minor).
    capability: (i32, i32),
    name: String,
    nvfp4_lut: CudaSlice<u16>,
    mxfp4_lut: CudaSlice<u16>,
    /// Copied out at each launch or capture that depends on it; set through `set_tuning`.
    tuning: Mutex<Tuning>,
    /// The decode timeline's buffer, with `MIMO_TRACE=1` only (trace.rs).
    trace: Option<Mutex<TraceBuffer>>,
    /// Partial sums and tickets of the tiled kernels' K splits (tiled.rs): allocated once, so
    /// that captured graphs keep valid pointers; launches on the one stream take turns.
    split_parts: CudaSlice<f32>,
    split_tickets: CudaSlice<u32>,
}

impl GpuContext {
    /// Opens GPU `ordinal`, compiles (first use in the process) and loads the kernels.
    /// Fails with [`CudaError::NoDevice`] where there is no driver, no GPU, or a GPU older than
    /// compute capability 8.0 (the kernels use bf16 `mma.sync`).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDevice(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice(e.to_string()))?;
        if ordinal as i64 >= count as i64 {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(e.to_string()))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        if major < 8 {
            return Err(CudaError::NoDevice(format!(
                "compute capability {major}.{minor} is below 8.0"
            )));
        }
        // Graph capture needs a stream of our own without cudarc's cross-stream events.
        // SAFETY: every buffer of this context is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("new stream"))?;
        let arch = nvrtc_arch(major, minor);
        let load = |(file, src): (&'static str, &str)| -> Result<Arc<CudaModule>, CudaError> {
            load_source(&ctx, file, src, &arch)
        };
        let gemm = load(FP4_GEMM_SRC)?;
        let moe = load(MOE_SRC)?;
        let trace = TraceBuffer::new(&stream)?;
        if let Some(t) = &trace {
            t.attach(&gemm, &stream)?;
            t.attach(&moe, &stream)?;
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(drv("multiprocessor count"))? as u32;
        let sm_shared = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            )
            .map_err(drv("shared memory per multiprocessor"))? as u32;
        let name = ctx.name().map_err(drv("device name"))?;
        let tuning = Tuning::from_env();
        let nvfp4_lut = stream
            .clone_htod(&scale_lut(Fp4Format::Nvfp4))
            .map_err(drv("upload scale table"))?;
        let mxfp4_lut = stream
            .clone_htod(&scale_lut(Fp4Format::Mxfp4))
            .map_err(drv("upload scale table"))?;
        let split_parts = stream
            .alloc_zeros::<f32>(super::tiled::PARTS_CAPACITY)
            .map_err(drv("split-K scratch"))?;
        let split_tickets = stream
            .alloc_zeros::<u32>(super::tiled::TICKETS_CAPACITY)
            .map_err(drv("split-K tickets"))?;
        Ok(GpuContext {
            ctx,
            stream,
            gemm,
            moe,
            probe: Mutex::new(None),
            functions: Mutex::new(HashMap::new()),
            sm_count,
            sm_shared,
            capability: (major, minor),
            name,
            nvfp4_lut,
            mxfp4_lut,
            tuning: Mutex::new(tuning),
            trace: trace.map(Mutex::new),
            split_parts,
            split_tickets,
        })
    }

    /// The latency features in force.
    pub fn tuning(&self) -> Tuning {
        // A poisoned lock still holds a whole Tuning (a plain Copy value).
        *self.tuning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Switches the latency features for launches and captures queued from now on.
    pub fn set_tuning(&self, t: Tuning) {
        *self.tuning.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// Driver handles of every kernel of this context loaded so far: all of them wait on their
    /// predecessor (`pdl_enter`), so [`super::PdlGraph`] may give them programmatic edges.
    pub fn pdl_kernels(&self) -> Vec<usize> {
        self.functions
            .lock()
            .map(|m| m.values().map(|f| f.cu_function() as usize).collect())
            .unwrap_or_default()
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch of this context goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The most shared memory one SM can have, in bytes (228 KiB on Hopper).
    pub fn sm_shared_bytes(&self) -> u32 {
        self.sm_shared
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Device name as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Whether this context records the decode timeline (`MIMO_TRACE=1`, trace.rs).
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Runs `f` on the timeline buffer and the stream; `None` without tracing.
    fn with_trace<R>(
        &self,
        f: impl FnOnce(&mut TraceBuffer, &Arc<CudaStream>) -> Result<R, CudaError>,
    ) -> Result<Option<R>, CudaError> {
        let Some(t) = &self.trace else {
            return Ok(None);
        };
        let mut t = t
            .lock()
            .map_err(|_| CudaError::NoDevice("trace lock poisoned".into()))?;
        f(&mut t, &self.stream).map(Some)
    }

    /// Points a module compiled by [`crate::cuda::compile_source`] outside this crate (the
    /// runtime's) at the timeline buffer; nothing without `MIMO_TRACE=1`.
    pub fn attach_trace(&self, module: &Arc<CudaModule>) -> Result<(), CudaError> {
        self.with_trace(|t, s| t.attach(module, s)).map(|_| ())
    }

    /// Empties the timeline buffer (queued on the stream); nothing without tracing.
    pub fn trace_reset(&self) -> Result<(), CudaError> {
        self.with_trace(|t, s| t.reset(s)).map(|_| ())
    }

    /// The timeline records since the last reset and how many were dropped (full buffer);
    /// `None` without tracing. Waits for the stream.
    pub fn trace_read(&self) -> Result<Option<(Vec<TraceRecord>, u64)>, CudaError> {
        self.with_trace(|t, s| t.read(s))
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    /// The tiled kernels' split-K partial sums and tickets (zero between launches).
    pub(crate) fn split_scratch(&self) -> (&CudaSlice<f32>, &CudaSlice<u32>) {
        (&self.split_parts, &self.split_tickets)
    }

    /// The stage-chain probe's module, compiled and loaded on first use.
    fn probe_module(&self) -> Result<Arc<CudaModule>, CudaError> {
        let mut slot = self
            .probe
            .lock()
            .map_err(|_| CudaError::NoDevice("probe module lock poisoned".into()))?;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let (file, src) = STAGE_PROBE_SRC;
        let arch = nvrtc_arch(self.capability.0, self.capability.1);
        let m = load_source(&self.ctx, file, src, &arch)?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Device table mapping a scale byte to its value as bf16 bits.
    pub(crate) fn scale_lut(&self, format: Fp4Format) -> &CudaSlice<u16> {
        match format {
            Fp4Format::Nvfp4 => &self.nvfp4_lut,
            Fp4Format::Mxfp4 => &self.mxfp4_lut,
        }
    }

    /// A kernel of fp4_gemm.cu or moe.cu by name (looked up once, then cached).
    pub(crate) fn function(&self, name: &'static str) -> Result<CudaFunction, CudaError> {
        let mut map = self
            .functions
            .lock()
            .map_err(|_| CudaError::NoDevice("kernel table lock poisoned".into()))?;
        if let Some(f) = map.get(name) {
            return Ok(f.clone());
        }
        let f = if name.starts_with("stage_probe") {
            self.probe_module()?.load_function(name)
        } else if name.starts_with("moe_") {
            self.moe.load_function(name)
        } else {
            self.gemm.load_function(name)
        }
        .map_err(drv("load function"))?;
        super::placement::on_load(self.tuning(), name, &f)?;
        map.insert(name, f.clone());
        Ok(f)
    }
}

/// NVRTC's architecture for a compute capability: `sm_90a` on Hopper (the `a` features: wgmma,
/// setmaxnreg), `sm_XY` elsewhere.
fn nvrtc_arch(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// bf16 bit pattern of every scale byte's value. E4M3 (4 significant bits) and E8M0 (powers of
/// two, 2^-127 as a bf16 subnormal) are exact in bf16; NaN codes map to a bf16 NaN.
pub fn scale_lut(format: Fp4Format) -> Vec<u16> {
    (0..=255u8)
        .map(|c| bf16::from_f32(format.decode_scale(c)).to_bits())
        .collect()
}
