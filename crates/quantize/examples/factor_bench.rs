//! Times GPTQ on one `[n, k]` weight: the inverse-Hessian factor
//! (`methods::gptq::inverse_hessian_factor`) of a random positive-definite `[k, k]` Hessian
//! (symmetric, entries in [-0.5, 0.5), `k` added to the diagonal), then `quantize_gptq` of a
//! random NVFP4 weight with it; prints checksums of the factor and of the codes so that two
//! builds can be compared bit for bit.
//! `cargo run --release -p mimo-quant --example factor_bench -- K [N]`

use std::time::Instant;

use mimo_kernels::fp4::Fp4Format;
use mimo_quant::methods::gptq::{inverse_hessian_factor, quantize_gptq};

fn lcg(s: &mut u64) -> f64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
}

fn checksum(bits: impl Iterator<Item = u64>) -> u64 {
    bits.fold(0u64, |a, v| a.wrapping_mul(31).wrapping_add(v))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let k: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let mut s = 12345u64;
    let mut h = vec![0.0f64; k * k];
    for i in 0..k {
        for j in 0..i {
            let v = lcg(&mut s);
            h[i * k + j] = v;
            h[j * k + i] = v;
        }
        h[i * k + i] = k as f64 + lcg(&mut s);
    }
    let t = Instant::now();
    let (u, _) = inverse_hessian_factor(&h, k, 0.01).expect("factor");
    let tf = t.elapsed().as_secs_f64();
    let cu = checksum(u.iter().map(|v| v.to_bits()));
    print!(
        "k {k}: factor {tf:.3} s (checksum {cu:016x}), threads {}",
        rayon::current_num_threads()
    );
    if n > 0 {
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut s) as f32 * 0.1).collect();
        let t = Instant::now();
        let m =
            quantize_gptq(&w, n, k, Fp4Format::Nvfp4, 448.0 * 6.0 / 0.05, &h, 0.01).expect("gptq");
        let tg = t.elapsed().as_secs_f64();
        let cq = checksum(m.packed.iter().chain(&m.scales).map(|&b| u64::from(b)));
        print!("; gptq n {n}: {tg:.3} s with its factor (checksum {cq:016x})");
    }
    println!();
}
