//! FP4 weights on the GPU: one Linear layer or a stack of experts of one shape.

use cudarc::driver::CudaSlice;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use crate::fp4::{Fp4Format, Fp4Matrix};

/// Packed FP4 weights on the device, in the `Fp4Matrix` layout, for `experts` matrices of
/// `[n, k]` stored back to back (`experts == 1` for a dense layer).
pub struct GpuFp4Weight {
    /// NVFP4 or MXFP4.
    pub format: Fp4Format,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns), a multiple of 32.
    pub k: usize,
    /// Number of stacked matrices.
    pub experts: usize,
    pub(crate) packed: CudaSlice<u8>,
    pub(crate) scales: CudaSlice<u8>,
    pub(crate) global_scales: CudaSlice<f32>,
}

impl GpuFp4Weight {
    /// Uploads one matrix. `name` is used in errors.
    pub fn upload(gpu: &GpuContext, name: &str, m: &Fp4Matrix) -> Result<Self, CudaError> {
        Self::upload_experts(gpu, name, std::slice::from_ref(m))
    }

    /// Uploads a stack of matrices of one format and shape (MoE experts).
    pub fn upload_experts(
        gpu: &GpuContext,
        name: &str,
        ms: &[Fp4Matrix],
    ) -> Result<Self, CudaError> {
        let first = ms.first().ok_or_else(|| CudaError::Shape {
            what: name.to_string(),
            reason: "no matrices".into(),
        })?;
        for (e, m) in ms.iter().enumerate() {
            m.validate().map_err(|source| CudaError::Fp4 {
                name: format!("{name}[{e}]"),
                source,
            })?;
            if m.format != first.format || m.n != first.n || m.k != first.k {
                return Err(CudaError::Mismatch {
                    what: "upload_experts",
                    reason: format!(
                        "{name}[{e}] is {} [{}, {}], {name}[0] is {} [{}, {}]",
                        m.format, m.n, m.k, first.format, first.n, first.k
                    ),
                });
            }
        }
        check_shape(name, first.n, first.k)?;
        let packed: Vec<u8> = ms.iter().flat_map(|m| m.packed.iter().copied()).collect();
        let scales: Vec<u8> = ms.iter().flat_map(|m| m.scales.iter().copied()).collect();
        let gs: Vec<f32> = ms.iter().map(|m| m.global_scale).collect();
        Self::from_parts(
            gpu,
            first.format,
            first.n,
            first.k,
            ms.len(),
            &packed,
            &scales,
            &gs,
        )
    }

    /// Uploads raw buffers in the `Fp4Matrix` layout (benchmarks build them directly).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        gpu: &GpuContext,
        format: Fp4Format,
        n: usize,
        k: usize,
        experts: usize,
        packed: &[u8],
        scales: &[u8],
        global_scales: &[f32],
    ) -> Result<Self, CudaError> {
        check_shape("weight", n, k)?;
        let want = (
            n * k / 2 * experts,
            n * (k / format.block_size()) * experts,
            experts,
        );
        if (packed.len(), scales.len(), global_scales.len()) != want {
            return Err(CudaError::Mismatch {
                what: "GpuFp4Weight::from_parts",
                reason: format!(
                    "buffers of {}, {}, {} elements; [{n}, {k}] x {experts} needs {}, {}, {}",
                    packed.len(),
                    scales.len(),
                    global_scales.len(),
                    want.0,
                    want.1,
                    want.2
                ),
            });
        }
        let s = gpu.stream();
        Ok(GpuFp4Weight {
            format,
            n,
            k,
            experts,
            packed: s.clone_htod(packed).map_err(drv("upload packed weights"))?,
            scales: s.clone_htod(scales).map_err(drv("upload scales"))?,
            global_scales: s
                .clone_htod(global_scales)
                .map_err(drv("upload global scales"))?,
        })
    }

    /// Bytes of one expert's packed weights plus block scales (what a GEMV must read).
    pub fn bytes_per_matrix(&self) -> usize {
        self.n * self.k / 2 + self.n * (self.k / self.format.block_size())
    }
}

fn check_shape(name: &str, n: usize, k: usize) -> Result<(), CudaError> {
    let bad = |reason: String| {
        Err(CudaError::Shape {
            what: name.to_string(),
            reason,
        })
    };
    if n == 0 || k == 0 {
        return bad(format!("[{n}, {k}] is empty"));
    }
    if k % 32 != 0 {
        // 16-byte loads of packed rows need rows aligned to 16 bytes.
        return bad(format!("k = {k} is not a multiple of 32"));
    }
    if n > i32::MAX as usize || k > i32::MAX as usize || n.checked_mul(k).is_none() {
        return bad(format!("[{n}, {k}] is too large"));
    }
    Ok(())
}
