//! The one-token path of the FP4 MoE layer (batch-1 decode): gate/up + SwiGLU with one block
//! row per (token, expert) pair and no routing scan, then the down projection of every pair with
//! the weighted combine fused, optionally as the output side of a folded norm; the experts
//! chosen from top-k ids or from the router's logits ([`OneTokenRoute`]).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::arg_or_null;
use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::fold::NormOut;
use super::gemm::{check_len, reduction_smem, Fp4GemmConfig, K_CHUNK};
use super::moe::{
    launch_moe_kernel, MoeConfig, MoeTail, MoeWeights, MoeWorkspace, Route, MOE_MAX_EXPERTS,
};
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// The one-token path of [`super::moe_layer_with`] (two launches): gate/up + SwiGLU with one block
/// row per pair and no routing scan (a token's top-k experts are distinct, so the grouped
/// kernel's gathering would share nothing), then the down projection of all pairs with the
/// weighted combine fused (`fp4_moe_down_t1_*`: one or two warps per pair
/// (`Tuning::moe_down_split`), warps summed in warp order).
#[allow(clippy::too_many_arguments)]
pub(super) fn moe_layer_one_token(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    out: &mut CudaSlice<bf16>,
    cfg: MoeConfig,
) -> Result<(), CudaError> {
    if top_k > MOE_ONE_TOKEN_MAX_TOPK {
        return Err(CudaError::Shape {
            what: "moe_layer".into(),
            reason: format!(
                "top_k {top_k}: the one-token kernel takes at most {MOE_ONE_TOKEN_MAX_TOPK}"
            ),
        });
    }
    let route = OneTokenRoute::TopK {
        ids: topk_ids,
        weights: topk_weights,
    };
    one_token_gate_up(gpu, w, x, route, top_k, ws, cfg)?;
    one_token_down(gpu, w, route, top_k, ws, DownTarget::Store(out))
}

/// Where the one-token MoE calls ([`moe_one_token_gate_up`], [`moe_down_norm_out`]) take their
/// experts from.
#[derive(Clone, Copy)]
pub enum OneTokenRoute<'a> {
    /// The router's top-k ids and routing weights, `top_k` of each.
    TopK {
        /// Expert ids in rank order.
        ids: &'a CudaSlice<i32>,
        /// Their routing weights.
        weights: &'a CudaSlice<f32>,
    },
    /// The router's logits (one per expert): each kernel takes the softmax and top-k itself,
    /// as the runtime's router picks them (ties to the lower index; `renorm`: the weights
    /// renormalised over the top-k), so that no launch waits for a separate top-k step. In a
    /// graph with programmatic edges the down projection reads them before its wait, so they
    /// must come from an earlier kernel than the gate/up call (as the router's do).
    Logits {
        /// `[experts]` logits of the token.
        logits: &'a CudaSlice<f32>,
        /// Renormalise the chosen weights (`norm_topk_prob`).
        renorm: bool,
    },
}

impl<'a> OneTokenRoute<'a> {
    /// Checks the route's buffers against the layer: `top_k` ids and weights, or one logit per
    /// expert.
    fn check(&self, experts: usize, top_k: usize) -> Result<(), CudaError> {
        match self {
            OneTokenRoute::TopK { ids, weights } => {
                check_len("moe one token: topk_ids", ids.len(), top_k)?;
                check_len("moe one token: topk_weights", weights.len(), top_k)
            }
            OneTokenRoute::Logits { logits, .. } => {
                check_len("moe one token: logits", logits.len(), experts)
            }
        }
    }

    /// The top-k ids, if this route has them (with logits the kernels read none).
    fn ids(self) -> Option<&'a CudaSlice<i32>> {
        match self {
            OneTokenRoute::TopK { ids, .. } => Some(ids),
            OneTokenRoute::Logits { .. } => None,
        }
    }

    /// The routing weights, if this route has them.
    fn weights(self) -> Option<&'a CudaSlice<f32>> {
        match self {
            OneTokenRoute::TopK { weights, .. } => Some(weights),
            OneTokenRoute::Logits { .. } => None,
        }
    }

    /// The logits, if this route has them (a null pointer for the kernels otherwise).
    fn logits(self) -> Option<&'a CudaSlice<f32>> {
        match self {
            OneTokenRoute::TopK { .. } => None,
            OneTokenRoute::Logits { logits, .. } => Some(logits),
        }
    }

    /// The kernels' `renorm` argument (only read with logits).
    fn renorm(self) -> i32 {
        i32::from(matches!(self, OneTokenRoute::Logits { renorm: true, .. }))
    }
}

