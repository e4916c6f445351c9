//! Launchers of the BF16 decode GEMVs (bf16_gemv.cu): BF16 weights times 1 to 8 BF16 token
//! rows, f32 accumulation, and the one-token MoE variant that takes each (token, expert) pair's
//! expert from the router's ids on the device.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::gemm::check_len;

/// Most tokens one dense launch takes.
pub const BF16_GEMV_MAX_TOKENS: usize = 8;
/// K must be a multiple of this (16-byte loads); multiples of 256 keep every lane busy.
pub const BF16_GEMV_K_STEP: usize = 8;
/// Most rows one block owns (its shared-memory partials).
const MAX_ROWS_PER_BLOCK: usize = 32;

/// Whether [`bf16_gemv`] takes an `[m, k] x [n, k]^T` product.
pub fn bf16_gemv_supported(m: usize, n: usize, k: usize) -> bool {
    (1..=BF16_GEMV_MAX_TOKENS).contains(&m)
        && n > 0
        && k > 0
        && k % BF16_GEMV_K_STEP == 0
        && n.checked_mul(k).is_some_and(|v| v <= i32::MAX as usize)
}

/// Rows per block: about four 8-warp blocks per SM in one wave over all `grid_y` block rows
/// (two groups of loads in flight per warp keeps ~128 KB per SM requested).
pub fn bf16_gemv_rows_per_block(n: usize, grid_y: usize, sm_count: u32) -> usize {
    let target = (4 * sm_count as usize / grid_y.max(1)).max(1);
    n.div_ceil(target).clamp(1, MAX_ROWS_PER_BLOCK)
}

fn shape_error(what: &str, reason: String) -> CudaError {
    CudaError::Shape {
        what: what.into(),
        reason,
    }
}

/// `y[m, n] = x[m, k] · w[n, k]^T`, all bf16 row-major, f32 accumulation, with the automatic
/// rows per block. Each token's output is independent of `m` (same summation order).
pub fn bf16_gemv(
    gpu: &GpuContext,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    m: usize,
    n: usize,
    k: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let rb = bf16_gemv_rows_per_block(n, 1, gpu.sm_count());
    bf16_gemv_with(gpu, w, x, m, n, k, rb, y)
}

/// [`bf16_gemv`] with `rows_per_block` rows per block (1..=32; the benchmark's sweep).
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemv_with(
    gpu: &GpuContext,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    m: usize,
    n: usize,
    k: usize,
    rows_per_block: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    if !bf16_gemv_supported(m, n, k) || !(1..=MAX_ROWS_PER_BLOCK).contains(&rows_per_block) {
        return Err(shape_error(
            "bf16_gemv",
            format!(
                "[{m}, {k}] x [{n}, {k}] with {rows_per_block} rows per block (1..={} tokens, \
                 k a multiple of {BF16_GEMV_K_STEP}, 1..={MAX_ROWS_PER_BLOCK} rows)",
                BF16_GEMV_MAX_TOKENS
            ),
        ));
    }
    check_len("bf16_gemv: w", w.len(), n * k)?;
    check_len("bf16_gemv: x", x.len().min(m * k), m * k)?;
    check_len("bf16_gemv: y", y.len().min(m * n), m * n)?;
    let name = match m {
        1 => "bf16_gemv_t1",
        2 => "bf16_gemv_t2",
        3 | 4 => "bf16_gemv_t4",
        _ => "bf16_gemv_t8",
    };
    let f = gpu.function(name)?;
    let (m_i, n_i, k_i, rb_i) = (m as i32, n as i32, k as i32, rows_per_block as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(w)
        .arg(x)
        .arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&rb_i);
    // SAFETY: w holds n * k, x at least m * k, y at least m * n bf16 (checked above); k is a
    // multiple of 256 and rows_per_block within the kernel's shared partials.
    unsafe { b.launch(cfg) }.map_err(drv("launch bf16_gemv"))?;
    Ok(())
}

/// One-token MoE experts: `y[p] = w[ids[p]] · x[p / in_div]` for every pair `p < pairs`, with
/// `w` the experts' stacked `[experts, n, k]` weights; with `swiglu_in` each input row is a
/// `[gate | up]` row of `2k` and `silu(gate) * up` (rounded to bf16) is formed while loading.
/// A pair whose id is outside `[0, experts)` leaves its output row unwritten (the combine skips
/// it). One pass over each pair's expert: for one token, where every pair has its own expert.
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemv_pairs(
    gpu: &GpuContext,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    n: usize,
    k: usize,
    ids: &CudaSlice<i32>,
    pairs: usize,
    experts: usize,
    in_div: usize,
    swiglu_in: bool,
) -> Result<(), CudaError> {
    if !bf16_gemv_supported(1, n, k) || in_div == 0 || pairs == 0 || pairs > 65_535 {
        return Err(shape_error(
            "bf16_gemv_pairs",
            format!("{pairs} pairs of [{n}, {k}] experts (input row p / {in_div})"),
        ));
    }
    let in_w = if swiglu_in { 2 * k } else { k };
    check_len("bf16_gemv_pairs: w", w.len(), experts * n * k)?;
    let in_rows = pairs.div_ceil(in_div);
    check_len(
        "bf16_gemv_pairs: x",
        x.len().min(in_rows * in_w),
        in_rows * in_w,
    )?;
    check_len("bf16_gemv_pairs: y", y.len().min(pairs * n), pairs * n)?;
    check_len("bf16_gemv_pairs: ids", ids.len().min(pairs), pairs)?;
    let rb = bf16_gemv_rows_per_block(n, pairs, gpu.sm_count());
    let f = gpu.function(if swiglu_in {
        "bf16_gemv_pairs_sw"
    } else {
        "bf16_gemv_pairs"
    })?;
    let (n_i, k_i, rb_i, e_i, d_i) = (n as i32, k as i32, rb as i32, experts as i32, in_div as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(rb) as u32, pairs as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(w)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&rb_i)
        .arg(ids)
        .arg(&e_i)
        .arg(&d_i);
    // SAFETY: w holds experts * n * k, x the input rows of every pair, y pairs * n, ids pairs
    // (checked above); the kernel reads ids only within [0, pairs) and skips ids outside
    // [0, experts).
    unsafe { b.launch(cfg) }.map_err(drv("launch bf16_gemv_pairs"))?;
    Ok(())
}
