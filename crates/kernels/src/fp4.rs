//! NVFP4 and MXFP4 block quantization (round to nearest) and dequantization.
//!
//! # What the reference tools compute (read with the search tool; repo + path)
//!
//! NVFP4, compressed-tensors convention (vllm-project/compressed-tensors):
//! - global scale, `generate_gparam` (src/compressed_tensors/quantization/utils/helpers.py):
//!   `448 * 6 / clamp(amax, min=finfo.tiny)`, in the dtype of `amax`, evaluated by PyTorch as
//!   `amax.reciprocal() * 2688` (two roundings; checked against 0.20.0 output), non-finite
//!   results replaced by 1.0, then `.to(float32)`.
//! - block scale, `calculate_qparams` (same file): `scales = max_val_pos / 6.0` (in the dtype
//!   of the observed min/max), then `scales = global_scale * scales` (f32), then
//!   `round_to_quantized_type_dtype(.., float8_e4m3fn)` = clamp to +-448 and cast (RNE); then
//!   every scale equal to 0 is replaced by the dtype's eps, 0.125 for E4M3 (`_get_dtype_eps`).
//!   So an all-zero block (or one whose scale underflows) is stored with scale 0.125, and its
//!   elements still quantize to 0.
//! - elements, `_quantize` (src/compressed_tensors/quantization/lifecycle/forward.py):
//!   `scale = scale / global_scale; scaled = x / scale` (two f32 divisions, in that order), then
//!   `round_to_quantized_type_args`: clamp to [-6, 6], then `cast_to_fp4`, which in current
//!   main (src/compressed_tensors/quantization/utils/fp4_utils.py) first converts to bfloat16
//!   (round to nearest even) and then applies the E2M1 thresholds (see [`crate::e2m1`]). Older
//!   releases (`FP4_E2M1_DATA._cast_to_fp4` in quant_args.py) applied the thresholds to the f32
//!   value directly, as does the released 0.20.0 (checked bit for bit by tests/ct_golden.rs);
//!   [`CT_ROUND_THROUGH_BF16`] is off accordingly.
//! - dequantize, `_dequantize`: `scale = scale / global_scale; x_q * scale`.
//! - llm-compressor's MinMax observer (vllm-project/llm-compressor,
//!   src/llmcompressor/observers/min_max.py) takes amin/amax in the weight's own dtype, so for a
//!   BF16 checkpoint `amax / 6.0` and `2688 / amax` are rounded to bf16.
//!   [`quantize_row_nvfp4_in`] / [`nvfp4_global_scale_in`] reproduce that; the plain functions
//!   compute in f32 (what compressed-tensors computes for an f32 weight).
//!
//! MXFP4, compressed-tensors (src/compressed_tensors/quantization/utils/mxfp4_utils.py,
//! `generate_mx_scales` / `round_to_power_2`): the block amax is rounded to a power of two by
//! adding half of the mantissa's top-but-one bit and masking the mantissa off, i.e. it rounds UP
//! to the next power of two when the mantissa is >= 1.75 (not the plain OCP floor(log2)); the
//! exponent is then `127 + floor(log2(that)) - 2`, clamped to the uint8 range (an all-zero block
//! gives log2(0) = -inf -> 0). Elements are `x / 2^(e-127)`, clamped and rounded like NVFP4.
//! The stored byte (`compress_mx_scale`, src/compressed_tensors/compressors/...) is
//! `127 + floor(log2(scale))`, the same exponent. MXFP4 has no global scale. Deliberate
//! difference: an amax so large that the rounding carries into the f32 infinity exponent would
//! give byte 255 (NaN) there; we clamp to 254.
//!
//! NVFP4, ModelOpt convention (NVIDIA TensorRT-Model-Optimizer,
//! modelopt/torch/quantization/qtensor/nvfp4_tensor.py, `NVFP4QTensor`):
//! `weight_scale_2 = amax.float() / (6.0 * 448.0)`; `per_block_scale = block_amax.float() /
//! (6.0 * weight_scale_2)`, zeros replaced by 1.0, cast to E4M3; elements
//! `x / (scale_e4m3.float() * weight_scale_2)` rounded by `_cast_fp4` (f32, ties to even, no
//! bfloat16 step). Deliberate difference: for an all-zero tensor ModelOpt divides 0 by 0 and
//! writes NaN scales; [`modelopt_weight_scale_2`] clamps amax to the smallest normal f32.

