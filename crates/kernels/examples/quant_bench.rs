//! Micro benchmark of the per-row FP4 quantizers on one thread: ns per element for NVFP4
//! (compressed-tensors, bf16 and f32 scale arithmetic), NVFP4 ModelOpt, MXFP4, the NVFP4 row
//! dequantizer, and the converter's whole per-row path (BF16 bytes -> f32 row -> quantize ->
//! dequantize -> error sums) and its fused replacement (BF16 bytes -> codes, scales and error sums
//! in one pass). Data: Gaussian-like BF16 weights with a few outliers.
//!
//! Run with `cargo run -p mimo-kernels --release --example quant_bench [-- ROWS K REPS [NAME]]`.
//! With NAME only that case runs, REPS times without warm-up or timing output: made for
//! instruction counts under `valgrind --tool=callgrind` (the difference between two REPS values
//! divided by the extra elements is instructions per element, set-up excluded).

use std::time::Instant;

use half::bf16;
use mimo_kernels::dtype::{convert_row, SrcDType};
use mimo_kernels::fp4::{
    self, dequantize_row, modelopt_weight_scale_2, nvfp4_global_scale_in, quantize_row_mxfp4,
    quantize_row_nvfp4, quantize_row_nvfp4_in, quantize_row_nvfp4_modelopt, Fp4Format, Fp4Matrix,
};
use mimo_kernels::rowquant::{self, RowQuant};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Everything one case needs: the source bytes, their f32 values and output buffers.
struct Data {
    rows: usize,
    k: usize,
    bytes: Vec<u8>,
    w: Vec<f32>,
    gs: f32,
    ws2: f32,
    packed: Vec<u8>,
    scales: Vec<u8>,
    out: Vec<f32>,
}

impl Data {
    fn new(rows: usize, k: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let w: Vec<f32> = (0..rows * k)
            .map(|i| {
                let g: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                let v = if i % 997 == 0 { g * 0.4 } else { g * 0.02 };
                bf16::from_f32(v).to_f32()
            })
            .collect();
        let bytes: Vec<u8> = w
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let amax = fp4::amax(&w);
        Data {
            rows,
            k,
            bytes,
            gs: nvfp4_global_scale_in(amax, SrcDType::BF16).unwrap_or(1.0),
            ws2: modelopt_weight_scale_2(amax),
            w,
            packed: vec![0; k / 2],
            scales: vec![0; k / 16],
            out: vec![0.0; k],
        }
    }
}

type Case = fn(&mut Data) -> f64;

fn rows_of(d: &Data) -> impl Iterator<Item = usize> {
    0..d.rows
}

fn nvfp4_ct_bf16(d: &mut Data) -> f64 {
    let k = d.k;
    for r in rows_of(d) {
        quantize_row_nvfp4_in(
            &d.w[r * k..(r + 1) * k],
            d.gs,
            SrcDType::BF16,
            &mut d.packed,
            &mut d.scales,
        )
        .expect("quantize");
    }
    d.packed[0] as f64
}

fn nvfp4_ct_f32(d: &mut Data) -> f64 {
    let k = d.k;
    for r in rows_of(d) {
        quantize_row_nvfp4(&d.w[r * k..(r + 1) * k], d.gs, &mut d.packed, &mut d.scales)
            .expect("quantize");
    }
    d.packed[0] as f64
}

fn nvfp4_modelopt(d: &mut Data) -> f64 {
    let k = d.k;
    for r in rows_of(d) {
        quantize_row_nvfp4_modelopt(
            &d.w[r * k..(r + 1) * k],
            d.ws2,
            &mut d.packed,
            &mut d.scales[..k / 16],
        )
        .expect("quantize");
    }
    d.packed[0] as f64
}

fn mxfp4(d: &mut Data) -> f64 {
    let k = d.k;
    for r in rows_of(d) {
        quantize_row_mxfp4(
            &d.w[r * k..(r + 1) * k],
            &mut d.packed,
            &mut d.scales[..k / 32],
        )
        .expect("quantize");
    }
    d.packed[0] as f64
}

fn one_row_matrix(d: &Data) -> Fp4Matrix {
    Fp4Matrix {
        format: Fp4Format::Nvfp4,
        n: 1,
        k: d.k,
        packed: d.packed.clone(),
        scales: d.scales.clone(),
        global_scale: d.gs,
    }
}

fn dequant_nvfp4(d: &mut Data) -> f64 {
    quantize_row_nvfp4(&d.w[..d.k], d.gs, &mut d.packed, &mut d.scales).expect("quantize");
    let m = one_row_matrix(d);
    for _ in rows_of(d) {
        dequantize_row(&m, 0, &mut d.out).expect("dequantize");
    }
    d.out[0] as f64
}

