//! CPU matmul kernels: fast versions against the scalar references and an f64 exact sum, on
//! random data with awkward shapes; determinism across thread counts and batch sizes.

use half::bf16;
use mimo_kernels::cpu::{self, MatmulError};
use mimo_kernels::fp4::{self, Fp4Matrix};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.1f32..2.0))
        .collect()
}

/// Checks `got` against the exact (f64) product of `x` [m, k] and the effective f32 weights
/// `w` [n, k], with the standard bound for a k-term f32 sum: |err| <= 2 k eps Σ|x w| (+ a tiny
/// absolute term for sums that cancel to near zero).
fn check_against_exact(
    name: &str,
    got: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut mag) = (0.0f64, 0.0f64);
            for t in 0..k {
                let p = x[i * k + t] as f64 * w[j * k + t] as f64;
                exact += p;
                mag += p.abs();
            }
            let bound = 2.0 * k as f64 * f32::EPSILON as f64 * mag + 1e-30;
            let err = (got[i * n + j] as f64 - exact).abs();
            assert!(
                err <= bound,
                "{name} m={m} n={n} k={k} [{i},{j}]: got {} exact {exact} err {err:e} bound {bound:e}",
                got[i * n + j]
            );
        }
    }
}

const SHAPES: [(usize, usize, usize); 6] = [
    (1, 33, 32),
    (3, 33, 96),
    (7, 33, 160),
    (1, 33, 4096),
    (7, 33, 1024),
    (3, 1, 64),
];

#[test]
fn f32_fast_and_reference_match_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (m, n, k) in SHAPES {
        let x = randn(&mut rng, m * k);
        let w = randn(&mut rng, n * k);
        let mut a = vec![0.0; m * n];
        let mut b = vec![0.0; m * n];
        cpu::matmul_f32_ref(&x, &w, n, k, &mut a).unwrap();
        cpu::matmul_f32(&x, &w, n, k, &mut b).unwrap();
        check_against_exact("f32 ref", &a, &x, &w, m, n, k);
        check_against_exact("f32 fast", &b, &x, &w, m, n, k);
    }
}

#[test]
fn bf16_fast_and_reference_match_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (m, n, k) in SHAPES {
        let x = randn(&mut rng, m * k);
        let wb: Vec<bf16> = randn(&mut rng, n * k)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let mut a = vec![0.0; m * n];
        let mut b = vec![0.0; m * n];
        cpu::matmul_bf16_ref(&x, &wb, n, k, &mut a).unwrap();
        cpu::matmul_bf16(&x, &wb, n, k, &mut b).unwrap();
        check_against_exact("bf16 ref", &a, &x, &wf, m, n, k);
        check_against_exact("bf16 fast", &b, &x, &wf, m, n, k);
        // Same reduction order as the f32 kernel on the widened weights.
        let mut c = vec![0.0; m * n];
        cpu::matmul_f32(&x, &wf, n, k, &mut c).unwrap();
        assert_eq!(b, c);
    }
}

fn fp4_matrices(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<Fp4Matrix> {
    let w = randn(rng, n * k);
    let gs = fp4::nvfp4_global_scale(fp4::amax(&w));
    vec![
        fp4::quantize_nvfp4(&w, n, k, gs).unwrap(),
        fp4::quantize_mxfp4(&w, n, k).unwrap(),
    ]
}

#[test]
fn fp4_fast_and_reference_match_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (m, n, k) in SHAPES {
        for wq in fp4_matrices(&mut rng, n, k) {
            let x = randn(&mut rng, m * k);
            let wd = fp4::dequantize(&wq).unwrap();
            let mut a = vec![0.0; m * n];
            let mut b = vec![0.0; m * n];
            cpu::matmul_fp4_ref(&x, &wq, &mut a).unwrap();
            cpu::matmul_fp4(&x, &wq, &mut b).unwrap();
            let name = format!("{} ", wq.format);
            check_against_exact(&(name.clone() + "ref"), &a, &x, &wd, m, n, k);
            check_against_exact(&(name + "fast"), &b, &x, &wd, m, n, k);
            // The FP4 kernel is the f32 kernel on the dequantized weights, bit for bit.
            let mut c = vec![0.0; m * n];
            cpu::matmul_f32(&x, &wd, n, k, &mut c).unwrap();
            assert_eq!(b, c, "{} m={m} k={k}", wq.format);
        }
    }
}

#[test]
fn fast_kernels_are_deterministic_over_threads_and_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (m, n, k) = (7, 67, 512);
    let x = randn(&mut rng, m * k);
    let w = randn(&mut rng, n * k);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let mats = fp4_matrices(&mut rng, n, k);
    let run = |threads: usize, x: &[f32]| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let rows = x.len() / k;
            let mut outs = vec![vec![0.0f32; rows * n]; 4];
            cpu::matmul_f32(x, &w, n, k, &mut outs[0]).unwrap();
            cpu::matmul_bf16(x, &wb, n, k, &mut outs[1]).unwrap();
            cpu::matmul_fp4(x, &mats[0], &mut outs[2]).unwrap();
            cpu::matmul_fp4(x, &mats[1], &mut outs[3]).unwrap();
            outs
        })
    };
    let one = run(1, &x);
    assert_eq!(one, run(2, &x));
    assert_eq!(one, run(3, &x));
    // Row i of the batch is bit-identical to the m = 1 product of x row i.
    for i in 0..m {
        let single = run(2, &x[i * k..(i + 1) * k]);
        for (batch, s) in one.iter().zip(&single) {
            assert_eq!(&batch[i * n..(i + 1) * n], &s[..]);
        }
    }
}

#[test]
fn shape_errors() {
    let mut out = vec![0.0; 4];
    assert_eq!(
        cpu::matmul_f32(&[0.0; 8], &[0.0; 8], 2, 0, &mut out),
        Err(MatmulError::ZeroK)
    );
    assert!(matches!(
        cpu::matmul_f32(&[0.0; 7], &[0.0; 8], 2, 4, &mut out),
        Err(MatmulError::XShape { len: 7, k: 4 })
    ));
    assert!(matches!(
        cpu::matmul_bf16(&[0.0; 8], &[bf16::ZERO; 6], 2, 4, &mut out),
        Err(MatmulError::WShape {
            expected: 8,
            got: 6
        })
    ));
    assert!(matches!(
        cpu::matmul_f32_ref(&[0.0; 8], &[0.0; 8], 2, 4, &mut out[..3]),
        Err(MatmulError::OutShape {
            expected: 4,
            got: 3
        })
    ));
    let mut q = fp4::quantize_mxfp4(&[1.0; 64], 2, 32).unwrap();
    assert!(matches!(
        cpu::matmul_fp4(&[0.0; 31], &q, &mut out[..2]),
        Err(MatmulError::XShape { .. })
    ));
    q.scales[0] = 255;
    // The reference validates every scale; the fast kernel checks only the shape per call and
    // lets a NaN scale through as NaN outputs (validate() at load time rejects it).
    assert!(matches!(
        cpu::matmul_fp4_ref(&[0.0; 32], &q, &mut out[..2]),
        Err(MatmulError::Fp4(_))
    ));
    assert!(q.validate().is_err());
    cpu::matmul_fp4(&[1.0; 32], &q, &mut out[..2]).unwrap();
    assert!(out[0].is_nan() && out[1].is_finite());
}
