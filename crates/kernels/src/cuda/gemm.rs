//! Launchers of the FP4 x BF16 GEMM kernels (decode and small-M path) and of the FP4 -> BF16
//! dequantization kernel used by the prefill path.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::bulk::{bulk_preferred, fp4_gemm_bulk, fp4_gemm_swiglu_bulk};
use super::context::{GpuContext, Tuning};
use super::error::{drv, CudaError};
use super::fold::{Fold, NormIn};
use super::placement::{beyond_spread_cap, spread_launch};
use super::tiled::{fp4_gemm_swiglu_tiled, fp4_gemm_tiled, tiled_preferred, tiled_supported};
use super::weights::GpuFp4Weight;
use super::wgmma::{fp4_gemm_wgmma, wgmma_preferred};
use super::NULL_PTR;
use crate::fp4::Fp4Format;

/// Elements of K one warp handles per step (64 bytes of each weight row).
pub const K_CHUNK: usize = 128;

/// Block shape of the FP4 GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp4GemmConfig {
    /// m16 row tiles per block (1 or 2): 16 or 32 output features.
    pub m_tiles: u32,
    /// Warps per block (1..=16); they split K between them and reduce in shared memory.
    pub warps: u32,
    /// Consecutive K chunks each warp loads before using the first (1, 2 or 4): the number of
    /// 16-byte weight loads per lane in flight is `2 * m_tiles * group`.
    pub group: u32,
}

/// Largest dynamic shared memory a block may ask for without opting in (48 KiB).
const SMEM_LIMIT: u32 = 48 * 1024;

impl Fp4GemmConfig {
    /// The shape chosen for an `[m, k] x [n, k]^T` product on a GPU with `sm_count` SMs.
    /// From the H100 sweep of the v5 kernel (docs/kernels-notes.md, round 2): two row tiles
    /// (32 rows per block) from n >= 4096 at up to 16 tokens; warps of split-K so that about
    /// 16 warps per SM are resident in the first wave (4..=16, at most one K chunk each); two
    /// chunks per load group at <= 8 tokens where every warp runs a whole group (the PDL-chain
    /// sweep of 2026-11-26, bench/results/kernels-h100-attn-proj-sweep.json: the attention
    /// projections of Qwen3-30B-A3B and MiMo-7B 7-17 % faster than with the earlier
    /// ">= 4 chunks per warp" rule, which left their warps two dependent load rounds).
    pub fn auto(m: usize, n: usize, k: usize, sm_count: u32) -> Self {
        let chunks = k.div_ceil(K_CHUNK) as u32;
        let tn = token_tiles(m);
        let token_groups = m.div_ceil(8 * tn as usize).max(1) as u32;
        let m_tiles = if n >= 4096 && tn <= 2 { 2 } else { 1 };
        let blocks = (n.div_ceil(16 * m_tiles as usize) as u32 * token_groups).max(1);
        let target = 16 * sm_count.max(1);
        let mut warps = 16;
        while warps > 4 && blocks * warps > target {
            warps /= 2;
        }
        // Where 4 warps per block still overfill that first wave and 2 fit it (one-token
        // products about 17-34 K rows wide, such as MiMo-7B's 4096 x 22016 gate/up), 2: the
        // 128-register kernels hold 16 warps per SM, so the fifth block of an SM waited for a
        // second, partial wave (H100 PDL-chain sweep, bench/results/kernels-h100-mimo-ffn-sweep.json:
        // NVFP4 26.5 -> 22.7 us, MXFP4 25.3 -> 24.0).
        if tn == 1 && blocks * warps > target && blocks * 2 <= target {
            warps = 2;
        }
        let warps = warps.min(chunks).max(1);
        let group = if tn == 1 && chunks >= 2 * warps { 2 } else { 1 };
        Fp4GemmConfig {
            m_tiles,
            warps,
            group,
        }
    }

    fn check(&self, tn: u32) -> Result<(), CudaError> {
        if !(1..=2).contains(&self.m_tiles)
            || !(1..=16).contains(&self.warps)
            || reduction_smem(*self, tn) > SMEM_LIMIT
        {
            return Err(CudaError::Shape {
                what: "Fp4GemmConfig".into(),
                reason: format!(
                    "m_tiles {} (1..=2), warps {} (1..=16), {} token tiles: {} bytes of shared memory",
                    self.m_tiles,
                    self.warps,
                    tn,
                    reduction_smem(*self, tn)
                ),
            });
        }
        Ok(())
    }
}

/// n8 token tiles per block for `m` tokens: 8, 16 or 32 tokens per pass over the weights.
pub fn token_tiles(m: usize) -> u32 {
    match m {
        0..=8 => 1,
        9..=16 => 2,
        _ => 4,
    }
}

