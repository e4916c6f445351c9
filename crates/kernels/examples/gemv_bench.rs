//! Micro benchmark of the CPU matmul, decode-shaped (m = 1) by default, on a 4096 x 4096 weight:
//! prints the median and best time per call and the weight bytes streamed per second (and, from
//! m > 1, GFLOP/s), for f32, bf16, NVFP4 and MXFP4. No assertions; numbers depend on the
//! machine. Run with `cargo run -p mimo-kernels --release --example gemv_bench [-- N K ITERS M]`.

use std::time::Instant;

use half::bf16;
use mimo_kernels::{cpu, fp4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (median, minimum) seconds per call over `iters` timed calls after 3 warm-up calls.
fn time_calls(iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, k, iters, m) = (arg(1, 4096), arg(2, 4096), arg(3, 50), arg(4, 1).max(1));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let nv = fp4::quantize_nvfp4(&w, n, k, fp4::nvfp4_global_scale(fp4::amax(&w)))?;
    let mx = fp4::quantize_mxfp4(&w, n, k)?;
    let mut out = vec![0.0f32; m * n];
    println!(
        "m={m} n={n} k={k} threads={} iters={iters}",
        rayon::current_num_threads()
    );
    let report = |name: &str, bytes: usize, (med, min): (f64, f64)| {
        println!(
            "{name:>6}: median {:7.3} ms {:6.2} GB/s | best {:7.3} ms {:6.2} GB/s  ({} weight bytes; {:.1} GFLOP/s at the median)",
            med * 1e3,
            bytes as f64 / med / 1e9,
            min * 1e3,
            bytes as f64 / min / 1e9,
            bytes,
            2.0 * (m * n * k) as f64 / med / 1e9
        );
    };
    let s = time_calls(iters, || {
        cpu::matmul_f32(&x, &w, n, k, &mut out).unwrap_or(())
    });
    report("f32", n * k * 4, s);
    let s = time_calls(iters, || {
        cpu::matmul_bf16(&x, &wb, n, k, &mut out).unwrap_or(())
    });
    report("bf16", n * k * 2, s);
    let s = time_calls(iters, || cpu::matmul_fp4(&x, &nv, &mut out).unwrap_or(()));
    report("nvfp4", nv.packed.len() + nv.scales.len(), s);
    let s = time_calls(iters, || cpu::matmul_fp4(&x, &mx, &mut out).unwrap_or(()));
    report("mxfp4", mx.packed.len() + mx.scales.len(), s);
    Ok(())
}