/// Most pairs (the router's top-k) of one token the one-token expert kernels take, FP4 and BF16
/// alike (their shared-memory selection slots when they rank the router's logits themselves).
pub const MOE_ONE_TOKEN_MAX_TOPK: usize = 16;

/// Partial sums of squares [`moe_down_norm_out`] writes: one per block of 16 hidden rows.
pub fn moe_fold_parts(hidden: usize) -> usize {
    hidden.div_ceil(16)
}

/// One token through a MoE layer whose output feeds a folded norm (fold.rs, batch-1 decode
/// with `Tuning::moe_direct`), in two calls so that the caller may pass the layer's input row
/// as the norm's output row: first [`moe_one_token_gate_up`] (the pairs' SwiGLU rows into the
/// workspace), then this: the down projection and weighted combine of every pair, added to the
/// residual row with `pending` (an output not added yet, such as an attention output a fused
/// router left pending) first, `bf16(weight ⊙ v)` and [`moe_fold_parts`] partial sums of `v²`
/// written instead of an output row. Returns the number of partial sums.
#[allow(clippy::too_many_arguments)]
pub fn moe_down_norm_out(
    gpu: &GpuContext,
    w: &MoeWeights,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    pending: Option<&CudaSlice<bf16>>,
    out: NormOut<'_>,
) -> Result<usize, CudaError> {
    let (_, hidden, _) = w.dims()?;
    check_one_token(w, route, top_k, ws)?;
    let parts = moe_fold_parts(hidden);
    check_len("moe_down_norm_out: resid", out.resid.len(), hidden)?;
    check_len("moe_down_norm_out: weight", out.weight.len(), hidden)?;
    check_len("moe_down_norm_out: h", out.h.len(), hidden)?;
    check_len(
        "moe_down_norm_out: parts",
        out.parts.len().min(parts),
        parts,
    )?;
    if let Some(p) = pending {
        check_len("moe_down_norm_out: pending", p.len(), hidden)?;
    }
    one_token_down(gpu, w, route, top_k, ws, DownTarget::Fold { pending, out })?;
    Ok(parts)
}

/// The first launch of the one-token MoE layer ([`moe_down_norm_out`]): gate/up + SwiGLU of
/// the `top_k` pairs of the one token `x` into the workspace.
pub fn moe_one_token_gate_up(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
) -> Result<(), CudaError> {
    let (_, hidden, inter) = w.dims()?;
    check_one_token(w, route, top_k, ws)?;
    check_len("moe_one_token_gate_up: x", x.len(), hidden)?;
    one_token_gate_up(
        gpu,
        w,
        x,
        route,
        top_k,
        ws,
        MoeConfig::auto(hidden, inter, 1),
    )
}

/// The checks of [`super::moe_layer_with`] for one token, for the split one-token calls.
fn check_one_token(
    w: &MoeWeights,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &MoeWorkspace,
) -> Result<(), CudaError> {
    let (experts, _, _) = w.dims()?;
    if top_k == 0
        || top_k > MOE_ONE_TOKEN_MAX_TOPK
        || top_k > ws.max_pairs
        || experts > MOE_MAX_EXPERTS
    {
        return Err(CudaError::Shape {
            what: "moe one token".into(),
            reason: format!(
                "top_k {top_k} (1..={MOE_ONE_TOKEN_MAX_TOPK}, workspace {} pairs), {experts} \
                 experts (at most {MOE_MAX_EXPERTS})",
                ws.max_pairs
            ),
        });
    }
    route.check(experts, top_k)
}