/// Kernel name of a variant; the set compiled is listed in fp4_gemm.cu (DENSE_VARIANTS).
pub(crate) fn gemm_kernel_name(
    format: Fp4Format,
    cfg: Fp4GemmConfig,
    tn: u32,
) -> Result<&'static str, CudaError> {
    const NAMES: [(u32, u32, u32, &str, &str); 11] = [
        (1, 1, 1, "fp4_gemm_nv_m1_t1_g1", "fp4_gemm_mx_m1_t1_g1"),
        (1, 1, 2, "fp4_gemm_nv_m1_t1_g2", "fp4_gemm_mx_m1_t1_g2"),
        (1, 1, 4, "fp4_gemm_nv_m1_t1_g4", "fp4_gemm_mx_m1_t1_g4"),
        (2, 1, 1, "fp4_gemm_nv_m2_t1_g1", "fp4_gemm_mx_m2_t1_g1"),
        (2, 1, 2, "fp4_gemm_nv_m2_t1_g2", "fp4_gemm_mx_m2_t1_g2"),
        (1, 2, 1, "fp4_gemm_nv_m1_t2_g1", "fp4_gemm_mx_m1_t2_g1"),
        (1, 2, 2, "fp4_gemm_nv_m1_t2_g2", "fp4_gemm_mx_m1_t2_g2"),
        (2, 2, 1, "fp4_gemm_nv_m2_t2_g1", "fp4_gemm_mx_m2_t2_g1"),
        (2, 2, 2, "fp4_gemm_nv_m2_t2_g2", "fp4_gemm_mx_m2_t2_g2"),
        (1, 4, 1, "fp4_gemm_nv_m1_t4_g1", "fp4_gemm_mx_m1_t4_g1"),
        (2, 4, 1, "fp4_gemm_nv_m2_t4_g1", "fp4_gemm_mx_m2_t4_g1"),
    ];
    NAMES
        .iter()
        .find(|v| (v.0, v.1, v.2) == (cfg.m_tiles, tn, cfg.group))
        .map(|v| match format {
            Fp4Format::Nvfp4 => v.3,
            Fp4Format::Mxfp4 => v.4,
        })
        .ok_or(CudaError::NoVariant {
            format,
            m_tiles: cfg.m_tiles,
            token_tiles: tn,
            group: cfg.group,
        })
}

/// The `_wide` copy of a one-token kernel (fp4_gemm.cu), for products with more blocks per SM
/// than the placement padding can cap (`Tuning::spread`): same code, but it keeps the driver's
/// shared-memory carveout (placement.rs exempts it). Under the carveout the lm_head shape
/// 2048 x 151936 took 67.8 instead of 62.5 us (H100, PDL chain).
fn wide_kernel_name(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    m: usize,
    cfg: Fp4GemmConfig,
    tn: u32,
    blocks: u32,
) -> Option<&'static str> {
    if m != 1 || !gpu.tuning().spread {
        return None;
    }
    if !beyond_spread_cap(blocks, gpu.sm_count()) {
        return None;
    }
    match (cfg.m_tiles, tn, cfg.group, w.format) {
        (2, 1, 2, Fp4Format::Nvfp4) => Some("fp4_gemm_nv_m2_t1_g2_wide"),
        (2, 1, 2, Fp4Format::Mxfp4) => Some("fp4_gemm_mx_m2_t1_g2_wide"),
        _ => None,
    }
}

/// Most warps of a staged 32-token block: its buffers (16 KiB per warp) fit the default 48 KiB
/// with two, and fp4_gemm.cu builds those kernels for 64 threads (more registers, no spill).
/// The automatic shape never stages 32 tokens (it takes 4 or more warps there: a two-warp
/// staged rule made MiMo-7B's batch-32 decode 6 % slower on the H100 although most of its
/// kernels were faster alone, docs/kernels-notes.md round 8); explicit shapes may.
const XS_T4_MAX_WARPS: u32 = 2;