use rayon::prelude::*;

use crate::dtype::SrcDType;
use crate::rowquant::{self, RowQuant};
use crate::{e2m1, e4m3, e8m0};

/// One revision of compressed-tensors main converted the scaled value to bfloat16 before the
/// E2M1 thresholds (`cast_to_fp4` in fp4_utils.py); the released 0.20.0 (CPU and Triton paths)
/// does not, and tests/ct_golden.rs checks us bit for bit against 0.20.0. Kept as one switch.
pub const CT_ROUND_THROUGH_BF16: bool = false;

/// E2M1 max times E4M3 max: the numerator of the NVFP4 global scale.
pub const NVFP4_SCALE_NUMERATOR: f32 = 448.0 * 6.0;

/// E4M3 value compressed-tensors stores for a block whose scale is 0 (`_get_dtype_eps`).
pub const CT_ZERO_SCALE_EPS: f32 = 0.125;

/// Block-scaled FP4 formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp4Format {
    /// NVIDIA NVFP4: 16-element blocks, E4M3 block scale, f32 global scale.
    Nvfp4,
    /// OCP MXFP4: 32-element blocks, E8M0 block scale.
    Mxfp4,
}

impl Fp4Format {
    /// Elements per block: 16 (NVFP4) or 32 (MXFP4).
    pub fn block_size(self) -> usize {
        match self {
            Fp4Format::Nvfp4 => 16,
            Fp4Format::Mxfp4 => 32,
        }
    }

    /// Lower-case name ("nvfp4" / "mxfp4").
    pub fn name(self) -> &'static str {
        match self {
            Fp4Format::Nvfp4 => "nvfp4",
            Fp4Format::Mxfp4 => "mxfp4",
        }
    }

    /// The block size, or [`Fp4Error::NotBlockMultiple`] when `k` is not a multiple of it.
    fn check_k(self, k: usize) -> Result<usize, Fp4Error> {
        let block = self.block_size();
        if k % block != 0 {
            return Err(Fp4Error::NotBlockMultiple {
                format: self,
                k,
                block,
            });
        }
        Ok(block)
    }

    /// Value of one scale byte in this format (E4M3 or E8M0).
    #[inline]
    pub fn decode_scale(self, code: u8) -> f32 {
        match self {
            Fp4Format::Nvfp4 => e4m3::decode(code),
            Fp4Format::Mxfp4 => e8m0::decode(code),
        }
    }
}

impl std::fmt::Display for Fp4Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of quantization and dequantization. Callers add the file and tensor name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fp4Error {
    /// The inner dimension is not a multiple of the block size.
    #[error("k = {k} is not a multiple of the {format} block size {block}")]
    NotBlockMultiple {
        /// format
        format: Fp4Format,
        /// inner dimension
        k: usize,
        /// block size
        block: usize,
    },
    /// A buffer has the wrong length for the shape.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        /// which buffer
        what: &'static str,
        /// expected length
        expected: usize,
        /// actual length
        got: usize,
    },
    /// An input value is NaN or infinite.
    #[error("non-finite input value {value} at element {index}")]
    NonFinite {
        /// element index within the row or matrix
        index: usize,
        /// the value
        value: f32,
    },
    /// The global (tensor) scale is not a finite positive number.
    #[error("invalid global scale {0} (must be finite and > 0)")]
    BadGlobalScale(f32),
    /// A row index is out of range.
    #[error("row {row} out of range for a matrix of {n} rows")]
    RowOutOfRange {
        /// requested row
        row: usize,
        /// number of rows
        n: usize,
    },
    /// A stored block scale is a NaN code (corrupt checkpoint).
    #[error("NaN block scale (byte 0x{code:02x}) at row {row}, block {block}")]
    NanScale {
        /// row
        row: usize,
        /// block within the row
        block: usize,
        /// the scale byte
        code: u8,
    },
    /// A shape dimension is zero where a matrix needs it positive, or the element count
    /// overflows.
    #[error("invalid shape [{n}, {k}]")]
    BadShape {
        /// rows
        n: usize,
        /// columns
        k: usize,
    },
}

