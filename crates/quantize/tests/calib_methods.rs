//! MSE scale search and GPTQ on random data: never worse than RTN on the weighted error (MSE),
//! lower output error than RTN on correlated inputs (GPTQ), deterministic, bad input rejected.

use mimo_kernels::fp4::{dequantize, quantize_mxfp4, quantize_nvfp4, Fp4Format, Fp4Matrix};
use mimo_quant::methods::gptq::{inverse_hessian_factor, quantize_gptq, DEFAULT_DAMP};
use mimo_quant::methods::mse::quantize_mse;
use mimo_quant::methods::MethodError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn weights(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<f32> {
    // Heavy-ish tails: some outliers per row, as real weights have.
    (0..n * k)
        .map(|i| {
            let v = normal(rng) * 0.05;
            if i % 37 == 0 {
                v * 6.0
            } else {
                v
            }
        })
        .collect()
}

fn rtn(w: &[f32], n: usize, k: usize, f: Fp4Format, gs: f32) -> Fp4Matrix {
    match f {
        Fp4Format::Nvfp4 => quantize_nvfp4(w, n, k, gs).unwrap(),
        Fp4Format::Mxfp4 => quantize_mxfp4(w, n, k).unwrap(),
    }
}

fn weighted_err(w: &[f32], q: &Fp4Matrix, d: &[f64]) -> f64 {
    let deq = dequantize(q).unwrap();
    let k = q.k;
    w.iter()
        .zip(&deq)
        .enumerate()
        .map(|(i, (&a, &b))| d[i % k] * ((a - b) as f64).powi(2))
        .sum()
}

fn gs_of(w: &[f32]) -> f32 {
    mimo_kernels::fp4::nvfp4_global_scale(mimo_kernels::fp4::amax(w))
}

#[test]
fn mse_never_worse_than_rtn_and_better_overall() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (n, k) = (48, 256);
    for f in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
        let w = weights(&mut rng, n, k);
        let gs = gs_of(&w);
        let d: Vec<f64> = (0..k)
            .map(|_| (normal(&mut rng) as f64).powi(2) + 0.01)
            .collect();
        let r = rtn(&w, n, k, f, gs);
        let m = quantize_mse(&w, n, k, f, gs, Some(&d)).unwrap();
        m.validate().unwrap();
        // Per block: never worse.
        let (dr, dm) = (dequantize(&r).unwrap(), dequantize(&m).unwrap());
        let b = f.block_size();
        for blk in 0..n * k / b {
            let err = |x: &[f32]| -> f64 {
                (0..b)
                    .map(|j| {
                        let i = blk * b + j;
                        d[i % k] * ((w[i] - x[i]) as f64).powi(2)
                    })
                    .sum()
            };
            assert!(err(&dm) <= err(&dr) * (1.0 + 1e-12), "{f} block {blk}");
        }
        let (er, em) = (weighted_err(&w, &r, &d), weighted_err(&w, &m, &d));
        eprintln!(
            "{f}: weighted err rtn {er:.4e} mse {em:.4e} ({:.1}%)",
            100.0 * em / er
        );
        assert!(em < 0.97 * er, "{f}: mse {em} not clearly below rtn {er}");
        // Uniform weights (no calibration) also improve the plain squared error.
        let u = quantize_mse(&w, n, k, f, gs, None).unwrap();
        let ones = vec![1.0; k];
        assert!(weighted_err(&w, &u, &ones) < weighted_err(&w, &r, &ones));
    }
}

/// Correlated inputs: X = Z A with a random mixing matrix and per-channel scales.
fn correlated_x(rng: &mut ChaCha8Rng, m: usize, k: usize) -> Vec<f32> {
    let a: Vec<f32> = (0..k * k)
        .map(|i| {
            if i % (k + 1) == 0 {
                1.0
            } else {
                normal(rng) * 0.15
            }
        })
        .collect();
    let scale: Vec<f32> = (0..k).map(|_| 0.2 + normal(rng).abs() * 2.0).collect();
    let z: Vec<f32> = (0..m * k).map(|_| normal(rng)).collect();
    let mut x = vec![0f32; m * k];
    for t in 0..m {
        for j in 0..k {
            let mut s = 0.0;
            for p in 0..k {
                s += z[t * k + p] * a[p * k + j];
            }
            x[t * k + j] = s * scale[j];
        }
    }
    x
}