/// gate/up + SwiGLU: grid.y = pairs, one token slot per block.
fn one_token_gate_up(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    cfg: MoeConfig,
) -> Result<(), CudaError> {
    let (experts, _, inter) = w.dims()?;
    let gu = &w.gate_up;
    let chunks = gu.k.div_ceil(K_CHUNK) as u32;
    let gcfg = Fp4GemmConfig {
        m_tiles: 2,
        warps: cfg.gate_up_warps.min(chunks).max(1),
        group: 1,
    };
    let name = match gu.format {
        Fp4Format::Nvfp4 => "fp4_moe_nv_g1_swiglu_t1",
        Fp4Format::Mxfp4 => "fp4_moe_mx_g1_swiglu_t1",
    };
    let f = gpu.function(name)?;
    let launch = LaunchConfig {
        grid_dim: (inter.div_ceil(16) as u32, top_k as u32, 1),
        block_dim: (32 * gcfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(gcfg, 1),
    };
    let (p_i, e_i) = (top_k as i32, experts as i32);
    let r = Route {
        ids: route.ids(),
        pairs: p_i,
        experts: e_i,
        slots: top_k as u32,
    };
    // SAFETY (of the call): x holds one row of `hidden`, act top_k rows of `inter` (the
    // workspace holds at least top_k pairs, checked by the callers), ids top_k entries or the
    // logits one per expert (OneTokenRoute::check).
    launch_moe_kernel(
        gpu,
        &f,
        launch,
        gu,
        x,
        &mut ws.act,
        &r,
        p_i,
        Some(&mut ws.bad),
        MoeTail::OneToken(route.logits(), down_prefetch(gpu, w)),
        "launch one-token gate/up",
    )
}

/// The down projection the one-token gate/up blocks prefetch (`Tuning::moe_down_prefetch`):
/// `w.down` where it is laid out as the kernel assumes (same format, `[E][hidden][inter]`).
fn down_prefetch<'a>(gpu: &GpuContext, w: &'a MoeWeights) -> Option<&'a GpuFp4Weight> {
    let (gu, d) = (&w.gate_up, &w.down);
    let fits = d.format == gu.format && d.experts == gu.experts && d.n == gu.k && 2 * d.k == gu.n;
    (gpu.tuning().moe_down_prefetch && fits).then_some(d)
}

/// Where the one-token down projection's combined row goes.
enum DownTarget<'a, 'b> {
    /// Stored as the layer's output row.
    Store(&'b mut CudaSlice<bf16>),
    /// Added to a residual row as the output side of a folded norm.
    Fold {
        pending: Option<&'a CudaSlice<bf16>>,
        out: NormOut<'a>,
    },
}

/// The most warps a one-token down + combine block takes (the kernels' launch bound of 512
/// threads, over 32).
pub const MOE_DOWN_T1_MAX_WARPS: usize = 16;

/// Warps per pair of the one-token down kernel: the tuning's split, 1 or 2 (the kernels
/// compiled), lowered to 1 where `top_k` pairs of 2 would not fit [`MOE_DOWN_T1_MAX_WARPS`].
fn down_split(wanted: u32, top_k: usize) -> u32 {
    if wanted >= 2 && 2 * top_k.max(1) <= MOE_DOWN_T1_MAX_WARPS {
        2
    } else {
        1
    }
}

/// The one-token down + combine kernel of fp4_gemm.cu for a format, with or without a folded
/// norm, with 1 or 2 warps per pair (`split`, from [`down_split`]).
fn down_kernel_name(format: Fp4Format, fold: bool, split: u32) -> &'static str {
    match (format, fold, split) {
        (Fp4Format::Nvfp4, false, 1) => "fp4_moe_down_t1_nv",
        (Fp4Format::Mxfp4, false, 1) => "fp4_moe_down_t1_mx",
        (Fp4Format::Nvfp4, true, 1) => "fp4_moe_down_t1_nv_fold",
        (Fp4Format::Mxfp4, true, 1) => "fp4_moe_down_t1_mx_fold",
        (Fp4Format::Nvfp4, false, _) => "fp4_moe_down_t1_nv_s2",
        (Fp4Format::Mxfp4, false, _) => "fp4_moe_down_t1_mx_s2",
        (Fp4Format::Nvfp4, true, _) => "fp4_moe_down_t1_nv_fold_s2",
        (Fp4Format::Mxfp4, true, _) => "fp4_moe_down_t1_mx_fold_s2",
    }
}

