//! FP8 prefill path: FP4 weights and bf16 activations become E4M3 rows with one f32 scale per
//! row (kernels in fp4_gemm.cu, CPU reference in `crate::fp8_rows`), then cuBLASLt multiplies
//! them on the FP8 tensor cores with both scale vectors applied in its epilogue
//! (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`). Hopper has FP8 but no FP4 tensor cores, so
//! for large M this is the fast way to use them; the cost is E4M3 rounding of the activations
//! (per token row) and of NVFP4 weight elements whose `e2m1 * scale` needs more than 3 mantissa
//! bits (MXFP4 weights convert exactly).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::gemm::check_len;
use super::weights::GpuFp4Weight;
use crate::fp4::Fp4Format;

/// cuBLASLt workspace: what cudarc's own wrapper gives Hopper.
const WORKSPACE: usize = 32 << 20;

/// E4M3 rows and their f32 scales on the device.
pub struct E4m3Rows {
    /// `rows * k` codes, row-major (may be longer: buffers are reused across shapes).
    pub q: CudaSlice<u8>,
    /// One scale per row (may be longer).
    pub scale: CudaSlice<f32>,
}

impl E4m3Rows {
    /// Buffers for `rows` rows of `k` values.
    pub fn alloc(gpu: &GpuContext, rows: usize, k: usize) -> Result<E4m3Rows, CudaError> {
        let s = gpu.stream();
        Ok(E4m3Rows {
            q: s.alloc_zeros::<u8>(rows * k)
                .map_err(drv("alloc E4M3 rows"))?,
            scale: s
                .alloc_zeros::<f32>(rows.max(1))
                .map_err(drv("alloc E4M3 row scales"))?,
        })
    }

    /// Grows the buffers (contents lost) so that they hold `rows` rows of `k` values.
    pub fn ensure(&mut self, gpu: &GpuContext, rows: usize, k: usize) -> Result<(), CudaError> {
        if self.q.len() < rows * k || self.scale.len() < rows {
            *self = E4m3Rows::alloc(gpu, rows, k)?;
        }
        Ok(())
    }
}

/// Reusable buffers of [`fp4_gemm_fp8`]: the converted weight and activations.
pub struct Fp8Scratch {
    /// the weight as E4M3 rows
    pub w: E4m3Rows,
    /// the activations as E4M3 rows
    pub x: E4m3Rows,
}

impl Fp8Scratch {
    /// Empty buffers; they grow on first use.
    pub fn new(gpu: &GpuContext) -> Result<Fp8Scratch, CudaError> {
        Ok(Fp8Scratch {
            w: E4m3Rows::alloc(gpu, 0, 0)?,
            x: E4m3Rows::alloc(gpu, 0, 0)?,
        })
    }
}

/// Whether the FP8 path can run `[m, k] x [n, k]^T`: cuBLASLt's FP8 kernels want 16-byte
/// aligned rows (k % 16) and we keep n a multiple of 16 too (its documented FP8 shape rule).
pub fn fp8_shape_ok(n: usize, k: usize) -> bool {
    n % 16 == 0 && k % 16 == 0 && n > 0 && k > 0
}

/// The weight an FP8 conversion takes: one dense matrix, not a stack of experts.
fn check_dense(w: &GpuFp4Weight, what: &'static str) -> Result<(), CudaError> {
    if w.experts != 1 {
        return Err(CudaError::Mismatch {
            what,
            reason: format!("weight holds {} experts", w.experts),
        });
    }
    Ok(())
}

/// The activations an FP8 conversion takes: `m > 0` rows of `k` (a multiple of 16) in `x`.
fn check_rows(
    x: &CudaSlice<bf16>,
    m: usize,
    k: usize,
    what: &'static str,
) -> Result<(), CudaError> {
    if k % 16 != 0 || m == 0 {
        return Err(CudaError::Shape {
            what: what.into(),
            reason: format!("[{m}, {k}]: k must be a multiple of 16 and m positive"),
        });
    }
    if x.len() < m * k {
        return Err(CudaError::Mismatch {
            what,
            reason: format!("x holds {} values, [{m}, {k}] needs {}", x.len(), m * k),
        });
    }
    Ok(())
}

/// Weight rows per block of the conversion kernels (one warp each).
const ROWS_PER_BLOCK: usize = 8;

