//! The CUDA backend: whole decoder-only models resident on one GPU.
//!
//! - weights: FP4 Linear layers stay packed (the kernels crate's fused dequant-GEMM and grouped
//!   MoE); BF16 ones go through cuBLAS; q/k/v and gate/up are fused into one matrix where
//!   they share a format (and, for NVFP4, a global scale).
//! - the KV cache lives on the device (`[seq][layer][kv_head][position][head_dim]`, BF16).
//! - prefill runs the prompt as one batch; decode is captured once per batch size as a CUDA
//!   graph on the context's own stream (cudarc's event tracking off) and replayed per token,
//!   with sampling on the device (greedy, temperature, nucleus) feeding the next replay: no
//!   host synchronisation inside a token.
//! - `bench_random_weights` builds a model of a real architecture's shape with random weights
//!   on the GPU and measures decode and prefill throughput ("random weights").
//!
//! The non-GEMM kernels are in crates/runtime/cuda/ops.cu and attention.cu, compiled by NVRTC
//! (as one program) on first use.

mod bench;
mod error;
mod estimate;
mod generate;
mod model;
mod ops;
mod random;
mod timeline;
mod weights;

pub use bench::{
    bench_random_weights, kind_from_name, kind_name, BenchOptions, BenchReport, BenchRun,
    DecodeResult,
};
pub use error::GpuError;
pub use estimate::{checkpoint_formats, weight_bytes as estimate_weight_bytes, Formats};
pub use generate::generate;
pub use model::{GpuKvCache, GpuModel, Stage};
pub use ops::{sampling_words, ARGMAX_CHUNK, OPS_SRC};
pub use random::WeightKind;
pub use timeline::{grid_spans, GridSpan};
pub use weights::{Gpu, GpuLinear};

/// Opens GPU 0 for a test, or explains why not: `Ok(None)` (after printing the reason) where
/// there is no usable GPU, an error instead when `MIMO_REQUIRE_GPU=1`.
pub fn gpu_for_tests() -> Result<Option<std::sync::Arc<Gpu>>, GpuError> {
    match mimo_kernels::cuda::gpu_for_tests()? {
        Some(ctx) => Ok(Some(std::sync::Arc::new(Gpu::from_context(ctx)?))),
        None => Ok(None),
    }
}
