//! The bulk-copy FP4 GEMV/GEMM for 1 to [`BULK_MAX_TOKENS`] tokens on Hopper (fp4_bulk.cu): one
//! producer thread per block streams 512-element K chunks of the block's weight rows, their
//! scale bytes and the tokens' activations into a ring of shared-memory stages with the bulk
//! tensor copy engine (tensor maps made here), completing on mbarriers; the consumer warps
//! decode and multiply as the decode kernels do. Bytes in flight are the ring's size, not
//! registers; K is split over blocks (the tiled kernel's deterministic last-block reduction)
//! where the products have too few rows to fill the GPU.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::{GpuContext, Tuning};
use super::error::{drv, CudaError};
use super::gemm::check_len;
use super::tiled::{PARTS_CAPACITY, TICKETS_CAPACITY};
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// K elements per pipeline stage (`BK_CHUNK`).
const CHUNK: usize = 512;
/// The most tokens of one launch (four token tiles of 8).
pub const BULK_MAX_TOKENS: usize = 32;
/// The most consumer warps of a 32-token block (544 threads: `__launch_bounds__(544, 1)`, the
/// registers its activation fragments need).
const MAX_CONSUMERS_T4: usize = 16;
/// The most consumer warps of a block (plus the producer warp: 1,024 threads,
/// `__launch_bounds__(1024, 1)`).
const MAX_CONSUMERS: usize = 31;
/// The most row tiles of 16 rows per block.
const MAX_ROW_TILES: usize = 16;
/// The most K splits (`BK_MAX_SPLITS`).
const MAX_SPLITS: usize = 8;
/// Shared memory the stage ring may take per block (one block per SM; Hopper allows 227 KiB,
/// less the kernel's 1 KiB of static shared memory, the ring's alignment and its barriers): the
/// most the epilogue's tiles may ask for.
const MAX_RING_BYTES: usize = 216 * 1024;
/// The ring the automatic shape fills with stages (`MIMO_BULK_RING_KIB` for A/B runs). H100,
/// NVFP4, PDL chains (bench/results/kernels-h100-bulk-ring.json): 2-3 stages within 128 KiB
/// against the 3-5 the whole 216 KiB held: 16 tokens 4096 x 14336 19.34 -> 18.51 us, 2048 x
/// 151936 94.18 -> 86.92, 4096 x 22016 25.28 -> 25.01; 32 tokens within 1-3 %. Three stages
/// kept the weight stream alone at its pace (`-DMIMO_BK_NO_COMPUTE`: 13.28 vs 13.11 us at 16
/// tokens; two were not timed alone, with the arithmetic they matched three: 18.51 vs 18.50).
/// Why fewer stages speed the arithmetic up was not measured (more L1 beside a smaller block is
/// the likely reason: plain launches gained too).
const RING_BYTES: usize = 128 * 1024;
/// Consumer warps per block of the automatic shape (`MIMO_BULK_WARPS`): 31 measured no faster
/// on the H100 (bench/results/kernels-h100-bulk.json).
const DEFAULT_CONSUMERS: usize = 16;
/// The most pipeline stages.
const MAX_STAGES: usize = 8;
/// Stages of pipeline fill (and epilogue) the automatic shape's estimate charges each block.
/// With one, K splits that leave a block four chunks looked as cheap as unsplit blocks of half
/// the rows; H100 (bench/results/kernels-h100-bulk.json calls 7 and 13): 4096 x 14336 at 16
/// tokens 27.0 us in two-way split blocks of 224 rows against 19.4 unsplit with 112; 4096 x
/// 22016 at 32 tokens 29.7 in one wave of unsplit 176-row blocks against 41.9-59.8 in two or
/// three waves of smaller ones.
const FILL_STAGES: usize = 3;
/// Weights (Mi elements, N x K) from which [`bulk_preferred`] takes a product. H100
/// (bench/results/kernels-h100-bulk.json calls 7-8, NVFP4, 16 tokens, PDL chains, bulk vs
/// decode kernels): 4096 x 22016 (86 Mi) 25.3 vs 30.0 us, 4096 x 14336 (56 Mi) 19.4 vs 24.2,
/// 2048 x 151936 94.9 vs 97.8; but 4096 x 4096 (16 Mi) 11.2 vs 9.8 and the small products two
/// to three times slower.
pub const BULK_MIN_MI: usize = 48;
/// Output rows (the gated form: gate and up rows together) from which [`bulk_preferred`] takes
/// a product: fewer rows need K splits to fill the GPU, and 14336 x 4096 at 16 tokens (56 Mi
/// weights, four splits) ran 23.4 us against the decode kernels' 22.8 (H100, same record).
pub const BULK_MIN_ROWS: usize = 8192;

