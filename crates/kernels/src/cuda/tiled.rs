//! The tiled FP4 GEMM for 9 to [`TILED_MAX_TOKENS`] tokens (fp4_tiled.cu): one block per 256
//! weight rows and 16 or 32 tokens, the K chunks' weights, scale bytes and activations
//! streamed into shared memory by a three-stage cp.async pipeline and shared by the block's
//! sixteen warps; K split over blocks (with a deterministic last-block reduction) where the
//! products have too few row blocks to fill the GPU.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::{GpuContext, Tuning};
use super::error::{drv, CudaError};
use super::gemm::check_len;
use super::moe::MoeRoute;
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// Weight rows of one block (16 warps x 16 rows; the gated form: 128 gate and 128 up rows).
const ROWS: usize = 256;
/// Threads of a block: 16 warps of 16 weight rows each.
const THREADS: u32 = 512;
/// Pipeline stages of the kernel (`MM_STAGES`).
const STAGES: u32 = 3;
/// K elements per chunk (one pipeline stage).
const CHUNK: usize = 128;
/// Floats between the token rows of the kernel's f32 output tile in shared memory
/// (`MM_TILE_STRIDE`: 4 floats of padding keep its stores and reads free of bank conflicts).
const TILE_STRIDE: usize = ROWS + 4;
/// The most K splits of one product.
const MAX_SPLITS: u32 = 8;
/// Fewest chunks a split may have: each split pays the pipeline's fill (two stages) again.
const MIN_SPLIT_CHUNKS: usize = 4;
/// The most tokens the tiled path takes: beyond that the weights are re-read once per 32
/// tokens and the prefill paths (FP8 tensor cores, dequantization + cuBLAS) take over.
pub const TILED_MAX_TOKENS: usize = 256;
/// The fewest tokens it takes: below, the decode kernels read each weight once anyway.
pub const TILED_MIN_TOKENS: usize = 9;
/// f32 partial sums the context keeps for split products (32 MiB).
pub(crate) const PARTS_CAPACITY: usize = 8 << 20;
/// Tickets (one per row and token block of a split product) the context keeps.
pub(crate) const TICKETS_CAPACITY: usize = 1 << 14;

/// Tokens per block for `m` tokens: 16 up to 16, else 32.
fn block_tokens(m: usize) -> usize {
    if m <= 16 {
        16
    } else {
        32
    }
}

/// Dynamic shared memory of a block: `MM_STAGES` x `MM_STAGE_BYTES(TN)` of fp4_tiled.cu, which
/// the epilogue reuses for its padded f32 tile (never larger: tested).
fn smem_bytes(bm: usize) -> u32 {
    let stage = ROWS * 64 + ROWS * 8 + bm * CHUNK * 2;
    let tile = bm * TILE_STRIDE * 4;
    (STAGES as usize * stage).max(tile) as u32
}

/// Whether the tiled kernels take `w` at `m` tokens (`gated`: the SwiGLU form): one matrix,
/// K a multiple of 128 (whole chunks, aligned copies), `m` in
/// [`TILED_MIN_TOKENS`]..=[`TILED_MAX_TOKENS`].
pub fn tiled_supported(w: &GpuFp4Weight, m: usize, gated: bool) -> bool {
    w.experts == 1
        && w.k % CHUNK == 0
        && w.k > 0
        && (TILED_MIN_TOKENS..=TILED_MAX_TOKENS).contains(&m)
        && (!gated || w.n % 2 == 0)
}

