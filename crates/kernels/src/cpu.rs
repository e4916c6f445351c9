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
use crate::fp4::{block_multiplier, Fp4Error, Fp4Matrix};

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

/// Scalar reference: f32 weights `w` [n, k].
pub fn matmul_f32_ref(
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for t in 0..k {
                s += x[i * k + t] * w[j * k + t];
            }
            out[i * n + j] = s;
        }
    }
    Ok(())
}

/// Scalar reference: bf16 weights `w` [n, k].
pub fn matmul_bf16_ref(
    x: &[f32],
    w: &[bf16],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for t in 0..k {
                s += x[i * k + t] * w[j * k + t].to_f32();
            }
            out[i * n + j] = s;
        }
    }
    Ok(())
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
            let mut s = 0.0f32;
            for t in 0..k {
                s += x[i * k + t] * row[t];
            }
            out[i * n + j] = s;
        }
    }
    Ok(())
}

/// Sum of eight partial sums in a fixed tree order.
#[inline(always)]
fn tree8(a: [f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Dot product with eight interleaved partial sums (element t goes to lane t % 8).
#[inline]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    tree8(acc)
}

/// [`dot_f32`] with bf16 `b` (bf16 -> f32 is exact, so the result is the same as converting
/// first).
#[inline]
fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * bf16_to_f32(y[l]);
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * bf16_to_f32(*y);
    }
    tree8(acc)
}

#[inline(always)]
fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// Runs `row_fn(j, out_j)` for every weight row j in parallel, where `out_j` holds the m outputs
/// of feature j, then scatters the [n, m] result into `out` [m, n].
fn par_rows(m: usize, n: usize, out: &mut [f32], row_fn: impl Fn(usize, &mut [f32]) + Sync) {
    if m == 0 || n == 0 {
        return;
    }
    if m == 1 {
        // out is already [n] for one input row: write in place.
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, o)| {
                for (r, v) in o.iter_mut().enumerate() {
                    row_fn(t * ROWS_PER_TASK + r, std::slice::from_mut(v));
                }
            });
        return;
    }
    let mut tr = vec![0.0f32; n * m];
    tr.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, o)| {
            for (r, v) in o.chunks_exact_mut(m).enumerate() {
                row_fn(t * ROWS_PER_TASK + r, v);
            }
        });
    for (j, col) in tr.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
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
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    par_rows(m, n, out, |j, o| {
        let wr = &w[j * k..(j + 1) * k];
        for (i, v) in o.iter_mut().enumerate() {
            *v = dot_f32(&x[i * k..(i + 1) * k], wr);
        }
    });
    Ok(())
}

/// Fast bf16-weight matmul: `out[m, n] = x[m, k] · w[n, k]^T`, parallel over n.
pub fn matmul_bf16(
    x: &[f32],
    w: &[bf16],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<(), MatmulError> {
    let m = dims(x.len(), k, w.len(), n, out.len())?;
    par_rows(m, n, out, |j, o| {
        let wr = &w[j * k..(j + 1) * k];
        for (i, v) in o.iter_mut().enumerate() {
            *v = dot_bf16(&x[i * k..(i + 1) * k], wr);
        }
    });
    Ok(())
}

/// Partial dot of one FP4 block: E2M1 values (unscaled) times x, eight interleaved lanes over the
/// block's elements, fixed tree. `bytes` holds block/2 packed bytes, `x` block elements.
#[inline]
fn fp4_block_dot(bytes: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    // Four bytes = eight elements per step: element 2q -> lane (2q) % 8, 2q+1 -> lane (2q+1) % 8.
    for (b4, x8) in bytes.chunks_exact(4).zip(x.chunks_exact(8)) {
        for q in 0..4 {
            let [lo, hi] = BYTE_LUT[b4[q] as usize];
            acc[2 * q] += lo * x8[2 * q];
            acc[2 * q + 1] += hi * x8[2 * q + 1];
        }
    }
    tree8(acc)
}

/// Fast FP4 matmul: `out[m, n] = x[m, k] · dequant(w)^T`, parallel over n. Per output element:
/// for each block in order, `acc += multiplier * Σ e2m1 * x` (the block sum as in
/// [`fp4_block_dot`]), so scales are applied once per block rather than per element.
pub fn matmul_fp4(x: &[f32], w: &Fp4Matrix, out: &mut [f32]) -> Result<(), MatmulError> {
    w.validate()?;
    let (n, k) = (w.n, w.k);
    let m = dims(x.len(), k, n * k, n, out.len())?;
    let block = w.format.block_size();
    let bpr = k / block;
    par_rows(m, n, out, |j, o| {
        let packed = &w.packed[j * k / 2..(j + 1) * k / 2];
        let scales = &w.scales[j * bpr..(j + 1) * bpr];
        for (i, v) in o.iter_mut().enumerate() {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = 0.0f32;
            for (b, &code) in scales.iter().enumerate() {
                let mult = block_multiplier(w.format, code, w.global_scale);
                let p = fp4_block_dot(
                    &packed[b * block / 2..(b + 1) * block / 2],
                    &xr[b * block..(b + 1) * block],
                );
                acc += mult * p;
            }
            *v = acc;
        }
    });
    Ok(())
}
