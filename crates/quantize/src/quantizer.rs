//! RTN quantization of one source tensor, streamed row by row out of the memory map, through the
//! kernels' per-row entry points, with the error of every quantized tensor (SQNR, max abs error).
//!
//! Global scales: compressed-tensors NVFP4 uses `nvfp4_global_scale_in(amax, dtype)` (computed
//! in the weight's dtype as llm-compressor's observer does); a fused set takes the MINIMUM of its
//! members' global scales, as llm-compressor's `update_fused_layer_weight_global_scales`
//! (src/llmcompressor/modifiers/utils/helpers.py) does for q/k/v and gate/up. ModelOpt's
//! `weight_scale_2` is the reciprocal convention, so the same sharing is the MAXIMUM (vLLM's
//! modelopt.py takes `weight_scale_2.max()` over fused shards). MXFP4 has no global scale.

use std::path::PathBuf;

use half::bf16;
use mimo_kernels::dtype::{convert_row, SrcDType};
use mimo_kernels::fp4::{
    modelopt_weight_scale_2, nvfp4_global_scale, nvfp4_global_scale_in, Fp4Matrix,
};
use mimo_kernels::rowquant::{quantize_row_bytes_with_error, RowError, RowQuant};
use mimo_runtime::checkpoint::{DType, HeaderEntry, TensorView};
use mimo_runtime::format::Layout;
use rayon::prelude::*;

/// Why a tensor cannot be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The tensor holds NaN or an infinity.
    #[error("{file}: tensor '{tensor}' holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        file: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    /// The dtype cannot be quantized.
    #[error("{file}: tensor '{tensor}' has dtype {dtype}; only BF16, F16 and F32 weights can be quantized")]
    UnsupportedDType {
        file: PathBuf,
        tensor: String,
        dtype: DType,
    },
    /// The raw bytes could not be converted to f32.
    #[error("{file}: tensor '{tensor}': {reason}")]
    Convert {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The kernels refused the data (shape or scale problem).
    #[error("{file}: tensor '{tensor}'")]
    Kernel {
        file: PathBuf,
        tensor: String,
        source: mimo_kernels::fp4::Fp4Error,
    },
}

/// Quantization error of one tensor against its source.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorStats {
    /// 10 log10(sum x^2 / sum (x - q)^2); infinite (written as null) when exact.
    pub sqnr_db: f64,
    /// Largest |x - q|.
    pub max_abs_err: f32,
}

/// Accumulates signal and noise energy.
#[derive(Debug, Default, Clone, Copy)]
pub struct ErrorAcc {
    signal: f64,
    noise: f64,
    max_abs: f32,
}

impl ErrorAcc {
    /// Adds one row of source values `x` and their reconstruction `q`. Eight independent f32
    /// lanes per row (so the loop vectorizes), summed into f64 per row.
    pub fn add(&mut self, x: &[f32], q: &[f32]) {
        let (mut s, mut n, mut m) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let mut xc = x.chunks_exact(8);
        let mut qc = q.chunks_exact(8);
        for (a, b) in (&mut xc).zip(&mut qc) {
            for l in 0..8 {
                let d = a[l] - b[l];
                let ad = d.abs();
                s[l] += a[l] * a[l];
                n[l] += d * d;
                // A select, not f32::max (whose NaN rule blocks vectorization); inputs are finite.
                m[l] = if ad > m[l] { ad } else { m[l] };
            }
        }
        for (&a, &b) in xc.remainder().iter().zip(qc.remainder()) {
            let d = a - b;
            s[0] += a * a;
            n[0] += d * d;
            m[0] = m[0].max(d.abs());
        }
        self.signal += s.iter().map(|&v| v as f64).sum::<f64>();
        self.noise += n.iter().map(|&v| v as f64).sum::<f64>();
        self.max_abs = m.iter().fold(self.max_abs, |a, &v| a.max(v));
    }

