//! Weight quantizers that go beyond round-to-nearest, given calibration statistics:
//! [`mse`] (per-block scale search minimising the activation-weighted squared error) and
//! [`gptq`] (column-by-column quantization with error feedback through the inverse Hessian).
//! Both produce a [`mimo_kernels::fp4::Fp4Matrix`] in the same convention as the RTN path, so the
//! layouts encode them unchanged.

pub mod apply;
mod factor;
pub mod gptq;
pub mod mse;
pub(crate) mod refine;
pub mod sequential;

pub use apply::{quantize_tensor, ApplyError, QuantOptions};

use mimo_kernels::fp4::{ct_round_e2m1, Fp4Error, Fp4Format};

/// Which quantizer a conversion uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Round to nearest with the reference tools' scale rules.
    #[default]
    Rtn,
    /// Per-block scale search minimising the activation-weighted squared error.
    Mse,
    /// GPTQ: error feedback through the inverse Hessian, block scales fixed as columns are reached.
    Gptq,
}

impl Method {
    /// Lower-case name ("rtn", "mse", "gptq").
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Mse => "mse",
            Method::Gptq => "gptq",
        }
    }

    /// True if the method needs calibration statistics to be better than RTN.
    pub fn wants_calibration(self) -> bool {
        !matches!(self, Method::Rtn)
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Method, String> {
        match s {
            "rtn" => Ok(Method::Rtn),
            "mse" => Ok(Method::Mse),
            "gptq" => Ok(Method::Gptq),
            o => Err(format!("unknown method '{o}' (expected rtn, mse or gptq)")),
        }
    }
}

/// Errors of the calibrated quantizers. Callers add the file and tensor name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MethodError {
    /// A buffer does not match the weight shape.
    #[error("{what}: expected {expected} values, got {got}")]
    Length {
        /// which buffer
        what: &'static str,
        /// expected length
        expected: usize,
        /// actual length
        got: usize,
    },
    /// The weight or a statistic holds NaN or an infinity.
    #[error("non-finite value in {what} at element {index}")]
    NonFinite {
        /// which buffer
        what: &'static str,
        /// element index
        index: usize,
    },
    /// The damped Hessian stayed non positive-definite even after raising the damping.
    #[error("Hessian is not positive definite (pivot {pivot} at column {column}) even with damping {damp}")]
    NotPositiveDefinite {
        /// column where the factorization broke down
        column: usize,
        /// the pivot value
        pivot: f64,
        /// the last relative damping tried
        damp: f64,
    },
    /// The damping factor is not a finite non-negative number.
    #[error("invalid damping {0} (must be finite and >= 0)")]
    BadDamping(f64),
    /// The tensor-scale search was asked of a layout without a tensor scale (MXFP4).
    #[error("the tensor scale search applies to NVFP4 layouts only")]
    NoTensorScale,
    /// The FP4 kernels refused the shape or global scale.
    #[error(transparent)]
    Fp4(#[from] Fp4Error),
}

pub(crate) fn check_finite_f32(what: &'static str, v: &[f32]) -> Result<(), MethodError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(MethodError::NonFinite { what, index }),
        None => Ok(()),
    }
}

pub(crate) fn check_finite_f64(what: &'static str, v: &[f64]) -> Result<(), MethodError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(MethodError::NonFinite { what, index }),
        None => Ok(()),
    }
}

pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), MethodError> {
    if expected == got {
        Ok(())
    } else {
        Err(MethodError::Length {
            what,
            expected,
            got,
        })
    }
}

/// Checks the shape against the format and the global scale (NVFP4 only).
pub(crate) fn check_shape(
    format: Fp4Format,
    n: usize,
    k: usize,
    global_scale: f32,
) -> Result<(), MethodError> {
    let block = format.block_size();
    if n == 0 || k == 0 {
        return Err(Fp4Error::BadShape { n, k }.into());
    }
    if k % block != 0 {
        return Err(Fp4Error::NotBlockMultiple { format, k, block }.into());
    }
    if format == Fp4Format::Nvfp4 && !(global_scale.is_finite() && global_scale > 0.0) {
        return Err(Fp4Error::BadGlobalScale(global_scale).into());
    }
    Ok(())
}

/// E2M1 code of `x` under block multiplier `mult` (nearest, ties to even, saturating), the
/// element rule of compressed-tensors: `x / mult`, then the E2M1 thresholds.
#[inline]
pub(crate) fn encode_elem(x: f32, mult: f32) -> u8 {
    if mult > 0.0 {
        ct_round_e2m1(x / mult)
    } else {
        0
    }
}