/// The converter's row loop as crates/quantize/src/quantizer.rs ran it before the fused entry:
/// bytes -> f32, quantize, dequantize through a one-row matrix, 8-lane error sums.
fn converter_row_path(d: &mut Data) -> f64 {
    let k = d.k;
    let mut row = vec![0f32; k];
    let (mut sig, mut noise, mut mx) = (0f64, 0f64, 0f32);
    for r in rows_of(d) {
        convert_row(
            SrcDType::BF16,
            &d.bytes[r * 2 * k..(r + 1) * 2 * k],
            &mut row,
        )
        .expect("convert");
        quantize_row_nvfp4_in(&row, d.gs, SrcDType::BF16, &mut d.packed, &mut d.scales)
            .expect("quantize");
        let m = one_row_matrix(d);
        dequantize_row(&m, 0, &mut d.out).expect("dequantize");
        let (mut s, mut n, mut m) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for (a, b) in row.chunks_exact(8).zip(d.out.chunks_exact(8)) {
            for l in 0..8 {
                let e = a[l] - b[l];
                s[l] += a[l] * a[l];
                n[l] += e * e;
                m[l] = m[l].max(e.abs());
            }
        }
        sig += s.iter().map(|&v| v as f64).sum::<f64>();
        noise += n.iter().map(|&v| v as f64).sum::<f64>();
        mx = m.iter().fold(mx, |a, &v| a.max(v));
    }
    sig + noise + mx as f64
}

/// The fused entry the converter can use instead: BF16 bytes straight to codes, scales and error
/// sums (`rowquant::quantize_row_bytes_with_error`).
fn converter_fused(d: &mut Data) -> f64 {
    let k = d.k;
    let q = RowQuant::Nvfp4Ct {
        global_scale: d.gs,
        arith: SrcDType::BF16,
    };
    let (mut sig, mut noise, mut mx) = (0f64, 0f64, 0f32);
    for r in rows_of(d) {
        let e = rowquant::quantize_row_bytes_with_error(
            q,
            SrcDType::BF16,
            &d.bytes[r * 2 * k..(r + 1) * 2 * k],
            &mut d.packed,
            &mut d.scales,
        )
        .expect("quantize");
        sig += e.signal;
        noise += e.noise;
        mx = mx.max(e.max_abs);
    }
    sig + noise + mx as f64
}

/// The portable (non-SIMD) build of the fused kernel on f32 rows, with error statistics: what a
/// CPU without AVX2 runs.
fn portable_fused_f32(d: &mut Data) -> f64 {
    let k = d.k;
    let q = RowQuant::Nvfp4Ct {
        global_scale: d.gs,
        arith: SrcDType::BF16,
    };
    let mut sig = 0f64;
    for r in rows_of(d) {
        let e = rowquant::quantize_row_portable(
            q,
            &d.w[r * k..(r + 1) * k],
            &mut d.packed,
            &mut d.scales,
        )
        .expect("quantize");
        sig += e.signal;
    }
    sig
}

const CASES: &[(&str, Case)] = &[
    ("nvfp4_ct_bf16", nvfp4_ct_bf16),
    ("nvfp4_ct_f32", nvfp4_ct_f32),
    ("nvfp4_modelopt", nvfp4_modelopt),
    ("mxfp4", mxfp4),
    ("dequant_nvfp4", dequant_nvfp4),
    ("converter_row_path", converter_row_path),
    ("converter_fused", converter_fused),
    ("portable_fused_f32", portable_fused_f32),
];

fn main() {
    let (rows, k, reps) = (arg(1, 64), arg(2, 4096), arg(3, 20));
    let only = std::env::args().nth(4);
    let mut d = Data::new(rows, k);
    let elems = (rows * k) as f64;
    if let Some(name) = only {
        let Some((_, f)) = CASES.iter().find(|(n, _)| *n == name) else {
            eprintln!("unknown case {name}");
            std::process::exit(2);
        };
        let mut sink = 0.0;
        for _ in 0..reps {
            sink += f(&mut d);
        }
        println!("{name}: {reps} reps of {rows} x {k} (sink {sink})");
        return;
    }
    println!("{rows} rows x {k}, best of {reps} reps, one thread");
    for (name, f) in CASES {
        let mut sink = f(&mut d);
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            sink += f(&mut d);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:>20}: {:7.3} ns/element  ({:6.2} GB/s of BF16)  [sink {:.1}]",
            best * 1e9 / elems,
            elems * 2.0 / best / 1e9,
            sink % 10.0
        );
    }
}