    /// Adds one row's statistics from the kernels' fused quantizer: the same sums as [`ErrorAcc::add`]
    /// of that row and its reconstruction, bit for bit.
    pub fn add_row(&mut self, e: &RowError) {
        self.signal += e.signal;
        self.noise += e.noise;
        self.max_abs = self.max_abs.max(e.max_abs);
    }

    /// Adds another accumulator's sums.
    pub fn merge(&mut self, o: &ErrorAcc) {
        self.signal += o.signal;
        self.noise += o.noise;
        self.max_abs = self.max_abs.max(o.max_abs);
    }

    /// The final statistics.
    pub fn finish(&self) -> ErrorStats {
        let sqnr_db = if self.noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (self.signal / self.noise).log10()
        };
        ErrorStats {
            sqnr_db,
            max_abs_err: self.max_abs,
        }
    }
}

/// The kernels' dtype of a dense float tensor.
pub fn src_dtype(t: &TensorView<'_>) -> Result<SrcDType, QuantError> {
    match t.dtype {
        DType::BF16 => Ok(SrcDType::BF16),
        DType::F16 => Ok(SrcDType::F16),
        DType::F32 => Ok(SrcDType::F32),
        d => Err(QuantError::UnsupportedDType {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            dtype: d,
        }),
    }
}

/// Largest |x| of the tensor; errors on NaN/Inf (naming file, tensor and element).
pub fn amax(t: &TensorView<'_>) -> Result<f32, QuantError> {
    let dt = src_dtype(t)?;
    let non_finite = |index: usize, value: f32| QuantError::NonFinite {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        index,
        value,
    };
    if dt == SrcDType::BF16 {
        // On the raw bits: |x| orders like its bits with the sign cleared; >= 0x7F80 is Inf/NaN.
        // Blocks without an early exit so the max vectorizes; a bad block is rescanned.
        let mut m = 0u16;
        for (bi, block) in t.data.chunks(8192).enumerate() {
            let bm = block
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7FFF)
                .fold(0u16, |a, b| if b > a { b } else { a });
            if bm >= 0x7F80 {
                for (i, c) in block.chunks_exact(2).enumerate() {
                    let bits = u16::from_le_bytes([c[0], c[1]]);
                    if bits & 0x7FFF >= 0x7F80 {
                        return Err(non_finite(bi * 4096 + i, bf16::from_bits(bits).to_f32()));
                    }
                }
            }
            m = m.max(bm);
        }
        return Ok(bf16::from_bits(m).to_f32());
    }
    let size = dt.size();
    let mut buf = vec![0f32; 4096];
    let mut m = 0f32;
    for (ci, chunk) in t.data.chunks(4096 * size).enumerate() {
        let n = chunk.len() / size;
        let out = &mut buf[..n];
        convert_row(dt, chunk, out).map_err(|_| non_finite(ci * 4096, f32::NAN))?;
        for (i, v) in out.iter().enumerate() {
            if !v.is_finite() {
                return Err(non_finite(ci * 4096 + i, *v));
            }
            m = m.max(v.abs());
        }
    }
    Ok(m)
}

/// The per-tensor scale a tensor alone would get in `layout` (compressed-tensors global scale or
/// ModelOpt weight_scale_2); `None` for MXFP4.
pub fn own_scale(layout: Layout, amax: f32, dtype: SrcDType) -> Option<f32> {
    match layout {
        Layout::CtNvfp4 => Some(
            nvfp4_global_scale_in(amax, dtype)
                // An F16 weight with a tiny amax overflows F16 arithmetic: use f32 then.
                .unwrap_or_else(|_| nvfp4_global_scale(amax)),
        ),
        Layout::ModelOptNvfp4 => Some(modelopt_weight_scale_2(amax)),
        Layout::CtMxfp4 => None,
    }
}

