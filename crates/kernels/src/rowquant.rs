//! Fast per-row FP4 quantizers: one pass per block (amax + finiteness check, scale, E2M1 codes,
//! nibble packing, and optionally the dequantized value and the error sums), branch-free per
//! element, reading f32 rows or raw BF16/F16/F32 bytes. Every result is bit-identical to the
//! reference op order documented in [`crate::fp4`] (compressed-tensors / ModelOpt / MXFP4), which
//! the tests check against the scalar reference encoders ([`crate::e2m1::encode_magnitude_reference`],
//! [`crate::e4m3::encode_reference`]) and the compressed-tensors golden files.
//!
//! Why it is exact:
//! - E2M1: the code is the count of thresholds that `|x / scale|` lies above (float compares,
//!   `>` or `>=` as [`crate::e2m1::MAGNITUDE_THRESHOLD_BITS`] documents), with the reference's
//!   `<=` / `<` ties; the
//!   clamp to +-6 of compressed-tensors never changes a code (everything above 5 is code 7). A
//!   NaN quotient (0 / 0, only possible for ModelOpt when a tiny block's E4M3 scale rounds to 0)
//!   is code 0 and an infinite one code 7, as in the reference chain.
//! - The divisions stay divisions (x / eff with eff = e4m3 / global_scale, as compressed-tensors
//!   does); only MXFP4 multiplies by `1 / 2^e`, which is exact (2^-e is an f32 for every E8M0
//!   code, and x * 2^-e and x / 2^e are the same real number rounded once).
//! - Block amax is the maximum of the sign-cleared bit patterns (non-negative floats order like
//!   their bits); a pattern at or above 0x7F80_0000 is the non-finite check.
//! - The dequantized value of a code is the sum of the E2M1 steps crossed (0.5, 0.5, 0.5, 0.5, 1,
//!   1, 2: exact) with the code's sign, times the block multiplier: the same product as
//!   [`crate::fp4::dequantize_row`].
//!
//! The AVX2 build of the same code is chosen at run time; it performs the same operations in the
//! same order (no FMA), so the choice never changes a result.

use std::marker::PhantomData;

use half::{bf16, f16};

use crate::cpu::use_avx2;
use crate::dtype::SrcDType;
use crate::fp4::{
    check_row_buffers, mxfp4_scale_code, Fp4Error, Fp4Format, CT_ROUND_THROUGH_BF16,
    CT_ZERO_SCALE_EPS,
};
use crate::{e2m1, e4m3, e8m0};

/// Value added to the dequantized magnitude by each threshold of
/// [`MAGNITUDE_THRESHOLDS`] that is crossed (0 -> 0.5 -> 1 -> 1.5 -> 2 -> 3 -> 4 -> 6).
const MAGNITUDE_STEPS: [f32; 7] = [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0];

/// The E2M1 rounding thresholds (the values of [`crate::e2m1::MAGNITUDE_THRESHOLD_BITS`]), each
/// with whether a tie goes to the upper code (`>=`) rather than the lower one (`>`): the
/// reference chain's `<` / `<=`.
const MAGNITUDE_THRESHOLDS: [(f32, bool); 7] = [
    (0.25, false),
    (0.75, true),
    (1.25, false),
    (1.75, true),
    (2.5, false),
    (3.5, true),
    (5.0, false),
];

/// Which quantizer a row goes through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowQuant {
    /// NVFP4, compressed-tensors op order ([`crate::fp4::quantize_row_nvfp4_in`]): global scale,
    /// and the dtype the block `amax / 6` is rounded to.
    Nvfp4Ct {
        /// compressed-tensors global scale (finite, > 0)
        global_scale: f32,
        /// dtype of the observer's arithmetic
        arith: SrcDType,
    },
    /// NVFP4, ModelOpt op order ([`crate::fp4::quantize_row_nvfp4_modelopt`]). The error
    /// statistics reconstruct with `e4m3 / (1 / weight_scale_2)`, what [`crate::fp4::dequantize`]
    /// gives for the matrix whose global scale is `1 / weight_scale_2`.
    Nvfp4ModelOpt {
        /// ModelOpt per-tensor scale (finite, > 0)
        weight_scale_2: f32,
    },
    /// MXFP4, compressed-tensors op order ([`crate::fp4::quantize_row_mxfp4`]).
    Mxfp4,
}