/// down + combine: `split` warps per pair (each a share of K), 16 output rows per block.
fn one_token_down(
    gpu: &GpuContext,
    w: &MoeWeights,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    mut target: DownTarget<'_, '_>,
) -> Result<(), CudaError> {
    let (experts, hidden, _) = w.dims()?;
    let d = &w.down;
    let fold = matches!(target, DownTarget::Fold { .. });
    let split = down_split(gpu.tuning().moe_down_split, top_k);
    let f = gpu.function(down_kernel_name(d.format, fold, split))?;
    let warps = top_k.max(1) as u32 * split;
    let launch = LaunchConfig {
        grid_dim: (hidden.div_ceil(16) as u32, 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: warps * 16 * 4,
    };
    let (n_i, k_i, p_i, e_i) = (d.n as i32, d.k as i32, top_k as i32, experts as i32);
    let renorm = route.renorm();
    let mut b = gpu.stream().launch_builder(&f);
    d.push_args(&mut b).arg(&ws.act);
    // With logits the kernel reads neither weights nor ids (null pointers).
    arg_or_null(&mut b, route.weights());
    arg_or_null(&mut b, route.ids());
    let what = match &mut target {
        DownTarget::Store(out) => {
            b.arg(&mut **out)
                .arg(&n_i)
                .arg(&k_i)
                .arg(&p_i)
                .arg(&e_i)
                .arg(&d.post);
            "launch one-token down + combine"
        }
        DownTarget::Fold { pending, out } => {
            b.arg(&n_i).arg(&k_i).arg(&p_i).arg(&e_i).arg(&d.post);
            arg_or_null(&mut b, *pending);
            b.arg(&*out.resid)
                .arg(out.weight)
                .arg(&*out.h)
                .arg(&*out.parts);
            "launch one-token down + folded norm"
        }
    };
    // Both kernels take the router's logits (or null) and renorm last.
    arg_or_null(&mut b, route.logits());
    b.arg(&renorm);
    // SAFETY: matches MOE_DOWN_T1_KERNEL / MOE_DOWN_T1_FOLD_KERNEL; act holds top_k rows of
    // `inter`, weights and ids top_k entries or the logits one per expert (OneTokenRoute::check),
    // out `hidden` elements; with a fold, resid, weight, h and pending hold `hidden` elements and
    // parts one per block (moe_down_norm_out checks).
    unsafe { b.launch(launch) }.map_err(drv(what))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every one-token down kernel the launcher can name is instantiated with the split its
    /// name says (the SPLIT template argument, last in the instantiation).
    #[test]
    fn down_kernel_names_are_instantiated() {
        let src = super::super::compile::FP4_GEMM_SRC.1;
        for format in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
            for fold in [false, true] {
                for split in [1, 2] {
                    let name = down_kernel_name(format, fold, split);
                    let line = src
                        .lines()
                        .find(|l| l.contains(&format!("({name}, ")))
                        .unwrap_or_else(|| panic!("{name} is not instantiated"));
                    assert!(
                        line.trim_end().ends_with(&format!(", {split})")),
                        "{name}: {line}"
                    );
                }
            }
        }
    }

    /// Two warps per pair where the tuning asks for them and top_k pairs of two fit a block;
    /// one otherwise.
    #[test]
    fn down_split_fits_the_block() {
        assert_eq!(down_split(2, 8), 2);
        assert_eq!(down_split(2, MOE_DOWN_T1_MAX_WARPS / 2), 2);
        assert_eq!(down_split(2, MOE_DOWN_T1_MAX_WARPS / 2 + 1), 1);
        assert_eq!(down_split(2, 16), 1);
        assert_eq!(down_split(1, 8), 1);
        assert_eq!(down_split(0, 1), 1);
        assert_eq!(down_split(7, 2), 2);
    }
}
