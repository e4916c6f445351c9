//! Applies the chosen method to one source tensor of a conversion: RTN goes through
//! [`crate::quantizer::quantize`] unchanged; MSE and GPTQ read the whole tensor as f32, look up
//! the calibration statistics of its module, and produce the same [`Quantized`] output.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mimo_kernels::dtype::convert_row;
use mimo_kernels::fp4::{dequantize_row, Fp4Format, Fp4Matrix};
use mimo_runtime::checkpoint::TensorView;
use mimo_runtime::format::Layout;

use super::gptq::{quantize_gptq_with, BlockScale, GptqOptions, DEFAULT_DAMP};
use super::mse::quantize_mse;
use super::{Method, MethodError};
use crate::calib::{CalibStats, LinearStats};
use crate::quantizer::{quantize, src_dtype, ErrorAcc, QuantError, Quantized};

/// Method, damping and calibration statistics of a conversion.
#[derive(Debug, Clone)]
pub struct QuantOptions {
    /// The quantizer.
    pub method: Method,
    /// GPTQ relative damping.
    pub damp: f64,
    /// GPTQ activation order (by whole blocks).
    pub act_order: bool,
    /// GPTQ's choice of each block's scale.
    pub block_scale: BlockScale,
    /// Coordinate-descent passes after GPTQ (0 = none).
    pub refine: usize,
    /// NVFP4 `mse` or `gptq`: search the tensor scale of each fused set.
    pub mse_scale_search: bool,
    /// Calibration statistics (None: MSE uses uniform weights; GPTQ needs them).
    pub stats: Option<Arc<CalibStats>>,
    /// A JSON summary of the calibration for the manifest (source, recipe, coverage): nothing that
    /// changes between runs, so the output stays byte-identical.
    pub manifest_info: Option<serde_json::Value>,
    /// The same summary plus wall-clock seconds and peak RSS, for the `--json` report only.
    pub report_info: Option<serde_json::Value>,
    /// Weights already quantized by sequential calibration ([`super::sequential`]), by module
    /// name; used instead of `stats` for the modules they hold.
    pub precomputed: Option<Arc<BTreeMap<String, Fp4Matrix>>>,
    /// Tensor scales (the layout's stored value) chosen for precomputed weights by the NVFP4
    /// `mse` search, by module name; they replace the converter's own for those modules.
    pub precomputed_scales: Option<Arc<BTreeMap<String, f32>>>,
}

impl QuantOptions {
    /// The tensor scale of `module`: the one sequential `mse` searched for it, else the
    /// converter's `scale`.
    pub fn scale_for(&self, module: &str, scale: Option<f32>) -> Option<f32> {
        self.precomputed_scales
            .as_ref()
            .and_then(|s| s.get(module))
            .copied()
            .or(scale)
    }
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            method: Method::Rtn,
            damp: DEFAULT_DAMP,
            act_order: false,
            block_scale: BlockScale::Diag,
            refine: 0,
            mse_scale_search: false,
            stats: None,
            manifest_info: None,
            report_info: None,
            precomputed: None,
            precomputed_scales: None,
        }
    }
}

impl QuantOptions {
    /// The GPTQ options.
    pub fn gptq(&self) -> GptqOptions {
        GptqOptions {
            damp: self.damp,
            act_order: self.act_order,
            block_scale: self.block_scale,
            refine: self.refine,
            mse_scale_search: self.mse_scale_search,
        }
    }
}

/// Why a tensor could not be quantized by the chosen method.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading or RTN quantization failed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The MSE or GPTQ quantizer failed.
    #[error("{file}: tensor '{tensor}': {method}: {source}")]
    Method {
        /// source file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// method name
        method: &'static str,
        /// the error
        source: MethodError,
    },
    /// A weight quantized during sequential calibration used another global scale than the
    /// converter (a bug: both derive it from the same rules).
    #[error("{file}: tensor '{tensor}': quantized during calibration with global scale {calibrated}, but the converter uses {convert}")]
    ScaleMismatch {
        /// source file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// global scale used during calibration
        calibrated: f32,
        /// global scale of the conversion
        convert: f32,
    },
    /// GPTQ was asked for but the module has no Hessian.
    #[error("{file}: tensor '{tensor}': gptq needs calibration statistics with a Hessian for module '{module}' (run with --calib)")]
    NoHessian {
        /// source file
        file: PathBuf,
        /// tensor name
        tensor: String,
        /// module name
        module: String,
    },
}