/// The arguments every weight-row conversion kernel takes first (`fp4_to_e4m3_rows_*` and
/// `fp8_operands_*`, in this order): the packed weight, its block and global scales, the scale
/// table, the output rows and their scales, then `n` and `k`.
fn push_weight_rows<'a, 'b>(
    b: &'b mut LaunchArgs<'a>,
    gpu: &'a GpuContext,
    w: &'a GpuFp4Weight,
    out: &'a mut E4m3Rows,
    (n, k): (&'a i32, &'a i32),
) -> &'b mut LaunchArgs<'a> {
    b.arg(&w.packed)
        .arg(&w.scales)
        .arg(&w.global_scales)
        .arg(gpu.scale_lut(w.format))
        .arg(&mut out.q)
        .arg(&mut out.scale)
        .arg(n)
        .arg(k)
}

/// Converts a dense FP4 weight to E4M3 rows (`w.n` rows of `w.k`).
pub fn fp4_to_e4m3_rows(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    out: &mut E4m3Rows,
) -> Result<(), CudaError> {
    check_dense(w, "fp4_to_e4m3_rows")?;
    out.ensure(gpu, w.n, w.k)?;
    let name = match w.format {
        Fp4Format::Nvfp4 => "fp4_to_e4m3_rows_nv",
        Fp4Format::Mxfp4 => "fp4_to_e4m3_rows_mx",
    };
    let f = gpu.function(name)?;
    let cfg = LaunchConfig {
        grid_dim: (w.n.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let mut b = gpu.stream().launch_builder(&f);
    push_weight_rows(&mut b, gpu, w, out, (&n_i, &k_i));
    // SAFETY: argument types match the kernel; out holds n*k codes and n scales (ensured
    // above); one warp per row, rows >= n return.
    unsafe { b.launch(cfg) }.map_err(drv("launch fp4_to_e4m3_rows"))?;
    Ok(())
}

/// Converts `m` bf16 rows of `k` values (k % 16 == 0) to E4M3 rows.
pub fn bf16_to_e4m3_rows(
    gpu: &GpuContext,
    x: &CudaSlice<bf16>,
    m: usize,
    k: usize,
    out: &mut E4m3Rows,
) -> Result<(), CudaError> {
    check_rows(x, m, k, "bf16_to_e4m3_rows")?;
    out.ensure(gpu, m, k)?;
    let f = gpu.function("bf16_rows_to_e4m3")?;
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let k_i = k as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&mut out.q).arg(&mut out.scale).arg(&k_i);
    // SAFETY: types match; x holds m*k bf16, out m*k codes and m scales; one block per row.
    unsafe { b.launch(cfg) }.map_err(drv("launch bf16_rows_to_e4m3"))?;
    Ok(())
}

/// Activation rows per block of [`fp8_operands`]: one warp per row (8 per block) for rows of at
/// most this many values, where a block per row would leave most of its 256 threads idle; one
/// block per row beyond. H100, 2048 rows (`bench/results/kernels-h100-fp8-operands.json`, call
/// 4): k = 768 12.4 us with a warp per row against 14.1 with a block; k = 2048 and 4096 slower
/// with a warp (20.9 vs 20.6 us, 83.2 vs 79.0 us).
const WARP_ROW_MAX_K: usize = 1024;

fn activation_rows_per_block(k: usize) -> usize {
    if k <= WARP_ROW_MAX_K {
        ROWS_PER_BLOCK
    } else {
        1
    }
}

/// Both operands of [`fp4_gemm_fp8`] in one launch: `w` as [`fp4_to_e4m3_rows`] and the `m`
/// rows of `x` as [`bf16_to_e4m3_rows`], the same bytes, one launch boundary less per product.
pub fn fp8_operands(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    scratch: &mut Fp8Scratch,
) -> Result<(), CudaError> {
    check_dense(w, "fp8_operands")?;
    check_rows(x, m, w.k, "fp8_operands")?;
    scratch.w.ensure(gpu, w.n, w.k)?;
    scratch.x.ensure(gpu, m, w.k)?;
    let name = match w.format {
        Fp4Format::Nvfp4 => "fp8_operands_nv",
        Fp4Format::Mxfp4 => "fp8_operands_mx",
    };
    let f = gpu.function(name)?;
    let xrows = activation_rows_per_block(w.k);
    let cfg = LaunchConfig {
        grid_dim: (
            (w.n.div_ceil(ROWS_PER_BLOCK) + m.div_ceil(xrows)) as u32,
            1,
            1,
        ),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, k_i, m_i, xr_i) = (w.n as i32, w.k as i32, m as i32, xrows as i32);
    let mut b = gpu.stream().launch_builder(&f);
    push_weight_rows(&mut b, gpu, w, &mut scratch.w, (&n_i, &k_i))
        .arg(x)
        .arg(&mut scratch.x.q)
        .arg(&mut scratch.x.scale)
        .arg(&m_i)
        .arg(&xr_i);
    // SAFETY: argument types match fp8_operands_*; scratch.w holds n*k codes and n scales,
    // scratch.x m*k codes and m scales (ensured above), x m*k values (checked); the first
    // ceil(n / 8) blocks take one weight row per warp (rows >= n return), the next
    // ceil(m / xrows) blocks xrows activation rows each (rows >= m return).
    unsafe { b.launch(cfg) }.map_err(drv("launch fp8_operands"))?;
    Ok(())
}

/// A cuBLASLt handle with its workspace, for FP8 GEMMs with per-row scales on the context's
/// stream. [`Fp8Gemm::new`] gives `Ok(Err(reason))` where this GPU or library cannot run the path.
pub struct Fp8Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// Best algorithm per (m, n, k, fast_accum), from cuBLASLt's heuristic.
    algos: Mutex<HashMap<(usize, usize, usize, bool), sys::cublasLtMatmulAlgo_t>>,
    /// Hopper's fast FP8 accumulation (fewer promotions of the partial sums to full f32).
    fast_accum: bool,
}