impl RowQuant {
    /// NVFP4 or MXFP4.
    pub fn format(self) -> Fp4Format {
        match self {
            RowQuant::Mxfp4 => Fp4Format::Mxfp4,
            _ => Fp4Format::Nvfp4,
        }
    }
}

/// Error statistics of one row against its reconstruction, summed exactly as the converter's
/// 8-lane accumulator does: element i goes to f32 lane i % 8, in row order, and the lanes are
/// summed in f64 in lane order at the end of the row.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RowError {
    /// Sum of x^2.
    pub signal: f64,
    /// Sum of (x - dequant(q))^2.
    pub noise: f64,
    /// Largest |x - dequant(q)|.
    pub max_abs: f32,
}

/// Per-lane f32 accumulators of [`RowError`].
#[derive(Default)]
struct Lanes {
    s: [f32; 8],
    n: [f32; 8],
    m: [f32; 8],
}

impl Lanes {
    fn finish(&self) -> RowError {
        RowError {
            signal: self.s.iter().map(|&v| v as f64).sum::<f64>(),
            noise: self.n.iter().map(|&v| v as f64).sum::<f64>(),
            max_abs: self.m.iter().fold(0.0f32, |a, &v| a.max(v)),
        }
    }
}

/// A source of 16-element chunks of one row as f32.
trait Source {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Elements 16 j .. 16 j + 16.
    fn chunk(&self, j: usize) -> [f32; 16];
}

struct F32Row<'a>(&'a [f32]);

impl Source for F32Row<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn chunk(&self, j: usize) -> [f32; 16] {
        let mut x = [0.0f32; 16];
        x.copy_from_slice(&self.0[16 * j..16 * j + 16]);
        x
    }
}

/// An element type of raw little-endian row bytes.
trait LeElement {
    /// Bytes per element.
    const WIDTH: usize;
    /// The f32 value of one element's `WIDTH` bytes (an exact widening).
    fn widen(b: &[u8]) -> f32;
}

impl LeElement for f32 {
    const WIDTH: usize = 4;
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl LeElement for bf16 {
    const WIDTH: usize = 2;
    /// bf16 -> f32 is a 16-bit shift; exact.
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
}

impl LeElement for f16 {
    const WIDTH: usize = 2;
    #[inline(always)]
    fn widen(b: &[u8]) -> f32 {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
    }
}

/// A row given as raw little-endian bytes of element type `E`.
struct LeBytes<'a, E>(&'a [u8], PhantomData<E>);

impl<'a, E: LeElement> LeBytes<'a, E> {
    fn new(bytes: &'a [u8]) -> Self {
        LeBytes(bytes, PhantomData)
    }
}

impl<E: LeElement> Source for LeBytes<'_, E> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() / E::WIDTH
    }
    #[inline(always)]
    fn chunk(&self, j: usize) -> [f32; 16] {
        let b = &self.0[16 * E::WIDTH * j..16 * E::WIDTH * (j + 1)];
        let mut x = [0.0f32; 16];
        for (v, c) in x.iter_mut().zip(b.chunks_exact(E::WIDTH)) {
            *v = E::widen(c);
        }
        x
    }
}

/// Sign-cleared bit pattern of the largest |x| of a chunk (>= 0x7F80_0000 when one is non-finite).
#[inline(always)]
fn amax_bits(x: &[f32; 16]) -> u32 {
    let mut m = 0u32;
    for v in x {
        m = m.max(v.to_bits() & 0x7FFF_FFFF);
    }
    m
}

/// The NonFinite error for chunk `j` (called only when [`amax_bits`] found one).
#[cold]
fn non_finite(x: &[f32; 16], j: usize) -> Fp4Error {
    let i = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Fp4Error::NonFinite {
        index: 16 * j + i,
        value: x[i],
    }
}

