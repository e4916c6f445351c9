//! RMSNorm folded into one-token dense FP4 products (fp4_gemm.cu `Fold`), for the batch-1
//! decode of dense layers, where each separate norm launch is a latency-bound step of the chain.
//!
//! `RMSNorm(v) · W^T = (bf16(w ⊙ v) · W^T) / rms(v)`: the norm's only step across the row is
//! one scalar per token. So the product *before* the norm (the attention output or down
//! projection) adds its result to the residual row `v` itself, writes `bf16(w ⊙ v)` and one
//! partial sum of `v²` per block ([`NormOut`]); the product *after* it (q/k/v, gate/up) reads
//! that row and scales its sums by `1 / sqrt(Σv² / len + eps)` ([`NormIn`]). The separate
//! `add_rmsnorm` launch goes away. Numerically the folded input rounds `w ⊙ v` to bf16 where
//! the unfolded one rounds `w ⊙ v / rms(v)`: the same relative rounding, not the same bits.

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::gemm::{check_len, dense_fold_bf16, dense_product, swiglu_product, Fp4GemmConfig};
use super::weights::GpuFp4Weight;
use super::{arg_or_null, NULL_PTR};

/// The input side of a folded norm: the product's input rows hold `bf16(w ⊙ v)` of a residual
/// row `v` that is not normalised yet, and `parts` the partial sums of `v²` a [`NormOut`]
/// product wrote.
#[derive(Clone, Copy)]
pub struct NormIn<'a> {
    /// The partial sums.
    pub parts: &'a CudaSlice<f32>,
    /// Entries of `parts` to add: [`fold_parts`] of the producing weight.
    pub nparts: usize,
    /// Width of the normalised row (the norm's `hidden`).
    pub len: usize,
    /// The norm's epsilon.
    pub eps: f32,
}

/// The output side of a folded norm: instead of storing its product `y` (one token), the kernel
/// adds `bf16(y)` to the residual row, writes `h = bf16(weight ⊙ resid)` and one partial sum of
/// `resid²` per block into `parts` (the next product's [`NormIn`]).
pub struct NormOut<'a> {
    /// The residual row (f32, `n` elements), updated in place.
    pub resid: &'a mut CudaSlice<f32>,
    /// The next norm's weight (`n` elements).
    pub weight: &'a CudaSlice<f32>,
    /// The unnormalised, weighted row for the next product (`n` elements).
    pub h: &'a mut CudaSlice<bf16>,
    /// Partial sums, at least [`fold_parts`] entries.
    pub parts: &'a mut CudaSlice<f32>,
}

/// The fold arguments of one dense launch (both absent: an ordinary product).
#[derive(Default)]
pub(crate) struct Fold<'a> {
    input: Option<NormIn<'a>>,
    output: Option<NormOut<'a>>,
    /// The input's scalars as the kernel takes them (`int`, `int`, `float`).
    in_n: i32,
    in_len: i32,
    in_eps: f32,
}

impl<'a> Fold<'a> {
    pub(crate) fn new(input: Option<NormIn<'a>>, output: Option<NormOut<'a>>) -> Self {
        let (in_n, in_len, in_eps) =
            input.map_or((0, 0, 0.0), |i| (i.nparts as i32, i.len as i32, i.eps));
        Fold {
            input,
            output,
            in_n,
            in_len,
            in_eps,
        }
    }

    /// Whether the launch folds a norm (and so runs a `_fold` kernel).
    pub(crate) fn active(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }

    /// Extra dynamic shared memory of the launch: the input's `1 / rms` (one float, 16 bytes
    /// kept for alignment).
    pub(crate) fn smem(&self) -> u32 {
        if self.input.is_some() {
            16
        } else {
            0
        }
    }

    /// Pushes the kernel's trailing arguments (fp4_gemm.cu DENSE_FOLD_KERNEL) in order.
    pub(crate) fn push_args(&'a self, b: &mut LaunchArgs<'a>) {
        arg_or_null(b, self.input.map(|i| i.parts));
        b.arg(&self.in_n).arg(&self.in_len).arg(&self.in_eps);
        match &self.output {
            Some(o) => b.arg(&*o.resid).arg(o.weight).arg(&*o.h).arg(&*o.parts),
            None => b
                .arg(&NULL_PTR)
                .arg(&NULL_PTR)
                .arg(&NULL_PTR)
                .arg(&NULL_PTR),
        };
    }
}

/// The shape of one-token dense products over `w` (the automatic one: a folded product runs the
/// same kernel as an ordinary one).
fn one_token_config(gpu: &GpuContext, w: &GpuFp4Weight) -> Fp4GemmConfig {
    Fp4GemmConfig::auto(1, w.n, w.k, gpu.sm_count())
}

/// Partial sums a [`NormOut`] product over `w` writes: one per block of `16 * m_tiles` output
/// rows.
pub fn fold_parts(gpu: &GpuContext, w: &GpuFp4Weight) -> usize {
    let cfg = one_token_config(gpu, w);
    w.n.div_ceil(16 * cfg.m_tiles as usize)
}

