//! Reading the decoder's tensors out of a [`Checkpoint`] with the shapes the config implies:
//! every mismatch is a [`LoadError`] naming the file and the tensor.

use std::path::PathBuf;

use mimo_kernels::{Fp4Format, SrcDType};

use crate::checkpoint::{Checkpoint, CheckpointError, DType, TensorView};
use crate::config::ConfigError;
use crate::format::{Detected, Layout};
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
    /// An FP4 tensor could not be read in its layout.
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// The checkpoint uses a quantization the runtime does not read.
    #[error("{dir}: unsupported quantization ({what}); mimo-run reads dense BF16/F16/F32 and the compressed-tensors NVFP4/MXFP4 and ModelOpt NVFP4 layouts")]
    UnsupportedQuantization {
        /// checkpoint folder
        dir: PathBuf,
        /// what was detected
        what: String,
    },
    /// A tensor's bytes could not be converted.
    #[error("{file}: tensor '{tensor}': {reason}")]
    Data {
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
    /// Its FP4 layout, if quantized.
    pub layout: Option<Layout>,
}

impl<'a> Loader<'a> {
    /// A loader for `ck`; detects its FP4 layout and rejects quantizations it cannot read.
    pub fn new(ck: &'a Checkpoint) -> Result<Loader<'a>, LoadError> {
        let unsupported = |what: String| LoadError::UnsupportedQuantization {
            dir: ck.root().to_path_buf(),
            what,
        };
        let layout = match crate::format::detect(ck) {
            Detected::Dense => None,
            Detected::Fp4(l) => Some(l),
            Detected::GptOssMxfp4 => return Err(unsupported("gpt-oss MXFP4 experts".into())),
            Detected::Other(what) => return Err(unsupported(what)),
        };
        Ok(Loader { ck, layout })
    }

    /// A 1-D tensor of length `len` as f32 (norm weights, biases). A NaN or infinity in it is
    /// refused: it would load without a word and turn every logit into NaN.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let t = self.ck.tensor(name)?;
        check_shape(&t, &[len])?;
        let dt = dense_dtype(&t)?;
        let data = |reason: String| LoadError::Data {
            file: t.file.to_path_buf(),
            tensor: name.to_string(),
            reason,
        };
        let v = mimo_kernels::dtype::convert_to_vec(dt, t.data).map_err(|e| data(e.to_string()))?;
        if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(data(format!(
                "holds a non-finite value ({x}) at element {i}"
            )));
        }
        Ok(v)
    }

    /// A dense `[n, k]` matrix kept in its stored dtype (F16 widened to F32).
    pub fn dense(&self, name: &str, n: usize, k: usize) -> Result<DenseMatrix, LoadError> {
        let t = self.ck.tensor(name)?;
        check_shape(&t, &[n, k])?;
        let dtype = dense_dtype(&t)?;
        DenseMatrix::from_bytes(dtype, n, k, t.data).map_err(|source| LoadError::Linear {
            file: t.file.to_path_buf(),
            tensor: name.to_string(),
            source,
        })
    }

    /// The FP4 format the Linear layer `base` is stored in, or `None` where it is dense (or
    /// absent): a quantized checkpoint keeps the Linear layers its converter ignored dense.
    pub fn fp4_format(&self, base: &str) -> Option<Fp4Format> {
        let layout = self.layout?;
        let names = layout.tensor_names(base);
        let quantized = match layout {
            Layout::CtNvfp4 | Layout::CtMxfp4 => self.ck.contains(&names.packed),
            Layout::ModelOptNvfp4 => names.global.as_deref().is_some_and(|g| self.ck.contains(g)),
        };
        quantized.then(|| layout.format())
    }

    /// The Linear layer `base` (`<base>.weight` and optionally `<base>.bias`) of shape `[n, k]`,
    /// dense or packed FP4 in the checkpoint's layout.
    pub fn linear(&self, base: &str, n: usize, k: usize, bias: bool) -> Result<Linear, LoadError> {
        let bias = if bias {
            Some(self.vector(&format!("{base}.bias"), n)?)
        } else {
            None
        };
        if let Some(layout) = self.layout {
            let names = layout.tensor_names(base);
            if self.fp4_format(base).is_some() {
                let m = crate::format::load_linear(self.ck, layout, base)?;
                if (m.n, m.k) != (n, k) {
                    let t = self.ck.tensor(&names.packed)?;
                    return Err(LoadError::Shape {
                        file: t.file.to_path_buf(),
                        tensor: names.packed,
                        expected: vec![n, k / 2],
                        found: t.shape.to_vec(),
                    });
                }
                let file = self.file_of(&names.scale);
                return Linear::fp4(m, bias).map_err(|source| LoadError::Linear {
                    file,
                    tensor: names.scale,
                    source,
                });
            }
        }
        let wname = format!("{base}.weight");
        let d = self.dense(&wname, n, k)?;
        let file = self.file_of(&wname);
        Linear::dense(d, bias).map_err(|source| LoadError::Linear {
            file,
            tensor: wname,
            source,
        })
    }

    /// The file holding `name`, or the folder if it is absent (for error messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.ck
            .tensor(name)
            .map(|t| t.file.to_path_buf())
            .unwrap_or_else(|_| self.ck.root().to_path_buf())
    }
}
