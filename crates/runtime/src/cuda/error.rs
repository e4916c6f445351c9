//! Errors of the CUDA backend.

use crate::config::ConfigError;
use crate::model::ForwardError;
use crate::weights::LoadError;
use mimo_kernels::cuda::CudaError;

/// Everything that can go wrong running a model on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No GPU, a kernel that failed to compile, or a failed launch of the kernels crate.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// A CUDA driver call of the runtime failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        /// the operation that failed
        what: &'static str,
        /// the driver's error
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call of the runtime failed.
    #[error("cuBLAS error in {what}: {source}")]
    Cublas {
        /// the operation that failed
        what: &'static str,
        /// cuBLAS status
        source: cudarc::cublas::result::CublasError,
    },
    /// The checkpoint could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The configuration could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad input to a forward pass (empty, token out of range, context overflow).
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// Bad input to generation (empty or too long prompt, sampling parameters).
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    /// The model and its buffers do not fit in the GPU's free memory (refused before loading).
    #[error("{what} needs {need_gib:.2} GiB of GPU memory; {free_gib:.2} GiB of {total_gib:.2} GiB is free on {device}")]
    OutOfMemory {
        /// what was being placed
        what: String,
        /// GiB needed
        need_gib: f64,
        /// GiB free
        free_gib: f64,
        /// GiB on the device
        total_gib: f64,
        /// device name
        device: String,
    },
    /// A model feature the GPU backend does not implement.
    #[error("not supported by the CUDA backend: {0}")]
    Unsupported(String),
    /// A device-side check failed (token ids out of range seen by a kernel, bad router ids).
    #[error("device check failed: {0}")]
    DeviceCheck(String),
}

/// Wraps a driver error with the name of the operation.
pub(crate) fn drv(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |source| GpuError::Driver { what, source }
}