/// The activation-staged variant (`Tuning::x_stage`, fp4_gemm.cu `_xs`) of a block shape, where
/// there is one (16 and 32 tokens; the launcher also needs its buffers to fit 48 KiB).
fn xs_kernel_name(format: Fp4Format, cfg: Fp4GemmConfig, tn: u32) -> Option<&'static str> {
    let nv = format == Fp4Format::Nvfp4;
    if tn == 4 && cfg.warps > XS_T4_MAX_WARPS {
        return None;
    }
    Some(match (cfg.m_tiles, tn, cfg.group, nv) {
        (1, 2, 1, true) => "fp4_gemm_nv_m1_t2_g1_xs",
        (1, 2, 2, true) => "fp4_gemm_nv_m1_t2_g2_xs",
        (2, 2, 1, true) => "fp4_gemm_nv_m2_t2_g1_xs",
        (2, 2, 2, true) => "fp4_gemm_nv_m2_t2_g2_xs",
        (1, 4, 1, true) => "fp4_gemm_nv_m1_t4_g1_xs",
        (2, 4, 1, true) => "fp4_gemm_nv_m2_t4_g1_xs",
        (1, 2, 1, false) => "fp4_gemm_mx_m1_t2_g1_xs",
        (1, 2, 2, false) => "fp4_gemm_mx_m1_t2_g2_xs",
        (2, 2, 1, false) => "fp4_gemm_mx_m2_t2_g1_xs",
        (2, 2, 2, false) => "fp4_gemm_mx_m2_t2_g2_xs",
        (1, 4, 1, false) => "fp4_gemm_mx_m1_t4_g1_xs",
        (2, 4, 1, false) => "fp4_gemm_mx_m2_t4_g1_xs",
        _ => return None,
    })
}

/// Whether a kernel variant exists for this block shape and `m` tokens.
pub fn variant_exists(cfg: Fp4GemmConfig, m: usize) -> bool {
    let tn = token_tiles(m);
    cfg.check(tn).is_ok() && gemm_kernel_name(Fp4Format::Nvfp4, cfg, tn).is_ok()
}

/// Activation staging buffers of one block (`Tuning::x_stage`): two per warp, each `group`
/// chunks of 128 bf16 elements for 8 * `tn` token slots.
fn x_stage_smem(cfg: Fp4GemmConfig, tn: u32) -> u32 {
    cfg.warps * 2 * cfg.group * 8 * tn * 128 * 2
}

/// Dynamic shared memory of one block: split-K partial sums, f32.
pub(crate) fn reduction_smem(cfg: Fp4GemmConfig, tn: u32) -> u32 {
    cfg.warps * 16 * cfg.m_tiles * 8 * tn * 4
}

/// `y[m, n] = x[m, k] · W[n, k]^T` with FP4 `W` (dequantized in the kernel), bf16 `x` and `y`,
/// f32 accumulation. Launches one kernel on the context's stream (no synchronization).
///
/// In a graph with programmatic edges ([`super::PdlGraph`]) the kernel reads its first weights
/// before waiting on the kernel before it, so `W` must not be written by that kernel (`x`
/// may be); in stream order or an ordinary graph there is no such condition.
pub fn fp4_gemm(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let tuning = gpu.tuning();
    if bulk_preferred(&tuning, gpu, w, m, false) {
        return fp4_gemm_bulk(gpu, w, x, m, y);
    }
    if fp4_gemm_takes_wgmma(&tuning, gpu, w, m) {
        return fp4_gemm_wgmma(gpu, w, x, m, y);
    }
    if tiled_preferred(&tuning, w, m, false) {
        return fp4_gemm_tiled(gpu, w, x, m, y);
    }
    let cfg = Fp4GemmConfig::auto(m, w.n, w.k, gpu.sm_count());
    fp4_gemm_with(gpu, w, x, m, y, cfg)
}

/// Whether [`fp4_gemm`] takes the warpgroup kernels for `m` tokens under `tuning`: where it
/// would take the tiled ones and [`super::wgmma_preferred`] (from 33 tokens on Hopper, round 26:
/// 4096 x 14336 at 48 tokens 32.6 vs 51.4 us); the bulk kernels, which it asks first, stop at 32.
pub fn fp4_gemm_takes_wgmma(tuning: &Tuning, gpu: &GpuContext, w: &GpuFp4Weight, m: usize) -> bool {
    tiled_preferred(tuning, w, m, false) && wgmma_preferred(tuning, gpu, w, m)
}

/// [`fp4_gemm`] with an explicit block shape.
pub fn fp4_gemm_with(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
    cfg: Fp4GemmConfig,
) -> Result<(), CudaError> {
    check_len("fp4_gemm: y", y.len(), m * w.n)?;
    dense_product(gpu, w, x, m, Some(y), cfg, &Fold::default())
}