fn hessian(x: &[f32], m: usize, k: usize) -> Vec<f64> {
    let mut h = vec![0f64; k * k];
    for t in 0..m {
        let row = &x[t * k..(t + 1) * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    h
}

fn output_err(x: &[f32], m: usize, w: &[f32], q: &Fp4Matrix) -> f64 {
    let (n, k) = (q.n, q.k);
    let deq = dequantize(q).unwrap();
    let mut e = 0.0f64;
    for t in 0..m {
        for r in 0..n {
            let mut s = 0.0f64;
            for j in 0..k {
                s += x[t * k + j] as f64 * (w[r * k + j] - deq[r * k + j]) as f64;
            }
            e += s * s;
        }
    }
    e.sqrt()
}

#[test]
fn gptq_lowers_output_error_vs_rtn_and_mse() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (n, k, m) = (32, 128, 512);
    let x = correlated_x(&mut rng, m, k);
    let h = hessian(&x, m, k);
    let d: Vec<f64> = (0..k).map(|j| h[j * k + j] / m as f64).collect();
    for f in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
        let w = weights(&mut rng, n, k);
        let gs = gs_of(&w);
        let r = rtn(&w, n, k, f, gs);
        let ms = quantize_mse(&w, n, k, f, gs, Some(&d)).unwrap();
        let g = quantize_gptq(&w, n, k, f, gs, &h, DEFAULT_DAMP).unwrap();
        g.validate().unwrap();
        let (er, em, eg) = (
            output_err(&x, m, &w, &r),
            output_err(&x, m, &w, &ms),
            output_err(&x, m, &w, &g),
        );
        eprintln!("{f}: ||X(W-Q)^T|| rtn {er:.4} mse {em:.4} gptq {eg:.4}");
        assert!(em <= er, "{f}: mse {em} > rtn {er}");
        assert!(eg < 0.85 * er, "{f}: gptq {eg} not clearly below rtn {er}");
        assert!(eg < em, "{f}: gptq {eg} not below mse {em}");
    }
}

#[test]
fn gptq_is_deterministic_across_thread_counts() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, k, m) = (40, 64, 200);
    let x = correlated_x(&mut rng, m, k);
    let h = hessian(&x, m, k);
    let w = weights(&mut rng, n, k);
    let gs = gs_of(&w);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            (
                quantize_gptq(&w, n, k, Fp4Format::Nvfp4, gs, &h, DEFAULT_DAMP).unwrap(),
                quantize_mse(&w, n, k, Fp4Format::Mxfp4, 1.0, None).unwrap(),
            )
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn inverse_hessian_factor_matches_the_inverse() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (k, m) = (24, 100);
    let x = correlated_x(&mut rng, m, k);
    let h = hessian(&x, m, k);
    let (u, damp) = inverse_hessian_factor(&h, k, 0.0).unwrap();
    assert_eq!(damp, 0.0);
    // (U^T U) H = I.
    for i in 0..k {
        for j in 0..k {
            let mut s = 0.0;
            for p in 0..k {
                let mut hinv = 0.0;
                for q in 0..k {
                    hinv += u[q * k + i] * u[q * k + p];
                }
                s += hinv * h[p * k + j];
            }
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((s - want).abs() < 1e-8, "({i},{j}) = {s}");
        }
    }
    // U is upper triangular.
    for i in 0..k {
        for j in 0..i {
            assert_eq!(u[i * k + j], 0.0);
        }
    }
}

