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

/// Output buffers given back after their bytes were written ([`recycle`]), reused by the next
/// tensors: a fresh multi-megabyte allocation costs a page fault and a kernel zero-fill per 4 KiB
/// page, every tensor. At most [`POOL_MAX`] buffers are kept.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Most buffers kept in [`POOL`] (a few tensors in flight, each with codes and scales).
const POOL_MAX: usize = 16;

/// A zeroed buffer of `len` bytes, reusing a recycled one when one is large enough.
fn take_buffer(len: usize) -> Vec<u8> {
    let reused = {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest buffer that fits, so big ones stay for big tensors.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i))
    };
    match reused {
        Some(mut b) => {
            b.clear();
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// Gives an output buffer back for reuse by later tensors (see `POOL`).
pub fn recycle(buf: Vec<u8>) {
    if buf.capacity() < 4096 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(buf);
    } else if let Some((i, _)) = pool
        .iter()
        .enumerate()
        .min_by_key(|(_, b)| b.capacity())
        .filter(|(_, b)| b.capacity() < buf.capacity())
    {
        pool[i] = buf;
    }
}

/// Refuses a NaN or an infinity in a float (BF16, F16, F32) tensor, naming file, tensor and
/// element; tensors of other dtypes pass.
pub fn check_finite(t: &TensorView<'_>) -> Result<(), QuantError> {
    if src_dtype(t).is_ok() {
        amax(t)?;
    }
    Ok(())
}

/// Largest |x| of the tensor; errors on NaN/Inf (naming file, tensor and element).
pub fn amax(t: &TensorView<'_>) -> Result<f32, QuantError> {
    let mut acc = AmaxAcc::new(src_dtype(t)?);
    acc.update(t.data);
    acc.finish()
        .map_err(|(index, value)| QuantError::NonFinite {
            file: t.file.to_path_buf(),
            tensor: t.name.to_string(),
            index,
            value,
        })
}

/// Largest |x| and first non-finite element of a tensor read in pieces (the source scan reads
/// each tensor once, in the same pass as the file's sha256).
#[derive(Debug, Clone)]
pub struct AmaxAcc {
    dt: SrcDType,
    /// BF16: the largest |x| as bits (sign cleared); other dtypes: unused.
    bits: u16,
    /// F16/F32: the largest |x|.
    max: f32,
    /// Elements seen so far.
    seen: usize,
    /// The first NaN/Inf: (element index, value).
    bad: Option<(usize, f32)>,
}

impl AmaxAcc {
    /// An empty accumulator for `dt`.
    pub fn new(dt: SrcDType) -> AmaxAcc {
        AmaxAcc {
            dt,
            bits: 0,
            max: 0.0,
            seen: 0,
            bad: None,
        }
    }

    /// Adds the next piece of the tensor's bytes; a piece holds whole elements.
    pub fn update(&mut self, bytes: &[u8]) {
        if self.bad.is_some() {
            return;
        }
        let size = self.dt.size();
        let n = bytes.len() / size;
        if self.dt == SrcDType::BF16 {
            // On the raw bits: |x| orders like its bits with the sign cleared; >= 0x7F80 is
            // Inf/NaN. No early exit, so the max vectorizes; a bad piece is rescanned.
            let m = bf16_abs_max_bits(bytes);
            if m >= 0x7F80 {
                for (i, c) in bytes.chunks_exact(2).enumerate() {
                    let bits = u16::from_le_bytes([c[0], c[1]]);
                    if bits & 0x7FFF >= 0x7F80 {
                        self.bad = Some((self.seen + i, bf16::from_bits(bits).to_f32()));
                        return;
                    }
                }
            }
            self.bits = self.bits.max(m);
            self.seen += n;
            return;
        }
        let mut buf = [0f32; 1024];
        for (ci, chunk) in bytes.chunks(1024 * size).enumerate() {
            let k = chunk.len() / size;
            let out = &mut buf[..k];
            let base = self.seen + ci * 1024;
            if convert_row(self.dt, chunk, out).is_err() {
                self.bad = Some((base, f32::NAN));
                return;
            }
            for (i, v) in out.iter().enumerate() {
                if !v.is_finite() {
                    self.bad = Some((base + i, *v));
                    return;
                }
                self.max = self.max.max(v.abs());
            }
        }
        self.seen += n;
    }

    /// The amax, or the first non-finite element (index, value).
    pub fn finish(&self) -> Result<f32, (usize, f32)> {
        match self.bad {
            Some(b) => Err(b),
            None if self.dt == SrcDType::BF16 => Ok(bf16::from_bits(self.bits).to_f32()),
            None => Ok(self.max),
        }
    }
}

/// Largest `bits & 0x7FFF` of little-endian BF16 values. The masked values fit in i16, so the max
/// is a signed one (SSE2 `pmaxsw`, AVX2 `vpmaxsw`); AVX2 when the CPU has it.
fn bf16_abs_max_bits(bytes: &[u8]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked above).
            return unsafe { bf16_abs_max_bits_avx2(bytes) };
        }
    }
    bf16_abs_max_bits_lanes(bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_abs_max_bits_avx2(bytes: &[u8]) -> u16 {
    use std::arch::x86_64::*;
    // Four accumulators of 16 lanes, 128 bytes per step (unaligned loads: tensor data in a
    // safetensors file need not be aligned).
    let mask = _mm256_set1_epi16(0x7FFF);
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut it = bytes.chunks_exact(128);
    for c in &mut it {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: c holds 128 bytes, so 32 bytes at 32 * j are in bounds.
            let v = _mm256_loadu_si256(c.as_ptr().add(32 * j) as *const __m256i);
            *a = _mm256_max_epi16(*a, _mm256_and_si256(v, mask));
        }
    }
    let m = _mm256_max_epi16(
        _mm256_max_epi16(acc[0], acc[1]),
        _mm256_max_epi16(acc[2], acc[3]),
    );
    let mut lanes = [0i16; 16];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, m);
    let tail = bf16_abs_max_bits_lanes(it.remainder()) as i16;
    lanes.iter().copied().fold(tail, i16::max) as u16
}

