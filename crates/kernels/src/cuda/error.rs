//! Errors of the CUDA backend.

use crate::fp4::{Fp4Error, Fp4Format};

/// Everything that can go wrong when compiling, loading or launching the CUDA kernels.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable GPU: the driver library is missing, no device is present, or it is too old.
    #[error("no usable CUDA GPU: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        /// the operation that failed
        what: &'static str,
        /// the driver's error
        source: cudarc::driver::DriverError,
    },
    /// NVRTC could not compile one of the embedded kernel sources.
    #[error("NVRTC failed to compile {file}: {log}")]
    Compile {
        /// the .cu file
        file: &'static str,
        /// compiler log
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {what}: {source}")]
    Cublas {
        /// the operation that failed
        what: &'static str,
        /// cuBLAS status
        source: cudarc::cublas::result::CublasError,
    },
    /// A cuBLASLt call failed (FP8 prefill path).
    #[error("cuBLASLt error in {what}: {source}")]
    CublasLt {
        /// the operation that failed
        what: &'static str,
        /// cuBLASLt status
        source: cudarc::cublaslt::result::CublasError,
    },
    /// The FP4 matrix handed to the GPU is inconsistent.
    #[error("invalid FP4 matrix {name}: {source}")]
    Fp4 {
        /// caller's name for the tensor
        name: String,
        /// what is wrong
        source: Fp4Error,
    },
    /// A shape the kernels do not handle (named tensor and reason).
    #[error("unsupported shape for {what}: {reason}")]
    Shape {
        /// which operand
        what: String,
        /// why it is refused
        reason: String,
    },
    /// Operands of one call disagree (format, shape or buffer length).
    #[error("operand mismatch in {what}: {reason}")]
    Mismatch {
        /// which call
        what: &'static str,
        /// what disagrees
        reason: String,
    },
    /// A kernel variant that was not compiled into the module was asked for.
    #[error(
        "no {format} kernel with {m_tiles} row tiles, {token_tiles} token tiles, group {group}"
    )]
    NoVariant {
        /// weight format
        format: Fp4Format,
        /// m16 row tiles per block
        m_tiles: u32,
        /// n8 token tiles per block
        token_tiles: u32,
        /// K chunks loaded together per warp
        group: u32,
    },
}

/// Wraps a driver error with the name of the operation.
pub(crate) fn drv(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    move |source| CudaError::Driver { what, source }
}