/// Refuses a BF16 weight buffer of `len` elements that is not `[n, k]`.
fn check_bf16_weight(what: &'static str, len: usize, n: usize, k: usize) -> Result<(), CudaError> {
    if len != n * k {
        return Err(CudaError::Shape {
            what: what.into(),
            reason: format!("BF16 weight of {len} elements for [{n}, {k}]"),
        });
    }
    Ok(())
}

fn check_input(what: &'static str, input: &NormIn<'_>, k: usize) -> Result<(), CudaError> {
    let bad = |reason: String| CudaError::Shape {
        what: what.into(),
        reason,
    };
    if input.nparts == 0 {
        return Err(bad("no partial sums".into()));
    }
    if input.parts.len() < input.nparts {
        return Err(bad(format!(
            "{} partial sums in a buffer of {}",
            input.nparts,
            input.parts.len()
        )));
    }
    if input.len != k {
        return Err(bad(format!("norm width {} for K = {k}", input.len)));
    }
    Ok(())
}

/// One token through `w` with the output side of a folded norm: the residual row, the next
/// product's input and the partial sums are written instead of `y`. Returns the number of
/// partial sums for the next [`NormIn`].
pub fn fp4_gemm_norm_out(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    output: NormOut<'_>,
) -> Result<usize, CudaError> {
    let parts = fold_parts(gpu, w);
    check_len("fp4_gemm_norm_out: resid", output.resid.len(), w.n)?;
    check_len("fp4_gemm_norm_out: weight", output.weight.len(), w.n)?;
    check_len("fp4_gemm_norm_out: h", output.h.len(), w.n)?;
    if output.parts.len() < parts {
        return Err(CudaError::Shape {
            what: "fp4_gemm_norm_out: parts".into(),
            reason: format!("{} entries, {parts} needed", output.parts.len()),
        });
    }
    let cfg = one_token_config(gpu, w);
    dense_product(gpu, w, x, 1, None, cfg, &Fold::new(None, Some(output)))?;
    Ok(parts)
}

/// One token through `w` whose input is the output side of a folded norm: `y = x · W^T / rms`.
pub fn fp4_gemm_norm_in(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    input: NormIn<'_>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    check_input("fp4_gemm_norm_in", &input, w.k)?;
    check_len("fp4_gemm: y", y.len(), w.n)?;
    let cfg = one_token_config(gpu, w);
    dense_product(gpu, w, x, 1, Some(y), cfg, &Fold::new(Some(input), None))
}

/// [`super::fp4_gemm_swiglu`] of one token whose input is the output side of a folded norm
/// (gate and up scaled by `1 / rms` before their bf16 rounding and SwiGLU).
pub fn fp4_gemm_swiglu_norm_in(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    input: NormIn<'_>,
    act: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    check_input("fp4_gemm_swiglu_norm_in", &input, w.k)?;
    swiglu_product(gpu, w, x, 1, act, &Fold::new(Some(input), None))
}

/// Widest input [`bf16_gemv_norm_in`] takes (each lane of a row's warp holds 16 pieces of 8).
pub const BF16_NORM_IN_MAX_K: usize = 4096;

/// Warps per block of [`bf16_gemv_norm_in`] (bf16_gemv.cu `BGN_WARPS`), each taking one or
/// two rows.
const BF16_NORM_IN_WARPS: usize = 8;

/// Blocks of [`bf16_gemv_norm_in`] one SM holds at once (8 warps at ~80 registers each).
const BF16_NORM_IN_BLOCKS_PER_SM: usize = 3;

/// Whether the BF16 folded-norm consumers take input width `k` at `rows_per_warp` rows per warp:
/// a positive multiple of 8 (16-byte pieces) whose pieces for that many rows fit a lane
/// (`k <= BF16_NORM_IN_MAX_K / rows_per_warp`).
pub fn bf16_norm_in_takes_k(k: usize, rows_per_warp: usize) -> bool {
    k > 0 && k % 8 == 0 && k <= BF16_NORM_IN_MAX_K / rows_per_warp.max(1)
}

/// Rows each warp of [`bf16_gemv_norm_in`] takes for `[n, k]`: 1, or 2 where one row per warp
/// would take more than one wave of blocks and two rows' pieces fit a lane (`k <= 2048`).
/// `None` where even that takes more than one wave: the product is better left to cuBLAS then
/// (Qwen3-30B-A3B's all-BF16 q/k/v at one row per warp, 1.6 waves: 328 tokens/s folded against
/// 343 unfolded, H100).
pub fn bf16_norm_in_rows_per_warp(gpu: &GpuContext, n: usize, k: usize) -> Option<usize> {
    if !bf16_norm_in_takes_k(k, 1) {
        return None;
    }
    let wave =
        |rw: usize| BF16_NORM_IN_WARPS * rw * BF16_NORM_IN_BLOCKS_PER_SM * gpu.sm_count() as usize;
    if n <= wave(1) {
        Some(1)
    } else if bf16_norm_in_takes_k(k, 2) && n <= wave(2) {
        Some(2)
    } else {
        None
    }
}

