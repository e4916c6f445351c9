//! Linear layers resident on the GPU: BF16 (cuBLAS) or packed FP4 (the kernels crate's fused
//! dequant-GEMM), and the fusion of several layers that read the same input (q/k/v, gate/up)
//! into one matrix so that one launch serves them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;
use half::bf16;
use mimo_kernels::cuda::{
    bf16_gemm, bf16_gemv_norm_in, bf16_norm_in_takes_k, bf16_to_e4m3_rows, fp4_bf16_gemv_norm_in,
    fp4_gemm, fp4_gemm_dequant_cublas, fp4_gemm_fp8, fp4_gemm_norm_in, fp4_gemm_norm_out,
    fp4_gemm_swiglu, fp4_gemm_swiglu_norm_in, fp4_gemm_swiglu_supported, fp4_gemm_takes_wgmma,
    fp4_gemm_wgmma, fp4_to_e4m3_rows, fp8_shape_ok, prefetches_itself, wgmma_preferred, E4m3Rows,
    Fp8Gemm, Fp8Scratch, GpuContext, GpuFp4Weight, L2Ranges, NormIn, NormOut,
};
use mimo_kernels::Fp4Matrix;

use super::error::{drv, GpuError};
use super::ops::Ops;
use crate::linear::{DenseMatrix, Linear, Weight};

/// How an FP4 GEMM runs ([`Gpu::fp4_path`]): the fused dequant-GEMV kernels below
/// [`PREFILL_DEQUANT_ROWS`] rows, else (Hopper, up to `Tuning::wgmma_max_tokens` rows) the
/// warpgroup kernels, else the FP8 tensor cores or dequantization + cuBLAS.
enum Fp4Path<'a> {
    Gemv,
    Wgmma,
    Fp8(&'a Fp8Gemm),
    Dequant,
}

/// The device, its cuBLAS handle and the runtime kernels.
pub struct Gpu {
    /// Device, stream and the kernels crate's modules.
    pub ctx: GpuContext,
    /// cuBLAS on the same stream.
    pub blas: CudaBlas,
    /// The runtime's own kernels.
    pub ops: Ops,
    /// bf16 scratch per FP4 weight shape for the prefill path (dequantize, then cuBLAS).
    scratch: Mutex<HashMap<(usize, usize), CudaSlice<bf16>>>,
    /// cuBLASLt for the FP8 prefill path; `None` where the GPU has no FP8 tensor cores.
    fp8: Option<Fp8Gemm>,
    /// E4M3 buffers of the FP8 prefill path (one set, grown to the largest weight: the
    /// stream runs one GEMM at a time).
    fp8_scratch: Mutex<Option<Fp8Scratch>>,
    /// Prefill GEMMs that took the FP8 path so far (tests and benches check the path ran).
    fp8_calls: AtomicUsize,
    _blas_workspace: CudaSlice<u8>,
}

/// From this many token rows on, an FP4 GEMM dequantizes the weight to bf16 and uses cuBLAS
/// (the fused kernel re-reads the weight once per 32 rows).
pub const PREFILL_DEQUANT_ROWS: usize = 64;

/// cuBLAS workspace given explicitly, so that GEMMs captured into a CUDA graph never allocate.
const BLAS_WORKSPACE: usize = 32 << 20;

impl Gpu {
    /// Opens GPU `ordinal` and loads every kernel.
    pub fn new(ordinal: usize) -> Result<Gpu, GpuError> {
        let ctx = GpuContext::new(ordinal)?;
        Gpu::from_context(ctx)
    }

