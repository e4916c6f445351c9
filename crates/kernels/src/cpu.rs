//! CPU matmul kernels used by the runtime: `out[m, n] = x[m, k] · w[n, k]^T` with `w` in f32,
//! bf16 or packed FP4 (dequantized block by block inside the kernel, never as a whole matrix).
//!
//! Each kernel has a scalar reference (`*_ref`: one sequential sum per output element) and a
//! rayon-parallel fast version. The fast versions split the work over output features `n`;
//! every output element is still summed by one thread in one fixed order (eight interleaved
//! partial sums combined by a fixed tree, blocks in order), so results are bit-identical on
//! any thread count and for any batch size `m` (row i of a batch equals the m = 1 result for
//! x row i). They differ from the references only by floating-point rounding.

use half::bf16;
use rayon::prelude::*;

use crate::e2m1::BYTE_LUT;
use crate::fp4::{block_multiplier, decode_block, Fp4Error, Fp4Matrix};

/// Weight rows handled by one parallel task (output features).
const ROWS_PER_TASK: usize = 16;

/// Shape errors of the matmul kernels.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatmulError {
    /// The inner dimension k is zero.
    #[error("inner dimension k must be > 0")]
    ZeroK,
    /// x does not hold a whole number of rows of length k.
    #[error("x has {len} elements, not a multiple of k = {k}")]
    XShape {
        /// elements in x
        len: usize,
        /// inner dimension
        k: usize,
    },
    /// w does not have n * k elements.
    #[error("w has {got} elements, expected n * k = {expected}")]
    WShape {
        /// n * k
        expected: usize,
        /// elements in w
        got: usize,
    },
    /// out does not have m * n elements.
    #[error("out has {got} elements, expected m * n = {expected}")]
    OutShape {
        /// m * n
        expected: usize,
        /// elements in out
        got: usize,
    },
    /// The FP4 matrix is malformed (lengths, global scale, NaN scale).
    #[error(transparent)]
    Fp4(#[from] Fp4Error),
}

/// Checks the shapes and returns m.
fn dims(
    x_len: usize,
    k: usize,
    w_len: usize,
    n: usize,
    out_len: usize,
) -> Result<usize, MatmulError> {
    if k == 0 {
        return Err(MatmulError::ZeroK);
    }
    if x_len % k != 0 {
        return Err(MatmulError::XShape { len: x_len, k });
    }
    let m = x_len / k;
    let expected = n.checked_mul(k).ok_or(MatmulError::WShape {
        expected: usize::MAX,
        got: w_len,
    })?;
    if w_len != expected {
        return Err(MatmulError::WShape {
            expected,
            got: w_len,
        });
    }
    if out_len != m * n {
        return Err(MatmulError::OutShape {
            expected: m * n,
            got: out_len,
        });
    }
    Ok(m)
}

/// Sequential dot product of the scalar references: `sum a[t] * widen(b[t])`, t in order.
fn dot_ref<T: Copy>(a: &[f32], b: &[T], widen: impl Fn(T) -> f32) -> f32 {
    let mut s = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        s += x * widen(y);
    }
    s
}

/// The scalar reference of [`matmul_f32_ref`] and [`matmul_bf16_ref`], over any weight element
/// type widened to f32 by `widen`.
fn matmul_dense_ref<T: Copy>(
    x: &[f32],
    w: &[T],
    n: usize,
    k: usize,
    out: &mut [f32],
    widen: impl Fn(T) -> f32 + Copy,
) -> Result<(), MatmulError> {
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = dot_ref(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k], widen);
        }
    }
    Ok(())
}

/// Scalar reference: f32 weights `w` [n, k].
pub fn matmul_f32_ref(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    matmul_dense_ref(x, w, n, k, out, |v| v)
}

/// Scalar reference: bf16 weights `w` [n, k].
pub fn matmul_bf16_ref(
    x: &[f32],
    w: &[bf16],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    matmul_dense_ref(x, w, n, k, out, bf16::to_f32)
}