/// [`fp4_gemm_norm_in`] for a BF16 weight: one token through `w` (`[n, k]` row-major, `k` a
/// multiple of 8 up to [`BF16_NORM_IN_MAX_K`]) whose input is the output side of a folded
/// norm, `y = bf16((x · W^T) / rms)`. For the Linear layers a mixed checkpoint keeps BF16
/// inside a folded decode chain (a programmatic launch, where cuBLAS's is not). Rows per warp
/// from [`bf16_norm_in_rows_per_warp`] (1 where it has none).
pub fn bf16_gemv_norm_in(
    gpu: &GpuContext,
    w: &CudaSlice<bf16>,
    n: usize,
    k: usize,
    x: &CudaSlice<bf16>,
    input: NormIn<'_>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let rw = bf16_norm_in_rows_per_warp(gpu, n, k).unwrap_or(1);
    bf16_gemv_norm_in_rows(gpu, rw, w, n, k, x, input, y)
}

/// [`fp4_gemm_norm_in`] over `w` and [`bf16_gemv_norm_in`] over the BF16 weight `bw` (`[bn,
/// w.k]`, row-major) of the same input in one launch: the FP4 blocks, then one BF16 row per warp
/// (a mixed checkpoint's FP4 q_proj and BF16 k|v: one launch instead of two). `y` and `by` get
/// what the two launches would write, bit for bit (each row's sum has one order in every form).
#[allow(clippy::too_many_arguments)]
pub fn fp4_bf16_gemv_norm_in(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    bw: &CudaSlice<bf16>,
    bn: usize,
    x: &CudaSlice<bf16>,
    input: NormIn<'_>,
    y: &mut CudaSlice<bf16>,
    by: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    const WHAT: &str = "fp4_bf16_gemv_norm_in";
    let k = w.k;
    if bn == 0 || !bf16_norm_in_takes_k(k, 1) {
        return Err(CudaError::Shape {
            what: WHAT.into(),
            reason: format!(
                "BF16 part [{bn}, {k}]: K must be a multiple of 8 up to {BF16_NORM_IN_MAX_K}, \
                 at least one row"
            ),
        });
    }
    check_input(WHAT, &input, k)?;
    check_bf16_weight(WHAT, bw.len(), bn, k)?;
    check_len("fp4_bf16_gemv_norm_in: BF16 y", by.len(), bn)?;
    // The FP4 part runs fp4_gemm_norm_in's shape, so that its rows come out bit for bit.
    let cfg = one_token_config(gpu, w);
    dense_fold_bf16(gpu, w, cfg, x, y, &input, bw, bn, by)
}

/// [`bf16_gemv_norm_in`] with `rows_per_warp` (1, or 2 where `k <= 2048`) chosen by the caller.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemv_norm_in_rows(
    gpu: &GpuContext,
    rows_per_warp: usize,
    w: &CudaSlice<bf16>,
    n: usize,
    k: usize,
    x: &CudaSlice<bf16>,
    input: NormIn<'_>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    const WHAT: &str = "bf16_gemv_norm_in";
    let max_k = BF16_NORM_IN_MAX_K / rows_per_warp.max(1);
    if n == 0 || !matches!(rows_per_warp, 1 | 2) || !bf16_norm_in_takes_k(k, rows_per_warp) {
        return Err(CudaError::Shape {
            what: WHAT.into(),
            reason: format!(
                "[{n}, {k}] at {rows_per_warp} rows per warp: K must be a positive multiple of \
                 8 up to {max_k}, 1 or 2 rows per warp"
            ),
        });
    }
    check_input(WHAT, &input, k)?;
    check_bf16_weight(WHAT, w.len(), n, k)?;
    check_len("bf16_gemv_norm_in: x", x.len(), k)?;
    check_len("bf16_gemv_norm_in: y", y.len(), n)?;
    let (n_i, k_i, p_i, l_i) = (n as i32, k as i32, input.nparts as i32, input.len as i32);
    let f = gpu.function(if rows_per_warp == 2 {
        "bf16_gemv_norm_in_r2"
    } else {
        "bf16_gemv_norm_in"
    })?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(w)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(input.parts)
        .arg(&p_i)
        .arg(&l_i)
        .arg(&input.eps);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BF16_NORM_IN_WARPS * rows_per_warp) as u32, 1, 1),
        block_dim: (32 * BF16_NORM_IN_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: w holds n * k elements, x at least k, y at least n, parts at least nparts
    // (checked above); k is a multiple of 8 up to 4096 / rows_per_warp, so every lane's pieces
    // lie in their row (rows past n read row n - 1 and store nothing).
    unsafe { b.launch(cfg) }.map_err(drv("launch bf16_gemv_norm_in"))?;
    Ok(())
}