    /// Wraps an opened context.
    pub fn from_context(ctx: GpuContext) -> Result<Gpu, GpuError> {
        let blas = mimo_kernels::cuda::cublas(&ctx)?;
        let ws = ctx
            .stream()
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(drv("alloc cuBLAS workspace"))?;
        {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = ws.device_ptr(ctx.stream());
            // SAFETY: the workspace lives as long as the handle (both owned by Gpu, the
            // handle is dropped first: fields drop in declaration order).
            let status = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    BLAS_WORKSPACE,
                )
            };
            if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(GpuError::Cublas {
                    what: "set workspace",
                    source: cudarc::cublas::result::CublasError(status),
                });
            }
        }
        let ops = Ops::load(&ctx)?;
        // FP8 prefill is an acceleration: where it cannot start, the GPU backend still runs.
        let fp8 = match Fp8Gemm::new(&ctx, false) {
            Ok(Ok(lt)) => Some(lt),
            Ok(Err(reason)) => {
                eprintln!("note: prefill stays on bf16: {reason}");
                None
            }
            Err(e) => {
                eprintln!("note: prefill stays on bf16: {e}");
                None
            }
        };
        Ok(Gpu {
            ctx,
            blas,
            ops,
            scratch: Mutex::new(HashMap::new()),
            fp8,
            fp8_scratch: Mutex::new(None),
            fp8_calls: AtomicUsize::new(0),
            _blas_workspace: ws,
        })
    }

    /// Whether FP8 GEMMs are available here (sm_89+ and cuBLASLt).
    pub fn has_fp8(&self) -> bool {
        self.fp8.is_some()
    }

    /// Prefill GEMMs run on the FP8 path so far in this process.
    pub fn fp8_calls(&self) -> usize {
        self.fp8_calls.load(Ordering::Relaxed)
    }

    /// The path an FP4 GEMM of `m` rows on `w` takes now.
    fn fp4_path(&self, w: &GpuFp4Weight, m: usize) -> Fp4Path<'_> {
        if m < PREFILL_DEQUANT_ROWS {
            return Fp4Path::Gemv;
        }
        let tuning = self.ctx.tuning();
        if wgmma_preferred(&tuning, &self.ctx, w, m) {
            return Fp4Path::Wgmma;
        }
        let fp8 = w.experts == 1 && fp8_shape_ok(w.n, w.k) && tuning.fp8_prefill;
        match self.fp8.as_ref().filter(|_| fp8) {
            Some(lt) => Fp4Path::Fp8(lt),
            None => Fp4Path::Dequant,
        }
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        self.ctx
            .context()
            .mem_get_info()
            .map_err(drv("memory info"))
    }

    /// Uploads a host slice.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
        what: &'static str,
    ) -> Result<CudaSlice<T>, GpuError> {
        self.ctx.stream().clone_htod(v).map_err(drv(what))
    }
}

/// A Linear weight on the device, `[n, k]`, with an optional f32 bias.
pub enum GpuLinear {
    /// BF16 weights (F32/F16 checkpoints are rounded to BF16), multiplied by cuBLAS.
    Bf16 {
        /// row-major [n, k]
        w: CudaSlice<bf16>,
        /// output features
        n: usize,
        /// input features
        k: usize,
        /// optional bias
        bias: Option<CudaSlice<f32>>,
    },
    /// Packed FP4 weights, dequantized inside the GEMM kernel.
    Fp4 {
        /// the packed weight
        w: GpuFp4Weight,
        /// optional bias
        bias: Option<CudaSlice<f32>>,
        /// E4M3 rows of `w`, kept after the first FP8 prefill where `Tuning::fp8_resident`.
        fp8: Mutex<Option<Box<E4m3Rows>>>,
    },
}

/// A prefill GEMM of an FP4 weight on the FP8 tensor cores: the weight's E4M3 rows (kept in
/// `resident` where `Tuning::fp8_resident`, else converted into the shared scratch), the
/// activations converted per call, then cuBLASLt.
#[allow(clippy::too_many_arguments)]
fn fp8_prefill(
    gpu: &Gpu,
    lt: &Fp8Gemm,
    w: &GpuFp4Weight,
    resident: &Mutex<Option<Box<E4m3Rows>>>,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    let poisoned = |what: &str| GpuError::Unsupported(format!("{what} lock poisoned"));
    let mut guard = gpu
        .fp8_scratch
        .lock()
        .map_err(|_| poisoned("FP8 scratch"))?;
    let sc = match guard.as_mut() {
        Some(sc) => sc,
        None => guard.insert(Fp8Scratch::new(&gpu.ctx)?),
    };
    if gpu.ctx.tuning().fp8_resident {
        // The weight's own E4M3 rows, converted once (same kernel, same bytes as the per-call
        // conversion), then only the activations per call.
        let mut slot = resident.lock().map_err(|_| poisoned("resident E4M3"))?;
        let rows = match slot.as_mut() {
            Some(r) => r,
            None => {
                let mut r = Box::new(E4m3Rows::alloc(&gpu.ctx, w.n, w.k)?);
                fp4_to_e4m3_rows(&gpu.ctx, w, &mut r)?;
                slot.insert(r)
            }
        };
        bf16_to_e4m3_rows(&gpu.ctx, x, m, w.k, &mut sc.x)?;
        lt.gemm(&gpu.ctx, rows, &sc.x, m, w.n, w.k, y)?;
    } else {
        fp4_gemm_fp8(&gpu.ctx, lt, w, x, m, sc, y)?;
    }
    gpu.fp8_calls.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A prefill GEMM of an FP4 weight without FP8: dequantized into a bf16 scratch of its shape,
/// then cuBLAS.
fn dequant_prefill(
    gpu: &Gpu,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    m: usize,
    y: &mut CudaSlice<bf16>,
) -> Result<(), GpuError> {
    let mut map = gpu
        .scratch
        .lock()
        .map_err(|_| GpuError::Unsupported("scratch lock poisoned".into()))?;
    let sc = match map.entry((w.n, w.k)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            gpu.ctx
                .stream()
                .alloc_zeros::<bf16>(w.n * w.k)
                .map_err(drv("alloc dequantization scratch"))?,
        ),
    };
    fp4_gemm_dequant_cublas(&gpu.ctx, &gpu.blas, w, x, m, sc, y)?;
    Ok(())
}