/// The launch behind [`fp4_gemm_with`] and the folded-norm products (fold.rs): `y` may be
/// `None` only where `fold` has an output (the kernel then never stores `y`); its length is
/// the caller's to check.
pub(crate) fn dense_product(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: Option<&mut CudaSlice<bf16>>,
    cfg: Fp4GemmConfig,
    fold: &Fold<'_>,
) -> Result<(), CudaError> {
    let tn = token_tiles(m);
    cfg.check(tn)?;
    dense_only(w, "fp4_gemm")?;
    check_len("fp4_gemm: x", x.len(), m * w.k)?;
    if m == 0 {
        return Ok(());
    }
    let m_i = tokens_i32(m, "fp4_gemm: x")?;
    let flags = prefetch_flags(gpu, w);
    let row_blocks = w.n.div_ceil(16 * cfg.m_tiles as usize) as u32;
    let (f, smem) = if fold.active() {
        fold_kernel(gpu, w.format, cfg, tn, fold, false)?
    } else {
        let plain = match wide_kernel_name(gpu, w, m, cfg, tn, row_blocks) {
            Some(name) => name,
            None => gemm_kernel_name(w.format, cfg, tn)?,
        };
        staged_or_plain(gpu, xs_kernel_name(w.format, cfg, tn), plain, cfg, tn)?
    };
    let launch = LaunchConfig {
        grid_dim: (row_blocks, 1, m.div_ceil(8 * tn as usize) as u32),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: smem,
    };
    // SAFETY (launch_dense): x was checked against (m, k) above, y and the fold's buffers by
    // the callers.
    unsafe {
        launch_dense(
            gpu,
            &f,
            launch,
            w,
            x,
            y,
            m_i,
            flags,
            fold,
            "launch fp4_gemm",
        )
    }
}

/// One token through the FP4 `w` and the BF16 `bw` (`[bn, w.k]`, row-major) in one launch
/// (bf16_gemv.cu `FP4_BF16_NORM_IN`), both consumers of the folded norm `input`: the FP4
/// kernel's blocks of shape `cfg` first, then `bn` BF16 rows, one per warp of blocks of that
/// shape. `y` gets `w.n` values, `by` `bn`.
///
/// The caller checks `input`, `bw`'s length, `by`'s and `k` (a multiple of 8 up to
/// [`super::BF16_NORM_IN_MAX_K`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_fold_bf16(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    cfg: Fp4GemmConfig,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    input: &NormIn<'_>,
    bw: &CudaSlice<bf16>,
    bn: usize,
    by: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    const WHAT: &str = "fp4_bf16_gemv_norm_in";
    dense_only(w, WHAT)?;
    check_len("fp4_bf16_gemv_norm_in: x", x.len(), w.k)?;
    check_len("fp4_bf16_gemv_norm_in: y", y.len(), w.n)?;
    cfg.check(1)?;
    let name = fold_bf16_kernel_name(w.format, cfg).ok_or(CudaError::NoVariant {
        format: w.format,
        m_tiles: cfg.m_tiles,
        token_tiles: 1,
        group: cfg.group,
    })?;
    let f = gpu.function(name)?;
    let fp4_blocks = w.n.div_ceil(16 * cfg.m_tiles as usize);
    let bf16_blocks = bn.div_ceil(cfg.warps as usize);
    let shape = |v: usize| {
        i32::try_from(v).map_err(|_| CudaError::Shape {
            what: WHAT.into(),
            reason: format!("{v} is too large"),
        })
    };
    let (n_i, k_i, bn_i, fb_i) = (shape(w.n)?, shape(w.k)?, shape(bn)?, shape(fp4_blocks)?);
    let blocks = u32::try_from(fp4_blocks + bf16_blocks).map_err(|_| CudaError::Shape {
        what: WHAT.into(),
        reason: format!("{fp4_blocks} + {bf16_blocks} blocks"),
    })?;
    let (m_i, flags) = (1i32, prefetch_flags(gpu, w));
    let mut b = gpu.stream().launch_builder(&f);
    w.push_args(&mut b).arg(x).arg(&mut *y);
    b.arg(&m_i).arg(&n_i).arg(&k_i).arg(&w.post).arg(&flags);
    let (np_i, len_i) = (shape(input.nparts)?, shape(input.len)?);
    b.arg(input.parts).arg(&np_i).arg(&len_i).arg(&input.eps);
    b.arg(bw).arg(&mut *by).arg(&bn_i).arg(&fb_i);
    let launch = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(cfg, 1) + Fold::new(Some(*input), None).smem(),
    };
    let launch = spread_launch(gpu, &f, launch)?;
    // SAFETY: argument types and order match FP4_BF16_NORM_IN; x holds k values, y n (checked
    // above); the caller checked the fold's partial sums, bw (bn * k values), by (bn) and that
    // k is a multiple of 8 up to BF16_NORM_IN_MAX_K, so every lane's BF16 pieces lie in their
    // row (rows past bn read row bn - 1 and store nothing).
    unsafe { b.launch(launch) }.map_err(drv("launch fp4_bf16_gemv_norm_in"))?;
    Ok(())
}

