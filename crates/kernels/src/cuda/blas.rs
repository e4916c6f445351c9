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

/// `h[k, k] += x[m, k]^T · x[m, k]` with `x` bf16 row-major (the first `m` rows of the view)
/// and `h` f32, f32 accumulation (cublasGemmEx): the Gram matrix (Hessian) of calibration
/// inputs, summed on the device. Symmetric up to rounding; cuBLAS gives the same bits on every
/// run on the same GPU.
pub fn bf16_gram_accumulate(
    gpu: &GpuContext,
    blas: &CudaBlas,
    x: &cudarc::driver::CudaView<'_, bf16>,
    m: usize,
    k: usize,
    h: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    check_len("bf16_gram_accumulate: x", x.len(), m * k)?;
    check_len("bf16_gram_accumulate: h", h.len(), k * k)?;
    if m == 0 {
        return Ok(());
    }
    if m > i32::MAX as usize || k > i32::MAX as usize {
        return Err(CudaError::Shape {
            what: "bf16_gram_accumulate".into(),
            reason: format!("[{m}, {k}]"),
        });
    }
    let stream = gpu.stream().clone();
    let (xp, _rx) = x.device_ptr(&stream);
    let (hp, _rh) = h.device_ptr_mut(&stream);
    let (alpha, beta) = (1.0f32, 1.0f32);
    // Column-major view: x is X^T (k x m), so h = X^T (k x m) * X (m x k) = A * A^T with
    // A = x (k x m, lda k).
    // SAFETY: x holds m * k bf16, h k * k f32 (checked above); both live on blas's stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_T,
            k as i32,
            k as i32,
            m as i32,
            &alpha as *const f32 as *const _,
            xp as *const _,
            cudaDataType::CUDA_R_16BF,
            k as i32,
            xp as *const _,
            cudaDataType::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const _,
            hp as *mut _,
            cudaDataType::CUDA_R_32F,
            k as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|source| CudaError::Cublas {
        what: "bf16 gram gemm",
        source,
    })
}