impl GpuLinear {
    /// Output features.
    pub fn n(&self) -> usize {
        match self {
            GpuLinear::Bf16 { n, .. } => *n,
            GpuLinear::Fp4 { w, .. } => w.n,
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match self {
            GpuLinear::Bf16 { k, .. } => *k,
            GpuLinear::Fp4 { w, .. } => w.k,
        }
    }

    /// Bytes one pass over the weight reads.
    pub fn bytes(&self) -> usize {
        match self {
            GpuLinear::Bf16 { n, k, .. } => n * k * 2,
            GpuLinear::Fp4 { w, .. } => w.bytes_per_matrix() * w.experts,
        }
    }

    /// Adds the whole weight to `r` for an L2 prefetch where it takes at most `budget` bytes
    /// (and `r` has the slots), unless its own launches prefetch it. Returns the bytes added.
    pub fn push_l2(&self, gpu: &Gpu, r: &mut L2Ranges, budget: usize) -> usize {
        let own = matches!(self, GpuLinear::Fp4 { w, .. } if prefetches_itself(&gpu.ctx, w));
        if own || self.bytes() > budget {
            return 0;
        }
        let stream = gpu.ctx.stream();
        match self {
            GpuLinear::Bf16 { w, .. } => {
                if r.push(stream, w, 0, self.bytes()) {
                    self.bytes()
                } else {
                    0
                }
            }
            GpuLinear::Fp4 { w, .. } => w.push_l2_rows(stream, r, 0, w.n),
        }
    }

    /// For a fused FP4 [gate; up] weight (`2 * inter` rows): adds the first rows of both
    /// halves, as many as `budget` bytes hold, to `r` (the one-token SwiGLU blocks take gate
    /// row i with up row inter + i, first blocks first). Returns the bytes added.
    pub fn push_l2_gated_head(&self, gpu: &Gpu, r: &mut L2Ranges, budget: usize) -> usize {
        let GpuLinear::Fp4 { w, .. } = self else {
            return 0;
        };
        let inter = w.n / 2;
        let rows = (budget / (2 * w.bytes_per_row())).min(inter);
        let stream = gpu.ctx.stream();
        let mut tried = *r;
        let gate = w.push_l2_rows(stream, &mut tried, 0, rows);
        let up = w.push_l2_rows(stream, &mut tried, inter, rows);
        if gate == 0 || up == 0 {
            return 0;
        }
        *r = tried;
        gate + up
    }

    /// `y[m, n] = x[m, k] · W^T (+ bias)`; queues the launches.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        m: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let bias = match self {
            GpuLinear::Bf16 { w, n, k, bias } => {
                bf16_gemm(&gpu.blas, w, x, m, *n, *k, y)?;
                bias
            }
            GpuLinear::Fp4 { w, bias, fp8 } => {
                match gpu.fp4_path(w, m) {
                    Fp4Path::Fp8(lt) => fp8_prefill(gpu, lt, w, fp8, x, m, y)?,
                    Fp4Path::Dequant => dequant_prefill(gpu, w, x, m, y)?,
                    Fp4Path::Gemv => fp4_gemm(&gpu.ctx, w, x, m, y)?,
                    Fp4Path::Wgmma => fp4_gemm_wgmma(&gpu.ctx, w, x, m, y)?,
                }
                bias
            }
        };
        if let Some(b) = bias {
            gpu.ops.add_bias(&gpu.ctx, y, b, m, self.n())?;
        }
        Ok(())
    }

    /// The packed weight of an FP4 Linear without a bias (the fused kernels below have no bias
    /// epilogue).
    pub(crate) fn fp4_plain(&self) -> Option<&GpuFp4Weight> {
        match self {
            GpuLinear::Fp4 { w, bias: None, .. } => Some(w),
            _ => None,
        }
    }

    /// `act[m, n/2] = silu(x·G^T) * (x·U^T)` of a `[gate | up]` FP4 Linear in one launch,
    /// bit-identical to [`GpuLinear::forward`] followed by the SwiGLU kernel, where
    /// `Tuning::dense_swiglu` is on and `m` takes the GEMV path; returns false (nothing queued)
    /// otherwise, and where the plain product takes the warpgroup kernels (33 tokens on,
    /// Hopper): they have no SwiGLU epilogue, and the product through them and the SwiGLU
    /// kernel beat the tiled kernels' fused form.
    pub fn forward_swiglu(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        m: usize,
        act: &mut CudaSlice<bf16>,
    ) -> Result<bool, GpuError> {
        let Some(w) = self.fp4_plain() else {
            return Ok(false);
        };
        let tuning = gpu.ctx.tuning();
        if !(tuning.dense_swiglu
            && matches!(gpu.fp4_path(w, m), Fp4Path::Gemv)
            && fp4_gemm_swiglu_supported(w, m, gpu.ctx.sm_count()))
            || fp4_gemm_takes_wgmma(&tuning, &gpu.ctx, w, m)
        {
            return Ok(false);
        }
        fp4_gemm_swiglu(&gpu.ctx, w, x, m, act)?;
        Ok(true)
    }

    /// One token through a bias-free FP4 Linear with the output side of a folded norm
    /// (`Tuning::norm_fold`): the residual row, the next product's input and its partial sums
    /// are written instead of an output row (the reader derives their count from this weight:
    /// `fold_parts`).
    pub fn forward_norm_out(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        out: NormOut<'_>,
    ) -> Result<(), GpuError> {
        let w = self.fp4_plain().ok_or_else(|| {
            GpuError::Unsupported("a folded norm needs a bias-free FP4 product before it".into())
        })?;
        fp4_gemm_norm_out(&gpu.ctx, w, x, out)?;
        Ok(())
    }

    /// One token through a Linear (FP4, or BF16 with K up to `BF16_NORM_IN_MAX_K`) whose input
    /// is the output side of a folded norm (the bias, if any, added after the scaling).
    pub fn forward_norm_in(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        input: NormIn<'_>,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let bias = match self {
            GpuLinear::Fp4 { w, bias, .. } => {
                fp4_gemm_norm_in(&gpu.ctx, w, x, input, y)?;
                bias
            }
            GpuLinear::Bf16 { w, n, k, bias } => {
                bf16_gemv_norm_in(&gpu.ctx, w, *n, *k, x, input, y)?;
                bias
            }
        };
        if let Some(b) = bias {
            gpu.ops.add_bias(&gpu.ctx, y, b, 1, self.n())?;
        }
        Ok(())
    }

    /// [`GpuLinear::forward_norm_in`] of `self` into `y` and `other` into `y2`, the same input,
    /// in one launch where `self` is a bias-free FP4 Linear and `other` a bias-free BF16 one
    /// with K up to [`mimo_kernels::cuda::BF16_NORM_IN_MAX_K`] (a mixed checkpoint's q_proj
    /// and k|v); returns false (nothing queued) otherwise. The outputs are those of the two launches, bit for bit.
    pub fn forward_norm_in_with(
        &self,
        other: &GpuLinear,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        input: NormIn<'_>,
        y: &mut CudaSlice<bf16>,
        y2: &mut CudaSlice<bf16>,
    ) -> Result<bool, GpuError> {
        let (
            Some(w),
            GpuLinear::Bf16 {
                w: bw,
                n,
                k,
                bias: None,
            },
        ) = (self.fp4_plain(), other)
        else {
            return Ok(false);
        };
        if *k != w.k || !bf16_norm_in_takes_k(*k, 1) {
            return Ok(false);
        }
        fp4_bf16_gemv_norm_in(&gpu.ctx, w, bw, *n, x, input, y, y2)?;
        Ok(true)
    }

    /// [`GpuLinear::forward_swiglu`] of one token whose input is the output side of a folded
    /// norm.
    pub fn forward_swiglu_norm_in(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<bf16>,
        input: NormIn<'_>,
        act: &mut CudaSlice<bf16>,
    ) -> Result<(), GpuError> {
        let w = self.fp4_plain().ok_or_else(|| {
            GpuError::Unsupported("a folded norm needs a bias-free FP4 gate/up".into())
        })?;
        Ok(fp4_gemm_swiglu_norm_in(&gpu.ctx, w, x, input, act)?)
    }

    /// Uploads a CPU Linear (bias included).
    pub fn upload(gpu: &Gpu, name: &str, l: &Linear) -> Result<GpuLinear, GpuError> {
        GpuLinear::fuse(gpu, name, &[l], true)
            .and_then(|o| o.ok_or_else(|| GpuError::Unsupported(format!("{name}: upload"))))
    }

    /// One weight holding the rows of every part in order (q/k/v, gate/up), or None where the
    /// parts cannot share one matrix (mixed dense/FP4, FP4 formats or NVFP4 global scales that
    /// differ). With `with_bias` false the biases are left out (the caller applies them).
    pub fn fuse(
        gpu: &Gpu,
        name: &str,
        parts: &[&Linear],
        with_bias: bool,
    ) -> Result<Option<GpuLinear>, GpuError> {
        let k = parts.first().map_or(0, |l| l.k());
        if parts.is_empty() || parts.iter().any(|l| l.k() != k) {
            return Ok(None);
        }
        let n: usize = parts.iter().map(|l| l.n()).sum();
        let bias = if with_bias && parts.iter().any(|l| l.bias.is_some()) {
            let mut b = Vec::with_capacity(n);
            for l in parts {
                match &l.bias {
                    Some(v) => b.extend_from_slice(v),
                    None => b.extend(std::iter::repeat_n(0.0f32, l.n())),
                }
            }
            Some(gpu.upload(&b, "upload bias")?)
        } else {
            None
        };
        if parts.iter().all(|l| !l.is_fp4()) {
            let mut w: Vec<bf16> = Vec::with_capacity(n * k);
            for l in parts {
                dense_bf16_into(l, &mut w);
            }
            return Ok(Some(GpuLinear::Bf16 {
                w: gpu.upload(&w, "upload bf16 weight")?,
                n,
                k,
                bias,
            }));
        }
        let mats: Vec<&Fp4Matrix> = parts
            .iter()
            .filter_map(|l| match &l.weight {
                Weight::Fp4(f) => Some(f),
                Weight::Dense(_) => None,
            })
            .collect();
        if mats.len() != parts.len() {
            return Ok(None);
        }
        let first = mats[0];
        if mats
            .iter()
            .any(|f| f.format != first.format || f.global_scale != first.global_scale)
        {
            return Ok(None);
        }
        let fused = Fp4Matrix {
            format: first.format,
            n,
            k,
            packed: mats.iter().flat_map(|f| f.packed.iter().copied()).collect(),
            scales: mats.iter().flat_map(|f| f.scales.iter().copied()).collect(),
            global_scale: first.global_scale,
        };
        let w = GpuFp4Weight::upload(&gpu.ctx, name, &fused)?;
        Ok(Some(GpuLinear::Fp4 {
            w,
            bias,
            fp8: Mutex::new(None),
        }))
    }
}