/// Scalar reference: FP4 weights. Each weight row is dequantized (block multiplier times E2M1
/// value, as [`crate::fp4::dequantize_row`]) and summed sequentially.
pub fn matmul_fp4_ref(x: &[f32], w: &Fp4Matrix, out: &mut [f32]) -> Result<(), MatmulError> {
    w.validate()?;
    let (n, k) = (w.n, w.k);
    let m = dims(x.len(), k, n * k, n, out.len())?;
    let mut row = vec![0.0f32; k];
    for j in 0..n {
        crate::fp4::dequantize_row(w, j, &mut row)?;
        for i in 0..m {
            out[i * n + j] = dot_ref(&x[i * k..(i + 1) * k], &row, |v| v);
        }
    }
    Ok(())
}

/// Sum of eight partial sums in a fixed tree order.
#[inline(always)]
fn tree8(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// True when the AVX2 paths (here and in [`crate::rowquant`]) can run on this CPU. They compute
/// exactly the same operations in the same order as the portable code (no FMA), so the choice
/// never changes a result.
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight element type of the dense fast kernels: widened to f32 exactly, 8 at a time with
/// AVX2.
trait DenseWeight: Copy + Sync {
    /// The f32 value (exact).
    fn widen(self) -> f32;

    /// Loads 8 consecutive weights from `p` and widens them to f32 lanes.
    ///
    /// # Safety
    /// AVX2 is present and `p` points to 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl DenseWeight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl DenseWeight for bf16 {
    /// bf16 -> f32 is a 16-bit shift; exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// Dot product with eight interleaved partial sums (element t goes to lane t % 8, lanes
/// combined by [`tree8`]). This order defines every fast kernel's result. bf16 -> f32 is exact,
/// so a bf16 `b` gives the same result as converting it first.
// Not inlined: inlined into the matmul closures it cost about 40 more instructions per call
// (callgrind, gemv_bench).
#[inline(never)]
fn dot<T: DenseWeight>(a: &[f32], b: &[T], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 support was checked at run time by the caller.
        return unsafe { simd::dot(a, b) };
    }
    let _ = avx2;
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].widen();
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y.widen();
    }
    tree8(acc)
}

/// Runs `rows_fn(j0, out)` over groups of weight rows in parallel: `out` holds the m outputs of
/// features j0, j0+1, ... (feature-major, `ROWS_PER_TASK` features at most), then scatters the
/// [n, m] result into `out` [m, n].
fn par_rows(m: usize, n: usize, out: &mut [f32], rows_fn: impl Fn(usize, &mut [f32]) + Sync) {
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        // out is already feature-major for one input row: write in place.
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, o)| rows_fn(t * ROWS_PER_TASK, o));
        return;
    }
    let mut tr = vec![0.0f32; n * m];
    tr.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, o)| rows_fn(t * ROWS_PER_TASK, o));
    for (j, col) in tr.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

/// The dense matmul of [`matmul_f32`] and [`matmul_bf16`], over either weight element type:
/// parallel over output rows, each element summed in one fixed order ([`dot`]).
fn matmul_dense<T: DenseWeight>(
    x: &[f32],
    w: &[T],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    let avx2 = use_avx2();
    par_rows(m, n, out, |j0, o| {
        let rows = o.len() / m.max(1);
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // Tiles of 4 rows x 2 tokens (each weight and activation vector loaded once per
            // tile, 8 independent sums in flight instead of one dependent chain); every element
            // summed exactly as `dot` does, so the result is bit-identical to the loop below.
            while r + 4 <= rows {
                let wr = |q: usize| &w[(j0 + r + q) * k..(j0 + r + q + 1) * k];
                // SAFETY: AVX2 was checked at run time.
                unsafe { four_rows_avx2(x, m, k, [wr(0), wr(1), wr(2), wr(3)], &mut o[r * m..]) };
                r += 4;
            }
        }
        for (rr, oj) in o.chunks_exact_mut(m).enumerate().skip(r) {
            let wr = &w[(j0 + rr) * k..(j0 + rr + 1) * k];
            for (i, v) in oj.iter_mut().enumerate() {
                *v = dot(&x[i * k..(i + 1) * k], wr, avx2);
            }
        }
    });
    Ok(())
}