/// The combined FP4 + BF16 folded-norm kernel of a one-token block shape.
pub(crate) fn fold_bf16_kernel_name(format: Fp4Format, cfg: Fp4GemmConfig) -> Option<&'static str> {
    let nv = format == Fp4Format::Nvfp4;
    Some(match (cfg.m_tiles, cfg.group, nv) {
        (1, 1, true) => "fp4_gemm_nv_m1_t1_g1_fold_bf16",
        (1, 2, true) => "fp4_gemm_nv_m1_t1_g2_fold_bf16",
        (2, 1, true) => "fp4_gemm_nv_m2_t1_g1_fold_bf16",
        (2, 2, true) => "fp4_gemm_nv_m2_t1_g2_fold_bf16",
        (1, 1, false) => "fp4_gemm_mx_m1_t1_g1_fold_bf16",
        (1, 2, false) => "fp4_gemm_mx_m1_t1_g2_fold_bf16",
        (2, 1, false) => "fp4_gemm_mx_m2_t1_g1_fold_bf16",
        (2, 2, false) => "fp4_gemm_mx_m2_t1_g2_fold_bf16",
        _ => return None,
    })
}

/// `m` as the kernels' `int` token count.
fn tokens_i32(m: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(m).map_err(|_| CudaError::Shape {
        what: what.into(),
        reason: format!("m = {m} is too large"),
    })
}

/// The kernel of a dense launch and its dynamic shared memory: the activation-staged variant
/// `staged` (`Tuning::x_stage`; bit-identical to `plain`) where there is one and its buffers
/// fit the default 48 KiB, else `plain`. Staged launches that needed more (32 tokens, or 8 and
/// more warps at 16) made the Qwen3-30B-A3B batch-32 decode step 9 % slower on the H100 although
/// each kernel alone was faster (docs/kernels-notes.md, round 7).
fn staged_or_plain(
    gpu: &GpuContext,
    staged: Option<&'static str>,
    plain: &'static str,
    cfg: Fp4GemmConfig,
    tn: u32,
) -> Result<(cudarc::driver::CudaFunction, u32), CudaError> {
    let smem = reduction_smem(cfg, tn);
    let staged_smem = smem + x_stage_smem(cfg, tn);
    match staged.filter(|_| gpu.tuning().x_stage && staged_smem <= SMEM_LIMIT) {
        Some(name) => Ok((gpu.function(name)?, staged_smem)),
        None => Ok((gpu.function(plain)?, smem)),
    }
}

/// The one-token kernel with a folded norm (fp4_gemm.cu `FOLD_VARIANTS`) of a block shape, and
/// its dynamic shared memory.
fn fold_kernel(
    gpu: &GpuContext,
    format: Fp4Format,
    cfg: Fp4GemmConfig,
    tn: u32,
    fold: &Fold<'_>,
    swiglu: bool,
) -> Result<(cudarc::driver::CudaFunction, u32), CudaError> {
    let name = fold_kernel_name(format, cfg, tn, swiglu).ok_or(CudaError::NoVariant {
        format,
        m_tiles: cfg.m_tiles,
        token_tiles: tn,
        group: cfg.group,
    })?;
    Ok((gpu.function(name)?, reduction_smem(cfg, tn) + fold.smem()))
}

/// The name of a folded-norm kernel: one token tile; the SwiGLU ones have two row tiles.
pub(crate) fn fold_kernel_name(
    format: Fp4Format,
    cfg: Fp4GemmConfig,
    tn: u32,
    swiglu: bool,
) -> Option<&'static str> {
    if tn != 1 {
        return None;
    }
    let nv = format == Fp4Format::Nvfp4;
    Some(match (swiglu, cfg.m_tiles, cfg.group, nv) {
        (false, 1, 1, true) => "fp4_gemm_nv_m1_t1_g1_fold",
        (false, 1, 2, true) => "fp4_gemm_nv_m1_t1_g2_fold",
        (false, 2, 1, true) => "fp4_gemm_nv_m2_t1_g1_fold",
        (false, 2, 2, true) => "fp4_gemm_nv_m2_t1_g2_fold",
        (true, 2, 1, true) => "fp4_gemm_sw_nv_t1_g1_fold",
        (true, 2, 2, true) => "fp4_gemm_sw_nv_t1_g2_fold",
        (false, 1, 1, false) => "fp4_gemm_mx_m1_t1_g1_fold",
        (false, 1, 2, false) => "fp4_gemm_mx_m1_t1_g2_fold",
        (false, 2, 1, false) => "fp4_gemm_mx_m2_t1_g1_fold",
        (false, 2, 2, false) => "fp4_gemm_mx_m2_t1_g2_fold",
        (true, 2, 1, false) => "fp4_gemm_sw_mx_t1_g1_fold",
        (true, 2, 2, false) => "fp4_gemm_sw_mx_t1_g2_fold",
        _ => return None,
    })
}

