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
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Lanes, MAGNITUDE_THRESHOLDS};
    use crate::e2m1::E2M1_LUT;

    /// Codes (i32 lanes, 0..=15) of 8 scaled values, and with ERR their dequantized values.
    /// With `NO_NAN` (the caller guarantees no lane of `q` is NaN) the thresholds are compared
    /// as integers, which the CPU runs on more ports than float compares.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes8<const ERR: bool, const NO_NAN: bool>(q: __m256, mult: __m256) -> (__m256i, __m256) {
        // Float compares of |q| with the thresholds (`>` for ties to the lower code, `>=` for ties
        // to the upper one): the same tests as the bit compares of the portable build. Ordered
        // predicates are false for NaN, so a NaN quotient gets code 0 as there.
        let masks = if NO_NAN {
            // Non-negative non-NaN floats order like their bit patterns as signed integers:
            // `a > t` is `bits(a) > bits(t)` and `a >= t` is `bits(a) > bits(t) - 1`. The
            // sign-cleared bits are taken as the unsigned min of the bits with and without the
            // sign flipped (not an `and`): LLVM then cannot see that they are non-negative, so it
            // keeps the one-instruction signed compare instead of an unsigned max + equal pair.
            let b = _mm256_castps_si256(q);
            let a = _mm256_min_epu32(b, _mm256_xor_si256(b, _mm256_set1_epi32(i32::MIN)));
            let gt = |t: f32| _mm256_cmpgt_epi32(a, _mm256_set1_epi32(t.to_bits() as i32));
            let ge = |t: f32| _mm256_cmpgt_epi32(a, _mm256_set1_epi32(t.to_bits() as i32 - 1));
            [
                gt(0.25),
                ge(0.75),
                gt(1.25),
                ge(1.75),
                gt(2.5),
                ge(3.5),
                gt(5.0),
            ]
        } else {
            let a = _mm256_and_ps(q, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)));
            [
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(0.25))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(0.75))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(1.25))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(1.75))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(2.5))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(3.5))),
                _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(5.0))),
            ]
        };
        let mut c = _mm256_setzero_si256();
        for above in masks {
            c = _mm256_sub_epi32(c, above);
        }
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(q, _mm256_setzero_ps());
        let deq = if ERR {
            // Magnitude of the code by a lane permute of the 8 E2M1 magnitudes: the same values
            // as the portable build's sum of crossed steps.
            // SAFETY: E2M1_LUT has 16 f32; the first 8 are the magnitudes.
            let lut = unsafe { _mm256_loadu_ps(E2M1_LUT.as_ptr()) };
            let v = _mm256_permutevar8x32_ps(lut, c);
            let sign = _mm256_and_ps(neg, _mm256_set1_ps(-0.0));
            _mm256_mul_ps(_mm256_or_ps(v, sign), mult)
        } else {
            _mm256_setzero_ps()
        };
        c = _mm256_or_si256(
            c,
            _mm256_and_si256(_mm256_castps_si256(neg), _mm256_set1_epi32(8)),
        );
        (c, deq)
    }

    /// The error accumulators of [`Lanes`] held in registers (signal, noise, max).
    pub(super) struct Acc {
        pub(super) s: __m256,
        pub(super) n: __m256,
        pub(super) m: __m256,
    }

    impl Acc {
        #[inline]
        #[target_feature(enable = "avx2")]
        pub(super) fn load(l: &Lanes) -> Acc {
            // SAFETY: each array holds 8 f32.
            unsafe {
                Acc {
                    s: _mm256_loadu_ps(l.s.as_ptr()),
                    n: _mm256_loadu_ps(l.n.as_ptr()),
                    m: _mm256_loadu_ps(l.m.as_ptr()),
                }
            }
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        pub(super) fn store(&self, l: &mut Lanes) {
            // SAFETY: each array holds 8 f32.
            unsafe {
                _mm256_storeu_ps(l.s.as_mut_ptr(), self.s);
                _mm256_storeu_ps(l.n.as_mut_ptr(), self.n);
                _mm256_storeu_ps(l.m.as_mut_ptr(), self.m);
            }
        }

        /// Adds 8 source values `xv` and their dequantized values `dv`: sum of x^2, sum of
        /// (x - dq)^2, max |x - dq|.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub(super) fn add(&mut self, xv: __m256, dv: __m256) {
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
            let d = _mm256_sub_ps(xv, dv);
            self.s = _mm256_add_ps(self.s, _mm256_mul_ps(xv, xv));
            self.n = _mm256_add_ps(self.n, _mm256_mul_ps(d, d));
            self.m = _mm256_max_ps(self.m, _mm256_and_ps(d, abs));
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn encode16<const ERR: bool, const MUL: bool>(
        x: &[f32; 16],
        s: f32,
        mult: f32,
        out: &mut [u8],
        lanes: &mut Lanes,
    ) {
        let out: &mut [u8; 8] = (&mut out[..8]).try_into().expect("8 bytes");
        // SAFETY: x has 16 f32.
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(x.as_ptr().add(8)),
            )
        };
        let mut acc = Acc::load(lanes);
        encode16_regs::<ERR, MUL, false>(x0, x1, s, mult, out, &mut acc);
        if ERR {
            acc.store(lanes);
        }
    }

    /// [`encode16`] on elements already in two registers (0..8 and 8..16), with the error
    /// accumulators in registers: the same operations in the same order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn encode16_regs<const ERR: bool, const MUL: bool, const NO_NAN: bool>(
        x0: __m256,
        x1: __m256,
        s: f32,
        mult: f32,
        out: &mut [u8; 8],
        acc: &mut Acc,
    ) {
        // SAFETY: the store below writes exactly the 8 bytes of `out`.
        unsafe {
            let sv = _mm256_set1_ps(s);
            let (q0, q1) = if MUL {
                (_mm256_mul_ps(x0, sv), _mm256_mul_ps(x1, sv))
            } else {
                (_mm256_div_ps(x0, sv), _mm256_div_ps(x1, sv))
            };
            let mv = _mm256_set1_ps(mult);
            let (c0, d0) = codes8::<ERR, NO_NAN>(q0, mv);
            let (c1, d1) = codes8::<ERR, NO_NAN>(q1, mv);
            // i16 lanes [c0 0-3, c1 0-3 | c0 4-7, c1 4-7] -> elements 0..15 in order.
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(c0, c1));
            // 32-bit lane j = e(2j) | e(2j+1) << 16; fold e(2j+1) down to bits 4..7.
            let p = _mm256_or_si256(p, _mm256_srli_epi32::<12>(p));
            _mm_storel_epi64(out.as_mut_ptr() as *mut __m128i, low_bytes(p));
            if ERR {
                acc.add(x0, d0);
                acc.add(x1, d1);
            }
        }
    }

    /// The low byte of each 32-bit lane of `p`, in lane order, in the low 8 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn low_bytes(p: __m256i) -> __m128i {
        let idx = _mm256_setr_epi8(
            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1,
            -1, -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let p = _mm256_shuffle_epi8(p, idx);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
        _mm256_castsi256_si128(p)
    }

    /// The NVFP4 compressed-tensors row of BF16 bytes with BF16 scale arithmetic (the
    /// converter's usual case), with error statistics: the block scales of 8 blocks at a time in
    /// vector registers instead of one after the other in scalar code, then the elements of
    /// those 8 blocks through [`encode16_regs`]. Per block the operations are those of
    /// `block_scale` (amax, `/ 6`, bf16 rounding, `* global_scale`, E4M3 encoding, the zero-scale
    /// substitute, `decode / global_scale`), each an IEEE operation on the same operands, so every
    /// bit is the same. Blocks after the last full group of 8 go through `block_scale` itself.
    /// Returns `None` when a block holds NaN or Inf (the caller reruns the row through the
    /// general kernel, which reports the first one).
    ///
    /// `bytes` holds `16 * scales.len()` BF16 values and `packed` `8 * scales.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) fn row_ct_bf16(
        gs: f32,
        bytes: &[u8],
        packed: &mut [u8],
        scales: &mut [u8],
    ) -> Option<Lanes> {
        use super::{bf16, e2m1, e4m3, LeBytes, RowQuant, Source, CT_ZERO_SCALE_EPS};
        let blocks = scales.len();
        if bytes.len() != 32 * blocks || packed.len() != 8 * blocks {
            return None;
        }
        let mut acc = Acc::load(&Lanes::default());
        let eps_code = e4m3::encode(CT_ZERO_SCALE_EPS) as i32;
        let full = blocks / 8 * 8;
        // SAFETY: every pointer below stays inside `bytes` (32 bytes per block), `scales` (one
        // byte per block) or `packed` (8 bytes per block), whose lengths were checked above;
        // the gather reads DECODE_LUT at codes 0..=0x7E.
        unsafe {
            let gsv = _mm256_set1_ps(gs);
            for g in (0..full).step_by(8) {
                let src = bytes.as_ptr().add(32 * g) as *const __m256i;
                // Block amax on the sign-cleared BF16 bits (they order like the values, and
                // widen exactly to the f32 bits the general kernel compares).
                let absmask = _mm256_set1_epi16(0x7FFF);
                let mut a = [_mm256_setzero_si256(); 8];
                for (j, r) in a.iter_mut().enumerate() {
                    *r = _mm256_and_si256(_mm256_loadu_si256(src.add(j)), absmask);
                }
                let m = transpose_max8(&a);
                // A block amax at or above 0x7F80 (Inf, NaN): the general kernel reports it.
                if _mm_movemask_epi8(_mm_cmpgt_epi16(m, _mm_set1_epi16(0x7F7F))) != 0 {
                    return None;
                }
                let amax = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(m)));
                let local = _mm256_div_ps(amax, _mm256_set1_ps(e2m1::E2M1_MAX));
                // bf16 round-to-nearest-even (`round_bf16`; the values are finite).
                let b = _mm256_castps_si256(local);
                let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let b = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd);
                let local = _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(-65536)));
                let code = e4m3_encode_nonneg(_mm256_mul_ps(gsv, local));
                let zero = _mm256_cmpeq_epi32(
                    _mm256_and_si256(code, _mm256_set1_epi32(0x7F)),
                    _mm256_setzero_si256(),
                );
                let code = _mm256_blendv_epi8(code, _mm256_set1_epi32(eps_code), zero);
                let dec = _mm256_i32gather_ps::<4>(e4m3::DECODE_LUT.as_ptr(), code);
                let effv = _mm256_div_ps(dec, gsv);
                let mut eff = [0f32; 8];
                _mm256_storeu_ps(eff.as_mut_ptr(), effv);
                _mm_storel_epi64(scales.as_mut_ptr().add(g) as *mut __m128i, low_bytes(code));
                // Below 2^16 a nonzero BF16 value (>= 2^-133) divided by the block's divisor is
                // at least 2^-149, so no quotient rounds to zero: the element codes then follow
                // from the BF16 bits alone (see `thresholds`). Larger divisors (tiny global
                // scales) take the division per element.
                let small = _mm256_cmp_ps::<_CMP_LT_OQ>(effv, _mm256_set1_ps(65536.0));
                if _mm256_movemask_ps(small) == 0xFF {
                    let k = thresholds(effv);
                    for (j, &e) in eff.iter().enumerate() {
                        let v = _mm256_loadu_si256(src.add(j));
                        let out = &mut *(packed.as_mut_ptr().add(8 * (g + j)) as *mut [u8; 8]);
                        encode16_bf16(v, &k, j, e, out, &mut acc);
                    }
                } else {
                    for (j, &e) in eff.iter().enumerate() {
                        let v = _mm256_loadu_si256(src.add(j));
                        let x0 = bf16_to_f32(_mm256_castsi256_si128(v));
                        let x1 = bf16_to_f32(_mm256_extracti128_si256::<1>(v));
                        let out = &mut *(packed.as_mut_ptr().add(8 * (g + j)) as *mut [u8; 8]);
                        encode16_regs::<true, false, true>(x0, x1, e, e, out, &mut acc);
                    }
                }
            }
        }
        let q = RowQuant::Nvfp4Ct {
            global_scale: gs,
            arith: crate::dtype::SrcDType::BF16,
        };
        let src = LeBytes::<bf16>::new(bytes);
        for b in full..blocks {
            let (code, v) = super::block_scale::<true, _>(q, &src, b).ok()?;
            scales[b] = code;
            let x = src.chunk(b);
            // SAFETY: x has 16 f32.
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                )
            };
            let out: &mut [u8; 8] = (&mut packed[8 * b..8 * b + 8]).try_into().ok()?;
            encode16_regs::<true, false, true>(x0, x1, v.s, v.mult, out, &mut acc);
        }
        let mut lanes = Lanes::default();
        acc.store(&mut lanes);
        Some(lanes)
    }

    /// For 8 blocks (divisors `eff`, finite and > 0): for each E2M1 threshold `t` the smallest
    /// BF16 magnitude pattern `K` whose quotient crosses it (`fl(f32(K) / eff) > t`, or `>=`),
    /// minus one, as `k[threshold][block]`: an element's magnitude code is then the number of
    /// thresholds with `|x| bits > k`. The quotient is monotone in the pattern, so `K` exists
    /// (0x7F80, +Inf, when no finite value crosses). `K` is `b0`, the smallest BF16 pattern at
    /// or above `fl(t * eff)`, when `b0` crosses, else `b0 + 1`: BF16 patterns are at least 2^-9
    /// apart relatively (2^-133 absolutely below 2^-126), the roundings of `t * eff` and of the
    /// quotient only 2^-24 relatively (2^-150 absolutely), so the quotient of `b0 - 1` stays
    /// below `t` and that of `b0 + 1` above it. The one test is the same division as the
    /// general kernel's.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn thresholds(eff: __m256) -> [[i16; 8]; 7] {
        let mut k = [[0i16; 8]; 7];
        for (out, &(t, ge)) in k.iter_mut().zip(&MAGNITUDE_THRESHOLDS) {
            let tv = _mm256_set1_ps(t);
            let y = _mm256_castps_si256(_mm256_mul_ps(tv, eff));
            let b0 = _mm256_srli_epi32::<16>(_mm256_add_epi32(y, _mm256_set1_epi32(0xFFFF)));
            let q = _mm256_div_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(b0)), eff);
            let crosses = if ge {
                _mm256_cmp_ps::<_CMP_GE_OQ>(q, tv)
            } else {
                _mm256_cmp_ps::<_CMP_GT_OQ>(q, tv)
            };
            let one = _mm256_set1_epi32(1);
            let kv =
                _mm256_blendv_epi8(_mm256_add_epi32(b0, one), b0, _mm256_castps_si256(crosses));
            let kv = _mm256_min_epi32(kv, _mm256_set1_epi32(0x7F80));
            let km1 = _mm256_sub_epi32(kv, one);
            // i32 lanes -1..=0x7F7F to i16, in lane order.
            let p = _mm256_permute4x64_epi64::<0b10_00>(_mm256_packs_epi32(km1, km1));
            // SAFETY: `out` holds 8 i16 (16 bytes).
            unsafe {
                _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(p))
            };
        }
        k
    }

    /// [`encode16_regs`] (division, no NaN) for one block of 16 BF16 values `v` whose
    /// thresholds are `k[..][j]` (from [`thresholds`]) and divisor `eff` (below 2^16): the codes
    /// come from 16-bit compares of the magnitude bits with the thresholds, the same codes as
    /// the compares of the quotients; a negative value gets the sign (its quotient is negative:
    /// nonzero, see the caller); the error sums are those of `encode16_regs`, same operations
    /// in the same order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn encode16_bf16(
        v: __m256i,
        k: &[[i16; 8]; 7],
        j: usize,
        eff: f32,
        out: &mut [u8; 8],
        acc: &mut Acc,
    ) {
        // |x| bits as the unsigned min of the bits with and without the sign (not an `and`, so
        // that LLVM keeps the signed 16-bit compares; see `codes8`).
        let a = _mm256_min_epu16(v, _mm256_xor_si256(v, _mm256_set1_epi16(i16::MIN)));
        let mut c = _mm256_setzero_si256();
        for kt in k {
            c = _mm256_sub_epi16(c, _mm256_cmpgt_epi16(a, _mm256_set1_epi16(kt[j])));
        }
        let neg = _mm256_andnot_si256(
            _mm256_cmpeq_epi16(a, _mm256_setzero_si256()),
            _mm256_srai_epi16::<15>(v),
        );
        let codes = _mm256_or_si256(c, _mm256_and_si256(neg, _mm256_set1_epi16(8)));
        // 32-bit lane j = e(2j) | e(2j+1) << 16; fold e(2j+1) down to bits 4..7.
        let p = _mm256_or_si256(codes, _mm256_srli_epi32::<12>(codes));
        // SAFETY: the store writes exactly the 8 bytes of `out`; E2M1_LUT has 16 f32.
        unsafe {
            _mm_storel_epi64(out.as_mut_ptr() as *mut __m128i, low_bytes(p));
            let lut = _mm256_loadu_ps(E2M1_LUT.as_ptr());
            let mv = _mm256_set1_ps(eff);
            let halves = [
                (
                    _mm256_castsi256_si128(v),
                    _mm256_castsi256_si128(c),
                    _mm256_castsi256_si128(neg),
                ),
                (
                    _mm256_extracti128_si256::<1>(v),
                    _mm256_extracti128_si256::<1>(c),
                    _mm256_extracti128_si256::<1>(neg),
                ),
            ];
            for (xh, ch, nh) in halves {
                let xv = bf16_to_f32(xh);
                let mag = _mm256_permutevar8x32_ps(lut, _mm256_cvtepu16_epi32(ch));
                let sign = _mm256_and_ps(
                    _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nh)),
                    _mm256_set1_ps(-0.0),
                );
                acc.add(xv, _mm256_mul_ps(_mm256_or_ps(mag, sign), mv));
            }
        }
    }

    /// 8 BF16 values widened to f32 (a 16-bit shift; exact).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bf16_to_f32(h: __m128i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    /// The largest of the 16 non-negative i16 lanes of each of `a[0..8]`, as 8 i16 lanes in
    /// order: pairs of registers are interleaved and reduced level by level (a transpose whose
    /// every step is also a max).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose_max8(a: &[__m256i; 8]) -> __m128i {
        let m01 = max_pairs16(a[0], a[1]);
        let m23 = max_pairs16(a[2], a[3]);
        let m45 = max_pairs16(a[4], a[5]);
        let m67 = max_pairs16(a[6], a[7]);
        let m0123 = _mm256_max_epi16(
            _mm256_unpacklo_epi32(m01, m23),
            _mm256_unpackhi_epi32(m01, m23),
        );
        let m4567 = _mm256_max_epi16(
            _mm256_unpacklo_epi32(m45, m67),
            _mm256_unpackhi_epi32(m45, m67),
        );
        let m = _mm256_max_epi16(
            _mm256_unpacklo_epi64(m0123, m4567),
            _mm256_unpackhi_epi64(m0123, m4567),
        );
        _mm_max_epi16(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m))
    }

    /// First step of [`transpose_max8`]: in each 128-bit half, lanes alternate x and y, each the
    /// max of two of that register's lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn max_pairs16(x: __m256i, y: __m256i) -> __m256i {
        _mm256_max_epi16(_mm256_unpacklo_epi16(x, y), _mm256_unpackhi_epi16(x, y))
    }

    /// [`crate::e4m3::encode`] of 8 non-negative, non-NaN values (`+Inf` included), as i32
    /// codes: the same integer and float operations lane by lane (the sign is 0).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn e4m3_encode_nonneg(x: __m256) -> __m256i {
        let a = _mm256_min_ps(x, _mm256_set1_ps(crate::e4m3::E4M3_MAX));
        let bits = _mm256_castps_si256(a);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(bits), _mm256_set1_epi32(1));
        let normal = _mm256_srli_epi32::<20>(_mm256_add_epi32(
            _mm256_add_epi32(bits, _mm256_set1_epi32(0x7_FFFF)),
            odd,
        ));
        let normal = _mm256_sub_epi32(normal, _mm256_set1_epi32(120 << 3));
        let sub = _mm256_add_ps(
            _mm256_mul_ps(a, _mm256_set1_ps(512.0)),
            _mm256_set1_ps(8_388_608.0),
        );
        let sub = _mm256_sub_epi32(_mm256_castps_si256(sub), _mm256_set1_epi32(0x4B00_0000));
        let is_normal = _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(0x3C7F_FFFF));
        let code = _mm256_blendv_epi8(sub, normal, is_normal);
        _mm256_and_si256(code, _mm256_set1_epi32(0xFF))
    }
}

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