/// Row blocks x token blocks x K chunks from which [`tiled_preferred`] takes the tiled
/// kernels. H100 (`bench/results/kernels-h100-tiled-r17.json`, call 2, NVFP4, tiled vs decode
/// kernels): at 32 tokens 4096 x 22016 (86 x 1 x 32 = 2,752) 48.9 vs 92.9 us, 4096 x 14336
/// (1,792) 34.0 vs 62.9, 11008 x 4096 (1,376) 27.1 vs 33.8, the 2048 x 151936 head 142 vs 269,
/// but 4096 x 4096 (512) 16.5 vs 15.9; at 64 tokens 4096 x 4096 (1,024) 21.7 vs 26.8. With few
/// blocks the split reduction and the pipeline's fill cost more than the shared activations
/// save; at 16 tokens the decode kernels won on every shape but the head (118 vs 120).
pub const TILED_MIN_WORK: usize = 1024;

/// (row blocks, token blocks, K chunks) of a tiled product.
fn grid_cells(w: &GpuFp4Weight, m: usize, gated: bool) -> (usize, usize, usize) {
    let row_blocks = if gated {
        (w.n / 2).div_ceil(ROWS / 2)
    } else {
        w.n.div_ceil(ROWS)
    };
    (row_blocks, m.div_ceil(block_tokens(m)), w.k / CHUNK)
}

/// Whether the automatic launchers ([`super::fp4_gemm`], [`super::fp4_gemm_swiglu`]) take the
/// tiled kernels under `tuning`: `tiled_gemm` on, supported, more than 16 tokens, and at least
/// `tiled_min_work` ([`TILED_MIN_WORK`] by default).
pub fn tiled_preferred(tuning: &Tuning, w: &GpuFp4Weight, m: usize, gated: bool) -> bool {
    if !tuning.tiled_gemm || !tiled_supported(w, m, gated) || m <= 16 {
        return false;
    }
    let (rb, tb, ch) = grid_cells(w, m, gated);
    rb * tb * ch >= tuning.tiled_min_work as usize
}

/// K splits of a product with `cells` (row block, token block) tiles of `chunks` chunks on
/// `sms` SMs (one block each): the count with the least estimated time, `waves x (chunks per
/// split + 2 stages of pipeline fill)`, fewer splits on ties; 1 where the partial sums
/// (`tile` floats per cell and split) or the tickets would not fit the context's buffers.
pub(crate) fn tiled_splits(cells: usize, chunks: usize, sms: usize, tile: usize) -> u32 {
    let sms = sms.max(1);
    let mut best = (usize::MAX, 1u32);
    for s in 1..=MAX_SPLITS {
        let su = s as usize;
        if su > 1
            && (chunks / su < MIN_SPLIT_CHUNKS
                || cells > TICKETS_CAPACITY
                || su * cells * tile > PARTS_CAPACITY)
        {
            break;
        }
        let waves = (cells * su).div_ceil(sms);
        let cost = waves * (chunks.div_ceil(su) + 2);
        if cost < best.0 {
            best = (cost, s);
        }
    }
    best.1
}

/// `y[m, n] = x[m, k] · W[n, k]^T` through the tiled kernel (see [`tiled_supported`]);
/// same contract as [`super::fp4_gemm`].
pub fn fp4_gemm_tiled(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    tiled_product(gpu, w, x, m, y, false)
}

/// `y[m, n/2] = silu(x·G^T) * (x·U^T)` through the tiled kernel; the same rounding as
/// [`super::fp4_gemm_swiglu`] (each product to bf16, then `silu` with `expf`).
pub fn fp4_gemm_swiglu_tiled(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    tiled_product(gpu, w, x, m, y, true)
}

/// Sets a tiled kernel's dynamic shared memory limit to `smem` bytes (over the default 48 KiB).
fn allow_smem(f: &cudarc::driver::CudaFunction, smem: u32) -> Result<(), CudaError> {
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(drv("tiled kernel dynamic shared memory limit"))
}