/// bf16 round-to-nearest-even of a non-NaN f32, and back (what `half::bf16::from_f32` does).
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000)
}

#[inline(always)]
fn round_arith(x: f32, arith: SrcDType) -> f32 {
    match arith {
        SrcDType::F32 => x,
        SrcDType::BF16 => round_bf16(x),
        SrcDType::F16 => SrcDType::F16.round(x),
    }
}

/// Codes of the 16 scaled values `x[i] / s` (`x[i] * s` with `MUL`), packed into `out` (8 bytes, element 2i in the
/// low nibble); with `ERR`, also the error of `code value * mult` against `x` into `lanes`.
#[inline(always)]
fn encode16<const ERR: bool, const MUL: bool>(
    x: &[f32; 16],
    s: f32,
    mult: f32,
    out: &mut [u8],
    lanes: &mut Lanes,
) {
    let mut codes = [0u32; 16];
    let mut deq = [0.0f32; 16];
    for i in 0..16 {
        let q = ct_post(if MUL { x[i] * s } else { x[i] / s });
        // Float compares of |q| with the thresholds, `>` where the tie goes to the lower code and
        // `>=` where it goes to the upper one (the reference chain's `<=` / `<`); every compare
        // is false for NaN (0 / 0: ModelOpt's zero E4M3 scale of a tiny block), which gets code
        // 0 as in the reference. Integer compares of the bits would need unsigned compares,
        // which SSE2 lacks.
        let a = q.abs();
        let mut above = [false; 7];
        for (x, &(t, ge)) in above.iter_mut().zip(&MAGNITUDE_THRESHOLDS) {
            *x = if ge { a >= t } else { a > t };
        }
        let mut c = 0u32;
        let mut v = 0.0f32;
        for t in 0..7 {
            c += above[t] as u32;
            if ERR {
                v += if above[t] { MAGNITUDE_STEPS[t] } else { 0.0 };
            }
        }
        let neg = (q < 0.0) as u32;
        codes[i] = c | (neg << 3);
        if ERR {
            deq[i] = f32::from_bits(v.to_bits() | (neg << 31)) * mult;
        }
    }
    for (j, o) in out[..8].iter_mut().enumerate() {
        *o = (codes[2 * j] | (codes[2 * j + 1] << 4)) as u8;
    }
    if ERR {
        for i in 0..16 {
            let l = i % 8;
            let d = x[i] - deq[i];
            lanes.s[l] += x[i] * x[i];
            lanes.n[l] += d * d;
            lanes.m[l] = lanes.m[l].max(d.abs());
        }
    }
}

/// [`encode16`], or its AVX2 twin when `AVX` (only inside [`row_avx2`]).
#[inline(always)]
fn encode16_dispatch<const ERR: bool, const MUL: bool, const AVX: bool>(
    x: &[f32; 16],
    s: f32,
    mult: f32,
    out: &mut [u8],
    lanes: &mut Lanes,
) {
    #[cfg(target_arch = "x86_64")]
    if AVX && !CT_ROUND_THROUGH_BF16 {
        // SAFETY: AVX is true only in code reached through `row_avx2`, which runs after the
        // run-time AVX2 check.
        unsafe { avx2::encode16::<ERR, MUL>(x, s, mult, out, lanes) };
        return;
    }
    encode16::<ERR, MUL>(x, s, mult, out, lanes)
}

/// AVX2 version of [`encode16`]: the same operations in the same order, 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
mod avx2;

/// compressed-tensors' scaled value before the E2M1 thresholds: the optional bf16 step of
/// [`CT_ROUND_THROUGH_BF16`] (the clamp to +-6 never changes a code and is left out otherwise;
/// ModelOpt has neither, and the step is off for both).
#[inline(always)]
fn ct_post(q: f32) -> f32 {
    if CT_ROUND_THROUGH_BF16 {
        round_bf16(q.clamp(-e2m1::E2M1_MAX, e2m1::E2M1_MAX))
    } else {
        q
    }
}

/// Blocks whose scales are computed before their elements are encoded (see [`row_kernel`]).
const GROUP: usize = 32;

