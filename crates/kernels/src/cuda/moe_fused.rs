//! One token through an FP4 MoE layer in one launch (`fp4_moe_fused_t1_*`, fp4_moe_fused.cu):
//! gate/up + SwiGLU, a grid-wide barrier, then the down projection and the weighted combine,
//! each block's down rows of the chosen experts copied to shared memory while the gate/up
//! weights stream. Taken by [`super::moe_layer`] at one token and by the runtime's folded decode
//! step ([`moe_fused_norm_out`]) where [`moe_fused_supported`] says so.

use cudarc::driver::sys::CUfunction_attribute as Attr;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::fold::NormOut;
use super::gemm::{check_len, K_CHUNK};
use super::moe::{check_one_token, DownTarget, MoeWeights, MoeWorkspace, OneTokenRoute};
use super::placement::SPREAD_CARVEOUT_PERCENT;
use super::{arg_or_null, NULL_PTR};
use crate::fp4::Fp4Format;

/// Most warps per block (the kernels come with 16 and 8).
const WARPS: u32 = 16;
/// Gate/up items (tile, K chunk) whose partial sums a block holds (`FUSED_MAX_BLOCK_ITEMS`).
const MAX_BLOCK_ITEMS: usize = 64;
/// Most pairs (`FUSED_MAX_PAIRS`).
const MAX_PAIRS: usize = 16;

/// Rows of the down projection each block owns (one mma row tile).
const ROWS: usize = 16;

/// Dynamic shared memory of a launch (the kernel's layout): the down rows of every pair
/// (weights, then scale bytes padded to 16 bytes), the input row, the two 256-entry bf16
/// multiplier tables, every pair's SwiGLU row, phase A's item partials and phase B's warp sums.
fn fused_smem(format: Fp4Format, hidden: usize, inter: usize, pairs: usize) -> usize {
    let block = format.block_size();
    let weights = pairs * ROWS * inter / 2;
    let scales = (pairs * ROWS * inter / block).next_multiple_of(16);
    let x = hidden.next_multiple_of(8) * 2;
    let act = (pairs * inter * 2).next_multiple_of(16);
    weights + scales + x + 2 * 512 + act + 4 * (MAX_BLOCK_ITEMS * 32 + WARPS as usize * 16)
}

/// Whether the shape suits the kernel, from the dimensions alone: one 16-row down tile per
/// block (hidden a multiple of 16), at most 16 pairs, and every block's gate/up items within
/// the partial sums it holds. Returns the block count.
fn fused_shape(hidden: usize, inter: usize, pairs: usize) -> Option<usize> {
    if hidden == 0 || inter == 0 || hidden % ROWS != 0 || pairs == 0 || pairs > MAX_PAIRS {
        return None;
    }
    let blocks = hidden / ROWS;
    let tiles = pairs * inter.div_ceil(16);
    let items = tiles.div_ceil(blocks) * hidden.div_ceil(K_CHUNK);
    (items <= MAX_BLOCK_ITEMS).then_some(blocks)
}

/// The kernel of a format, with or without the folded norm output, with 16 or 8 warps.
fn kernel_name(format: Fp4Format, fold: bool, warps: u32) -> &'static str {
    match (format, fold, warps == 8) {
        (Fp4Format::Nvfp4, false, false) => "fp4_moe_fused_t1_nv",
        (Fp4Format::Mxfp4, false, false) => "fp4_moe_fused_t1_mx",
        (Fp4Format::Nvfp4, true, false) => "fp4_moe_fused_t1_nv_fold",
        (Fp4Format::Mxfp4, true, false) => "fp4_moe_fused_t1_mx_fold",
        (Fp4Format::Nvfp4, false, true) => "fp4_moe_fused_t1_nv_w8",
        (Fp4Format::Mxfp4, false, true) => "fp4_moe_fused_t1_mx_w8",
        (Fp4Format::Nvfp4, true, true) => "fp4_moe_fused_t1_nv_fold_w8",
        (Fp4Format::Mxfp4, true, true) => "fp4_moe_fused_t1_mx_fold_w8",
    }
}

/// Warps per block of the fused launch: `Tuning::moe_fused_warps` where it is 8, else 16.
fn warps(gpu: &GpuContext) -> u32 {
    if gpu.tuning().moe_fused_warps == 8 {
        8
    } else {
        WARPS
    }
}