/// Appends the weight of a dense Linear as bf16 (F32 rounded to nearest even).
fn dense_bf16_into(l: &Linear, out: &mut Vec<bf16>) {
    match &l.weight {
        Weight::Dense(DenseMatrix::Bf16 { data, .. }) => out.extend_from_slice(data),
        Weight::Dense(DenseMatrix::F32 { data, .. }) => {
            out.extend(data.iter().map(|&v| bf16::from_f32(v)))
        }
        Weight::Fp4(_) => {}
    }
}

/// The weight of any Linear as dense bf16 `[n, k]` (FP4 dequantized: embeddings, routers and
/// experts that cannot be stacked).
pub fn linear_to_bf16(l: &Linear) -> Vec<bf16> {
    match &l.weight {
        Weight::Fp4(f) => {
            let mut row = vec![0.0f32; f.k];
            let mut out = Vec::with_capacity(f.n * f.k);
            for r in 0..f.n {
                // Validated when the Linear was built, so decoding cannot fail.
                let _ = mimo_kernels::dequantize_row(f, r, &mut row);
                out.extend(row.iter().map(|&v| bf16::from_f32(v)));
            }
            out
        }
        _ => {
            let mut out = Vec::with_capacity(l.n() * l.k());
            dense_bf16_into(l, &mut out);
            out
        }
    }
}
