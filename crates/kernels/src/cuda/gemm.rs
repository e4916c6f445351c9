//! Launchers of the FP4 x BF16 GEMM kernels (decode and small-M path) and of the FP4 -> BF16
//! dequantization kernel used by the prefill path.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// Elements of K one warp handles per step (64 bytes of each weight row).
pub const K_CHUNK: usize = 128;

/// Block shape of the FP4 GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp4GemmConfig {
    /// m16 row tiles per block (1 or 2): 16 or 32 output features.
    pub m_tiles: u32,
    /// Warps per block (1..=8); they split K between them and reduce in shared memory.
    pub warps: u32,
}

impl Fp4GemmConfig {
    /// The shape chosen for an `[m, k] x [n, k]^T` product on a GPU with `sm_count` SMs.
    /// Measured on H100 (docs/kernels-notes.md): one row tile, 8 warps of split-K.
    pub fn auto(m: usize, n: usize, k: usize, sm_count: u32) -> Self {
        let chunks = k.div_ceil(K_CHUNK) as u32;
        let warps = chunks.clamp(1, 8);
        // Two row tiles per block halve the activation traffic per weight byte; worth it only
        // where there are still several blocks per SM.
        let tiles32 = n.div_ceil(32) * m.div_ceil(8 * token_tiles(m) as usize);
        let m_tiles = if m > 8 && tiles32 >= 4 * sm_count as usize {
            2
        } else {
            1
        };
        Fp4GemmConfig { m_tiles, warps }
    }

    fn check(&self) -> Result<(), CudaError> {
        if !(1..=2).contains(&self.m_tiles) || !(1..=8).contains(&self.warps) {
            return Err(CudaError::Shape {
                what: "Fp4GemmConfig".into(),
                reason: format!(
                    "m_tiles {} (1..=2), warps {} (1..=8)",
                    self.m_tiles, self.warps
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

pub(crate) fn gemm_kernel_name(
    format: Fp4Format,
    mt: u32,
    tn: u32,
) -> Result<&'static str, CudaError> {
    use Fp4Format::*;
    Ok(match (format, mt, tn) {
        (Nvfp4, 1, 1) => "fp4_gemm_nv_m1_t1",
        (Nvfp4, 1, 2) => "fp4_gemm_nv_m1_t2",
        (Nvfp4, 1, 4) => "fp4_gemm_nv_m1_t4",
        (Nvfp4, 2, 1) => "fp4_gemm_nv_m2_t1",
        (Nvfp4, 2, 2) => "fp4_gemm_nv_m2_t2",
        (Nvfp4, 2, 4) => "fp4_gemm_nv_m2_t4",
        (Mxfp4, 1, 1) => "fp4_gemm_mx_m1_t1",
        (Mxfp4, 1, 2) => "fp4_gemm_mx_m1_t2",
        (Mxfp4, 1, 4) => "fp4_gemm_mx_m1_t4",
        (Mxfp4, 2, 1) => "fp4_gemm_mx_m2_t1",
        (Mxfp4, 2, 2) => "fp4_gemm_mx_m2_t2",
        (Mxfp4, 2, 4) => "fp4_gemm_mx_m2_t4",
        _ => {
            return Err(CudaError::NoVariant {
                format,
                m_tiles: mt,
                token_tiles: tn,
            })
        }
    })
}

/// Dynamic shared memory of one block: split-K partial sums, f32.
pub(crate) fn reduction_smem(cfg: Fp4GemmConfig, tn: u32) -> u32 {
    cfg.warps * 16 * cfg.m_tiles * 8 * tn * 4
}

/// `y[m, n] = x[m, k] · W[n, k]^T` with FP4 `W` (dequantized in the kernel), bf16 `x` and `y`,
/// f32 accumulation. Launches one kernel on the context's stream (no synchronization).
pub fn fp4_gemm(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let cfg = Fp4GemmConfig::auto(m, w.n, w.k, gpu.sm_count());
    fp4_gemm_with(gpu, w, x, m, y, cfg)
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
    cfg.check()?;
    if w.experts != 1 {
        return Err(CudaError::Mismatch {
            what: "fp4_gemm",
            reason: format!(
                "weight holds {} experts; use the MoE entry point",
                w.experts
            ),
        });
    }
    check_len("fp4_gemm: x", x.len(), m * w.k)?;
    check_len("fp4_gemm: y", y.len(), m * w.n)?;
    if m == 0 {
        return Ok(());
    }
    let m_i = i32::try_from(m).map_err(|_| CudaError::Shape {
        what: "fp4_gemm: x".into(),
        reason: format!("m = {m} is too large"),
    })?;
    let tn = token_tiles(m);
    let f = gpu.function(gemm_kernel_name(w.format, cfg.m_tiles, tn)?)?;
    let launch = LaunchConfig {
        grid_dim: (
            w.n.div_ceil(16 * cfg.m_tiles as usize) as u32,
            1,
            m.div_ceil(8 * tn as usize) as u32,
        ),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(cfg, tn),
    };
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let lut = gpu.scale_lut(w.format);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&w.packed)
        .arg(&w.scales)
        .arg(&w.global_scales)
        .arg(lut)
        .arg(x)
        .arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i);
    // SAFETY: argument types and order match the kernel; every buffer length was checked
    // against (m, n, k) above, and the kernel guards rows, tokens and k chunks.
    unsafe { b.launch(launch) }.map_err(drv("launch fp4_gemm"))?;
    Ok(())
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

pub(crate) fn check_len(what: &'static str, got: usize, want: usize) -> Result<(), CudaError> {
    if got != want {
        return Err(CudaError::Mismatch {
            what,
            reason: format!("buffer holds {got} elements, the shape needs {want}"),
        });
    }
    Ok(())
}