/// Packed FP4 weight of a Linear layer, [n out-features, k in-features], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp4Matrix {
    /// NVFP4 or MXFP4.
    pub format: Fp4Format,
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features); a multiple of the block size.
    pub k: usize,
    /// n * k / 2 bytes; element 2i in the LOW nibble, 2i+1 in the HIGH nibble.
    pub packed: Vec<u8>,
    /// n * (k / block) bytes: E4M3 (NVFP4) or E8M0 (MXFP4), row-major.
    pub scales: Vec<u8>,
    /// NVFP4: compressed-tensors convention, w = fp4 * e4m3(scale) / global_scale. MXFP4: 1.0.
    pub global_scale: f32,
}

impl Fp4Matrix {
    /// Blocks per row.
    pub fn blocks_per_row(&self) -> usize {
        self.k / self.format.block_size()
    }

    /// Checks that the buffers agree with the shape and the global scale is finite and positive
    /// (O(1); what the matmul kernels check on every call).
    pub fn validate_shape(&self) -> Result<(), Fp4Error> {
        let block = self.format.check_k(self.k)?;
        let elems = self.n.checked_mul(self.k).ok_or(Fp4Error::BadShape {
            n: self.n,
            k: self.k,
        })?;
        check_len("packed", elems / 2, self.packed.len())?;
        check_len("scales", self.n * (self.k / block), self.scales.len())?;
        if !(self.global_scale.is_finite() && self.global_scale > 0.0) {
            return Err(Fp4Error::BadGlobalScale(self.global_scale));
        }
        Ok(())
    }

    /// [`Fp4Matrix::validate_shape`] plus a scan of every block scale for NaN codes (O(n k /
    /// block)): run once when a matrix is loaded from disk.
    pub fn validate(&self) -> Result<(), Fp4Error> {
        self.validate_shape()?;
        let bpr = self.blocks_per_row().max(1);
        let bad = match self.format {
            Fp4Format::Nvfp4 => self.scales.iter().position(|&c| c & 0x7F == 0x7F),
            Fp4Format::Mxfp4 => self.scales.iter().position(|&c| c == e8m0::NAN_CODE),
        };
        if let Some(i) = bad {
            return Err(Fp4Error::NanScale {
                row: i / bpr,
                block: i % bpr,
                code: self.scales[i],
            });
        }
        Ok(())
    }

    /// Packed bytes of one row (k / 2 bytes). Panics if `row >= n` or the buffers are short;
    /// call [`Fp4Matrix::validate`] first on untrusted matrices.
    pub fn row_packed(&self, row: usize) -> &[u8] {
        let w = self.k / 2;
        &self.packed[row * w..(row + 1) * w]
    }

    /// Scale bytes of one row (k / block bytes). Same preconditions as [`Fp4Matrix::row_packed`].
    pub fn row_scales(&self, row: usize) -> &[u8] {
        let w = self.blocks_per_row();
        &self.scales[row * w..(row + 1) * w]
    }

    /// Multiplier applied to the E2M1 values of each block of `row`, in block order:
    /// `e4m3(s) / global_scale` (NVFP4, compressed-tensors op order) or `2^(e-127)` (MXFP4).
    pub fn block_multipliers(&self, row: usize, out: &mut [f32]) {
        for (o, &c) in out.iter_mut().zip(self.row_scales(row)) {
            *o = block_multiplier(self.format, c, self.global_scale);
        }
    }
}