/// The portable body: 16 independent lanes (one AVX2 register of i16).
#[inline(always)]
fn bf16_abs_max_bits_lanes(bytes: &[u8]) -> u16 {
    let mut lanes = [0i16; 16];
    let mut it = bytes.chunks_exact(32);
    for c in &mut it {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let v = (u16::from_le_bytes([c[2 * l], c[2 * l + 1]]) & 0x7FFF) as i16;
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let mut m = lanes.iter().copied().max().unwrap_or(0);
    for c in it.remainder().chunks_exact(2) {
        m = m.max((u16::from_le_bytes([c[0], c[1]]) & 0x7FFF) as i16);
    }
    m as u16
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
        packed: take_buffer(n * k / 2),
        scales: take_buffer(n * bpr),
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
    // `Layout::encode` without its copies: the packed codes and scales move into the result
    // (the same entries and bytes; a copy of the whole output less).
    let entries = layout.tensor_entries(module, n, k);
    let global = layout.stored_global(&m, scale.filter(|_| layout == Layout::ModelOptNvfp4));
    let mut data = vec![m.packed, m.scales];
    if let Some(g) = global {
        data.push(g.to_le_bytes().to_vec());
    }
    let tensors = entries.into_iter().zip(data).collect();
    Ok(Quantized {
        tensors,
        stats: acc.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 7.0
    }

    /// Scalar reference: max |x| over decoded values, first non-finite element.
    fn reference(dt: SrcDType, bytes: &[u8]) -> Result<f32, (usize, f32)> {
        let mut out = vec![0f32; bytes.len() / dt.size()];
        convert_row(dt, bytes, &mut out).unwrap();
        let mut m = 0f32;
        for (i, v) in out.iter().enumerate() {
            if !v.is_finite() {
                return Err((i, *v));
            }
            m = m.max(v.abs());
        }
        Ok(m)
    }

    /// Random data fed in pieces of every awkward size gives the reference's amax and the first
    /// non-finite element's index, for every dtype (the AVX2 and portable paths both run: the
    /// remainder of each piece takes the scalar tail).
    #[test]
    fn streaming_amax_matches_the_scalar_reference() {
        let mut st = 7u64;
        for dt in [SrcDType::BF16, SrcDType::F16, SrcDType::F32] {
            for n in [1usize, 15, 16, 17, 1000, 5003] {
                let mut vals: Vec<f32> = (0..n).map(|_| lcg(&mut st)).collect();
                for bad in [
                    None,
                    Some(f32::NAN),
                    Some(f32::INFINITY),
                    Some(-f32::INFINITY),
                ] {
                    if let Some(b) = bad {
                        vals[n * 2 / 3] = b;
                    }
                    let bytes = mimo_kernels::dtype::encode_vec(dt, &vals);
                    let want = reference(dt, &bytes);
                    for piece in [1usize, 3, 16, 17, 64, 100_000] {
                        let mut acc = AmaxAcc::new(dt);
                        for p in bytes.chunks(piece * dt.size()) {
                            acc.update(p);
                        }
                        let got = acc.finish();
                        match (got, want) {
                            (Ok(a), Ok(b)) => {
                                assert_eq!(a.to_bits(), b.to_bits(), "{dt:?} {n} {piece}")
                            }
                            (Err((i, _)), Err((j, _))) => assert_eq!(i, j, "{dt:?} {n} {piece}"),
                            (g, w) => panic!("{dt:?} n={n} piece={piece}: {g:?} vs {w:?}"),
                        }
                    }
                }
            }
        }
    }

    /// A recycled buffer comes back zeroed and of the asked length, never shorter.
    #[test]
    fn recycled_buffers_come_back_zeroed() {
        recycle(vec![0xAB; 100_000]);
        recycle(vec![0xCD; 10_000]);
        for len in [5_000usize, 50_000, 200_000, 0] {
            let b = take_buffer(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0), "{len}");
            recycle(b);
        }
    }

    #[test]
    fn bf16_bit_max_paths_agree() {
        let mut st = 99u64;
        let vals: Vec<f32> = (0..4099).map(|_| lcg(&mut st)).collect();
        let bytes = mimo_kernels::dtype::encode_vec(SrcDType::BF16, &vals);
        let want = vals
            .iter()
            .map(|&v| bf16::from_f32(v).to_bits() & 0x7FFF)
            .max()
            .unwrap();
        assert_eq!(bf16_abs_max_bits_lanes(&bytes), want);
        // Every length and start offset (odd ones included) against the portable body.
        for start in 0..3 {
            for len in [0usize, 2, 30, 126, 128, 130, 256, 1000, 4000] {
                let b = &bytes[start..start + len];
                assert_eq!(
                    bf16_abs_max_bits(b),
                    bf16_abs_max_bits_lanes(b),
                    "{start} {len}"
                );
            }
        }
        assert_eq!(bf16_abs_max_bits(&bytes), want);
    }
}
