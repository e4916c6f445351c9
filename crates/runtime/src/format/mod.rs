//! The FP4 on-disk layouts: tensor names, dtypes, shapes and config JSON, for writer and reader alike.
//!
//! Three layouts are written and read ([`Layout`]):
//! - compressed-tensors `nvfp4-pack-quantized` (vllm-project/compressed-tensors,
//!   compressors/quantized_compressors/fp4_quantized.py, `NVFP4PackedCompressor`): per Linear `X`,
//!   `X.weight_packed` U8 [N, K/2] (element 2i in the low nibble, `pack_fp4_to_uint8`),
//!   `X.weight_scale` F8_E4M3 [N, K/16] (`compress_scale`: `scale.to(scale_dtype)`, the preset's
//!   scale_dtype is float8_e4m3fn) and `X.weight_global_scale` F32 `[1]`; dequantization is
//!   `fp4 * scale / global_scale`. We write weight-only (W4A16), so no `input_global_scale`.
//! - compressed-tensors `mxfp4-pack-quantized` (`MXFP4PackedCompressor`, same file): the same
//!   `weight_packed`, and `weight_scale` U8 [N, K/32] holding the E8M0 exponent byte; the MXFP4
//!   preset (quant_scheme.py) is strategy "group", group_size 32, scale_dtype uint8, so there is
//!   no global scale tensor.
//! - ModelOpt NVFP4 (vLLM modelopt.py, `ModelOptNvFp4LinearMethod` / `...W4A16LinearMethod`):
//!   `X.weight` U8 [N, K/2], `X.weight_scale` F8_E4M3 [N, K/16], `X.weight_scale_2` F32 scalar
//!   = amax / (6 * 448); dequantization is `fp4 * scale * weight_scale_2`. `X.input_scale` only
//!   exists for W4A4 checkpoints; we write W4A16 (`quant_algo: W4A16_NVFP4`) without it.
//!
//! [`detect`] tells which layout a checkpoint uses (ours or another tool's) and [`load_linear`]
//! reads one quantized Linear into an [`Fp4Matrix`].

mod config;
mod detect;
mod error;
mod load;

use mimo_kernels::fp4::{Fp4Format, Fp4Matrix};

use crate::checkpoint::{DType, HeaderEntry};

pub use config::{hf_quant_config, quantization_config, HF_QUANT_CONFIG_FILE};
pub use detect::{detect, quantized_modules, Detected};
pub use error::FormatError;
pub use load::{load_linear, read_global_scale};

/// An FP4 on-disk layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// compressed-tensors `nvfp4-pack-quantized`.
    CtNvfp4,
    /// compressed-tensors `mxfp4-pack-quantized`.
    CtMxfp4,
    /// NVIDIA ModelOpt NVFP4 (hf_quant_config.json).
    ModelOptNvfp4,
}

/// Names of the tensors one quantized Linear is stored as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorNames {
    /// Packed FP4 codes.
    pub packed: String,
    /// Block scales.
    pub scale: String,
    /// Per-tensor scale (`weight_global_scale` or `weight_scale_2`), if the layout has one.
    pub global: Option<String>,
}

impl Layout {
    /// Every layout.
    pub const ALL: [Layout; 3] = [Layout::CtNvfp4, Layout::CtMxfp4, Layout::ModelOptNvfp4];

    /// The FP4 block format.
    pub fn format(self) -> Fp4Format {
        match self {
            Layout::CtNvfp4 | Layout::ModelOptNvfp4 => Fp4Format::Nvfp4,
            Layout::CtMxfp4 => Fp4Format::Mxfp4,
        }
    }

    /// A short name for messages and manifests.
    pub fn name(self) -> &'static str {
        match self {
            Layout::CtNvfp4 => "nvfp4-pack-quantized",
            Layout::CtMxfp4 => "mxfp4-pack-quantized",
            Layout::ModelOptNvfp4 => "modelopt-nvfp4",
        }
    }

    /// dtype of the block scales.
    pub fn scale_dtype(self) -> DType {
        match self {
            Layout::CtNvfp4 | Layout::ModelOptNvfp4 => DType::F8_E4M3,
            Layout::CtMxfp4 => DType::U8,
        }
    }

    /// Tensor names of the Linear `module` (the weight's name without `.weight`).
    pub fn tensor_names(self, module: &str) -> TensorNames {
        match self {
            Layout::CtNvfp4 => TensorNames {
                packed: format!("{module}.weight_packed"),
                scale: format!("{module}.weight_scale"),
                global: Some(format!("{module}.weight_global_scale")),
            },
            Layout::CtMxfp4 => TensorNames {
                packed: format!("{module}.weight_packed"),
                scale: format!("{module}.weight_scale"),
                global: None,
            },
            Layout::ModelOptNvfp4 => TensorNames {
                packed: format!("{module}.weight"),
                scale: format!("{module}.weight_scale"),
                global: Some(format!("{module}.weight_scale_2")),
            },
        }
    }

    /// Shape of the per-tensor scale: [1] for compressed-tensors, a 0-d scalar for ModelOpt.
    fn global_shape(self) -> Vec<usize> {
        match self {
            Layout::ModelOptNvfp4 => vec![],
            _ => vec![1],
        }
    }

    /// Header entries (names, dtypes, shapes) of a quantized [n, k] Linear, in write order.
    pub fn tensor_entries(self, module: &str, n: usize, k: usize) -> Vec<HeaderEntry> {
        let names = self.tensor_names(module);
        let block = self.format().block_size();
        let mut v = vec![
            HeaderEntry {
                name: names.packed,
                dtype: DType::U8,
                shape: vec![n, k / 2],
            },
            HeaderEntry {
                name: names.scale,
                dtype: self.scale_dtype(),
                shape: vec![n, k / block],
            },
        ];
        if let Some(g) = names.global {
            v.push(HeaderEntry {
                name: g,
                dtype: DType::F32,
                shape: self.global_shape(),
            });
        }
        v
    }

    /// The on-disk value of the per-tensor scale for a matrix quantized with this layout's
    /// numerics: compressed-tensors stores `global_scale` (a divisor); ModelOpt stores
    /// `weight_scale_2` (a multiplier), which the caller passes as `modelopt_scale_2` because
    /// `1 / global_scale` is not bit-exact.
    pub fn stored_global(self, m: &Fp4Matrix, modelopt_scale_2: Option<f32>) -> Option<f32> {
        match self {
            Layout::CtNvfp4 => Some(m.global_scale),
            Layout::CtMxfp4 => None,
            Layout::ModelOptNvfp4 => Some(modelopt_scale_2.unwrap_or(1.0 / m.global_scale)),
        }
    }

    /// Serializes a quantized Linear: (entry, little-endian bytes) in [`Layout::tensor_entries`]
    /// order. `modelopt_scale_2` is the exact `weight_scale_2` for [`Layout::ModelOptNvfp4`].
    pub fn encode(
        self,
        module: &str,
        m: &Fp4Matrix,
        modelopt_scale_2: Option<f32>,
    ) -> Vec<(HeaderEntry, Vec<u8>)> {
        let entries = self.tensor_entries(module, m.n, m.k);
        let mut data = vec![m.packed.clone(), m.scales.clone()];
        if let Some(g) = self.stored_global(m, modelopt_scale_2) {
            data.push(g.to_le_bytes().to_vec());
        }
        entries.into_iter().zip(data).collect()
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
