//! Linear layers with weights kept as stored (dense BF16/F16/F32 or packed FP4) and their
//! matmul: `out[m, n] = x[m, k] @ W[n, k]^T (+ bias)`.
//!
//! Weights are decoded one row at a time inside the matmul, never expanded for a whole matrix.
//! Work is split over output rows (each row's dot products are computed by one thread in a
//! fixed order), so results are identical on any thread count.

use mimo_kernels::{Fp4Error, Fp4Matrix, SrcDType};
use rayon::prelude::*;

/// A dense weight matrix `[n, k]` holding the checkpoint's raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    /// Element type of `data`.
    pub dtype: SrcDType,
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features).
    pub k: usize,
    /// `n * k * dtype.size()` bytes, row-major.
    pub data: Vec<u8>,
}

impl DenseMatrix {
    /// Decodes row `r` into `out` (length k).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let w = self.k * self.dtype.size();
        // Lengths are checked at construction, so this conversion cannot fail.
        let _ = mimo_kernels::dtype::convert_row(self.dtype, &self.data[r * w..(r + 1) * w], out);
    }
}

/// The stored form of a Linear weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense BF16/F16/F32.
    Dense(DenseMatrix),
    /// Packed FP4 (NVFP4 or MXFP4), dequantized block by block in the kernel.
    Fp4(Fp4Matrix),
}

/// Errors building a [`Linear`].
#[derive(Debug, thiserror::Error)]
pub enum LinearError {
    /// Dense data length does not match the shape.
    #[error("dense weight [{n}, {k}] {dtype:?} needs {expected} bytes, got {got}")]
    DenseLength {
        /// rows
        n: usize,
        /// columns
        k: usize,
        /// element type
        dtype: SrcDType,
        /// bytes needed
        expected: usize,
        /// bytes given
        got: usize,
    },
    /// The FP4 matrix is inconsistent or holds a NaN scale.
    #[error("FP4 weight: {0}")]
    Fp4(#[from] Fp4Error),
    /// The bias length differs from the number of output features.
    #[error("bias has {got} elements, the weight has {n} output features")]
    BiasLength {
        /// output features
        n: usize,
        /// bias length
        got: usize,
    },
}

/// A Linear layer: weight `[n, k]` and an optional f32 bias of length n.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight as stored.
    pub weight: Weight,
    /// Optional bias.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Builds a dense Linear, checking the byte length.
    pub fn dense(m: DenseMatrix, bias: Option<Vec<f32>>) -> Result<Linear, LinearError> {
        let expected = m.n * m.k * m.dtype.size();
        if m.data.len() != expected {
            return Err(LinearError::DenseLength {
                n: m.n,
                k: m.k,
                dtype: m.dtype,
                expected,
                got: m.data.len(),
            });
        }
        Linear::with_bias(Weight::Dense(m), bias)
    }

    /// Builds an FP4 Linear, validating buffers and scales (a NaN scale is an error here, not
    /// a NaN in the logits later).
    pub fn fp4(m: Fp4Matrix, bias: Option<Vec<f32>>) -> Result<Linear, LinearError> {
        m.validate()?;
        Linear::with_bias(Weight::Fp4(m), bias)
    }

    fn with_bias(weight: Weight, bias: Option<Vec<f32>>) -> Result<Linear, LinearError> {
        let l = Linear { weight, bias };
        if let Some(b) = &l.bias {
            if b.len() != l.n() {
                return Err(LinearError::BiasLength {
                    n: l.n(),
                    got: b.len(),
                });
            }
        }
        Ok(l)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        match &self.weight {
            Weight::Dense(d) => d.n,
            Weight::Fp4(f) => f.n,
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match &self.weight {
            Weight::Dense(d) => d.k,
            Weight::Fp4(f) => f.k,
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(d) => d.data.len(),
            Weight::Fp4(f) => f.packed.len() + f.scales.len() + 4,
        }
    }

    /// Decodes weight row `r` into `out` (length k).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match &self.weight {
            Weight::Dense(d) => d.row_into(r, out),
            // Validated at construction, so dequantization cannot fail.
            Weight::Fp4(f) => {
                let _ = mimo_kernels::dequantize_row(f, r, out);
            }
        }
    }

    /// `out[m, n] = x[m, k] @ W^T + bias`. Panics if the slice lengths disagree with m, n, k
    /// (an internal invariant of the decoder, not user input).
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n(), self.k());
        assert_eq!(x.len(), m * k, "Linear input length");
        assert_eq!(out.len(), m * n, "Linear output length");
        matmul_rows(self, x, m, out);
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    /// Allocating form of [`Linear::forward`].
    pub fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * self.n()];
        self.forward(x, m, &mut out);
        out
    }
}

/// Output rows handled per rayon task: enough work per task to amortize scheduling.
const ROWS_PER_TASK: usize = 16;

/// Row-parallel matmul: each task decodes `ROWS_PER_TASK` weight rows once and multiplies them
/// with every input row. The result is written transposed per task and scattered in order.
fn matmul_rows(l: &Linear, x: &[f32], m: usize, out: &mut [f32]) {
    let (n, k) = (l.n(), l.k());
    if n == 0 || m == 0 {
        return;
    }
    // outT[n, m]: task t owns rows t*ROWS_PER_TASK.. of W, i.e. a contiguous slice of outT.
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, chunk)| {
            let mut wrow = vec![0.0f32; k];
            for (j, orow) in chunk.chunks_exact_mut(m).enumerate() {
                l.row_into(t * ROWS_PER_TASK + j, &mut wrow);
                for (i, o) in orow.iter_mut().enumerate() {
                    *o = dot(&x[i * k..(i + 1) * k], &wrow);
                }
            }
        });
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
}

/// Dot product with 8 independent accumulators (vectorizable, fixed order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect()
    }

    /// Scalar reference: f64 sums over the decoded weight.
    fn reference(
        w: &[f32],
        bias: Option<&[f32]>,
        x: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t] as f64;
                }
                out[i * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        out
    }

    #[test]
    fn dense_bf16_matches_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (m, n, k) = (5, 37, 72);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let wb = bf16_bytes(&w);
        let wr: Vec<f32> = w
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let l = Linear::dense(
            DenseMatrix {
                dtype: SrcDType::BF16,
                n,
                k,
                data: wb,
            },
            Some(bias.clone()),
        )
        .unwrap();
        let got = l.apply(&x, m);
        let want = reference(&wr, Some(&bias), &x, m, n, k);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn fp4_matches_dequantized_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (m, n, k) = (3, 20, 64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let gs = mimo_kernels::nvfp4_global_scale(mimo_kernels::fp4::amax(&w));
        let q = mimo_kernels::quantize_nvfp4(&w, n, k, gs).unwrap();
        let wd = mimo_kernels::dequantize(&q).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let l = Linear::fp4(q, None).unwrap();
        let got = l.apply(&x, m);
        let want = reference(&wd, None, &x, m, n, k);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let d = DenseMatrix {
            dtype: SrcDType::BF16,
            n: 2,
            k: 4,
            data: vec![0; 15],
        };
        assert!(matches!(
            Linear::dense(d, None),
            Err(LinearError::DenseLength { .. })
        ));
        let d = DenseMatrix {
            dtype: SrcDType::F32,
            n: 2,
            k: 4,
            data: vec![0; 32],
        };
        assert!(matches!(
            Linear::dense(d, Some(vec![0.0; 3])),
            Err(LinearError::BiasLength { .. })
        ));
    }
}
