//! RMSNorms folded into the products around them at batch 1 (`Tuning::norm_fold`, the kernels
//! crate's fold.rs): in a dense FP4 decoder the attention output projection and the down
//! projection add their row to the residual stream themselves and write the next norm's
//! unnormalised input with one partial sum of squares per block; q/k/v and gate/up scale by
//! `1 / rms`. A one-token step then runs no `add_rmsnorm` but the first layer's and the final
//! one. In a MoE decoder (FP4 experts, no shared expert) the one-token down + combine kernel
//! is the producer of the next layer's input norm, and q/k/v the consumer.

use cudarc::driver::CudaSlice;
use mimo_kernels::cuda::{
    bf16_norm_in_rows_per_warp, fold_parts, fp4_gemm_swiglu_supported, GpuContext, NormIn,
};

use super::{Experts, Ffn, GateUp, GpuModel, Layer, Qkv};
use crate::cuda::error::GpuError;
use crate::cuda::weights::GpuLinear;

/// Whether every layer can fold its norms. Dense layers: bias-free FP4 output and down
/// projections (the producers), FP4 q/k/v and a fused bias-free FP4 gate/up with a one-token
/// SwiGLU kernel (the consumers). MoE layers without a shared expert: FP4 experts, whose
/// one-token down kernel produces the next layer's input norm (moe_down_norm_out), and FP4
/// q/k/v; their post-attention norm stays where it is (in the router with `norm_router`).
/// With `bf16_qkv`, q/k/v may also be BF16 (the dense parts of a mixed checkpoint: the
/// kernels crate's `bf16_gemv_norm_in`, where `bf16_norm_in_rows_per_warp` has a shape for
/// it: one wave of blocks, else cuBLAS after a norm launch does better).
pub(super) fn fold_capable(layers: &[Layer], ctx: &GpuContext, bf16_qkv: bool) -> bool {
    let sm_count = ctx.sm_count();
    let consumer = |l: &GpuLinear| match l {
        GpuLinear::Fp4 { .. } => true,
        GpuLinear::Bf16 { n, k, .. } => {
            bf16_qkv && bf16_norm_in_rows_per_warp(ctx, *n, *k).is_some()
        }
    };
    !layers.is_empty()
        && layers.iter().all(|l| {
            let qkv = match &l.qkv {
                Qkv::Fused(q) => consumer(q),
                Qkv::QKv(q, kv) => consumer(q) && consumer(kv),
                Qkv::Split(q, k, v) => consumer(q) && consumer(k) && consumer(v),
            };
            let mlp = match &l.ffn {
                Ffn::Dense(mlp) => mlp,
                Ffn::Moe(moe) => {
                    return qkv && moe.shared.is_none() && matches!(moe.experts, Experts::Fp4(_))
                }
            };
            let GateUp::Fused(gu) = &mlp.gate_up else {
                return false;
            };
            qkv && l.o.fp4_plain().is_some()
                && mlp.down.fp4_plain().is_some()
                && gu
                    .fp4_plain()
                    .is_some_and(|w| fp4_gemm_swiglu_supported(w, 1, sm_count))
        })
}

impl GpuModel {
    /// Whether a pass over `m` token rows (no observer) folds its norms (MoE layers only on
    /// their one-token direct path, `Tuning::moe_direct`).
    pub(super) fn folds(&self, m: usize) -> bool {
        let t = self.gpu.ctx.tuning();
        let moe = self.layers.iter().any(|l| matches!(l.ffn, Ffn::Moe(_)));
        self.fold[usize::from(t.bf16_fold)] && m == 1 && t.norm_fold && (t.moe_direct || !moe)
    }

    /// The input side of a fold whose output side was `producer` (its partial sums in `parts`).
    pub(super) fn fold_input<'a>(
        &self,
        parts: &'a CudaSlice<f32>,
        producer: &GpuLinear,
    ) -> Result<NormIn<'a>, GpuError> {
        let w = producer
            .fp4_plain()
            .ok_or_else(|| GpuError::Unsupported("folded norm: producer is not FP4".into()))?;
        Ok(NormIn {
            parts,
            nparts: fold_parts(&self.gpu.ctx, w),
            len: self.config.hidden_size,
            eps: self.config.rms_norm_eps as f32,
        })
    }
}
