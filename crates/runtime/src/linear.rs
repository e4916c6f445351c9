//! Linear layers with weights kept as stored (BF16, F32 or packed FP4) and their matmul,
//! `out[m, n] = x[m, k] @ W[n, k]^T (+ bias)`, through the CPU kernels of `mimo_kernels::cpu`:
//! FP4 weights are dequantized block by block inside the kernel, never expanded for a whole
//! matrix. The kernels split work over output rows with a fixed summation order, so results are
//! identical on any thread count.

use half::bf16;
use mimo_kernels::cpu::{matmul_bf16, matmul_f32, matmul_fp4, MatmulError};
use mimo_kernels::{Fp4Error, Fp4Matrix, SrcDType};

/// A dense weight matrix `[n, k]`.
#[derive(Debug, Clone)]
pub enum DenseMatrix {
    /// BF16 weights, as stored in the checkpoint.
    Bf16 {
        /// rows (output features)
        n: usize,
        /// columns (input features)
        k: usize,
        /// n * k values, row-major
        data: Vec<bf16>,
    },
    /// F32 weights (F32 checkpoints, and F16 ones widened at load: the kernels have no F16 path).
    F32 {
        /// rows (output features)
        n: usize,
        /// columns (input features)
        k: usize,
        /// n * k values, row-major
        data: Vec<f32>,
    },
}

impl DenseMatrix {
    /// Builds a matrix from raw little-endian checkpoint bytes.
    pub fn from_bytes(
        dtype: SrcDType,
        n: usize,
        k: usize,
        bytes: &[u8],
    ) -> Result<DenseMatrix, LinearError> {
        let expected = n * k * dtype.size();
        if bytes.len() != expected {
            return Err(LinearError::DenseLength {
                n,
                k,
                dtype,
                expected,
                got: bytes.len(),
            });
        }
        Ok(match dtype {
            SrcDType::BF16 => DenseMatrix::Bf16 {
                n,
                k,
                data: bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            },
            SrcDType::F32 | SrcDType::F16 => {
                let mut data = vec![0.0f32; n * k];
                mimo_kernels::dtype::convert_row(dtype, bytes, &mut data).map_err(|_| {
                    LinearError::DenseLength {
                        n,
                        k,
                        dtype,
                        expected,
                        got: bytes.len(),
                    }
                })?;
                DenseMatrix::F32 { n, k, data }
            }
        })
    }

    fn shape(&self) -> (usize, usize) {
        match self {
            DenseMatrix::Bf16 { n, k, .. } | DenseMatrix::F32 { n, k, .. } => (*n, *k),
        }
    }
}

/// The stored form of a Linear weight.
#[derive(Debug, Clone)]
pub enum Weight {
    /// Dense BF16/F32.
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
    /// Builds a dense Linear.
    pub fn dense(m: DenseMatrix, bias: Option<Vec<f32>>) -> Result<Linear, LinearError> {
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
            Weight::Dense(d) => d.shape().0,
            Weight::Fp4(f) => f.n,
        }
    }

    /// Input features.
    pub fn k(&self) -> usize {
        match &self.weight {
            Weight::Dense(d) => d.shape().1,
            Weight::Fp4(f) => f.k,
        }
    }

    /// Whether the weight is packed FP4.
    pub fn is_fp4(&self) -> bool {
        matches!(self.weight, Weight::Fp4(_))
    }

    /// Bytes the weight occupies in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(DenseMatrix::Bf16 { data, .. }) => data.len() * 2,
            Weight::Dense(DenseMatrix::F32 { data, .. }) => data.len() * 4,
            Weight::Fp4(f) => f.packed.len() + f.scales.len() + 4,
        }
    }

    /// Decodes weight row `r` into `out` (length k): embedding lookups.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.k();
        match &self.weight {
            Weight::Dense(DenseMatrix::Bf16 { data, .. }) => {
                for (o, w) in out.iter_mut().zip(&data[r * k..(r + 1) * k]) {
                    *o = w.to_f32();
                }
            }
            Weight::Dense(DenseMatrix::F32 { data, .. }) => {
                out.copy_from_slice(&data[r * k..(r + 1) * k])
            }
            // Validated at construction, so dequantization cannot fail.
            Weight::Fp4(f) => {
                let _ = mimo_kernels::dequantize_row(f, r, out);
            }
        }
    }

    /// `out[m, n] = x[m, k] @ W^T + bias`. The shapes are the decoder's own invariants (the
    /// weights were checked against the config at load), so a mismatch is a bug and panics.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        let r: Result<(), MatmulError> = match &self.weight {
            Weight::Dense(DenseMatrix::Bf16 { n, k, data }) => matmul_bf16(x, data, *n, *k, out),
            Weight::Dense(DenseMatrix::F32 { n, k, data }) => matmul_f32(x, data, *n, *k, out),
            Weight::Fp4(f) => matmul_fp4(x, f, out),
        };
        if let Err(e) = r {
            panic!("Linear [{}, {}]: {e}", self.n(), self.k());
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    /// Allocating form of [`Linear::forward`] for `m` input rows.
    pub fn apply(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * self.n()];
        self.forward(x, &mut out);
        out
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
        let d = DenseMatrix::from_bytes(SrcDType::BF16, n, k, &wb).unwrap();
        let l = Linear::dense(d, Some(bias.clone())).unwrap();
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
        assert!(matches!(
            DenseMatrix::from_bytes(SrcDType::BF16, 2, 4, &[0; 15]),
            Err(LinearError::DenseLength { .. })
        ));
        let d = DenseMatrix::from_bytes(SrcDType::F32, 2, 4, &[0; 32]).unwrap();
        assert!(matches!(
            Linear::dense(d, Some(vec![0.0; 3])),
            Err(LinearError::BiasLength { .. })
        ));
    }
}
