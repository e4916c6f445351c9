//! Times GPTQ's inverse-Hessian factor (`methods::gptq::inverse_hessian_factor`) on a random
//! positive-definite `[k, k]` Hessian `X^T X` (X: 2k rows of an LCG), and prints a checksum of
//! the factor so that two builds can be compared bit for bit.
//! `cargo run --release -p mimo-quant --example factor_bench -- K [REPEATS]`

use std::time::Instant;

use mimo_quant::methods::gptq::inverse_hessian_factor;

fn main() {
    let mut args = std::env::args().skip(1);
    let k: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let rows = 2 * k;
    let mut s = 12345u64;
    let x: Vec<f64> = (0..rows * k)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
        .collect();
    let mut h = vec![0.0f64; k * k];
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for i in 0..k {
            let xi = xr[i];
            for (hj, xj) in h[i * k..(i + 1) * k].iter_mut().zip(xr) {
                *hj += xi * xj;
            }
        }
    }
    let mut best = f64::INFINITY;
    let mut sum = 0u64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let (u, _) = inverse_hessian_factor(&h, k, 0.01).expect("factor");
        best = best.min(t.elapsed().as_secs_f64());
        sum = u
            .iter()
            .fold(0u64, |a, v| a.wrapping_mul(31).wrapping_add(v.to_bits()));
    }
    println!(
        "k {k}: {best:.3} s (best of {reps}), threads {}, checksum {sum:016x}",
        rayon::current_num_threads()
    );
}