/// Quantizes source tensor `t` ([n, k]) as Linear `module` with `opts.method`; `scale` as for
/// [`crate::quantizer::quantize`].
pub fn quantize_tensor(
    t: &TensorView<'_>,
    module: &str,
    layout: Layout,
    scale: Option<f32>,
    opts: &QuantOptions,
) -> Result<Quantized, ApplyError> {
    if opts.method == Method::Rtn {
        return Ok(quantize(t, module, layout, scale)?);
    }
    let (n, k) = (t.shape[0], t.shape[1]);
    let w = read_weight(t)?;
    let scale = opts.scale_for(module, scale);
    let gs = kernel_global_scale(layout, scale);
    let merr = |source| ApplyError::Method {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        method: opts.method.name(),
        source,
    };
    let pre = opts.precomputed.as_ref().and_then(|p| p.get(module));
    let m: Fp4Matrix = match pre {
        Some(m) => {
            if layout.format() == Fp4Format::Nvfp4 && m.global_scale.to_bits() != gs.to_bits() {
                return Err(ApplyError::ScaleMismatch {
                    file: t.file.to_path_buf(),
                    tensor: t.name.to_string(),
                    calibrated: m.global_scale,
                    convert: gs,
                });
            }
            if (m.n, m.k) != (n, k) {
                return Err(merr(MethodError::Length {
                    what: "precomputed weight",
                    expected: n * k,
                    got: m.n * m.k,
                }));
            }
            m.clone()
        }
        None => {
            let stats = opts.stats.as_ref().and_then(|s| s.get(module));
            quantize_with_stats(t, module, &w, layout, gs, opts.method, &opts.gptq(), stats)?
        }
    };
    let mut acc = ErrorAcc::default();
    let mut deq = vec![0f32; k];
    for r in 0..n {
        dequantize_row(&m, r, &mut deq).map_err(|e| merr(MethodError::Fp4(e)))?;
        acc.add(&w[r * k..(r + 1) * k], &deq);
    }
    let tensors = layout.encode(
        module,
        &m,
        scale.filter(|_| layout == Layout::ModelOptNvfp4),
    );
    Ok(Quantized {
        tensors,
        stats: acc.finish(),
    })
}

/// The source tensor as f32, refusing NaN and infinities.
pub fn read_weight(t: &TensorView<'_>) -> Result<Vec<f32>, ApplyError> {
    let dt = src_dtype(t)?;
    let (n, k) = (t.shape[0], t.shape[1]);
    let mut w = vec![0f32; n * k];
    convert_row(dt, t.data, &mut w).map_err(|e| QuantError::Convert {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(index) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            index,
            value: w[index],
        }
        .into());
    }
    Ok(w)
}

/// The global scale the FP4 kernels use for the converter's per-tensor `scale` in `layout`
/// (compressed-tensors stores it as is, ModelOpt its reciprocal; MXFP4 has none).
pub fn kernel_global_scale(layout: Layout, scale: Option<f32>) -> f32 {
    match layout {
        Layout::CtNvfp4 => scale.unwrap_or(1.0),
        Layout::ModelOptNvfp4 => 1.0 / scale.unwrap_or(1.0),
        Layout::CtMxfp4 => 1.0,
    }
}

/// MSE or GPTQ on the f32 weight `w` of tensor `t` (module `module`) with its statistics.
#[allow(clippy::too_many_arguments)]
pub fn quantize_with_stats(
    t: &TensorView<'_>,
    module: &str,
    w: &[f32],
    layout: Layout,
    gs: f32,
    method: Method,
    gptq: &GptqOptions,
    stats: Option<&LinearStats>,
) -> Result<Fp4Matrix, ApplyError> {
    let (n, k) = (t.shape[0], t.shape[1]);
    let format = layout.format();
    let merr = |source| ApplyError::Method {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        method: method.name(),
        source,
    };
    match method {
        Method::Mse | Method::Rtn => {
            let d = stats
                .map(|s| s.second_moment.as_slice())
                .filter(|d| d.len() == k);
            quantize_mse(w, n, k, format, gs, d).map_err(merr)
        }
        Method::Gptq => {
            let h = stats
                .and_then(|s| s.hessian.as_deref())
                .filter(|h| h.len() == k * k)
                .ok_or_else(|| ApplyError::NoHessian {
                    file: t.file.to_path_buf(),
                    tensor: t.name.to_string(),
                    module: module.to_string(),
                })?;
            quantize_gptq_with(w, n, k, format, gs, h, gptq).map_err(merr)
        }
    }
}