#[test]
fn rank_deficient_hessian_is_damped_and_dead_columns_survive() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, k, m) = (8, 32, 4); // m < k: rank 4
    let mut x = correlated_x(&mut rng, m, k);
    for t in 0..m {
        x[t * k + 5] = 0.0; // a dead channel
    }
    let h = hessian(&x, m, k);
    let w = weights(&mut rng, n, k);
    let g = quantize_gptq(&w, n, k, Fp4Format::Mxfp4, 1.0, &h, DEFAULT_DAMP).unwrap();
    g.validate().unwrap();
    // The dead channel is decoupled in H^-1: it gets no error feedback, so it is its original
    // weight rounded to nearest under the block's chosen scale (not zeroed).
    let deq = dequantize(&g).unwrap();
    for r in 0..n {
        let mult = mimo_kernels::fp4::block_multiplier(Fp4Format::Mxfp4, g.scales[r], 1.0);
        let want =
            mimo_kernels::e2m1::decode(mimo_kernels::fp4::ct_round_e2m1(w[r * k + 5] / mult))
                * mult;
        assert_eq!(deq[r * k + 5], want, "row {r}");
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let w = vec![0.1f32; 4 * 32];
    let h = vec![0.0f64; 32 * 32];
    let mut bad = w.clone();
    bad[17] = f32::NAN;
    assert_eq!(
        quantize_mse(&bad, 4, 32, Fp4Format::Nvfp4, 1.0, None),
        Err(MethodError::NonFinite {
            what: "weight",
            index: 17
        })
    );
    assert!(matches!(
        quantize_mse(&w, 4, 32, Fp4Format::Nvfp4, 1.0, Some(&[1.0; 31])),
        Err(MethodError::Length { .. })
    ));
    assert!(matches!(
        quantize_mse(&w, 4, 32, Fp4Format::Nvfp4, f32::INFINITY, None),
        Err(MethodError::Fp4(_))
    ));
    assert!(matches!(
        quantize_gptq(&w, 4, 32, Fp4Format::Mxfp4, 1.0, &h[..100], 0.01),
        Err(MethodError::Length { .. })
    ));
    assert!(matches!(
        quantize_gptq(&w, 4, 32, Fp4Format::Mxfp4, 1.0, &h, -1.0),
        Err(MethodError::BadDamping(_))
    ));
    assert!(matches!(
        quantize_gptq(
            &w[..4 * 24],
            4,
            24,
            Fp4Format::Mxfp4,
            1.0,
            &h[..24 * 24],
            0.01
        ),
        Err(MethodError::Fp4(_))
    ));
    // An all-zero Hessian (no tokens) still works: every column is dead, damping makes it I.
    let g = quantize_gptq(&w, 4, 32, Fp4Format::Mxfp4, 1.0, &h, 0.01).unwrap();
    assert_eq!(
        g,
        quantize_mse(&w, 4, 32, Fp4Format::Mxfp4, 1.0, None).unwrap()
    );
}

#[test]
fn gptq_act_order_and_loss_scales_stay_well_below_rtn_and_are_deterministic() {
    use mimo_quant::methods::gptq::{quantize_gptq_with, BlockScale, GptqOptions};
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (n, k, m) = (32, 128, 512);
    let x = correlated_x(&mut rng, m, k);
    let h = hessian(&x, m, k);
    for f in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
        let w = weights(&mut rng, n, k);
        let gs = gs_of(&w);
        let er = output_err(&x, m, &w, &rtn(&w, n, k, f, gs));
        let plain = quantize_gptq(&w, n, k, f, gs, &h, DEFAULT_DAMP).unwrap();
        // The default options are plain GPTQ, bit for bit.
        let same = quantize_gptq_with(
            &w,
            n,
            k,
            f,
            gs,
            &h,
            &GptqOptions {
                damp: DEFAULT_DAMP,
                ..GptqOptions::default()
            },
        )
        .unwrap();
        assert_eq!(plain, same);
        let ep = output_err(&x, m, &w, &plain);
        for (act_order, block_scale, refine) in [
            (true, BlockScale::Diag, 0),
            (false, BlockScale::Loss, 0),
            (true, BlockScale::Loss, 0),
            (false, BlockScale::Diag, 3),
            (true, BlockScale::Diag, 3),
        ] {
            let o = GptqOptions {
                damp: DEFAULT_DAMP,
                act_order,
                block_scale,
                refine,
                mse_scale_search: false,
            };
            let run = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| quantize_gptq_with(&w, n, k, f, gs, &h, &o).unwrap())
            };
            let g = run(1);
            assert_eq!(g, run(2), "{f} {o:?}: thread count changed the output");
            g.validate().unwrap();
            assert_ne!(g, plain, "{f} {o:?}: option had no effect");
            let eg = output_err(&x, m, &w, &g);
            eprintln!("{f} {o:?}: ||X(W-Q)^T|| rtn {er:.4} gptq {ep:.4} variant {eg:.4}");
            assert!(eg < 0.85 * er, "{f} {o:?}: {eg} not clearly below rtn {er}");
            assert!(
                eg < 1.1 * ep,
                "{f} {o:?}: {eg} much worse than plain gptq {ep}"
            );
        }
    }
}
