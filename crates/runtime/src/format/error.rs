//! Errors of reading FP4 layouts; each names the checkpoint file or folder and the tensor.

use std::path::PathBuf;

use crate::checkpoint::{CheckpointError, DType};

/// Why a quantized Linear cannot be read from a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The checkpoint itself could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor the layout requires is absent.
    #[error("{dir}: tensor '{tensor}' required by the {layout} layout is missing")]
    MissingTensor {
        dir: PathBuf,
        tensor: String,
        layout: &'static str,
    },
    /// A tensor has another dtype than the layout prescribes.
    #[error("{file}: tensor '{tensor}' has dtype {actual}, the layout needs {expected}")]
    WrongDType {
        file: PathBuf,
        tensor: String,
        expected: DType,
        actual: DType,
    },
    /// A tensor's shape does not fit the layout.
    #[error("{file}: tensor '{tensor}' has shape {actual:?}, expected {expected}")]
    WrongShape {
        file: PathBuf,
        tensor: String,
        expected: String,
        actual: Vec<usize>,
    },
    /// A per-tensor scale is not finite and positive.
    #[error(
        "{file}: tensor '{tensor}' holds global scale {value}, which is not finite and positive"
    )]
    BadGlobalScale {
        file: PathBuf,
        tensor: String,
        value: f32,
    },
    /// A per-tensor scale so small (or, for ModelOpt, so large) that the largest FP4 weight it
    /// can dequantize to, `max`, is not a finite f32.
    #[error(
        "{file}: tensor '{tensor}' holds global scale {value}, which makes the largest dequantized weight {max} (not finite)"
    )]
    GlobalScaleOverflow {
        file: PathBuf,
        tensor: String,
        value: f32,
        max: f32,
    },
    /// An MXFP4 block scale code whose largest weight, 6 * 2^(code - 127), overflows f32.
    #[error(
        "{file}: tensor '{tensor}': block scale {index} has code {code}, which makes 6 * 2^({code} - 127) overflow f32"
    )]
    ScaleCodeOverflow {
        file: PathBuf,
        tensor: String,
        index: usize,
        code: u8,
    },
    /// The layout's JSON config (quantization_config or hf_quant_config.json) is malformed.
    #[error("{file}: {reason}")]
    BadConfig { file: PathBuf, reason: String },
}