/// Per-block values the element pass needs: the divisor (or MXFP4 multiplier) of the elements
/// and the dequantization multiplier of the error statistics.
#[derive(Clone, Copy, Default)]
struct BlockScale {
    s: f32,
    mult: f32,
}

/// The whole row, in groups of [`GROUP`] blocks: first every block scale of the group (amax,
/// finiteness, scale code, divisor), then every block's elements. The scale of one block is a
/// long chain of dependent operations (reduction, divisions, rounding, table look-up); computed
/// back to back for independent blocks they overlap, where interleaved with the element work
/// they would stall it. Same operations, same order per block, so the same bits.
#[inline(always)]
fn row_kernel<const ERR: bool, const AVX: bool, S: Source>(
    q: RowQuant,
    src: &S,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<Lanes, Fp4Error> {
    let mut lanes = Lanes::default();
    let chunks = src.len() / 16;
    let per_block = q.format().block_size() / 16;
    let blocks = (chunks / per_block).min(scales.len());
    let mut bs = [BlockScale::default(); GROUP];
    for g0 in (0..blocks).step_by(GROUP) {
        let g1 = (g0 + GROUP).min(blocks);
        for (b, (sc, slot)) in scales[g0..g1].iter_mut().zip(bs.iter_mut()).enumerate() {
            let b = g0 + b;
            let (code, v) = block_scale::<ERR, S>(q, src, b)?;
            *sc = code;
            *slot = v;
        }
        for (b, v) in (g0..g1).zip(bs) {
            let out = &mut packed[b * 8 * per_block..(b + 1) * 8 * per_block];
            if per_block == 1 {
                let x = src.chunk(b);
                encode16_dispatch::<ERR, false, AVX>(&x, v.s, v.mult, out, &mut lanes);
            } else {
                let (lo, hi) = out.split_at_mut(8);
                let (x0, x1) = (src.chunk(2 * b), src.chunk(2 * b + 1));
                encode16_dispatch::<ERR, true, AVX>(&x0, v.s, v.mult, lo, &mut lanes);
                encode16_dispatch::<ERR, true, AVX>(&x1, v.s, v.mult, hi, &mut lanes);
            }
        }
    }
    Ok(lanes)
}

/// Scale code and element divisor of block `b` (with `ERR`, also its dequantization multiplier).
#[inline(always)]
fn block_scale<const ERR: bool, S: Source>(
    q: RowQuant,
    src: &S,
    b: usize,
) -> Result<(u8, BlockScale), Fp4Error> {
    match q {
        RowQuant::Nvfp4Ct {
            global_scale: gs,
            arith,
        } => {
            let x = src.chunk(b);
            let mb = amax_bits(&x);
            if mb >= 0x7F80_0000 {
                return Err(non_finite(&x, b));
            }
            let local = round_arith(f32::from_bits(mb) / e2m1::E2M1_MAX, arith);
            let code = e4m3::encode(gs * local);
            let code = if code & 0x7F == 0 {
                e4m3::encode(CT_ZERO_SCALE_EPS)
            } else {
                code
            };
            // compressed-tensors `_quantize`: scale / global_scale, then x / that; the
            // dequantization multiplier is the same quotient.
            let eff = e4m3::DECODE_LUT[code as usize] / gs;
            Ok((code, BlockScale { s: eff, mult: eff }))
        }
        RowQuant::Nvfp4ModelOpt {
            weight_scale_2: ws2,
        } => {
            let x = src.chunk(b);
            let mb = amax_bits(&x);
            if mb >= 0x7F80_0000 {
                return Err(non_finite(&x, b));
            }
            let s = f32::from_bits(mb) / (e2m1::E2M1_MAX * ws2);
            let code = e4m3::encode(if s == 0.0 { 1.0 } else { s });
            let dec = e4m3::DECODE_LUT[code as usize];
            // The error reconstructs through the matrix's global scale 1 / weight_scale_2.
            let mult = if ERR { dec / (1.0 / ws2) } else { 0.0 };
            Ok((code, BlockScale { s: dec * ws2, mult }))
        }
        RowQuant::Mxfp4 => {
            let (x0, x1) = (src.chunk(2 * b), src.chunk(2 * b + 1));
            // One reduction over both halves (element-wise max first).
            let mut both = x0;
            for (a, &b) in both.iter_mut().zip(&x1) {
                *a = f32::from_bits((a.to_bits() & 0x7FFF_FFFF).max(b.to_bits() & 0x7FFF_FFFF));
            }
            let m = amax_bits(&both);
            if m >= 0x7F80_0000 {
                return Err(if amax_bits(&x0) >= 0x7F80_0000 {
                    non_finite(&x0, 2 * b)
                } else {
                    non_finite(&x1, 2 * b + 1)
                });
            }
            let code = mxfp4_scale_code(f32::from_bits(m));
            let s = e8m0::DECODE_LUT[code as usize];
            // Exact: 1 / 2^e is an f32 for every code 0..=254 (see module docs).
            Ok((
                code,
                BlockScale {
                    s: 1.0 / s,
                    mult: s,
                },
            ))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2<const ERR: bool, S: Source>(
    q: RowQuant,
    src: &S,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<Lanes, Fp4Error> {
    row_kernel::<ERR, true, S>(q, src, packed, scales)
}

fn row_dispatch<const ERR: bool, S: Source>(
    q: RowQuant,
    src: &S,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<Lanes, Fp4Error> {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: AVX2 is present (checked at run time just above).
        return unsafe { row_avx2::<ERR, S>(q, src, packed, scales) };
    }
    row_kernel::<ERR, false, S>(q, src, packed, scales)
}

/// The argument checks of every public entry: buffer lengths for a row of `k` elements, then a
/// finite positive tensor scale.
#[inline]
fn check_row_args(q: RowQuant, k: usize, packed: &[u8], scales: &[u8]) -> Result<(), Fp4Error> {
    check_row_buffers(q.format(), k, packed.len(), scales.len())?;
    check_scale(q)
}

/// The tensor scale of `q` (none for MXFP4) is finite and > 0.
fn check_scale(q: RowQuant) -> Result<(), Fp4Error> {
    let s = match q {
        RowQuant::Nvfp4Ct { global_scale, .. } => global_scale,
        RowQuant::Nvfp4ModelOpt { weight_scale_2 } => weight_scale_2,
        RowQuant::Mxfp4 => return Ok(()),
    };
    if s.is_finite() && s > 0.0 {
        Ok(())
    } else {
        Err(Fp4Error::BadGlobalScale(s))
    }
}

/// Quantizes one f32 row (length k, a multiple of the block size) with `q`. Writes k/2 packed
/// bytes and k/block scale bytes. The output is that of the matching `crate::fp4` row function;
/// on a non-finite value the error names its index in the row and the buffers hold partial data.
pub fn quantize_row(
    q: RowQuant,
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), Fp4Error> {
    check_row_args(q, row.len(), packed_out, scales_out)?;
    row_dispatch::<false, _>(q, &F32Row(row), packed_out, scales_out).map(|_| ())
}

/// [`quantize_row`] through the portable build only (no SIMD dispatch): lets tests compare the
/// two builds on a machine that has AVX2.
pub fn quantize_row_portable(
    q: RowQuant,
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<RowError, Fp4Error> {
    check_row_args(q, row.len(), packed_out, scales_out)?;
    row_kernel::<true, false, _>(q, &F32Row(row), packed_out, scales_out).map(|l| l.finish())
}

/// Quantizes one row given as raw little-endian bytes of `dtype` (k elements, k = 2 *
/// `packed_out.len()`), without an intermediate f32 row, and returns the row's error statistics
/// against the dequantized result (see [`RowError`]; the reconstruction is bit-identical to
/// [`crate::fp4::dequantize_row`] of the output). Same outputs and errors as [`quantize_row`].
pub fn quantize_row_bytes_with_error(
    q: RowQuant,
    dtype: SrcDType,
    bytes: &[u8],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<RowError, Fp4Error> {
    let k = packed_out.len() * 2;
    if bytes.len() != k * dtype.size() {
        return Err(Fp4Error::Length {
            what: "row bytes",
            expected: k * dtype.size(),
            got: bytes.len(),
        });
    }
    check_row_args(q, k, packed_out, scales_out)?;
    #[cfg(target_arch = "x86_64")]
    if let (
        SrcDType::BF16,
        RowQuant::Nvfp4Ct {
            global_scale,
            arith: SrcDType::BF16,
        },
    ) = (dtype, q)
    {
        if !CT_ROUND_THROUGH_BF16 && use_avx2() {
            // SAFETY: AVX2 is present (checked at run time just above).
            if let Some(l) =
                unsafe { avx2::row_ct_bf16(global_scale, bytes, packed_out, scales_out) }
            {
                return Ok(l.finish());
            }
            // A NaN or Inf: the general kernel below finds the first one and reports it.
        }
    }
    let lanes = match dtype {
        SrcDType::BF16 => {
            row_dispatch::<true, _>(q, &LeBytes::<bf16>::new(bytes), packed_out, scales_out)
        }
        SrcDType::F16 => {
            row_dispatch::<true, _>(q, &LeBytes::<f16>::new(bytes), packed_out, scales_out)
        }
        SrcDType::F32 => {
            row_dispatch::<true, _>(q, &LeBytes::<f32>::new(bytes), packed_out, scales_out)
        }
    }?;
    Ok(lanes.finish())
}

/// [`quantize_row_bytes_with_error`] for an f32 row.
pub fn quantize_row_with_error(
    q: RowQuant,
    row: &[f32],
    packed_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<RowError, Fp4Error> {
    check_row_args(q, row.len(), packed_out, scales_out)?;
    row_dispatch::<true, _>(q, &F32Row(row), packed_out, scales_out).map(|l| l.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (the test needs no statistical quality, only variety).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
        fn below(&mut self, n: u32) -> u32 {
            self.next() % n
        }
    }

    /// BF16 bytes of `blocks` blocks of 16: per block one of several kinds (random values at a
    /// random magnitude, zeros, E2M1 grid values that hit the ties, BF16 subnormals, single
    /// outliers, random bit patterns that are finite).
    fn random_bf16_row(rng: &mut Lcg, blocks: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 * blocks);
        for _ in 0..blocks {
            let kind = rng.below(7);
            let e = rng.below(120) as i32 - 60;
            let mag = 2f32.powi(e);
            for i in 0..16 {
                let v = match kind {
                    0 => 0.0,
                    1 | 2 => (rng.next() as f32 / u32::MAX as f32 - 0.5) * 4.0 * mag,
                    3 if i == 0 => 6.0 * mag,
                    3 => (rng.below(49) as i32 - 24) as f32 * 0.25 * mag,
                    4 => f32::from_bits((rng.below(0x7F) << 16) | ((rng.below(2)) << 31)),
                    5 if i == 7 => 1e4 * mag,
                    5 => (rng.next() as f32 / u32::MAX as f32 - 0.5) * mag,
                    _ => {
                        // Any finite BF16 pattern.
                        let b = rng.next() >> 16;
                        let b = if b & 0x7F80 == 0x7F80 { b & 0x807F } else { b };
                        f32::from_bits(b << 16)
                    }
                };
                let h = half::bf16::from_f32(v).to_bits();
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        out
    }

    fn general(gs: f32, bytes: &[u8]) -> (Result<RowError, Fp4Error>, Vec<u8>, Vec<u8>) {
        let blocks = bytes.len() / 32;
        let (mut p, mut s) = (vec![0xAAu8; 8 * blocks], vec![0xAAu8; blocks]);
        let q = RowQuant::Nvfp4Ct {
            global_scale: gs,
            arith: SrcDType::BF16,
        };
        let r = row_kernel::<true, false, _>(q, &LeBytes::<bf16>::new(bytes), &mut p, &mut s)
            .map(|l| l.finish());
        (r, p, s)
    }

    fn public(gs: f32, bytes: &[u8]) -> (Result<RowError, Fp4Error>, Vec<u8>, Vec<u8>) {
        let blocks = bytes.len() / 32;
        let (mut p, mut s) = (vec![0x55u8; 8 * blocks], vec![0x55u8; blocks]);
        let q = RowQuant::Nvfp4Ct {
            global_scale: gs,
            arith: SrcDType::BF16,
        };
        let r = quantize_row_bytes_with_error(q, SrcDType::BF16, bytes, &mut p, &mut s);
        (r, p, s)
    }

    const SCALES: [f32; 11] = [
        1.0, 448.0, 2688.0, 3.0e-3, 1.0e12, 1.0e-30, 3.0e30, 17.25, 6.1e5, 1.0e38, 3.0e38,
    ];

    /// The vector block-scale path of BF16 NVFP4 rows (8 blocks at a time) gives the general
    /// portable kernel's codes, scales and error sums bit for bit, for every row length from 1
    /// to 41 blocks (full groups and every tail) and global scales from tiny (every block scale
    /// substituted) to huge (every one saturated).
    #[test]
    fn bf16_ct_fast_path_matches_the_general_kernel() {
        let mut rng = Lcg(0x5eed);
        let mut checked = 0usize;
        for blocks in 1..=41usize {
            for rep in 0..6 {
                let bytes = random_bf16_row(&mut rng, blocks);
                for gs in SCALES {
                    let what = format!("{blocks} blocks, rep {rep}, gs {gs:e}");
                    let (r0, p0, s0) = general(gs, &bytes);
                    let e0 = r0.expect("finite row");
                    let (r1, p1, s1) = public(gs, &bytes);
                    let e1 = r1.expect("finite row");
                    assert_eq!(s1, s0, "{what}: scales");
                    assert_eq!(p1, p0, "{what}: packed");
                    assert_eq!(e1.signal.to_bits(), e0.signal.to_bits(), "{what}: signal");
                    assert_eq!(e1.noise.to_bits(), e0.noise.to_bits(), "{what}: noise");
                    assert_eq!(e1.max_abs.to_bits(), e0.max_abs.to_bits(), "{what}: max");
                    checked += blocks;
                    #[cfg(target_arch = "x86_64")]
                    if use_avx2() {
                        // The fast path itself (the public entry could fall back silently).
                        let (mut p, mut s) = (vec![0u8; 8 * blocks], vec![0u8; blocks]);
                        // SAFETY: AVX2 checked just above.
                        let l = unsafe { avx2::row_ct_bf16(gs, &bytes, &mut p, &mut s) }
                            .expect("fast path on a finite row");
                        assert_eq!((&p, &s), (&p0, &s0), "{what}: fast path");
                        assert_eq!(l.finish(), e0, "{what}: fast path error");
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
        // The substituted and saturated scale codes really occurred.
        let bytes = random_bf16_row(&mut Lcg(3), 64);
        let (_, _, tiny) = general(1.0e-30, &bytes);
        let (_, _, huge) = general(3.0e30, &bytes);
        assert!(tiny.contains(&e4m3::encode(CT_ZERO_SCALE_EPS)));
        assert!(huge.contains(&0x7E));
    }

    /// Every finite BF16 block amax (each block holds one pattern, with both signs across the
    /// row, next to smaller values) under every global scale gives the general kernel's scale
    /// code, codes and error sums: the vector `/ 6`, bf16 rounding (its ties occur only for
    /// subnormal amaxes), E4M3 encoding and zero-scale substitution cover their whole domain.
    #[test]
    fn bf16_ct_fast_path_matches_for_every_block_amax() {
        let mut rng = Lcg(7);
        let mut bytes = Vec::with_capacity(32 * 0x7F80);
        for m in 0..0x7F80u32 {
            for i in 0..16u32 {
                let v = match i {
                    0 => m | ((m & 1) << 15),
                    _ => rng.below(m + 1),
                };
                bytes.extend_from_slice(&(v as u16).to_le_bytes());
            }
        }
        for gs in SCALES {
            let (r0, p0, s0) = general(gs, &bytes);
            let (r1, p1, s1) = public(gs, &bytes);
            assert_eq!(s1, s0, "gs {gs:e}: scales");
            assert_eq!(p1, p0, "gs {gs:e}: packed");
            assert_eq!(r1.expect("finite"), r0.expect("finite"), "gs {gs:e}: error");
        }
    }

    /// The per-block thresholds of the 16-bit element compares: for divisors across their
    /// whole range (subnormal to just below 2^16, random bit patterns and edge values), each
    /// threshold is the first BF16 magnitude pattern whose quotient crosses, found here by a
    /// binary search with the general kernel's division and compare.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_thresholds_are_the_first_crossing_patterns() {
        if !use_avx2() {
            eprintln!("SKIP: no AVX2");
            return;
        }
        use std::arch::x86_64::_mm256_loadu_ps;
        let mut rng = Lcg(21);
        let top = 65536f32.to_bits();
        // Edge values first (divisors with few significant bits make `t * eff` exact, where
        // the first pattern at or above it may not cross), then random bit patterns.
        let mut effs: Vec<f32> = vec![
            f32::from_bits(1),
            f32::MIN_POSITIVE,
            1.0,
            1.0 / 448.0,
            f32::from_bits(top - 1),
            0.75,
            3.0,
            448.0,
        ];
        effs.extend((0..64).map(|e| 2f32.powi(e - 140)));
        effs.extend((0..4000).map(|_| f32::from_bits(1 + rng.next() % (top - 1))));
        effs.truncate(effs.len() / 8 * 8);
        let mut checked = 0;
        for e8 in effs.chunks_exact(8) {
            // SAFETY: AVX2 checked above; e8 has 8 f32.
            let k = unsafe { avx2::thresholds(_mm256_loadu_ps(e8.as_ptr())) };
            for (i, &(t, ge)) in MAGNITUDE_THRESHOLDS.iter().enumerate() {
                for (j, &eff) in e8.iter().enumerate() {
                    let crosses = |b: u32| {
                        let q = f32::from_bits(b << 16) / eff;
                        if ge {
                            q >= t
                        } else {
                            q > t
                        }
                    };
                    // First pattern in 0..=0x7F80 that crosses (0x7F80, +Inf, always does).
                    let (mut lo, mut hi) = (0u32, 0x7F80u32);
                    while lo < hi {
                        let mid = (lo + hi) / 2;
                        if crosses(mid) {
                            hi = mid;
                        } else {
                            lo = mid + 1;
                        }
                    }
                    assert_eq!(k[i][j] as i32, lo as i32 - 1, "eff {eff:e}, threshold {t}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 25_000, "{checked}");
    }

    /// A NaN or Inf anywhere (also in the tail after the last full group, and with a later one
    /// present) is reported as the general kernel reports it.
    #[test]
    fn bf16_ct_fast_path_reports_non_finite_values_like_the_general_kernel() {
        let mut rng = Lcg(99);
        for blocks in [1usize, 7, 8, 9, 16, 19] {
            for at in [0usize, 5, 16 * blocks / 2, 16 * blocks - 1] {
                for bad in [0x7FC0u16, 0x7F80, 0xFF80, 0xFFC1] {
                    let mut bytes = random_bf16_row(&mut rng, blocks);
                    bytes[2 * at..2 * at + 2].copy_from_slice(&bad.to_le_bytes());
                    if at + 3 < 16 * blocks {
                        let later = 16 * blocks - 1;
                        bytes[2 * later..2 * later + 2].copy_from_slice(&0x7FC0u16.to_le_bytes());
                    }
                    let (r0, _, _) = general(448.0, &bytes);
                    let (r1, _, _) = public(448.0, &bytes);
                    let (e0, e1) = (r0.unwrap_err(), r1.unwrap_err());
                    assert_eq!(
                        format!("{e1:?}"),
                        format!("{e0:?}"),
                        "{blocks} blocks, at {at}"
                    );
                    assert!(
                        matches!(e0, Fp4Error::NonFinite { index, .. } if index == at),
                        "{e0:?} at {at}"
                    );
                }
            }
        }
    }
}
