//! cuBLAS BF16 GEMM: the baseline of the benchmark and the second half of the prefill path
//! (FP4 -> BF16 dequantization, then cuBLAS).

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::context::GpuContext;
use super::error::CudaError;
use super::gemm::{check_len, fp4_dequantize};
use super::weights::GpuFp4Weight;

/// A cuBLAS handle on the context's stream.
pub fn cublas(gpu: &GpuContext) -> Result<CudaBlas, CudaError> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::NoDevice(
            "the cuBLAS library was not found".into(),
        ));
    }
    CudaBlas::new(gpu.stream().clone()).map_err(|source| CudaError::Cublas {
        what: "create handle",
        source,
    })
}

/// `y[m, n] = x[m, k] · w[n, k]^T`, all bf16 row-major, f32 accumulation (cublasGemmEx).
#[allow(clippy::too_many_arguments)]
pub fn bf16_gemm(
    blas: &CudaBlas,
    w: &CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    m: usize,
    n: usize,
    k: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    check_len("bf16_gemm: w", w.len(), n * k)?;
    check_len("bf16_gemm: x", x.len(), m * k)?;
    check_len("bf16_gemm: y", y.len(), m * n)?;
    let too_big = |v: usize| v > i32::MAX as usize;
    if too_big(m) || too_big(n) || too_big(k) {
        return Err(CudaError::Shape {
            what: "bf16_gemm".into(),
            reason: format!("[{m}, {k}] x [{n}, {k}]"),
        });
    }
    // Column-major view: y^T (n x m) = w (k x n, transposed) * x^T (k x m).
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    // SAFETY: lengths checked above match the leading dimensions and shapes.
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|source| CudaError::Cublas {
        what: "bf16 gemm",
        source,
    })
}

/// Prefill path: dequantize `w` into `scratch` (`n * k` bf16) and multiply with cuBLAS.
pub fn fp4_gemm_dequant_cublas(
    gpu: &GpuContext,
    blas: &CudaBlas,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    scratch: &mut CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    fp4_dequantize(gpu, w, scratch)?;
    bf16_gemm(blas, scratch, x, m, w.n, w.k, y)
}