/// A `CUtensorMap`: 128 opaque bytes, 64-byte aligned, passed by value to the kernel.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TensorMap([u64; 16]);

// SAFETY: plain bytes, the layout of cuda.h's CUtensorMap (and fp4_bulk.cu's TensorMap).
unsafe impl DeviceRepr for TensorMap {}

/// The launch shape of a bulk product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkConfig {
    /// Row tiles of 16 weight rows per block (one per consumer warp of a K share).
    pub row_tiles: usize,
    /// Consumer warps per row tile (they share its K chunks round-robin).
    pub k_warps: usize,
    /// K splits over blocks.
    pub splits: usize,
    /// Pipeline stages.
    pub stages: usize,
}

/// Scale bytes per row and stage.
fn scale_bytes(format: Fp4Format) -> usize {
    match format {
        Fp4Format::Nvfp4 => CHUNK / 16,
        Fp4Format::Mxfp4 => CHUNK / 32,
    }
}

/// What K must be a multiple of: the copy engine takes row strides of whole 16-byte units, and
/// a row of scale bytes is `K x scale_bytes / CHUNK` bytes (NVFP4 256, MXFP4 512).
fn k_align(format: Fp4Format) -> usize {
    16 * CHUNK / scale_bytes(format)
}

/// The bulk kernels' A/B and sweep knobs (`MIMO_BULK_WARPS`, `MIMO_BULK_CFG`,
/// `MIMO_BULK_RING_KIB`, `MIMO_BULK_XFULL`), read from the environment once per process rather
/// than at every launch.
struct Knobs {
    /// The most consumer warps of the automatic shape.
    warps: usize,
    /// `MIMO_BULK_CFG=row_tiles,k_warps,splits,stages`: this shape for every launch.
    cfg: Option<BulkConfig>,
    /// `MIMO_BULK_XFULL=1`: activation boxes of 8, 16 or 32 tokens whatever M is.
    full_x_boxes: bool,
    /// `MIMO_BULK_RING_KIB`: the ring budget of the automatic shape's stages (KiB; default
    /// `RING_BYTES`, at most `MAX_RING_BYTES`).
    ring_bytes: usize,
}

fn knobs() -> &'static Knobs {
    static KNOBS: OnceLock<Knobs> = OnceLock::new();
    KNOBS.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok();
        let cfg = var("MIMO_BULK_CFG").and_then(|v| {
            let f: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            match f[..] {
                [row_tiles, k_warps, splits, stages] => Some(BulkConfig {
                    row_tiles,
                    k_warps,
                    splits,
                    stages,
                }),
                _ => None,
            }
        });
        Knobs {
            warps: var("MIMO_BULK_WARPS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_CONSUMERS),
            cfg,
            full_x_boxes: var("MIMO_BULK_XFULL").as_deref() == Some("1"),
            ring_bytes: var("MIMO_BULK_RING_KIB")
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(RING_BYTES, |k| (k * 1024).min(MAX_RING_BYTES)),
        }
    })
}

/// Tokens a block holds (8, 16 or 32): the activation boxes' rows.
fn block_tokens(m: usize) -> usize {
    match m {
        0..=8 => 8,
        9..=16 => 16,
        _ => 32,
    }
}

