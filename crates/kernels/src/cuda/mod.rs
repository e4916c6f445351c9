//! CUDA kernels compiled at run time with NVRTC, and their launchers.
//!
//! The kernel sources (`crates/kernels/cuda/*.cu`) are embedded in the binary and compiled on
//! first use for the GPU's architecture (cached per process). Without a driver or GPU,
//! [`GpuContext::new`] returns [`CudaError::NoDevice`] and nothing else is touched.
//!
//! Paths:
//! - [`fp4_gemm`]: FP4 weights dequantized in registers and fed to bf16 `mma.sync`
//!   (decode and small M, up to 32 tokens per pass over the weights).
//! - [`fp4_gemm_tiled`]: 9 to 256 tokens, 256 weight rows per block sharing each K chunk's
//!   activations in shared memory (a cp.async pipeline), K split over blocks where needed.
//! - [`fp4_gemm_dequant_cublas`]: FP4 -> bf16 then cuBLAS (large M).
//! - [`fp4_gemm_fp8`]: FP4 weights and bf16 activations -> E4M3 rows, then cuBLASLt's FP8
//!   GEMM with per-row scales (large M on sm_89+).
//! - [`moe_layer`]: grouped MoE layer from the router's device output; for one token with a
//!   folded norm after it, [`moe_one_token_gate_up`] then [`moe_down_norm_out`], routed by the
//!   router's top-k or, taking the top-k themselves, by its logits ([`OneTokenRoute`]).
//! - [`fp4_gemm_norm_out`] / [`fp4_gemm_norm_in`]: one-token products with an RMSNorm folded
//!   into them (fold.rs).
//! - [`moe_bf16_grouped`] / [`moe_bf16_pairs`]: BF16 experts (the BF16 baseline's MoE paths).

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};

mod blas;
mod bulk;
mod compile;
mod context;
mod error;
mod fold;
mod fp8;
mod gemm;
mod graph;
mod l2;
mod moe;
mod moe_bf16;
mod moe_one_token;
mod placement;
mod probe;
mod tiled;
mod trace;
mod weights;
mod wgmma;

pub use blas::{bf16_gemm, bf16_gram_accumulate, cublas, fp4_gemm_dequant_cublas};
pub use bulk::{
    bulk_preferred, bulk_supported, fp4_gemm_bulk, fp4_gemm_bulk_with, fp4_gemm_swiglu_bulk,
    BulkConfig, BULK_MAX_TOKENS, BULK_MIN_MI, BULK_MIN_ROWS,
};
pub use compile::{
    compile_source, compile_source_traced, load_source, nvrtc_available, ptx_cache_dir,
    COMMON_HEADER,
};
pub use context::{scale_lut, GpuContext, Tuning, ATTN_PREFETCH_MIB, L2_PREFETCH_SMALL_BYTES};
pub use error::CudaError;
pub use fold::{
    bf16_gemv_norm_in, bf16_gemv_norm_in_rows, bf16_norm_in_rows_per_warp, bf16_norm_in_takes_k,
    fold_parts, fp4_bf16_gemv_norm_in, fp4_gemm_norm_in, fp4_gemm_norm_out,
    fp4_gemm_swiglu_norm_in, NormIn, NormOut, BF16_NORM_IN_MAX_K,
};
pub use fp8::{
    bf16_to_e4m3_rows, fp4_gemm_fp8, fp4_to_e4m3_rows, fp8_operands, fp8_shape_ok, E4m3Rows,
    Fp8Gemm, Fp8Scratch,
};
pub use gemm::{
    device_copy, fp4_dequantize, fp4_gemm, fp4_gemm_swiglu, fp4_gemm_swiglu_supported,
    fp4_gemm_takes_wgmma, fp4_gemm_with, prefetches_itself, token_tiles, variant_exists,
    Fp4GemmConfig, K_CHUNK,
};
pub use graph::PdlGraph;
pub use l2::L2Ranges;
pub use moe::{
    moe_layer, moe_layer_tiled, moe_layer_tiled_with, moe_layer_with, moe_tile_pairs,
    moe_tiled_batch, moe_tiled_preferred, moe_tiled_supported, MoeConfig, MoeRoute, MoeWeights,
    MoeWorkspace, MOE_MAX_EXPERTS, MOE_TILE64_MIN_PAIRS, MOE_TILED_MIN_PAIRS, MOE_TILE_PAIRS,
};
pub use moe_bf16::{
    moe_bf16_grouped, moe_bf16_logits_route_supported, moe_bf16_pairs, moe_bf16_pairs_from_logits,
    moe_bf16_pairs_supported, moe_bf16_tiled, moe_bf16_tiled_supported, Bf16Experts,
    Bf16LogitsRoute, Bf16Pairs, MOE_BF16_PAIRS_MAX_SWIGLU_K,
};
pub use moe_one_token::{
    moe_down_norm_out, moe_fold_parts, moe_one_token_gate_up, OneTokenRoute, MOE_DOWN_T1_MAX_WARPS,
    MOE_ONE_TOKEN_MAX_TOPK,
};
pub use placement::{on_load, spread_launch, spread_smem, SPREAD_CARVEOUT_PERCENT};
pub use probe::{
    attention_reference, probe_tag, qwen3_moe_layer, stage_reference, stage_timings, ProbeData,
    ProbeKind, ProbeMode, ProbeStage, StageChain, StageTiming, PROBE_MAX_TILES,
};
pub use tiled::{
    fp4_gemm_swiglu_tiled, fp4_gemm_tiled, tiled_preferred, tiled_supported, TILED_MAX_TOKENS,
    TILED_MIN_TOKENS, TILED_MIN_WORK,
};
pub use trace::{trace_file_name, TraceRecord};
pub use weights::GpuFp4Weight;
pub use wgmma::{
    fp4_gemm_wgmma, fp4_gemm_wgmma_with, wgmma_preferred, wgmma_supported, WgmmaConfig,
    WGMMA_CONFIGS, WGMMA_MAX_TOKENS, WGMMA_MIN_TOKENS,
};

/// A null device pointer as a kernel argument (an optional buffer left out).
pub static NULL_PTR: u64 = 0;

/// Pushes `s` as the next kernel argument, or [`NULL_PTR`] where it is absent.
pub fn arg_or_null<'a, T>(b: &mut LaunchArgs<'a>, s: Option<&'a CudaSlice<T>>) {
    match s {
        Some(s) => b.arg(s),
        None => b.arg(&NULL_PTR),
    };
}

/// The embedded kernel sources, (file name, text), for tools that compile them ahead.
pub fn kernel_sources() -> [(&'static str, &'static str); 3] {
    [
        compile::FP4_GEMM_SRC,
        compile::MOE_SRC,
        compile::STAGE_PROBE_SRC,
    ]
}

/// Opens GPU 0 for a test, or explains why not. With `MIMO_REQUIRE_GPU=1` a missing GPU is an
/// error; otherwise the caller prints the reason and skips.
pub fn gpu_for_tests() -> Result<Option<GpuContext>, CudaError> {
    match GpuContext::new(0) {
        Ok(g) => Ok(Some(g)),
        Err(e) => {
            if std::env::var("MIMO_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                Err(e)
            } else {
                eprintln!("skipping GPU test: {e}");
                Ok(None)
            }
        }
    }
}