/// Dequantization multiplier of one block: NVFP4 `e4m3(code) / global_scale`; MXFP4
/// `2^(code-127)` (the global scale is ignored).
#[inline]
pub fn block_multiplier(format: Fp4Format, code: u8, global_scale: f32) -> f32 {
    match format {
        Fp4Format::Nvfp4 => e4m3::decode(code) / global_scale,
        Fp4Format::Mxfp4 => e8m0::decode(code),
    }
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), Fp4Error> {
    if expected != got {
        return Err(Fp4Error::Length {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

pub(crate) fn check_row_buffers(
    format: Fp4Format,
    k: usize,
    packed_len: usize,
    scales_len: usize,
) -> Result<(), Fp4Error> {
    let block = format.check_k(k)?;
    check_len("packed_out", k / 2, packed_len)?;
    check_len("scales_out", k / block, scales_len)
}

fn check_finite(values: &[f32], offset: usize) -> Result<(), Fp4Error> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Fp4Error::NonFinite {
            index: offset + i,
            value: values[i],
        }),
        None => Ok(()),
    }
}

/// Largest absolute value (0 for an empty slice; NaN is ignored, callers reject it first).
pub fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// NVFP4 global scale (compressed-tensors `generate_gparam`, f32 arithmetic):
/// `448 * 6 / max(amax, f32::MIN_POSITIVE)`, with an infinite result replaced by 1.0 (0.20.0
/// applies `nan_to_num(nan=1, posinf=1)`: amax below ~2688 / f32::MAX).
pub fn nvfp4_global_scale(amax: f32) -> f32 {
    ct_global_scale(amax, SrcDType::F32)
}

/// NVFP4 global scale computed in the weight's dtype as llm-compressor feeds it to
/// compressed-tensors: the division is rounded to `arith` (amin/amax are taken in the weight
/// dtype), non-finite results become 1.0, then the value is widened to f32. Always `Ok` since
/// compressed-tensors 0.20.0 maps overflow to 1.0; the `Result` is kept for callers written
/// against the earlier signature.
pub fn nvfp4_global_scale_in(amax: f32, arith: SrcDType) -> Result<f32, Fp4Error> {
    Ok(ct_global_scale(amax, arith))
}

fn ct_global_scale(amax: f32, arith: SrcDType) -> f32 {
    let tiny = match arith {
        SrcDType::F16 => 6.1035156e-5, // finfo(float16).tiny
        SrcDType::F32 | SrcDType::BF16 => f32::MIN_POSITIVE,
    };
    // `scale_data.max * quant_data.max / max_val_pos` is a Python float divided by a tensor,
    // which PyTorch evaluates as `tensor.reciprocal() * 2688` (`Tensor.__rtruediv__`): two
    // roundings in the tensor's dtype, not one division.
    let recip = arith.round(1.0 / arith.round(amax).max(tiny));
    let gs = arith.round(recip * NVFP4_SCALE_NUMERATOR);
    if gs.is_finite() {
        gs
    } else {
        1.0
    }
}

/// compressed-tensors' final E2M1 rounding of an already scaled value: clamp to +-6, optional
/// bfloat16 rounding ([`CT_ROUND_THROUGH_BF16`]), then the ties-to-even thresholds.
#[inline]
pub fn ct_round_e2m1(q: f32) -> u8 {
    e2m1::encode(ct_clamp(q))
}

/// compressed-tensors' scaled value before the E2M1 thresholds: clamped to +-6, then rounded
/// to bfloat16 when [`CT_ROUND_THROUGH_BF16`] is on.
#[inline]
fn ct_clamp(q: f32) -> f32 {
    let c = q.clamp(-e2m1::E2M1_MAX, e2m1::E2M1_MAX);
    if CT_ROUND_THROUGH_BF16 {
        SrcDType::BF16.round(c)
    } else {
        c
    }
}

/// E4M3 code of one NVFP4 block scale, compressed-tensors op order:
/// `e4m3(global_scale * round_arith(block_amax / 6))`, with a zero result replaced by 0.125.
#[inline]
pub fn nvfp4_block_scale_code(block_amax: f32, global_scale: f32, arith: SrcDType) -> u8 {
    ct_block_scale_code_with(block_amax, global_scale, arith, e4m3::encode)
}

/// [`nvfp4_block_scale_code`] with the E4M3 encoder `encode` (the fast one or the reference).
#[inline]
fn ct_block_scale_code_with(
    block_amax: f32,
    global_scale: f32,
    arith: SrcDType,
    encode: fn(f32) -> u8,
) -> u8 {
    let local = arith.round(block_amax / e2m1::E2M1_MAX);
    let code = encode(global_scale * local);
    if e4m3::decode(code) == 0.0 {
        encode(CT_ZERO_SCALE_EPS)
    } else {
        code
    }
}

/// Quantizes one row to NVFP4 with f32 scale arithmetic (see [`quantize_row_nvfp4_in`]).
pub fn quantize_row_nvfp4(
    row: &[f32],
    global_scale: f32,
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    quantize_row_nvfp4_in(row, global_scale, SrcDType::F32, packed_out, scales_out)
}

/// Quantizes one row (length k, a multiple of 16) to NVFP4 exactly as compressed-tensors does,
/// with the block `amax / 6` rounded to `arith` (the dtype llm-compressor's observer works in).
/// Writes k/2 packed bytes and k/16 E4M3 scale bytes. Runs the fused kernel of
/// [`crate::rowquant`]; bit-identical to [`quantize_row_nvfp4_in_reference`].
pub fn quantize_row_nvfp4_in(
    row: &[f32],
    global_scale: f32,
    arith: SrcDType,
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    let q = RowQuant::Nvfp4Ct {
        global_scale,
        arith,
    };
    rowquant::quantize_row(q, row, packed_out, scales_out)
}

/// Quantizes one row (length k, a multiple of 32) to MXFP4 as compressed-tensors does. Writes
/// k/2 packed bytes and k/32 E8M0 scale bytes. Runs the fused kernel of [`crate::rowquant`];
/// bit-identical to [`quantize_row_mxfp4_reference`].
pub fn quantize_row_mxfp4(
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    rowquant::quantize_row(RowQuant::Mxfp4, row, packed_out, scales_out)
}

/// Quantizes one row to NVFP4 exactly as ModelOpt does (`NVFP4QTensor.quantize`), given its
/// per-tensor `weight_scale_2` (see [`modelopt_weight_scale_2`]). Writes k/2 packed bytes and
/// k/16 E4M3 scale bytes; dequantize with `fp4 * e4m3(scale) * weight_scale_2`. Runs the fused
/// kernel of [`crate::rowquant`]; bit-identical to [`quantize_row_nvfp4_modelopt_reference`].
pub fn quantize_row_nvfp4_modelopt(
    row: &[f32],
    weight_scale_2: f32,
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    let q = RowQuant::Nvfp4ModelOpt { weight_scale_2 };
    rowquant::quantize_row(q, row, packed_out, scales_out)
}

/// The scalar reference quantizers' common part: checks the buffer lengths for the row, the
/// tensor scale when the format has one (finite and > 0, either NVFP4 convention) and that
/// every element is finite; then for each block `x` of the row, `block_fn(x)` gives the
/// block's scale code and the E2M1 encoder of its elements.
fn quantize_blocks_reference<E: Fn(f32) -> u8>(
    format: Fp4Format,
    tensor_scale: Option<f32>,
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
    block_fn: impl Fn(&[f32]) -> (u8, E),
) -> Result<(), Fp4Error> {
    check_row_buffers(format, row.len(), packed_out.len(), scales_out.len())?;
    if let Some(s) = tensor_scale {
        if !(s.is_finite() && s > 0.0) {
            return Err(Fp4Error::BadGlobalScale(s));
        }
    }
    check_finite(row, 0)?;
    let block = format.block_size();
    for ((x, packed), scale) in row
        .chunks_exact(block)
        .zip(packed_out.chunks_exact_mut(block / 2))
        .zip(scales_out.iter_mut())
    {
        let (code, enc) = block_fn(x);
        *scale = code;
        for (pair, byte) in x.chunks_exact(2).zip(packed.iter_mut()) {
            *byte = e2m1::pack(enc(pair[0]), enc(pair[1]));
        }
    }
    Ok(())
}

/// Scalar reference (slow, written as the reference tools read; tests check the fast row
/// kernel against it).
///
/// Quantizes one row (length k, a multiple of 16) to NVFP4 exactly as compressed-tensors does,
/// with the block `amax / 6` rounded to `arith` (the dtype llm-compressor's observer works in).
/// Writes k/2 packed bytes and k/16 E4M3 scale bytes.
pub fn quantize_row_nvfp4_in_reference(
    row: &[f32],
    global_scale: f32,
    arith: SrcDType,
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    let (p, s) = (packed_out, scales_out);
    quantize_blocks_reference(Fp4Format::Nvfp4, Some(global_scale), row, p, s, |x| {
        let code = ct_block_scale_code_with(amax(x), global_scale, arith, e4m3::encode_reference);
        // compressed-tensors `_quantize`: scale / global_scale, then x / that.
        let eff = e4m3::decode(code) / global_scale;
        (code, move |v| ct_round_e2m1_reference(v / eff))
    })
}

/// E8M0 code of one MXFP4 block scale as compressed-tensors computes it (see module docs).
#[inline]
pub fn mxfp4_scale_code(block_amax: f32) -> u8 {
    // round_to_power_2: add 1 << (23 - 1 - 1) to the f32 bits and keep sign + exponent. For a
    // bf16 amax this is the same as compressed-tensors' bf16 version (1 << 5 on bf16 bits).
    let rounded = block_amax.abs().to_bits().wrapping_add(1 << 21) & 0xFF80_0000;
    let field = (rounded >> 23) as i32;
    if field == 0 {
        // log2(0) = -inf (or a subnormal power of two): clamps to 0.
        return 0;
    }
    if field == 255 {
        // The rounding carried into infinity: compressed-tensors would store 255 (NaN).
        return 254;
    }
    // 127 + floor(log2(2^(field-127))) - 2, clamped to the uint8 range.
    (field - 2).clamp(0, 254) as u8
}

/// Scalar reference (slow, written as the reference tools read; tests check the fast row
/// kernel against it).
///
/// Quantizes one row (length k, a multiple of 32) to MXFP4 as compressed-tensors does. Writes
/// k/2 packed bytes and k/32 E8M0 scale bytes.
pub fn quantize_row_mxfp4_reference(
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    quantize_blocks_reference(Fp4Format::Mxfp4, None, row, packed_out, scales_out, |x| {
        let code = mxfp4_scale_code(amax(x));
        let s = e8m0::decode(code);
        (code, move |v| ct_round_e2m1_reference(v / s))
    })
}

/// ModelOpt per-tensor scale `weight_scale_2 = amax / (6 * 448)`, with amax clamped to the
/// smallest normal f32 (ModelOpt itself would produce NaN block scales for amax = 0).
pub fn modelopt_weight_scale_2(amax: f32) -> f32 {
    amax.max(f32::MIN_POSITIVE) / NVFP4_SCALE_NUMERATOR
}

/// E4M3 code of one NVFP4 block scale, ModelOpt op order:
/// `e4m3(block_amax / (6 * weight_scale_2))`, with a zero scale replaced by 1.0.
#[inline]
pub fn modelopt_block_scale_code(block_amax: f32, weight_scale_2: f32) -> u8 {
    modelopt_block_scale_code_with(block_amax, weight_scale_2, e4m3::encode)
}

/// [`modelopt_block_scale_code`] with the E4M3 encoder `encode` (the fast one or the
/// reference).
#[inline]
fn modelopt_block_scale_code_with(
    block_amax: f32,
    weight_scale_2: f32,
    encode: fn(f32) -> u8,
) -> u8 {
    let s = block_amax / (e2m1::E2M1_MAX * weight_scale_2);
    encode(if s == 0.0 { 1.0 } else { s })
}

/// Scalar reference (slow, written as the reference tools read; tests check the fast row
/// kernel against it).
///
/// Quantizes one row to NVFP4 exactly as ModelOpt does (`NVFP4QTensor.quantize`), given its
/// per-tensor `weight_scale_2` (see [`modelopt_weight_scale_2`]). Writes k/2 packed bytes and
/// k/16 E4M3 scale bytes; dequantize with `fp4 * e4m3(scale) * weight_scale_2`.
pub fn quantize_row_nvfp4_modelopt_reference(
    row: &[f32],
    weight_scale_2: f32,
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    let (p, s) = (packed_out, scales_out);
    quantize_blocks_reference(Fp4Format::Nvfp4, Some(weight_scale_2), row, p, s, |x| {
        let code = modelopt_block_scale_code_with(amax(x), weight_scale_2, e4m3::encode_reference);
        let eff = e4m3::decode(code) * weight_scale_2;
        // `_cast_fp4`: f32 thresholds, no clamp needed (anything above 5 is code 7).
        (code, move |v| e2m1_encode_reference(v / eff))
    })
}

/// [`e2m1::encode`] through the reference threshold chain.
fn e2m1_encode_reference(x: f32) -> u8 {
    let mag = e2m1::encode_magnitude_reference(x.abs());
    if x < 0.0 {
        mag | e2m1::SIGN_BIT
    } else {
        mag
    }
}

/// [`ct_round_e2m1`] through the reference threshold chain.
fn ct_round_e2m1_reference(q: f32) -> u8 {
    e2m1_encode_reference(ct_clamp(q))
}

fn check_matrix_input(format: Fp4Format, w: &[f32], n: usize, k: usize) -> Result<(), Fp4Error> {
    format.check_k(k)?;
    let elems = n.checked_mul(k).ok_or(Fp4Error::BadShape { n, k })?;
    check_len("w", elems, w.len())?;
    check_finite(w, 0)
}

fn quantize_matrix(
    format: Fp4Format,
    w: &[f32],
    n: usize,
    k: usize,
    global_scale: f32,
    row_fn: impl Fn(&[f32], &mut [u8], &mut [u8]) -> Result<(), Fp4Error> + Sync,
) -> Result<Fp4Matrix, Fp4Error> {
    check_matrix_input(format, w, n, k)?;
    let bpr = k / format.block_size();
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * bpr];
    if k > 0 {
        // One task per row: each row's bytes depend only on that row, so the result is the
        // same on any thread count.
        w.par_chunks_exact(k)
            .zip(packed.par_chunks_exact_mut(k / 2))
            .zip(scales.par_chunks_exact_mut(bpr))
            .try_for_each(|((r, p), s)| row_fn(r, p, s))?;
    }
    Ok(Fp4Matrix {
        format,
        n,
        k,
        packed,
        scales,
        global_scale,
    })
}