/// Outputs of four weight rows for all `m` tokens into `o` (feature-major: `o[q * m + i]`),
/// in 4 x 2 tiles of [`simd::dot_tile`]: each element bit-identical to [`dot`].
///
/// # Safety
/// AVX2 is present; `x` holds `m` rows of `k`, each of `ws` `k` elements, `o` at least `4 * m`.
#[cfg(target_arch = "x86_64")]
unsafe fn four_rows_avx2<T: DenseWeight>(
    x: &[f32],
    m: usize,
    k: usize,
    ws: [&[T]; 4],
    o: &mut [f32],
) {
    let mut i = 0;
    while i + 2 <= m {
        let xs = [&x[i * k..(i + 1) * k], &x[(i + 1) * k..(i + 2) * k]];
        let d = simd::dot_tile::<T, 4, 2>(xs, ws);
        for (c, dc) in d.iter().enumerate() {
            for (q, &v) in dc.iter().enumerate() {
                o[q * m + i + c] = v;
            }
        }
        i += 2;
    }
    if i < m {
        let d = simd::dot_tile::<T, 4, 1>([&x[i * k..(i + 1) * k]], ws);
        for (q, &v) in d[0].iter().enumerate() {
            o[q * m + i] = v;
        }
    }
}

/// Fast f32 matmul: `out[m, n] = x[m, k] · w[n, k]^T`, parallel over n.
pub fn matmul_f32(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    matmul_dense(x, w, n, k, out)
}

/// Fast bf16-weight matmul: `out[m, n] = x[m, k] · w[n, k]^T`, parallel over n. Bit-identical
/// to [`matmul_f32`] on the widened weights.
pub fn matmul_bf16(
    x: &[f32],
    w: &[bf16],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    matmul_dense(x, w, n, k, out)
}

/// Multiplier of every possible scale byte for this matrix (the same f32 values as
/// [`block_multiplier`], computed once per call instead of once per block).
fn multiplier_table(w: &Fp4Matrix) -> [f32; 256] {
    let mut t = [0.0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        *v = block_multiplier(w.format, c as u8, w.global_scale);
    }
    t
}

/// Decodes one packed row into f32 weights: `e2m1 * multiplier` (exactly the values of
/// [`crate::fp4::dequantize_row`]).
fn decode_row(packed: &[u8], scales: &[u8], block: usize, mults: &[f32; 256], out: &mut [f32]) {
    for ((o, bytes), &code) in out
        .chunks_exact_mut(block)
        .zip(packed.chunks_exact(block / 2))
        .zip(scales)
    {
        decode_block(bytes, mults[code as usize], o);
    }
}

/// Dot of x with one FP4 row, portable version: element t contributes
/// `(e2m1_t * multiplier) * x_t` to lane t % 8, so the result equals [`dot`] of x with the
/// dequantized row, bit for bit.
fn fp4_row_dot_portable(
    packed: &[u8],
    scales: &[u8],
    block: usize,
    mults: &[f32; 256],
    x: &[f32],
) -> f32 {
    let mut acc = [0.0f32; 8];
    for ((bytes, xb), &code) in packed
        .chunks_exact(block / 2)
        .zip(x.chunks_exact(block))
        .zip(scales)
    {
        let mult = mults[code as usize];
        for (b4, x8) in bytes.chunks_exact(4).zip(xb.chunks_exact(8)) {
            for q in 0..4 {
                let [lo, hi] = BYTE_LUT[b4[q] as usize];
                acc[2 * q] += (lo * mult) * x8[2 * q];
                acc[2 * q + 1] += (hi * mult) * x8[2 * q + 1];
            }
        }
    }
    tree8(acc)
}