/// Launches a DENSE_KERNEL of fp4_gemm.cu (plain or SwiGLU epilogue: the same arguments).
///
/// # Safety
/// `x` must hold `m` rows of `w.k` elements and `y` the kernel's output rows (`w.n`, or
/// `w.n / 2` for the SwiGLU epilogue) for `m` tokens (`None`: only with a fold output, which
/// stores no `y`); a fold's buffers must have the sizes its launcher (fold.rs) checks; the
/// kernel guards rows, tokens and K.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_dense(
    gpu: &GpuContext,
    f: &cudarc::driver::CudaFunction,
    launch: LaunchConfig,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    y: Option<&mut CudaSlice<bf16>>,
    m: i32,
    flags: i32,
    fold: &Fold<'_>,
    what: &'static str,
) -> Result<(), CudaError> {
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let mut b = gpu.stream().launch_builder(f);
    w.push_args(&mut b).arg(x);
    match y {
        Some(y) => b.arg(y),
        None => b.arg(&NULL_PTR),
    };
    b.arg(&m).arg(&n_i).arg(&k_i).arg(&w.post).arg(&flags);
    // Only the folded-norm kernels (DENSE_FOLD_KERNEL) take the fold's arguments.
    if fold.active() {
        fold.push_args(&mut b);
    }
    // One token only: padding the 8-token launches too cost MiMo-7B's batch 8 0.5 %.
    let launch = if m == 1 {
        spread_launch(gpu, f, launch)?
    } else {
        launch
    };
    // SAFETY: argument types and order match DENSE_KERNEL_EPI; sizes are the caller's promise.
    unsafe { b.launch(launch) }.map_err(drv(what))?;
    Ok(())
}

/// Whether dense launches over `w` ask L2 for their own rows before their PDL wait
/// (`Tuning::l2_prefetch`, or `l2_prefetch_small` for a weight up to its size): another
/// kernel asking for the same bytes only adds traffic.
pub fn prefetches_itself(gpu: &GpuContext, w: &GpuFp4Weight) -> bool {
    prefetch_flags(gpu, w) != 0
}

/// `FLAG_PREFETCH` of fp4_gemm.cu for a launch over `w`.
fn prefetch_flags(gpu: &GpuContext, w: &GpuFp4Weight) -> i32 {
    let t = gpu.tuning();
    let small = w.bytes_per_matrix() <= (t.l2_prefetch_small_mib as usize) << 20;
    i32::from(t.l2_prefetch || (t.l2_prefetch_small && small))
}

fn dense_only(w: &GpuFp4Weight, what: &'static str) -> Result<(), CudaError> {
    if w.experts != 1 {
        return Err(CudaError::Mismatch {
            what,
            reason: format!(
                "weight holds {} experts; use the MoE entry point",
                w.experts
            ),
        });
    }
    Ok(())
}

/// The block shape of the gated products: `fp4_gemm`'s for the whole `[gate | up]` matrix
/// (so the same warps split K in the same way: bit-identical sums), with two row tiles (a
/// gate tile and its up tile).
fn gated_config(m: usize, n: usize, k: usize, sm_count: u32) -> Fp4GemmConfig {
    Fp4GemmConfig {
        m_tiles: 2,
        ..Fp4GemmConfig::auto(m, n, k, sm_count)
    }
}

/// The staged variant of a gated kernel (16 tokens, one chunk per group).
fn swiglu_xs_kernel_name(format: Fp4Format, tn: u32, cfg: Fp4GemmConfig) -> Option<&'static str> {
    match (tn, cfg.group, format) {
        (2, 1, Fp4Format::Nvfp4) => Some("fp4_gemm_sw_nv_t2_g1_xs"),
        (2, 1, Fp4Format::Mxfp4) => Some("fp4_gemm_sw_mx_t2_g1_xs"),
        _ => None,
    }
}

fn swiglu_kernel_name(format: Fp4Format, tn: u32, group: u32) -> Option<&'static str> {
    let nv = format == Fp4Format::Nvfp4;
    Some(match (tn, group, nv) {
        (1, 1, true) => "fp4_gemm_sw_nv_t1_g1",
        (1, 2, true) => "fp4_gemm_sw_nv_t1_g2",
        (2, 1, true) => "fp4_gemm_sw_nv_t2_g1",
        (4, 1, true) => "fp4_gemm_sw_nv_t4_g1",
        (1, 1, false) => "fp4_gemm_sw_mx_t1_g1",
        (1, 2, false) => "fp4_gemm_sw_mx_t1_g2",
        (2, 1, false) => "fp4_gemm_sw_mx_t2_g1",
        (4, 1, false) => "fp4_gemm_sw_mx_t4_g1",
        _ => return None,
    })
}