fn kernel_name(format: Fp4Format, bm: usize, gated: bool) -> &'static str {
    match (format, bm == 16, gated) {
        (Fp4Format::Nvfp4, true, false) => "fp4_mm_nv_t2",
        (Fp4Format::Nvfp4, false, false) => "fp4_mm_nv_t4",
        (Fp4Format::Mxfp4, true, false) => "fp4_mm_mx_t2",
        (Fp4Format::Mxfp4, false, false) => "fp4_mm_mx_t4",
        (Fp4Format::Nvfp4, true, true) => "fp4_mm_sw_nv_t2",
        (Fp4Format::Nvfp4, false, true) => "fp4_mm_sw_nv_t4",
        (Fp4Format::Mxfp4, true, true) => "fp4_mm_sw_mx_t2",
        (Fp4Format::Mxfp4, false, true) => "fp4_mm_sw_mx_t4",
    }
}

fn tiled_product(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
    gated: bool,
) -> Result<(), CudaError> {
    let (what, what_x, what_y) = if gated {
        (
            "fp4_gemm_swiglu_tiled",
            "fp4_gemm_swiglu_tiled: x",
            "fp4_gemm_swiglu_tiled: y",
        )
    } else {
        ("fp4_gemm_tiled", "fp4_gemm_tiled: x", "fp4_gemm_tiled: y")
    };
    if !tiled_supported(w, m, gated) {
        return Err(CudaError::Shape {
            what: what.into(),
            reason: format!(
                "{} matrices of [{}, {}] at m = {m}: needs one matrix, K a multiple of {CHUNK}, \
                 {TILED_MIN_TOKENS}..={TILED_MAX_TOKENS} tokens{}",
                w.experts,
                w.n,
                w.k,
                if gated { ", an even N" } else { "" }
            ),
        });
    }
    let out_cols = if gated { w.n / 2 } else { w.n };
    check_len(what_x, x.len(), m * w.k)?;
    check_len(what_y, y.len(), m * out_cols)?;
    let bm = block_tokens(m);
    let (row_blocks, token_blocks, chunks) = grid_cells(w, m, gated);
    let cells = row_blocks * token_blocks;
    let splits = tiled_splits(cells, chunks, gpu.sm_count() as usize, ROWS * bm);
    let launch = LaunchConfig {
        grid_dim: (row_blocks as u32, splits, token_blocks as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem_bytes(bm),
    };
    let f = gpu.function(kernel_name(w.format, bm, gated))?;
    launch_split_product(gpu, &f, launch, w, (x, m, y), "launch fp4_gemm_tiled")
}

/// Launches a split FP4 product kernel `f` of the tiled or warpgroup family (`MM_KERNEL`,
/// `WG_KERNEL`: the same arguments) over `x` (`m` rows of K) into `y`, its dynamic shared
/// memory limit raised to the launch's. The caller checked the lengths and kept the launch's
/// K splits x cells x tile floats and cells tickets within the split scratch
/// ([`tiled_splits`]).
pub(crate) fn launch_split_product(
    gpu: &GpuContext,
    f: &cudarc::driver::CudaFunction,
    launch: LaunchConfig,
    w: &GpuFp4Weight,
    (x, m, y): (&CudaSlice<bf16>, usize, &mut CudaSlice<bf16>),
    what: &'static str,
) -> Result<(), CudaError> {
    allow_smem(f, launch.shared_mem_bytes)?;
    let (m_i, n_i, k_i) = (m as i32, w.n as i32, w.k as i32);
    let (parts, tickets) = gpu.split_scratch();
    let mut b = gpu.stream().launch_builder(f);
    w.push_args(&mut b)
        .arg(x)
        .arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w.post)
        .arg(parts)
        .arg(tickets);
    // SAFETY: argument types and order match MM_KERNEL and WG_KERNEL; x holds m rows of k and
    // y m rows of the output width (the callers check); the split scratch holds the launch's
    // splits x cells x tile floats and cells tickets (tiled_splits keeps one split where they
    // would not fit), and every launch on this stream uses it only after its PDL wait, so
    // launches never overlap on it.
    unsafe { b.launch(launch) }.map_err(drv(what))?;
    Ok(())
}