/// The most consumer warps of a block holding `tok` tokens.
fn max_consumers(tok: usize) -> usize {
    if tok > 16 {
        MAX_CONSUMERS_T4
    } else {
        MAX_CONSUMERS
    }
}

/// Bytes of one stage (`bk_stage_bytes`): activations (four boxes of `tok` x 128 bf16),
/// weights (rows x 256 bytes), scale bytes, rounded up to 1 KiB.
fn stage_bytes(rows: usize, tok: usize, sb: usize) -> usize {
    (4 * tok * 256 + rows * 256 + rows * sb).div_ceil(1024) * 1024
}

/// Dynamic shared memory of a launch: the stages, their two mbarriers each, and 1 KiB to align
/// the ring to the swizzle's period.
fn smem_bytes(cfg: &BulkConfig, tok: usize, sb: usize) -> usize {
    1024 + cfg.stages * (stage_bytes(16 * cfg.row_tiles, tok, sb) + 16)
}

/// Whether the epilogue's f32 tiles (one `[tok][rows + 4]` tile per K share) fit in the ring.
fn tiles_fit(cfg: &BulkConfig, tok: usize, sb: usize) -> bool {
    let rows = 16 * cfg.row_tiles;
    cfg.k_warps * tok * (rows + 4) * 4 <= cfg.stages * stage_bytes(rows, tok, sb)
}

/// Whether the bulk kernels take `w` at `m` tokens on `gpu` (`gated`: the SwiGLU form, N
/// even): compute capability 9.0 or later, one matrix, 1..=[`BULK_MAX_TOKENS`] tokens, and
/// rows of scale bytes whose stride the copy engine accepts (a multiple of 16 bytes: K a
/// multiple of 256 for NVFP4, 512 for MXFP4).
pub fn bulk_supported(gpu: &GpuContext, w: &GpuFp4Weight, m: usize, gated: bool) -> bool {
    gpu.compute_capability().0 >= 9
        && w.experts == 1
        && w.n > 0
        && w.k > 0
        && w.k % k_align(w.format) == 0
        && (1..=BULK_MAX_TOKENS).contains(&m)
        && (!gated || w.n % 2 == 0)
}

/// Whether the automatic launchers ([`super::fp4_gemm`], [`super::fp4_gemm_swiglu`]) take the
/// bulk kernels under `tuning`: `bulk_gemm` on, supported, 9 to `bulk_max_tokens` tokens (at
/// one to eight tokens the decode kernels won on every shape but one), at least `bulk_min_mi`
/// Mi weights and [`BULK_MIN_ROWS`] rows.
pub fn bulk_preferred(
    tuning: &Tuning,
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    m: usize,
    gated: bool,
) -> bool {
    tuning.bulk_gemm
        && (9..=tuning.bulk_max_tokens as usize).contains(&m)
        && w.n * w.k >= (tuning.bulk_min_mi as usize) << 20
        && (w.n >= BULK_MIN_ROWS || tuning.bulk_min_mi == 0)
        && bulk_supported(gpu, w, m, gated)
}

impl BulkConfig {
    /// The shape with the least estimated time for `[n, k]` at `m` tokens on `sms` SMs: waves
    /// (one block per SM) x stages per block (plus `FILL_STAGES`) x the bytes a stage
    /// brings (weights, scale bytes, half the activations' bytes: they come from L2); fewer
    /// waves, then fewer splits on ties.
    pub fn auto(format: Fp4Format, m: usize, n: usize, k: usize, sms: usize, gated: bool) -> Self {
        let kn = knobs();
        if let Some(cfg) = kn.cfg {
            return cfg;
        }
        Self::auto_with(format, m, n, k, sms, gated, kn.warps)
    }