/// Quantizes a row-major [n, k] f32 matrix to NVFP4 with the given global scale
/// (compressed-tensors convention, f32 arithmetic).
pub fn quantize_nvfp4(
    w: &[f32],
    n: usize,
    k: usize,
    global_scale: f32,
) -> Result<Fp4Matrix, Fp4Error> {
    quantize_nvfp4_in(w, n, k, global_scale, SrcDType::F32)
}

/// [`quantize_nvfp4`] with the block `amax / 6` rounded to `arith` (see
/// [`quantize_row_nvfp4_in`]).
pub fn quantize_nvfp4_in(
    w: &[f32],
    n: usize,
    k: usize,
    global_scale: f32,
    arith: SrcDType,
) -> Result<Fp4Matrix, Fp4Error> {
    if !(global_scale.is_finite() && global_scale > 0.0) {
        return Err(Fp4Error::BadGlobalScale(global_scale));
    }
    quantize_matrix(Fp4Format::Nvfp4, w, n, k, global_scale, |r, p, s| {
        quantize_row_nvfp4_in(r, global_scale, arith, p, s)
    })
}

/// Quantizes a row-major [n, k] f32 matrix to MXFP4 (global_scale 1.0).
pub fn quantize_mxfp4(w: &[f32], n: usize, k: usize) -> Result<Fp4Matrix, Fp4Error> {
    quantize_matrix(Fp4Format::Mxfp4, w, n, k, 1.0, quantize_row_mxfp4)
}