/// The scale a fused set shares: min of global scales (compressed-tensors) or max of
/// weight_scale_2 (ModelOpt).
pub fn shared_scale(layout: Layout, scales: impl Iterator<Item = f32>) -> Option<f32> {
    match layout {
        Layout::CtNvfp4 => scales.reduce(f32::min),
        Layout::ModelOptNvfp4 => scales.reduce(f32::max),
        Layout::CtMxfp4 => None,
    }
}

/// A quantized tensor ready to write.
#[derive(Debug)]
pub struct Quantized {
    /// Output tensors in layout order.
    pub tensors: Vec<(HeaderEntry, Vec<u8>)>,
    /// Error against the source.
    pub stats: ErrorStats,
}

/// Quantizes source tensor `t` ([n, k]) as Linear `module` in `layout`, with per-tensor `scale`
/// from [`own_scale`]/[`shared_scale`] (ignored for MXFP4). Streams rows from the mapping; output
/// depends only on the inputs, so results are the same on any thread count.
pub fn quantize(
    t: &TensorView<'_>,
    module: &str,
    layout: Layout,
    scale: Option<f32>,
) -> Result<Quantized, QuantError> {
    let dt = src_dtype(t)?;
    let kerr = |source| QuantError::Kernel {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        source,
    };
    let (n, k) = (t.shape[0], t.shape[1]);
    let format = layout.format();
    let bpr = k / format.block_size();
    let global_scale = match layout {
        Layout::CtNvfp4 => scale.unwrap_or(1.0),
        Layout::ModelOptNvfp4 => 1.0 / scale.unwrap_or(1.0),
        Layout::CtMxfp4 => 1.0,
    };
    let mut m = Fp4Matrix {
        format,
        n,
        k,
        packed: vec![0u8; n * k / 2],
        scales: vec![0u8; n * bpr],
        global_scale,
    };
    let row_bytes = k * dt.size();
    // Fixed chunks of rows, quantized in parallel; the error sums are combined in chunk order,
    // so the result does not depend on the thread count.
    const ROWS: usize = 32;
    let rq = match layout {
        Layout::CtNvfp4 => RowQuant::Nvfp4Ct {
            global_scale,
            arith: dt,
        },
        Layout::CtMxfp4 => RowQuant::Mxfp4,
        Layout::ModelOptNvfp4 => RowQuant::Nvfp4ModelOpt {
            weight_scale_2: scale.unwrap_or(1.0),
        },
    };
    let accs: Vec<ErrorAcc> = m
        .packed
        .par_chunks_mut((ROWS * k / 2).max(1))
        .zip(m.scales.par_chunks_mut((ROWS * bpr).max(1)))
        .enumerate()
        .map(|(ci, (packed, scales))| {
            let mut acc = ErrorAcc::default();
            let rows = packed.len() / (k / 2).max(1);
            for j in 0..rows {
                let r = ci * ROWS + j;
                let src = &t.data[r * row_bytes..(r + 1) * row_bytes];
                let p = &mut packed[j * k / 2..(j + 1) * k / 2];
                let s = &mut scales[j * bpr..(j + 1) * bpr];
                // One pass from the source bytes: codes, scales and the error against the
                // reconstruction (for ModelOpt through the matrix's global scale
                // 1 / weight_scale_2, as `dequantize` of the written matrix gives).
                let e = quantize_row_bytes_with_error(rq, dt, src, p, s).map_err(|e| match e {
                    mimo_kernels::fp4::Fp4Error::NonFinite { index, value } => {
                        QuantError::NonFinite {
                            file: t.file.to_path_buf(),
                            tensor: t.name.to_string(),
                            index: r * k + index,
                            value,
                        }
                    }
                    other => kerr(other),
                })?;
                acc.add_row(&e);
            }
            Ok(acc)
        })
        .collect::<Result<_, QuantError>>()?;
    let mut acc = ErrorAcc::default();
    for a in &accs {
        acc.merge(a);
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