/// One grouped product of the tiled MoE path (moe.rs `moe_layer_tiled`): `w` holds every
/// expert; tile t of the route table ([`super::MoeRoute`], built for `pairs` pairs) multiplies
/// its expert's rows with activation rows `sorted[first + i] / in_div` into output rows
/// `sorted[first + i]` (`gated`: `[gate | up]` rows, SwiGLU into `n / 2` columns). K must be
/// a multiple of 128 (moe.rs `moe_tiled_supported`); the caller sized x and y for the pairs.
pub(crate) fn moe_tiled_product(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    (route, pairs): (&MoeRoute, usize),
    in_div: usize,
    gated: bool,
) -> Result<(), CudaError> {
    let bm = route.tile_pairs();
    let name = match (w.format, gated, bm) {
        (Fp4Format::Nvfp4, false, 32) => "fp4_mm_moe_nv_t4",
        (Fp4Format::Mxfp4, false, 32) => "fp4_mm_moe_mx_t4",
        (Fp4Format::Nvfp4, true, 32) => "fp4_mm_moe_sw_nv_t4",
        (Fp4Format::Mxfp4, true, 32) => "fp4_mm_moe_sw_mx_t4",
        (Fp4Format::Nvfp4, false, _) => "fp4_mm_moe_nv_t8",
        (Fp4Format::Mxfp4, false, _) => "fp4_mm_moe_mx_t8",
        (Fp4Format::Nvfp4, true, _) => "fp4_mm_moe_sw_nv_t8",
        (Fp4Format::Mxfp4, true, _) => "fp4_mm_moe_sw_mx_t8",
    };
    let (sorted, table, tiles) = route.tables("moe_tiled_product", pairs)?;
    let (f, launch) = moe_tiled_launch(gpu, name, smem_bytes(bm), w.n, gated, tiles)?;
    let (n_i, k_i, div_i) = (w.n as i32, w.k as i32, in_div as i32);
    let mut b = gpu.stream().launch_builder(&f);
    w.push_args(&mut b)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w.post)
        .arg(sorted)
        .arg(table)
        .arg(&div_i);
    // SAFETY: argument types and order match MM_MOE_KERNEL; the route table has at most
    // `tiles` tiles whose pairs index x (through in_div) and y within the caller's sizes.
    unsafe { b.launch(launch) }.map_err(drv("launch tiled grouped FP4 GEMM"))?;
    Ok(())
}

/// Bytes of shared memory of the BF16 tiled grouped kernels (`bf16_mm_moe_*`, fp4_tiled.cu)
/// with tiles of `bm` pairs: three stages of 256 rows x 64 bf16 weights and `bm` slots x 64
/// bf16 activations (more than the epilogue's tile of `bm` x `TILE_STRIDE` floats: tested).
pub(crate) fn bf16_moe_smem(bm: usize) -> u32 {
    (STAGES as usize * (ROWS * 128 + bm * 128)) as u32
}