/// The kernel of [`fp4_gemm_swiglu`] for `w` at `m` tokens, its block shape and token tiles.
fn swiglu_variant(
    w: &GpuFp4Weight,
    m: usize,
    sm_count: u32,
) -> Result<(&'static str, Fp4GemmConfig, u32), CudaError> {
    dense_only(w, "fp4_gemm_swiglu")?;
    let tn = token_tiles(m);
    let cfg = gated_config(m, w.n, w.k, sm_count);
    cfg.check(tn)?;
    match swiglu_kernel_name(w.format, tn, cfg.group) {
        Some(name) if w.n % 2 == 0 => Ok((name, cfg, tn)),
        _ => Err(CudaError::NoVariant {
            format: w.format,
            m_tiles: 2,
            token_tiles: tn,
            group: cfg.group,
        }),
    }
}

/// Whether [`fp4_gemm_swiglu`] has a kernel for `w` at `m` tokens.
pub fn fp4_gemm_swiglu_supported(w: &GpuFp4Weight, m: usize, sm_count: u32) -> bool {
    tiled_supported(w, m, true) || swiglu_variant(w, m, sm_count).is_ok()
}

/// `y[m, n/2] = silu(x·G^T) * (x·U^T)` for an FP4 `[gate | up]` weight (`G` its first `n/2`
/// rows, `U` the rest): bit for bit what [`fp4_gemm`] into `[m, n]` followed by the runtime's
/// SwiGLU kernel gives (each product rounded to bf16, then `silu` with `expf`), in one launch.
pub fn fp4_gemm_swiglu(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    // The bulk kernel where it is preferred; else the tiled kernel where it is preferred, or
    // where no decode variant takes the shape (the decode variant is only looked up when the
    // tiled one is not preferred).
    let tuning = gpu.tuning();
    if bulk_preferred(&tuning, gpu, w, m, true) {
        return fp4_gemm_swiglu_bulk(gpu, w, x, m, y);
    }
    if tiled_supported(w, m, true)
        && (tiled_preferred(&tuning, w, m, true) || swiglu_variant(w, m, gpu.sm_count()).is_err())
    {
        return fp4_gemm_swiglu_tiled(gpu, w, x, m, y);
    }
    swiglu_product(gpu, w, x, m, y, &Fold::default())
}

/// The launch behind [`fp4_gemm_swiglu`] and its folded-norm form (fold.rs).
pub(crate) fn swiglu_product(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
    fold: &Fold<'_>,
) -> Result<(), CudaError> {
    let (name, cfg, tn) = swiglu_variant(w, m, gpu.sm_count())?;
    let inter = w.n / 2;
    check_len("fp4_gemm_swiglu: x", x.len(), m * w.k)?;
    check_len("fp4_gemm_swiglu: y", y.len(), m * inter)?;
    if m == 0 {
        return Ok(());
    }
    let m_i = tokens_i32(m, "fp4_gemm_swiglu: x")?;
    let (f, smem) = if fold.active() {
        fold_kernel(gpu, w.format, cfg, tn, fold, true)?
    } else {
        staged_or_plain(gpu, swiglu_xs_kernel_name(w.format, tn, cfg), name, cfg, tn)?
    };
    let launch = LaunchConfig {
        grid_dim: (
            inter.div_ceil(16) as u32,
            1,
            m.div_ceil(8 * tn as usize) as u32,
        ),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: smem,
    };
    let flags = prefetch_flags(gpu, w);
    // SAFETY (launch_dense): x holds m rows of k, y m rows of n / 2 (checked above).
    unsafe {
        launch_dense(
            gpu,
            &f,
            launch,
            w,
            x,
            Some(y),
            m_i,
            flags,
            fold,
            "launch fp4_gemm_swiglu",
        )
    }
}

