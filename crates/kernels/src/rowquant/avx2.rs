//! AVX2 version of the row quantizer's `encode16`: the same operations in the same order, 8
//! lanes at a time (chosen at run time where the CPU has AVX2).

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
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
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
        let kv = _mm256_blendv_epi8(_mm256_add_epi32(b0, one), b0, _mm256_castps_si256(crosses));
        let kv = _mm256_min_epi32(kv, _mm256_set1_epi32(0x7F80));
        let km1 = _mm256_sub_epi32(kv, one);
        // i32 lanes -1..=0x7F7F to i16, in lane order.
        let p = _mm256_permute4x64_epi64::<0b10_00>(_mm256_packs_epi32(km1, km1));
        // SAFETY: `out` holds 8 i16 (16 bytes).
        unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(p)) };
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