// SAFETY: the handle is only used through &self on one stream; cuBLASLt handles may be shared
// between threads (NVIDIA's documentation), and cudarc marks its own wrapper the same way.
unsafe impl Send for Fp8Gemm {}
unsafe impl Sync for Fp8Gemm {}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        // SAFETY: created in new(), destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn blas_err(what: &'static str) -> impl FnOnce(lt::CublasError) -> CudaError {
    move |source| CudaError::CublasLt { what, source }
}

/// Descriptor objects destroyed on drop (the call that made them may fail half way).
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn set_desc<T>(
    d: &Desc,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<(), CudaError> {
    // SAFETY: v points to a live value of the attribute's type and size.
    unsafe {
        lt::set_matmul_desc_attribute(
            d.0,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(blas_err("set matmul attribute"))
}

impl Fp8Gemm {
    /// A handle on `gpu`'s stream, or `Ok(Err(reason))` where FP8 GEMMs are not
    /// available: compute capability below 8.9 or no cuBLASLt library.
    pub fn new(gpu: &GpuContext, fast_accum: bool) -> Result<Result<Fp8Gemm, String>, CudaError> {
        let (major, minor) = gpu
            .context()
            .compute_capability()
            .map_err(drv("compute capability"))?;
        if (major, minor) < (8, 9) {
            return Ok(Err(format!(
                "compute capability {major}.{minor} has no FP8 tensor cores"
            )));
        }
        // SAFETY: only tries to dlopen the library.
        if !unsafe { sys::is_culib_present() } {
            return Ok(Err("the cuBLASLt library was not found".into()));
        }
        let handle = lt::create_handle().map_err(blas_err("create handle"))?;
        let workspace = match gpu.stream().alloc_zeros::<u8>(WORKSPACE) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created, not used.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(CudaError::Driver {
                    what: "alloc cuBLASLt workspace",
                    source: e,
                });
            }
        };
        Ok(Ok(Fp8Gemm {
            handle,
            workspace,
            algos: Mutex::new(HashMap::new()),
            fast_accum,
        }))
    }

    /// `y[m, n] = (x.q[m, k] * x.scale[m]) · (w.q[n, k] * w.scale[n])^T` in bf16, f32
    /// accumulation, on the FP8 tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        gpu: &GpuContext,
        w: &E4m3Rows,
        x: &E4m3Rows,
        m: usize,
        n: usize,
        k: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        if !fp8_shape_ok(n, k) || m == 0 || m > i32::MAX as usize || n > i32::MAX as usize {
            return Err(CudaError::Shape {
                what: "fp8 gemm".into(),
                reason: format!("[{m}, {k}] x [{n}, {k}]: n and k must be multiples of 16"),
            });
        }
        let short = |what: &str, got: usize, want: usize| {
            (got < want).then(|| CudaError::Mismatch {
                what: "fp8 gemm",
                reason: format!("{what} holds {got} elements, the shape needs {want}"),
            })
        };
        if let Some(e) = short("w", w.q.len(), n * k)
            .or_else(|| short("w scales", w.scale.len(), n))
            .or_else(|| short("x", x.q.len(), m * k))
            .or_else(|| short("x scales", x.scale.len(), m))
        {
            return Err(e);
        }
        check_len("fp8 gemm: y", y.len(), m * n)?;
        use sys::cublasLtMatmulDescAttributes_t as A;
        let stream = gpu.stream();
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(blas_err("create matmul desc"))?,
        );
        // Column-major view (as in bf16_gemm): y^T [n, m] = op(W) [n, k] * x^T [k, m] with
        // W stored as k x n (ld k) and transposed: the "TN" layout FP8 GEMMs require.
        // cublasOperation_t as i32: 1 = T, 0 = N.
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        set_desc(
            &desc,
            A::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
            &(self.fast_accum as i8),
        )?;
        let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
        set_desc(&desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
        let (wq, _r0) = w.q.device_ptr(stream);
        let (ws, _r1) = w.scale.device_ptr(stream);
        let (xq, _r2) = x.q.device_ptr(stream);
        let (xs, _r3) = x.scale.device_ptr(stream);
        let (yp, _r4) = y.device_ptr_mut(stream);
        let (wsp, _r5) = self.workspace.device_ptr(stream);
        set_desc(
            &desc,
            A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &(ws as *const c_void),
        )?;
        set_desc(
            &desc,
            A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            &(xs as *const c_void),
        )?;
        let layout = |t: sys::cudaDataType, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
                .map(Layout)
                .map_err(blas_err("create matrix layout"))
        };
        let la = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, n, k)?;
        let lb = layout(sys::cudaDataType::CUDA_R_8F_E4M3, k, m, k)?;
        let lc = layout(sys::cudaDataType::CUDA_R_16BF, n, m, n)?;
        let key = (m, n, k, self.fast_accum);
        let cached = self.algos.lock().ok().and_then(|a| a.get(&key).copied());
        let algo = match cached {
            Some(a) => a,
            None => {
                let pref = Pref(lt::create_matmul_pref().map_err(blas_err("create preference"))?);
                // SAFETY: a usize attribute of the stated size.
                unsafe {
                    lt::set_matmul_pref_attribute(
                        pref.0,
                        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &WORKSPACE as *const usize as *const c_void,
                        std::mem::size_of::<usize>(),
                    )
                }
                .map_err(blas_err("set workspace preference"))?;
                // SAFETY: every descriptor is alive; the result is a plain struct.
                let h = unsafe {
                    lt::get_matmul_algo_heuristic(
                        self.handle,
                        desc.0,
                        la.0,
                        lb.0,
                        lc.0,
                        lc.0,
                        pref.0,
                    )
                }
                .map_err(blas_err("FP8 algorithm heuristic"))?;
                if let Ok(mut a) = self.algos.lock() {
                    a.insert(key, h.algo);
                }
                h.algo
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the pointers are device buffers of the lengths checked above, alive until
        // the records (_r*) drop after the call; descriptors describe exactly those shapes.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                wq as *const c_void,
                la.0,
                xq as *const c_void,
                lb.0,
                yp as *const c_void,
                lc.0,
                yp as *mut c_void,
                lc.0,
                &algo,
                wsp as *mut c_void,
                WORKSPACE,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(blas_err("FP8 matmul"))
    }
}

/// Prefill path on the FP8 tensor cores: converts `w` and `x` into `scratch` (one launch,
/// [`fp8_operands`]), then
/// [`Fp8Gemm::gemm`]. `y` is `[m, w.n]`.
pub fn fp4_gemm_fp8(
    gpu: &GpuContext,
    lt: &Fp8Gemm,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    scratch: &mut Fp8Scratch,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    fp8_operands(gpu, w, x, m, scratch)?;
    lt.gemm(gpu, &scratch.w, &scratch.x, m, w.n, w.k, y)
}
