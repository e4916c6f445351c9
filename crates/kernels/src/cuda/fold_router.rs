//! A MoE router folded into the one-token product before it (fp4_gemm.cu `Router`,
//! `fp4_gemm_*_router`), for the batch-1 decode of MoE layers without a shared expert.
//!
//! The attention output projection is a [`NormOut`] producer (fold.rs): it adds its row to the
//! residual `v` and writes `bf16(w ⊙ v)` and one partial sum of `v²` per block. Each block then
//! adds its columns' share of every router logit, `logit[e] = (bf16(w ⊙ v) · W_r[e]) / rms(v)`
//! (the folded products' rule), and the last block to finish sums the shares in block order,
//! picks the top-k experts as the runtime's router does (softmax, ties to the lower index,
//! optional renormalisation) and writes the experts' input `h = bf16(w ⊙ v / rms(v))`. The
//! router launch between the projection and the experts goes away.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::fold::{fold_parts, NormOut};
use super::gemm::{check_len, prefetch_flags, reduction_smem, Fp4GemmConfig};
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// Most experts the router tail handles (its shared probability table).
pub const ROUTER_FOLD_MAX_EXPERTS: usize = 1024;
/// Most experts it picks per token.
pub const ROUTER_FOLD_MAX_TOP_K: usize = 256;

/// The router of a [`fp4_gemm_norm_out_router`] launch and where its results go.
pub struct RouterOut<'a> {
    /// Router weights `[experts, n]` (bf16).
    pub weight: &'a CudaSlice<bf16>,
    /// Number of experts.
    pub experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Renormalise the chosen weights to sum to one (`norm_topk_prob`).
    pub renorm: bool,
    /// The norm's epsilon.
    pub eps: f32,
    /// Scratch: at least [`router_fold_parts`] floats.
    pub part: &'a mut CudaSlice<f32>,
    /// One arrival counter, zero before the first launch (the last block resets it).
    pub counter: &'a mut CudaSlice<i32>,
    /// `[top_k]` chosen experts.
    pub ids: &'a mut CudaSlice<i32>,
    /// `[top_k]` their routing weights.
    pub weights: &'a mut CudaSlice<f32>,
    /// `[n]` the experts' input, `bf16(norm weight ⊙ v / rms(v))`.
    pub h: &'a mut CudaSlice<bf16>,
}

/// The one-token block shape (the automatic one, as for every folded product).
fn config(gpu: &GpuContext, w: &GpuFp4Weight) -> Fp4GemmConfig {
    Fp4GemmConfig::auto(1, w.n, w.k, gpu.sm_count())
}

/// Scratch floats a [`fp4_gemm_norm_out_router`] launch over `w` with `experts` experts needs.
pub fn router_fold_parts(gpu: &GpuContext, w: &GpuFp4Weight, experts: usize) -> usize {
    experts * fold_parts(gpu, w)
}

fn kernel_name(format: Fp4Format, cfg: Fp4GemmConfig) -> Option<&'static str> {
    let nv = format == Fp4Format::Nvfp4;
    Some(match (cfg.m_tiles, cfg.group, nv) {
        (1, 1, true) => "fp4_gemm_nv_m1_t1_g1_router",
        (1, 2, true) => "fp4_gemm_nv_m1_t1_g2_router",
        (2, 1, true) => "fp4_gemm_nv_m2_t1_g1_router",
        (2, 2, true) => "fp4_gemm_nv_m2_t1_g2_router",
        (1, 1, false) => "fp4_gemm_mx_m1_t1_g1_router",
        (1, 2, false) => "fp4_gemm_mx_m1_t1_g2_router",
        (2, 1, false) => "fp4_gemm_mx_m2_t1_g1_router",
        (2, 2, false) => "fp4_gemm_mx_m2_t1_g2_router",
        _ => return None,
    })
}

/// One token through `w` (dense FP4, `n` outputs) as a [`NormOut`] producer whose norm feeds a
/// MoE router: the residual row, `bf16(w ⊙ v)` and the partial sums are written as by
/// [`super::fp4_gemm_norm_out`], then the router's top-k ids and weights and the experts'
/// input `router.h`. One launch.
pub fn fp4_gemm_norm_out_router(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    output: NormOut<'_>,
    router: RouterOut<'_>,
) -> Result<(), CudaError> {
    let bad = |reason: String| CudaError::Shape {
        what: "fp4_gemm_norm_out_router".into(),
        reason,
    };
    if w.experts != 1 {
        return Err(bad(format!("weight holds {} experts", w.experts)));
    }
    let cfg = config(gpu, w);
    let parts = fold_parts(gpu, w);
    check_len("fp4_gemm_norm_out_router: x", x.len(), w.k)?;
    check_len("fp4_gemm_norm_out_router: resid", output.resid.len(), w.n)?;
    check_len("fp4_gemm_norm_out_router: weight", output.weight.len(), w.n)?;
    check_len("fp4_gemm_norm_out_router: h", output.h.len(), w.n)?;
    check_len("fp4_gemm_norm_out_router: router h", router.h.len(), w.n)?;
    if output.parts.len() < parts {
        return Err(bad(format!(
            "{} partial sums, {parts} needed",
            output.parts.len()
        )));
    }
    let e = router.experts;
    if e == 0 || e > ROUTER_FOLD_MAX_EXPERTS {
        return Err(bad(format!("{e} experts (1..={ROUTER_FOLD_MAX_EXPERTS})")));
    }
    if router.top_k == 0 || router.top_k > e.min(ROUTER_FOLD_MAX_TOP_K) {
        return Err(bad(format!("top_k {} of {e} experts", router.top_k)));
    }
    check_len(
        "fp4_gemm_norm_out_router: router weight",
        router.weight.len(),
        e * w.n,
    )?;
    if router.part.len() < e * parts {
        return Err(bad(format!(
            "router scratch of {} floats, {} needed",
            router.part.len(),
            e * parts
        )));
    }
    if router.counter.is_empty()
        || router.ids.len() < router.top_k
        || router.weights.len() < router.top_k
    {
        return Err(bad("counter, ids or weights too short".into()));
    }
    let name = kernel_name(w.format, cfg).ok_or(CudaError::NoVariant {
        format: w.format,
        m_tiles: cfg.m_tiles,
        token_tiles: 1,
        group: cfg.group,
    })?;
    let f = gpu.function(name)?;
    let launch = LaunchConfig {
        grid_dim: (parts as u32, 1, 1),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(cfg, 1),
    };
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let flags = prefetch_flags(gpu, w);
    let (e_i, k_top, renorm) = (e as i32, router.top_k as i32, i32::from(router.renorm));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&w.packed)
        .arg(&w.scales)
        .arg(&w.global_scales)
        .arg(&w.mult_lut)
        .arg(x)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w.post)
        .arg(&flags)
        .arg(&*output.resid)
        .arg(output.weight)
        .arg(&*output.h)
        .arg(&*output.parts)
        .arg(router.weight)
        .arg(&*router.part)
        .arg(&*router.counter)
        .arg(&*router.ids)
        .arg(&*router.weights)
        .arg(&*router.h)
        .arg(&router.eps)
        .arg(&e_i)
        .arg(&k_top)
        .arg(&renorm);
    // SAFETY: arguments in ROUTER_KERNEL's order and types; every buffer's length was checked
    // above against what the kernel reads and writes (one token).
    unsafe { b.launch(launch) }.map_err(drv("launch fp4_gemm_norm_out_router"))?;
    Ok(())
}