/// Fast FP4 matmul: `out[m, n] = x[m, k] · dequant(w)^T`, parallel over n, weights decoded
/// block by block inside the kernel. For m = 1 each row is decoded and multiplied in one pass
/// (two rows at a time with AVX2, sharing the loads of x); for m > 1 each weight row is
/// decoded once into a k-element buffer and reused for all m inputs. Either way the result is
/// bit-identical to [`matmul_f32`] on `dequantize(w)`.
///
/// Only the shape is checked per call ([`Fp4Matrix::validate_shape`]); a NaN block scale gives
/// NaN outputs. Run [`Fp4Matrix::validate`] once when the matrix is loaded to reject those.
pub fn matmul_fp4(x: &[f32], w: &Fp4Matrix, out: &mut [f32]) -> Result<(), MatmulError> {
    w.validate_shape()?;
    let (n, k) = (w.n, w.k);
    let m = dims(x.len(), k, n * k, n, out.len())?;
    let block = w.format.block_size();
    let bpr = k / block;
    let mults = multiplier_table(w);
    let avx2 = use_avx2();
    let row = |j: usize| {
        (
            &w.packed[j * k / 2..(j + 1) * k / 2],
            &w.scales[j * bpr..(j + 1) * bpr],
        )
    };
    if m == 1 {
        par_rows(1, n, out, |j0, o| {
            let mut r = 0;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                while r + 2 <= o.len() {
                    let (p0, s0) = row(j0 + r);
                    let (p1, s1) = row(j0 + r + 1);
                    // SAFETY: AVX2 checked at run time; slices have k/2 bytes, k/block scales
                    // and x has k elements (shapes validated above).
                    let (a, b) = unsafe { simd::fp4_dot2(p0, s0, p1, s1, block, &mults, x) };
                    o[r] = a;
                    o[r + 1] = b;
                    r += 2;
                }
            }
            while r < o.len() {
                let (p, s) = row(j0 + r);
                o[r] = fp4_row_dot_portable(p, s, block, &mults, x);
                r += 1;
            }
        });
        return Ok(());
    }
    par_rows(m, n, out, |j0, o| {
        // Each row decoded once (exactly `dequantize`'s values, so a dot with the decoded row
        // equals the FP4 dot bit for bit), then the dense kernel's 4 x 2 tiles over the tokens.
        let rows = o.len() / m;
        let mut buf = vec![0.0f32; 4 * k];
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            while r + 4 <= rows {
                for (q, b) in buf.chunks_exact_mut(k).enumerate() {
                    let (p, s) = row(j0 + r + q);
                    decode_row(p, s, block, &mults, b);
                }
                let (b0, rest) = buf.split_at(k);
                let (b1, rest) = rest.split_at(k);
                let (b2, b3) = rest.split_at(k);
                // SAFETY: AVX2 was checked at run time; shapes validated above.
                unsafe { four_rows_avx2(x, m, k, [b0, b1, b2, b3], &mut o[r * m..]) };
                r += 4;
            }
        }
        let b = &mut buf[..k];
        for (rr, oj) in o.chunks_exact_mut(m).enumerate().skip(r) {
            let (p, s) = row(j0 + rr);
            decode_row(p, s, block, &mults, b);
            for (i, v) in oj.iter_mut().enumerate() {
                *v = dot(&x[i * k..(i + 1) * k], b, avx2);
            }
        }
    });
    Ok(())
}

