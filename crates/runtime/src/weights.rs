//! Reading the decoder's tensors out of a [`Checkpoint`] with the shapes the config implies:
//! every mismatch is a [`LoadError`] naming the file and the tensor.

use std::path::PathBuf;

use mimo_kernels::SrcDType;

use crate::checkpoint::{Checkpoint, CheckpointError, DType, TensorView};
use crate::config::ConfigError;
use crate::linear::{DenseMatrix, Linear, LinearError};

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// config.json could not be turned into a model configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The checkpoint folder or a tensor could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor's shape disagrees with config.json.
    #[error("{file}: tensor '{tensor}' has shape {found:?}, config.json implies {expected:?}")]
    Shape {
        /// safetensors file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// shape from the config
        expected: Vec<usize>,
        /// shape in the file
        found: Vec<usize>,
    },
    /// A tensor has a dtype the runtime cannot use there.
    #[error("{file}: tensor '{tensor}' has dtype {dtype}, expected {expected}")]
    DType {
        /// safetensors file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// dtype in the file
        dtype: String,
        /// what is accepted
        expected: &'static str,
    },
    /// A Linear layer could not be built (bad FP4 buffers, NaN scale, bias length).
    #[error("{file}: tensor '{tensor}': {source}")]
    Linear {
        /// safetensors file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// the cause
        source: LinearError,
    },
    /// The FP4 layout of a quantized tensor could not be read.
    #[error("{file}: tensor '{tensor}': {reason}")]
    Fp4Layout {
        /// safetensors file (or the folder)
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// why
        reason: String,
    },
}

/// Maps a checkpoint dtype to a dense source dtype.
fn dense_dtype(t: &TensorView<'_>) -> Result<SrcDType, LoadError> {
    match t.dtype {
        DType::BF16 => Ok(SrcDType::BF16),
        DType::F16 => Ok(SrcDType::F16),
        DType::F32 => Ok(SrcDType::F32),
        other => Err(LoadError::DType {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            dtype: format!("{other:?}"),
            expected: "BF16, F16 or F32",
        }),
    }
}

/// Checks a view's shape.
pub fn check_shape(t: &TensorView<'_>, expected: &[usize]) -> Result<(), LoadError> {
    if t.shape != expected {
        return Err(LoadError::Shape {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            expected: expected.to_vec(),
            found: t.shape.to_vec(),
        });
    }
    Ok(())
}

/// Reads tensors of one checkpoint.
pub struct Loader<'a> {
    /// The checkpoint.
    pub ck: &'a Checkpoint,
}

impl<'a> Loader<'a> {
    /// A 1-D tensor of length `len` as f32 (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let t = self.ck.tensor(name)?;
        check_shape(&t, &[len])?;
        let dt = dense_dtype(&t)?;
        mimo_kernels::dtype::convert_to_vec(dt, t.data).map_err(|e| LoadError::Fp4Layout {
            file: t.file.to_path_buf(),
            tensor: name.to_string(),
            reason: e.to_string(),
        })
    }

    /// A dense `[n, k]` matrix kept in its stored dtype.
    pub fn dense(&self, name: &str, n: usize, k: usize) -> Result<DenseMatrix, LoadError> {
        let t = self.ck.tensor(name)?;
        check_shape(&t, &[n, k])?;
        let dtype = dense_dtype(&t)?;
        Ok(DenseMatrix {
            dtype,
            n,
            k,
            data: t.data.to_vec(),
        })
    }

    /// The Linear layer `base` (`<base>.weight` and optionally `<base>.bias`) of shape `[n, k]`,
    /// dense or in any FP4 layout `format` recognizes.
    pub fn linear(&self, base: &str, n: usize, k: usize, bias: bool) -> Result<Linear, LoadError> {
        let bias = if bias {
            Some(self.vector(&format!("{base}.bias"), n)?)
        } else {
            None
        };
        let wname = format!("{base}.weight");
        let wrap = |file: PathBuf, source: LinearError| LoadError::Linear {
            file,
            tensor: wname.clone(),
            source,
        };
        if let Some(m) = crate::fp4_weights::load_fp4(self.ck, base, n, k)? {
            let file = self.file_of(&wname);
            return Linear::fp4(m, bias).map_err(|e| wrap(file, e));
        }
        let d = self.dense(&wname, n, k)?;
        let file = self.file_of(&wname);
        Linear::dense(d, bias).map_err(|e| wrap(file, e))
    }

    /// The file holding `name`, or the folder if it is absent (for error messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.ck
            .tensor(name)
            .map(|t| t.file.to_path_buf())
            .unwrap_or_else(|_| self.ck.root().to_path_buf())
    }
}