/// The function and launch shape of a tiled grouped kernel `name` over `n` weight rows
/// (`gated`: 128 gate rows and their up rows per block, else 256 rows) and `tiles` tiles, its
/// dynamic shared memory limit raised to `smem`.
pub(crate) fn moe_tiled_launch(
    gpu: &GpuContext,
    name: &'static str,
    smem: u32,
    n: usize,
    gated: bool,
    tiles: usize,
) -> Result<(cudarc::driver::CudaFunction, LaunchConfig), CudaError> {
    let f = gpu.function(name)?;
    allow_smem(&f, smem)?;
    let row_blocks = if gated {
        (n / 2).div_ceil(ROWS / 2)
    } else {
        n.div_ceil(ROWS)
    };
    let launch = LaunchConfig {
        grid_dim: (row_blocks as u32, 1, tiles as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    Ok((f, launch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_holds_the_epilogue_tile() {
        for bm in [16, 32, 64] {
            assert!(smem_bytes(bm) as usize >= bm * TILE_STRIDE * 4);
            // Under the 227 KiB an H100 block may have.
            assert!(smem_bytes(bm) <= 227 * 1024);
        }
        for bm in [32, 64] {
            assert!(bf16_moe_smem(bm) as usize >= bm * TILE_STRIDE * 4);
            assert!(bf16_moe_smem(bm) <= 227 * 1024);
        }
    }

    #[test]
    fn splits_fill_the_gpu_without_tiny_splits() {
        // 4096 x 14336 at 32 tokens: 56 row blocks; two splits fill 112 of 132 SMs.
        assert_eq!(tiled_splits(56, 32, 132, ROWS * 32), 2);
        // MiMo-7B's down (11008 x 4096): 16 row blocks, 86 chunks: eight splits (128 blocks).
        assert_eq!(tiled_splits(16, 86, 132, ROWS * 32), 8);
        // 172 cells of 32 chunks: three splits make 516 blocks in four full waves.
        assert_eq!(tiled_splits(172, 32, 132, ROWS * 32), 3);
        // MiMo-7B's gate/up at 32 tokens: 86 blocks of 128 gate rows: 258 blocks, two waves.
        assert_eq!(tiled_splits(86, 32, 132, ROWS * 32), 3);
        // Few chunks: no split below MIN_SPLIT_CHUNKS each.
        assert_eq!(tiled_splits(4, 6, 132, ROWS * 32), 1);
        // Enough cells for a wave: one split.
        assert_eq!(tiled_splits(600, 32, 132, ROWS * 32), 1);
    }

    #[test]
    fn splits_respect_the_scratch() {
        // 8 splits of 2048 cells of 8192 floats would need 128 Mi floats.
        assert_eq!(tiled_splits(100, 64, 100_000, PARTS_CAPACITY), 1);
        assert_eq!(tiled_splits(TICKETS_CAPACITY + 1, 64, 1_000_000, 1), 1);
    }

    #[test]
    fn shared_memory_fits_the_carveout_of_the_other_kernels() {
        // Under placement.rs's 100 KiB configuration (one block per SM, 1 KiB reserved).
        assert!(smem_bytes(32) + 1024 + 16 <= 100 * 1024);
        assert_eq!(smem_bytes(32), 3 * (16384 + 2048 + 8192));
    }

    #[test]
    fn the_output_tile_is_free_of_bank_conflicts() {
        // fp4_tiled.cu's epilogue: lane (g = lane / 4, t = lane % 4) of warp w stores its
        // accumulator element for token 8j + 2t (+1) and row 16w + g (+8) at
        // token * TILE_STRIDE + row; the 32 lanes of each store must hit 32 distinct banks.
        for j in 0..4 {
            for (dt, dr) in [(0, 0), (1, 0), (0, 8), (1, 8)] {
                let mut banks: Vec<usize> = (0..32)
                    .map(|lane| {
                        let (g, t) = (lane / 4, lane % 4);
                        ((8 * j + 2 * t + dt) * TILE_STRIDE + 16 + g + dr) % 32
                    })
                    .collect();
                banks.sort_unstable();
                banks.dedup();
                assert_eq!(banks.len(), 32, "store j={j} dt={dt} dr={dr}");
            }
        }
        // The reads take 32 consecutive rows of one token (and whole float4s of a row for the
        // split partials): contiguous, so conflict-free, as long as rows start 16-byte aligned.
        assert_eq!(TILE_STRIDE * 4 % 16, 0);
    }

    #[test]
    fn the_output_tile_fits_in_the_stage_buffers() {
        // The epilogue reuses the pipeline's buffers for the padded f32 tile.
        for bm in [16, 32] {
            let stages = STAGES as usize * (ROWS * 72 + bm * CHUNK * 2);
            assert!(bm * TILE_STRIDE * 4 <= stages, "bm {bm}");
            assert_eq!(smem_bytes(bm) as usize, stages);
        }
    }
}