/// Quantizes a row-major [n, k] f32 matrix to NVFP4 the ModelOpt way. Returns the matrix and
/// `weight_scale_2`; the matrix's `global_scale` is `1 / weight_scale_2` rounded to f32, so
/// [`dequantize`] of it can differ from ModelOpt's `fp4 * s * weight_scale_2` in the last bit.
pub fn quantize_nvfp4_modelopt(
    w: &[f32],
    n: usize,
    k: usize,
) -> Result<(Fp4Matrix, f32), Fp4Error> {
    check_matrix_input(Fp4Format::Nvfp4, w, n, k)?;
    let ws2 = modelopt_weight_scale_2(amax(w));
    let m = quantize_matrix(Fp4Format::Nvfp4, w, n, k, 1.0 / ws2, |r, p, s| {
        quantize_row_nvfp4_modelopt(r, ws2, p, s)
    })?;
    Ok((m, ws2))
}

/// Dequantizes one row of `m` into `out` (length k): `e2m1 * block_multiplier`.
pub fn dequantize_row(m: &Fp4Matrix, row: usize, out: &mut [f32]) -> Result<(), Fp4Error> {
    if row >= m.n {
        return Err(Fp4Error::RowOutOfRange { row, n: m.n });
    }
    check_len("out", m.k, out.len())?;
    let block = m.format.block_size();
    let bpr = m.k / block;
    check_len("packed", m.n * m.k / 2, m.packed.len())?;
    check_len("scales", m.n * bpr, m.scales.len())?;
    for (b, (o, bytes)) in out
        .chunks_exact_mut(block)
        .zip(m.row_packed(row).chunks_exact(block / 2))
        .enumerate()
    {
        let code = m.row_scales(row)[b];
        let mult = block_multiplier(m.format, code, m.global_scale);
        if mult.is_nan() {
            return Err(Fp4Error::NanScale {
                row,
                block: b,
                code,
            });
        }
        decode_block(bytes, mult, o);
    }
    Ok(())
}

/// Dequantizes one block: element `2i` / `2i + 1` of `out` is the low / high nibble of
/// `bytes[i]` as an E2M1 value, times `mult`.
#[inline]
pub(crate) fn decode_block(bytes: &[u8], mult: f32, out: &mut [f32]) {
    for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
        let [lo, hi] = e2m1::BYTE_LUT[byte as usize];
        pair[0] = lo * mult;
        pair[1] = hi * mult;
    }
}

/// Dequantizes the whole matrix into a new row-major [n, k] f32 vector (validates first).
pub fn dequantize(m: &Fp4Matrix) -> Result<Vec<f32>, Fp4Error> {
    m.validate()?;
    let mut out = vec![0.0f32; m.n * m.k];
    if m.k > 0 {
        out.par_chunks_exact_mut(m.k)
            .enumerate()
            .try_for_each(|(r, o)| dequantize_row(m, r, o))?;
    }
    Ok(out)
}