    /// [`BulkConfig::auto`] with at most `warps` consumer warps per block (`gated`: an even
    /// number of row tiles per block, half gate rows and half up rows).
    pub fn auto_with(
        format: Fp4Format,
        m: usize,
        n: usize,
        k: usize,
        sms: usize,
        gated: bool,
        warps: usize,
    ) -> Self {
        let step = if gated { 2 } else { 1 };
        let warps = warps.clamp(1, max_consumers(block_tokens(m)));
        let sb = scale_bytes(format);
        let tiles = n.div_ceil(16).max(1);
        let chunks = k.div_ceil(CHUNK).max(1);
        let sms = sms.max(1);
        let mut best: Option<((usize, usize, usize), BulkConfig)> = None;
        for rt in (step..=MAX_ROW_TILES.min(tiles.max(step))).step_by(step) {
            for s in 1..=MAX_SPLITS.min(chunks) {
                let blocks = tiles.div_ceil(rt) * s;
                let waves = blocks.div_ceil(sms);
                let per_stage = rt * 16 * (256 + sb) + m * CHUNK;
                let cost = waves * (chunks.div_ceil(s) + FILL_STAGES) * per_stage;
                let key = (cost, waves, s);
                if best.as_ref().is_none_or(|(b, _)| key < *b) {
                    let k_warps = (warps / rt).max(1);
                    best = Some((
                        key,
                        BulkConfig {
                            row_tiles: rt,
                            k_warps,
                            splits: s,
                            stages: 2,
                        },
                    ));
                }
            }
        }
        let mut cfg = best.map(|(_, c)| c).unwrap_or(BulkConfig {
            row_tiles: step,
            k_warps: 1,
            splits: 1,
            stages: 2,
        });
        let per_block = chunks.div_ceil(cfg.splits);
        let stage = stage_bytes(16 * cfg.row_tiles, block_tokens(m), sb);
        let ring = knobs().ring_bytes;
        cfg.stages = (ring / stage).clamp(2, MAX_STAGES).min(per_block.max(2));
        // The epilogue's tiles (one per K share) live in the ring: more stages, or fewer K
        // warps where even the whole ring is too small.
        let tok = block_tokens(m);
        while !tiles_fit(&cfg, tok, sb) {
            if (cfg.stages + 1) * stage <= MAX_RING_BYTES {
                cfg.stages += 1;
            } else if cfg.k_warps > 1 {
                cfg.k_warps -= 1;
            } else {
                break;
            }
        }
        cfg
    }
}

/// Encodes a tiled tensor map of `rank` dimensions (innermost first).
///
/// # Safety
/// `addr` must be a device allocation holding the described tensor.
unsafe fn encode(
    what: &'static str,
    dtype: sys::CUtensorMapDataType,
    addr: sys::CUdeviceptr,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<TensorMap, CudaError> {
    let mut map = TensorMap([0; 16]);
    let elem = vec![1u32; dims.len()];
    // SAFETY: the arrays hold `rank` (strides `rank - 1`) entries; the caller vouches for addr.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast::<sys::CUtensorMap>(),
            dtype,
            dims.len() as u32,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(drv(what))?;
    }
    Ok(map)
}

/// `y[m, n] = x[m, k] · W[n, k]^T` through the bulk kernel with the automatic shape; same
/// contract as [`super::fp4_gemm`].
pub fn fp4_gemm_bulk(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let cfg = BulkConfig::auto(w.format, m, w.n, w.k, gpu.sm_count() as usize, false);
    fp4_gemm_bulk_with(gpu, w, x, m, y, &cfg, false)
}

/// `y[m, n/2] = silu(x·G^T) * (x·U^T)` through the bulk kernel with the automatic shape; the
/// same rounding as [`super::fp4_gemm_swiglu`] (each product to bf16, then `silu` with `expf`).
pub fn fp4_gemm_swiglu_bulk(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let cfg = BulkConfig::auto(w.format, m, w.n, w.k, gpu.sm_count() as usize, true);
    fp4_gemm_bulk_with(gpu, w, x, m, y, &cfg, true)
}