/// Whether one token's MoE layer with `top_k` experts runs as one fused launch on this GPU:
/// `Tuning::moe_fused` and `moe_direct` on, both stacks of one format, a shape the kernel takes
/// ([`fused_shape`]), its shared memory within the GPU's limit, and every block of the grid
/// resident at once (the occupancy the driver reports times the SMs; a block left waiting would
/// never let the grid barrier open).
pub fn moe_fused_supported(
    gpu: &GpuContext,
    w: &MoeWeights,
    top_k: usize,
) -> Result<bool, CudaError> {
    let t = gpu.tuning();
    if !t.moe_fused || !t.moe_direct || w.gate_up.format != w.down.format {
        return Ok(false);
    }
    let (_, hidden, inter) = w.dims()?;
    let Some(blocks) = fused_shape(hidden, inter, top_k) else {
        return Ok(false);
    };
    let smem = fused_smem(w.down.format, hidden, inter, top_k);
    // The kernels' static shared memory (the router's probabilities) comes on top.
    let nw = warps(gpu);
    let f = gpu.function(kernel_name(w.down.format, false, nw))?;
    let stat = f
        .get_attribute(Attr::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(drv("kernel shared memory"))?;
    // Within the carveout every kernel of a decode chain asks for (placement.rs), so that the
    // SMs keep one split of shared memory and L1 between kernels.
    let budget = (gpu.sm_shared_bytes() / 100 * SPREAD_CARVEOUT_PERCENT) as usize;
    if smem + usize::try_from(stat).unwrap_or(usize::MAX) + 1024 > budget {
        return Ok(false);
    }
    for fold in [false, true] {
        let f = gpu.function(kernel_name(w.down.format, fold, nw))?;
        set_smem_limit(&f, smem)?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(32 * nw, smem, None)
            .map_err(drv("fused MoE occupancy"))?;
        if (per_sm as usize) * (gpu.sm_count() as usize) < blocks {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Raises the kernel's dynamic shared memory limit to `smem` where it is past the default.
fn set_smem_limit(f: &cudarc::driver::CudaFunction, smem: usize) -> Result<(), CudaError> {
    if smem > 48 * 1024 {
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(drv("fused MoE shared memory limit"))?;
    }
    Ok(())
}

/// One token's MoE layer whose output feeds a folded norm, in one launch (the fused form of
/// [`super::moe_one_token_gate_up`] then [`super::moe_down_norm_out`]): the layer's input row
/// is `out.h` on entry (the runtime's MoE input), and on exit `out.h` holds the next layer's
/// unnormalised input, `out.resid` the residual with `pending` and the layer's output added,
/// `out.parts` the [`super::moe_fold_parts`] partial sums of `v²`. Returns the number of
/// partial sums. Refused where [`moe_fused_supported`] is false.
pub fn moe_fused_norm_out(
    gpu: &GpuContext,
    w: &MoeWeights,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    pending: Option<&CudaSlice<bf16>>,
    out: NormOut<'_>,
) -> Result<usize, CudaError> {
    let (_, hidden, _) = w.dims()?;
    let parts = super::moe_fold_parts(hidden);
    check_len("moe_fused_norm_out: resid", out.resid.len(), hidden)?;
    check_len("moe_fused_norm_out: weight", out.weight.len(), hidden)?;
    check_len("moe_fused_norm_out: h", out.h.len(), hidden)?;
    check_len(
        "moe_fused_norm_out: parts",
        out.parts.len().min(parts),
        parts,
    )?;
    if let Some(p) = pending {
        check_len("moe_fused_norm_out: pending", p.len(), hidden)?;
    }
    moe_fused(
        gpu,
        w,
        None,
        route,
        top_k,
        ws,
        DownTarget::Fold { pending, out },
    )?;
    Ok(parts)
}

/// The fused launch. `x` is the input row, or None for a fold target whose `h` holds it.
pub(super) fn moe_fused(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: Option<&CudaSlice<bf16>>,
    route: OneTokenRoute<'_>,
    top_k: usize,
    ws: &mut MoeWorkspace,
    target: DownTarget<'_, '_>,
) -> Result<(), CudaError> {
    let (experts, hidden, inter) = w.dims()?;
    check_one_token(w, route, top_k, ws)?;
    if !moe_fused_supported(gpu, w, top_k)? {
        return Err(CudaError::Shape {
            what: "fused MoE layer".into(),
            reason: format!(
                "hidden {hidden}, inter {inter}, top_k {top_k}: not taken on this GPU \
                 (moe_fused_supported)"
            ),
        });
    }
    let blocks = hidden / ROWS;
    let fold = matches!(target, DownTarget::Fold { .. });
    let nw = warps(gpu);
    let f = gpu.function(kernel_name(w.down.format, fold, nw))?;
    let smem = fused_smem(w.down.format, hidden, inter, top_k);
    let launch = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * nw, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // The barrier's count must be a multiple of this launch's blocks when it starts.
    if ws.barrier_blocks != blocks {
        gpu.stream()
            .memset_zeros(&mut ws.barrier)
            .map_err(drv("zero the fused MoE barrier"))?;
        ws.barrier_blocks = blocks;
    }
    let (h_i, i_i, p_i, e_i) = (hidden as i32, inter as i32, top_k as i32, experts as i32);
    let renorm = route.renorm();
    let mut b = gpu.stream().launch_builder(&f);
    w.gate_up.push_args(&mut b);
    w.down.push_args(&mut b);
    match (&target, x) {
        (_, Some(x)) => {
            check_len("fused MoE layer: x", x.len(), hidden)?;
            b.arg(x)
        }
        (DownTarget::Fold { out, .. }, None) => b.arg(&*out.h),
        (DownTarget::Store(_), None) => {
            return Err(CudaError::Shape {
                what: "fused MoE layer".into(),
                reason: "no input row".into(),
            })
        }
    };
    b.arg(&ws.act);
    arg_or_null(&mut b, route.weights());
    arg_or_null(&mut b, route.ids());
    b.arg(&h_i)
        .arg(&i_i)
        .arg(&p_i)
        .arg(&e_i)
        .arg(&w.gate_up.post)
        .arg(&w.down.post);
    arg_or_null(&mut b, route.logits());
    b.arg(&renorm);
    match route.ids() {
        Some(_) => b.arg(&ws.bad),
        None => b.arg(&NULL_PTR),
    };
    b.arg(&ws.barrier);
    let what = match &target {
        DownTarget::Store(out) => {
            check_len("fused MoE layer: out", out.len(), hidden)?;
            b.arg(&**out);
            "launch fused one-token MoE layer"
        }
        DownTarget::Fold { pending, out } => {
            arg_or_null(&mut b, *pending);
            b.arg(&*out.resid)
                .arg(out.weight)
                .arg(&*out.h)
                .arg(&*out.parts);
            "launch fused one-token MoE layer + folded norm"
        }
    };
    // SAFETY: matches MOE_FUSED_KERNEL / MOE_FUSED_FOLD_KERNEL; x (or out.h) and out hold
    // `hidden` elements, act top_k rows of `inter` (check_one_token: the workspace holds
    // top_k pairs), weights and ids top_k entries or the logits one per expert
    // (OneTokenRoute::check), the barrier one u64 counting in multiples of `blocks`; with a fold, resid, weight, h and pending
    // hold `hidden` elements and parts one per block (moe_fused_norm_out checks). Every block
    // is resident at once (moe_fused_supported), so the grid barrier opens.
    unsafe { b.launch(launch) }.map_err(drv(what))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_moe_shape_is_taken() {
        // 128 blocks, 384 gate/up tiles of 16 chunks: 3 items per warp.
        assert_eq!(fused_shape(2048, 768, 8), Some(128));
        // 49,152 bytes of down rows + 6,144 of scales, the 4 KiB input row, the tables, 12 KiB
        // of SwiGLU rows and the partials: under the 100 KiB carveout with the kernel's static
        // 5 KiB.
        let smem = fused_smem(Fp4Format::Nvfp4, 2048, 768, 8);
        assert_eq!(
            smem,
            8 * 16 * 384 + 8 * 16 * 48 + 4096 + 1024 + 8 * 768 * 2 + 4 * (64 * 32 + 16 * 16)
        );
        assert!(smem + 5 * 1024 + 1024 <= 233_472 / 100 * SPREAD_CARVEOUT_PERCENT as usize);
    }

    #[test]
    fn shapes_past_the_kernel_are_refused() {
        assert_eq!(
            fused_shape(2050, 768, 8),
            None,
            "hidden not a multiple of 16"
        );
        assert_eq!(
            fused_shape(2048, 768, 17),
            None,
            "more pairs than the kernel holds"
        );
        assert_eq!(fused_shape(2048, 768, 0), None);
        // 4096 hidden: 256 blocks each with one tile x 32 chunks: held; with three tiles
        // (inter 1536) 96 items are not.
        assert_eq!(fused_shape(4096, 512, 8), Some(256));
        assert_eq!(fused_shape(4096, 1536, 8), None);
        // Too many tiles per block for the registers.
        assert_eq!(fused_shape(256, 2048, 16), None);
    }
}