/// AVX2 versions of the dot products. Same lanes, same operations (separate multiply and add,
/// no FMA) and the same final [`tree8`] as the portable code, hence the same bits.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{tree8, DenseWeight};

    /// How far ahead of the current block the FP4 loop prefetches packed weights.
    const PREFETCH_BYTES: usize = 512;

    /// Twice the E2M1 value of each code, as i8 (the -0 code gives 0, which cannot change a sum
    /// that starts at +0).
    const LUT2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let mut a = [0.0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        tree8(a)
    }

    /// Portable `dot` semantics with 8-wide vectors.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot<T: DenseWeight>(a: &[f32], b: &[T]) -> f32 {
        let len = a.len().min(b.len());
        let main = len / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut t = 0;
        while t < main {
            let va = _mm256_loadu_ps(a.as_ptr().add(t));
            let vb = T::load8(b.as_ptr().add(t));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(va, vb));
            t += 8;
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        for l in 0..len - main {
            lanes[l] += a[main + l] * b[main + l].widen();
        }
        tree8(lanes)
    }

    /// `dot` of `R` weight rows with `C` activation rows at once: `out[c][r] = dot(x[c], w[r])`,
    /// each sum formed exactly as `dot` forms it (lane l adds elements l, l + 8, ... in order,
    /// then the tail, then `tree8`), so the results are bit-identical to `R * C` calls of
    /// `dot`; each weight and activation vector is loaded once per tile, and the `R * C` sums are
    /// independent chains. All slices must hold the same number of elements.
    #[target_feature(enable = "avx2")]
    #[inline(never)]
    pub unsafe fn dot_tile<T: DenseWeight, const R: usize, const C: usize>(
        x: [&[f32]; C],
        w: [&[T]; R],
    ) -> [[f32; R]; C] {
        let len = w[0].len();
        let main = len / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); R]; C];
        let mut t = 0;
        while t < main {
            let mut vw = [_mm256_setzero_ps(); R];
            for (v, wr) in vw.iter_mut().zip(&w) {
                *v = T::load8(wr.as_ptr().add(t));
            }
            for (ac, xc) in acc.iter_mut().zip(&x) {
                let vx = _mm256_loadu_ps(xc.as_ptr().add(t));
                for (a, v) in ac.iter_mut().zip(&vw) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(vx, *v));
                }
            }
            t += 8;
        }
        let mut out = [[0.0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[c][r]);
                for l in 0..len - main {
                    lanes[l] += x[c][main + l] * w[r][main + l].widen();
                }
                out[c][r] = tree8(lanes);
            }
        }
        out
    }

    /// Decodes 8 packed bytes (16 elements, in element order) to two vectors of E2M1 values.
    #[inline(always)]
    unsafe fn decode16(p: *const u8, lut: __m128i, mask: __m128i) -> (__m256, __m256) {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        // Element 2i is the low nibble of byte i: interleave low and high nibbles.
        let idx = _mm_unpacklo_epi8(lo, hi);
        let v = _mm_shuffle_epi8(lut, idx);
        let half = _mm256_set1_ps(0.5);
        // Integer * 0.5 is exact: these are the E2M1 values themselves.
        let w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), half);
        let w1 = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))),
            half,
        );
        (w0, w1)
    }

    /// Dots of x with two FP4 rows at once (x loaded once for both). Per element:
    /// `acc[t % 8] += (e2m1 * mult) * x`, as the portable `fp4_row_dot_portable`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn fp4_dot2(
        p0: &[u8],
        s0: &[u8],
        p1: &[u8],
        s1: &[u8],
        block: usize,
        mults: &[f32; 256],
        x: &[f32],
    ) -> (f32, f32) {
        // The group count per block is a constant in each instance, so the inner loop unrolls.
        if block == 16 {
            fp4_dot2_g::<1>(p0, s0, p1, s1, mults, x)
        } else {
            fp4_dot2_g::<2>(p0, s0, p1, s1, mults, x)
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn fp4_dot2_g<const G: usize>(
        p0: &[u8],
        s0: &[u8],
        p1: &[u8],
        s1: &[u8],
        mults: &[f32; 256],
        x: &[f32],
    ) -> (f32, f32) {
        let lut = _mm_loadu_si128(super::simd::LUT2.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let groups_per_block = G;
        let blocks = (p0.len().min(p1.len()).min(x.len() / 2)) / (8 * groups_per_block);
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        for b in 0..blocks.min(s0.len()).min(s1.len()) {
            let m0 = _mm256_set1_ps(mults[s0[b] as usize]);
            let m1 = _mm256_set1_ps(mults[s1[b] as usize]);
            // Software prefetch a few cache lines ahead in both rows: each row pair starts new
            // streams that the hardware prefetcher only picks up after a few misses. Prefetching
            // past a row's end touches the next rows, which are processed next; it never faults.
            let ahead = b * groups_per_block * 8 + PREFETCH_BYTES;
            _mm_prefetch(p0.as_ptr().wrapping_add(ahead) as *const i8, _MM_HINT_T0);
            _mm_prefetch(p1.as_ptr().wrapping_add(ahead) as *const i8, _MM_HINT_T0);
            for gi in 0..groups_per_block {
                let g = b * groups_per_block + gi;
                let xp = x.as_ptr().add(g * 16);
                let x0 = _mm256_loadu_ps(xp);
                let x1 = _mm256_loadu_ps(xp.add(8));
                let (w0, w1) = decode16(p0.as_ptr().add(g * 8), lut, mask);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_mul_ps(w0, m0), x0));
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_mul_ps(w1, m0), x1));
                let (v0, v1) = decode16(p1.as_ptr().add(g * 8), lut, mask);
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_mul_ps(v0, m1), x0));
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_mul_ps(v1, m1), x1));
            }
        }
        (hsum(a0), hsum(a1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// The tiled dense matmul gives every element the bits of one portable `dot` (row and
    /// token counts off the 4 x 2 tile, K with and without a tail, both weight types).
    #[test]
    fn tiled_dense_matmul_matches_dot_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for &(m, n, k) in &[
            (1usize, 7usize, 64usize),
            (2, 4, 9),
            (3, 33, 77),
            (5, 16, 256),
            (8, 18, 1000),
        ] {
            let x = rand_vec(&mut rng, m * k);
            let w = rand_vec(&mut rng, n * k);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let (mut o, mut ob) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            matmul_f32(&x, &w, n, k, &mut o).unwrap();
            matmul_bf16(&x, &wb, n, k, &mut ob).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let xi = &x[i * k..(i + 1) * k];
                    let want = dot(xi, &w[j * k..(j + 1) * k], false);
                    let wantb = dot(xi, &wb[j * k..(j + 1) * k], false);
                    assert_eq!(
                        o[i * n + j].to_bits(),
                        want.to_bits(),
                        "f32 m={m} n={n} k={k} ({i}, {j})"
                    );
                    assert_eq!(
                        ob[i * n + j].to_bits(),
                        wantb.to_bits(),
                        "bf16 m={m} n={n} k={k} ({i}, {j})"
                    );
                }
            }
        }
    }

    /// The FP4 matmul over several tokens (rows decoded once, then the dense tiles) gives each
    /// element the bits of the f32 `dot` with the dequantized row, both formats.
    #[test]
    fn fp4_matmul_tokens_match_dot_bitwise() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for &(m, n, k) in &[(2usize, 7usize, 64usize), (3, 18, 160), (5, 33, 320)] {
            let w = rand_vec(&mut rng, n * k);
            let x = rand_vec(&mut rng, m * k);
            for q in [
                crate::fp4::quantize_nvfp4(
                    &w,
                    n,
                    k,
                    crate::fp4::nvfp4_global_scale(crate::fp4::amax(&w)),
                )
                .unwrap(),
                crate::fp4::quantize_mxfp4(&w, n, k).unwrap(),
            ] {
                let d = crate::fp4::dequantize(&q).unwrap();
                let mut o = vec![f32::NAN; m * n];
                matmul_fp4(&x, &q, &mut o).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let want = dot(&x[i * k..(i + 1) * k], &d[j * k..(j + 1) * k], false);
                        assert_eq!(
                            o[i * n + j].to_bits(),
                            want.to_bits(),
                            "{:?} m={m} n={n} k={k} ({i}, {j})",
                            q.format
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 paths give the same bits as the portable code (when AVX2 is present).
    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        if !use_avx2() {
            eprintln!("skip: no AVX2 on this CPU");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for len in [1usize, 7, 8, 9, 31, 64, 77, 1000] {
            let a = rand_vec(&mut rng, len);
            let b = rand_vec(&mut rng, len);
            let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(dot(&a, &b, true).to_bits(), dot(&a, &b, false).to_bits());
            assert_eq!(dot(&a, &bb, true).to_bits(), dot(&a, &bb, false).to_bits());
        }
        for (fmt_nv, k) in [(true, 16usize), (true, 160), (false, 32), (false, 320)] {
            let w = rand_vec(&mut rng, 2 * k);
            let x = rand_vec(&mut rng, k);
            let m = if fmt_nv {
                let gs = crate::fp4::nvfp4_global_scale(crate::fp4::amax(&w) * 3.0);
                crate::fp4::quantize_nvfp4(&w, 2, k, gs).unwrap()
            } else {
                crate::fp4::quantize_mxfp4(&w, 2, k).unwrap()
            };
            let block = m.format.block_size();
            let mults = multiplier_table(&m);
            let (a, b) = unsafe {
                simd::fp4_dot2(
                    m.row_packed(0),
                    m.row_scales(0),
                    m.row_packed(1),
                    m.row_scales(1),
                    block,
                    &mults,
                    &x,
                )
            };
            let pa = fp4_row_dot_portable(m.row_packed(0), m.row_scales(0), block, &mults, &x);
            let pb = fp4_row_dot_portable(m.row_packed(1), m.row_scales(1), block, &mults, &x);
            assert_eq!(
                (a.to_bits(), b.to_bits()),
                (pa.to_bits(), pb.to_bits()),
                "k {k}"
            );
            // And both equal the f32 dot with the dequantized row.
            let d = crate::fp4::dequantize(&m).unwrap();
            assert_eq!(pa.to_bits(), dot(&x, &d[..k], false).to_bits());
        }
    }
}