/// [`fp4_gemm_bulk`] (`gated` false) or [`fp4_gemm_swiglu_bulk`] with an explicit launch shape
/// (tests, sweeps; the gated form takes one tile per warp and an even number of row tiles).
pub fn fp4_gemm_bulk_with(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
    cfg: &BulkConfig,
    gated: bool,
) -> Result<(), CudaError> {
    let what = if gated {
        "fp4_gemm_swiglu_bulk"
    } else {
        "fp4_gemm_bulk"
    };
    if !bulk_supported(gpu, w, m, gated) {
        return Err(CudaError::Shape {
            what: what.into(),
            reason: format!(
                "{} matrices of [{}, {}] at m = {m}: needs compute capability 9.0, one matrix, \
                 K a multiple of {}, 1..={BULK_MAX_TOKENS} tokens{}",
                w.experts,
                w.n,
                w.k,
                k_align(w.format),
                if gated { ", an even N" } else { "" }
            ),
        });
    }
    let out_cols = if gated { w.n / 2 } else { w.n };
    let (what_x, what_y) = if gated {
        ("fp4_gemm_swiglu_bulk: x", "fp4_gemm_swiglu_bulk: y")
    } else {
        ("fp4_gemm_bulk: x", "fp4_gemm_bulk: y")
    };
    check_len(what_x, x.len(), m * w.k)?;
    check_len(what_y, y.len(), m * out_cols)?;
    let sb = scale_bytes(w.format);
    let tok = block_tokens(m);
    let rows = 16 * cfg.row_tiles;
    let chunks = w.k.div_ceil(CHUNK);
    // Gated: half the block's rows are gate rows, half the matching up rows (two boxes each).
    let box_rows = if gated { rows / 2 } else { rows };
    let row_blocks = out_cols.div_ceil(box_rows);
    let consumers = cfg.row_tiles * cfg.k_warps;
    let smem = smem_bytes(cfg, tok, sb);
    let bad = |reason: String| {
        Err(CudaError::Shape {
            what: what.into(),
            reason: format!("{cfg:?}: {reason}"),
        })
    };
    if !(1..=MAX_ROW_TILES).contains(&cfg.row_tiles)
        || (gated && cfg.row_tiles % 2 != 0)
        || consumers == 0
        || consumers > max_consumers(tok)
    {
        return bad(format!(
            "1..={MAX_ROW_TILES} row tiles (even when gated) and 1..={} warps",
            max_consumers(tok)
        ));
    }
    if !(1..=MAX_SPLITS).contains(&cfg.splits) || cfg.splits > chunks {
        return bad(format!("1..={MAX_SPLITS} splits, at most one per chunk"));
    }
    // An SM's shared memory less the 1 KiB the system reserves per block and the kernel's
    // 1 KiB of static shared memory.
    if cfg.stages < 1 || smem + 2048 > gpu.sm_shared_bytes() as usize {
        return bad(format!("{smem} bytes of shared memory"));
    }
    if !tiles_fit(cfg, tok, sb) {
        return bad("the output tiles do not fit the stages".into());
    }
    if cfg.splits > 1
        && (row_blocks > TICKETS_CAPACITY || cfg.splits * row_blocks * rows * tok > PARTS_CAPACITY)
    {
        return bad("the split partial sums do not fit the scratch".into());
    }
    // Activation boxes of exactly the M tokens, which the copy engine fills without zero fill
    // (`MIMO_BULK_XFULL=1` asks for the full boxes anyway, an A/B knob: no difference measured).
    let xrows = if knobs().full_x_boxes { tok } else { m };
    let stream = gpu.stream();
    let (wp, _gw) = w.packed.device_ptr(stream);
    let (sp, _gs) = w.scales.device_ptr(stream);
    let (xp, _gx) = x.device_ptr(stream);
    use sys::CUtensorMapDataType as T;
    use sys::CUtensorMapSwizzle as Z;
    let (n, k) = (w.n as u64, w.k as u64);
    // SAFETY: each map describes its allocation: the packed weights ([n][k / 2] bytes), the
    // scale bytes ([n][k / block] bytes) and the activations ([m][k] bf16 viewed as
    // [m][k / 64][64]); strides are multiples of 16 bytes (bulk_supported).
    let (tw, ts, tx) = unsafe {
        (
            encode(
                "weight tensor map",
                T::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                wp,
                &[k / 2, n],
                &[k / 2],
                &[(CHUNK / 2) as u32, box_rows as u32],
                Z::CU_TENSOR_MAP_SWIZZLE_NONE,
            )?,
            encode(
                "scale tensor map",
                T::CU_TENSOR_MAP_DATA_TYPE_UINT8,
                sp,
                &[k * sb as u64 / CHUNK as u64, n],
                &[k * sb as u64 / CHUNK as u64],
                &[sb as u32, box_rows as u32],
                Z::CU_TENSOR_MAP_SWIZZLE_NONE,
            )?,
            encode(
                "activation tensor map",
                T::CU_TENSOR_MAP_DATA_TYPE_UINT16,
                xp,
                &[64, k / 64, m as u64],
                &[128, 2 * k],
                &[64, 2, xrows as u32],
                Z::CU_TENSOR_MAP_SWIZZLE_128B,
            )?,
        )
    };
    let name = match (w.format, tok, gated) {
        (Fp4Format::Nvfp4, 32, true) => "fp4_bulk_sw_nv_t4_m1",
        (Fp4Format::Mxfp4, 32, true) => "fp4_bulk_sw_mx_t4_m1",
        (Fp4Format::Nvfp4, 32, false) => "fp4_bulk_nv_t4_m1",
        (Fp4Format::Mxfp4, 32, false) => "fp4_bulk_mx_t4_m1",
        (Fp4Format::Nvfp4, 8, true) => "fp4_bulk_sw_nv_t1_m1",
        (Fp4Format::Nvfp4, _, true) => "fp4_bulk_sw_nv_t2_m1",
        (Fp4Format::Mxfp4, 8, true) => "fp4_bulk_sw_mx_t1_m1",
        (Fp4Format::Mxfp4, _, true) => "fp4_bulk_sw_mx_t2_m1",
        (Fp4Format::Nvfp4, 8, false) => "fp4_bulk_nv_t1_m1",
        (Fp4Format::Nvfp4, _, false) => "fp4_bulk_nv_t2_m1",
        (Fp4Format::Mxfp4, 8, false) => "fp4_bulk_mx_t1_m1",
        (Fp4Format::Mxfp4, _, false) => "fp4_bulk_mx_t2_m1",
    };
    let f = gpu.function(name)?;
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(drv("bulk kernel dynamic shared memory limit"))?;
    let launch = LaunchConfig {
        grid_dim: (row_blocks as u32, cfg.splits as u32, 1),
        block_dim: (32 * (consumers as u32 + 1), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (m_i, n_i, k_i) = (m as i32, w.n as i32, w.k as i32);
    let (rt_i, st_i, xr_i) = (cfg.row_tiles as i32, cfg.stages as i32, xrows as i32);
    let (parts, tickets) = gpu.split_scratch();
    let mut b = stream.launch_builder(&f);
    b.arg(&tw)
        .arg(&ts)
        .arg(&tx)
        .arg(&w.global_scales)
        .arg(&w.mult_lut)
        .arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&w.post)
        .arg(&rt_i)
        .arg(&st_i)
        .arg(&xr_i)
        .arg(parts)
        .arg(tickets);
    // SAFETY: argument types and order match BK_KERNEL; the tensor maps describe w and x (x
    // holds m rows of k, y m rows of n: checked above); the shared memory holds the stages and
    // the output tiles (checked); the split scratch holds splits x row blocks x tile floats and
    // row-block tickets, and every launch on this stream uses it only after its PDL wait.
    unsafe { b.launch(launch) }.map_err(drv("launch fp4_gemm_bulk"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_fills_the_gpu_in_one_wave() {
        // 4096 x 14336 at one token: 896 tiles, 7 per block: 128 blocks of 14 warps.
        let c = BulkConfig::auto_with(Fp4Format::Nvfp4, 1, 14336, 4096, 132, false, 16);
        assert_eq!((c.row_tiles, c.k_warps, c.splits), (7, 2, 1), "{c:?}");
        // 14336 x 4096 at one token: 256 tiles, two per block (128 blocks), no split.
        let c = BulkConfig::auto_with(Fp4Format::Nvfp4, 1, 4096, 14336, 132, false, 16);
        assert_eq!((c.row_tiles, c.splits), (2, 1), "{c:?}");
        // At 16 tokens the measured best of 4096 x 14336: 112-row blocks, no split.
        let c = BulkConfig::auto_with(Fp4Format::Nvfp4, 16, 14336, 4096, 132, false, 16);
        assert_eq!((c.row_tiles, c.splits), (7, 1), "{c:?}");
        // And of 4096 x 22016 at 32 tokens: one wave of 176-row blocks.
        let c = BulkConfig::auto_with(Fp4Format::Nvfp4, 32, 22016, 4096, 132, false, 16);
        assert_eq!((c.row_tiles, c.splits), (11, 1), "{c:?}");
        // The gated form: even row tiles only.
        let c = BulkConfig::auto_with(Fp4Format::Nvfp4, 16, 28672, 4096, 132, true, 16);
        assert_eq!(c.row_tiles % 2, 0, "{c:?}");
        for (m, n, k) in [
            (1, 151936, 2048),
            (16, 1536, 2048),
            (3, 77, 256),
            (16, 4096, 4096),
            (32, 22016, 4096),
            (20, 4096, 11008),
        ] {
            for (format, gated) in [
                (Fp4Format::Nvfp4, false),
                (Fp4Format::Mxfp4, false),
                (Fp4Format::Nvfp4, true),
            ] {
                let c = BulkConfig::auto_with(format, m, n, k, 132, gated, MAX_CONSUMERS);
                let (tok, sb) = (block_tokens(m), scale_bytes(format));
                assert!(c.row_tiles * c.k_warps <= max_consumers(tok), "{c:?}");
                assert!(!gated || c.row_tiles % 2 == 0, "{c:?}");
                assert!(tiles_fit(&c, tok, sb), "{c:?}");
                assert!(smem_bytes(&c, tok, sb) + 2048 <= 228 * 1024, "{c:?}");
                assert!(c.stages >= 2, "{c:?}");
            }
        }
    }

    #[test]
    fn stages_are_swizzle_aligned() {
        for rows in [16, 32, 112, 256] {
            for tok in [8, 16] {
                for sb in [16, 32] {
                    let s = stage_bytes(rows, tok, sb);
                    assert_eq!(s % 1024, 0);
                    assert!(s >= 4 * tok * 256 + rows * (256 + sb));
                }
            }
        }
    }

    #[test]
    fn the_output_tiles_are_free_of_bank_conflicts() {
        // fp4_bulk.cu's epilogue: lane (g, t) of the warp on tile ti stores token 8j + 2t (+1),
        // row 16 ti + g (+8) at token * (rows + 4) + row: 32 distinct banks per store.
        for rt in [1, 2, 7, 16] {
            let ts = 16 * rt + 4;
            for (dt, dr) in [(0, 0), (1, 0), (0, 8), (1, 8)] {
                let mut banks: Vec<usize> = (0..32)
                    .map(|lane| {
                        let (g, t) = (lane / 4, lane % 4);
                        ((2 * t + dt) * ts + g + dr) % 32
                    })
                    .collect();
                banks.sort_unstable();
                banks.dedup();
                assert_eq!(banks.len(), 32, "rt {rt}");
            }
        }
    }
}