/// Dequantizes the FP4 weight to a dense row-major bf16 `[n, k]` matrix:
/// `bf16(e2m1 * (scale / global_scale))`, the CPU reference's operation order.
pub fn fp4_dequantize(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    out: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    if w.experts != 1 {
        return Err(CudaError::Mismatch {
            what: "fp4_dequantize",
            reason: format!("weight holds {} experts", w.experts),
        });
    }
    check_len("fp4_dequantize: out", out.len(), w.n * w.k)?;
    let pieces = w.n * w.k / 32;
    let name = match w.format {
        Fp4Format::Nvfp4 => "fp4_dequant_nv",
        Fp4Format::Mxfp4 => "fp4_dequant_mx",
    };
    let f = gpu.function(name)?;
    let launch = LaunchConfig {
        grid_dim: (pieces.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let lut = gpu.scale_lut(w.format);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&w.packed)
        .arg(&w.scales)
        .arg(&w.global_scales)
        .arg(lut)
        .arg(out)
        .arg(&n_i)
        .arg(&k_i);
    // SAFETY: types match the kernel; out holds n*k elements; one thread per 32 elements.
    unsafe { b.launch(launch) }.map_err(drv("launch fp4_dequantize"))?;
    Ok(())
}

/// Copies `src` to `dst` (equal lengths, a multiple of 16 bytes) with a 16-byte-per-thread
/// kernel: the benchmark's measure of achievable copy bandwidth.
pub fn device_copy(
    gpu: &GpuContext,
    src: &CudaSlice<u8>,
    dst: &mut CudaSlice<u8>,
) -> Result<(), CudaError> {
    check_len("device_copy: dst", dst.len(), src.len())?;
    if src.len() % 16 != 0 {
        return Err(CudaError::Shape {
            what: "device_copy".into(),
            reason: format!("{} bytes is not a multiple of 16", src.len()),
        });
    }
    let n = (src.len() / 16) as u64;
    let f = gpu.function("util_copy_u4")?;
    let blocks = (gpu.sm_count() * 8).min(n.div_ceil(256).max(1) as u32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(src).arg(dst).arg(&n);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: both buffers hold n 16-byte words (cudaMalloc alignment is 256 bytes).
    unsafe { b.launch(cfg) }.map_err(drv("launch copy"))?;
    Ok(())
}

pub(crate) fn check_len(what: &'static str, got: usize, want: usize) -> Result<(), CudaError> {
    if got != want {
        return Err(CudaError::Mismatch {
            what,
            reason: format!("buffer holds {got} elements, the shape needs {want}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{fold_bf16_kernel_name, fold_kernel_name, gated_config, Fp4GemmConfig};
    use crate::fp4::Fp4Format;

    /// Every one-token shape the automatic rule picks has a folded-norm kernel, plain and
    /// SwiGLU, and each name is instantiated in fp4_gemm.cu (FOLD_VARIANTS, names formed by
    /// token pasting), so that a missing one fails here and not at launch on a GPU; so has the
    /// FP4 + BF16 one-launch kernel (bf16_gemv.cu).
    #[test]
    fn fold_kernels_cover_the_one_token_shapes() {
        let src = super::super::compile::FP4_GEMM_SRC.1;
        for n in [64usize, 300, 2048, 4096, 5120, 14336, 22016, 151936] {
            for k in [256usize, 2048, 4096, 11008] {
                for format in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
                    for (cfg, swiglu) in [
                        (Fp4GemmConfig::auto(1, n, k, 132), false),
                        (gated_config(1, n, k, 132), true),
                    ] {
                        let name = fold_kernel_name(format, cfg, 1, swiglu)
                            .unwrap_or_else(|| panic!("no fold kernel for {cfg:?} {swiglu}"));
                        let pasted = name.replacen("_nv_", "_##FMTNAME##_", 1).replacen(
                            "_mx_",
                            "_##FMTNAME##_",
                            1,
                        );
                        assert!(src.contains(&pasted), "{name} is not instantiated");
                    }
                    // The FP4 + BF16 one-launch kernel (bf16_gemv.cu, names written out).
                    let cfg = Fp4GemmConfig::auto(1, n, k, 132);
                    let name = fold_bf16_kernel_name(format, cfg)
                        .unwrap_or_else(|| panic!("no FP4 + BF16 kernel for {cfg:?}"));
                    assert!(
                        src.contains(&format!("({name},")),
                        "{name} is not instantiated"
                    );
                }
            }
        }
    }

    fn cfg(m_tiles: u32, warps: u32, group: u32) -> Fp4GemmConfig {
        Fp4GemmConfig {
            m_tiles,
            warps,
            group,
        }
    }

    /// The one-wave rule on a 132-SM H100: two warps only where four overfill the first wave
    /// of 16 warps per SM and two fit it, and only for one token tile.
    #[test]
    fn auto_takes_two_warps_only_where_they_make_one_wave() {
        // MiMo-7B gate/up: 688 blocks; 4 warps = 2,752 > 2,112, 2 warps = 1,376.
        assert_eq!(Fp4GemmConfig::auto(1, 22016, 4096, 132), cfg(2, 2, 2));
        // 448 blocks: 4 warps fit one wave.
        assert_eq!(Fp4GemmConfig::auto(1, 14336, 4096, 132), cfg(2, 4, 2));
        // The lm_head: 4,748 blocks overfill it at any width.
        assert_eq!(Fp4GemmConfig::auto(1, 151936, 2048, 132).warps, 4);
        // Two token tiles keep the earlier rule.
        assert_eq!(Fp4GemmConfig::auto(16, 22016, 4096, 132).warps, 4);
    }
}
