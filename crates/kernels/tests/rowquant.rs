//! The fast row quantizers (crates/kernels/src/rowquant.rs, behind `fp4::quantize_row_*`) against
//! the scalar references, bit for bit: the bit-level E4M3 and branch-free E2M1 encoders on many
//! f32 patterns (every tie and boundary neighbourhood, plus a stride over all 2^32 patterns), the
//! row quantizers on random rows of every kind (ties included), the AVX2 build against the
//! portable one, the fused bytes entry with its error statistics, and the error paths.
//! `cargo test -p mimo-kernels --release --test rowquant -- --ignored` runs the exhaustive check
//! of both encoders over every f32 bit pattern.

use half::{bf16, f16};
use mimo_kernels::fp4::{self, Fp4Error, Fp4Format, Fp4Matrix};
use mimo_kernels::rowquant::{self, RowError, RowQuant};
use mimo_kernels::{e2m1, e4m3, SrcDType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

fn e2m1_ref(x: f32) -> u8 {
    let m = e2m1::encode_magnitude_reference(x.abs());
    if x < 0.0 {
        m | 8
    } else {
        m
    }
}

fn check_e4m3(bits: u32) {
    let x = f32::from_bits(bits);
    assert_eq!(
        e4m3::encode(x),
        e4m3::encode_reference(x),
        "e4m3 {x:e} ({bits:#010x})"
    );
}

fn check_e2m1(bits: u32) {
    let x = f32::from_bits(bits);
    assert_eq!(e2m1::encode(x), e2m1_ref(x), "e2m1 {x:e} ({bits:#010x})");
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    assert_eq!(
        e2m1::encode_magnitude(a),
        e2m1::encode_magnitude_reference(a),
        "e2m1 magnitude {a:e}"
    );
}

/// Bit patterns within `r` ulps (both signs) of each of `points`.
fn around(points: impl Iterator<Item = f32>, r: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for p in points {
        let b = p.to_bits() & 0x7FFF_FFFF;
        for d in 0..=2 * r {
            let c = (b + d).saturating_sub(r);
            v.push(c);
            v.push(c | 0x8000_0000);
        }
    }
    v
}

#[test]
fn e4m3_bit_encoder_matches_reference_at_every_boundary_and_on_a_stride() {
    // Every code value and every midpoint between neighbours (the ties), +-64 ulps.
    let vals: Vec<f32> = (0..=0x7Eu8).map(e4m3::decode).collect();
    let mids: Vec<f32> = vals.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let extra = [
        448.0f32,
        464.0,
        480.0,
        1e30,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        0.0,
    ];
    let pts = vals.iter().chain(&mids).chain(&extra).copied();
    let near = around(pts, 64);
    assert!(near.len() > 30_000);
    near.iter().for_each(|&b| check_e4m3(b));
    // A stride over all 2^32 patterns (NaNs, infinities, subnormals included).
    (0..=u32::MAX / 7919)
        .into_par_iter()
        .for_each(|i| check_e4m3(i * 7919 + 13));
}

#[test]
fn e2m1_branch_free_encoder_matches_reference_at_every_boundary_and_on_a_stride() {
    let pts = [
        0.0f32, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0,
    ];
    let extra = [f32::INFINITY, f32::MAX, 1e-45];
    around(pts.iter().chain(&extra).copied(), 256)
        .iter()
        .for_each(|&b| check_e2m1(b));
    (0..=u32::MAX / 7919)
        .into_par_iter()
        .for_each(|i| check_e2m1(i * 7919 + 5));
}

#[test]
#[ignore = "exhaustive over all 2^32 f32 patterns: run with --release -- --ignored"]
fn e4m3_and_e2m1_encoders_match_reference_on_every_f32_pattern() {
    (0..=u32::MAX).into_par_iter().for_each(|b| {
        check_e4m3(b);
        check_e2m1(b);
    });
}

/// Random rows: Gaussian-like values at one of several magnitudes per block, exact zeros, whole
/// zero blocks, and grid values (integers times 0.25 times a power of two) that land exactly on
/// the E2M1 ties when the block scale is a power of two.
fn random_row(rng: &mut ChaCha8Rng, k: usize) -> Vec<f32> {
    let mut row = Vec::with_capacity(k);
    for _ in 0..k / 16 {
        let kind = rng.random_range(0..6);
        let e = rng.random_range(-40i32..40);
        let mag = 2f32.powi(e);
        for i in 0..16 {
            let v = match kind {
                0 => 0.0,
                // Block amax 6 * 2^e: with global scale 1 the NVFP4 scale is 2^e too, so the
                // grid values below hit every E2M1 tie exactly.
                3 if i == 0 => 6.0 * mag,
                1 | 2 => {
                    let g: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                    g * mag
                }
                3 => rng.random_range(-24i32..=24) as f32 * 0.25 * mag,
                4 => {
                    let g: f32 = rng.random_range(-1.0f32..1.0);
                    if rng.random_range(0..4) == 0 {
                        0.0
                    } else {
                        g * mag * 1e3
                    }
                }
                _ => bf16::from_f32(rng.random_range(-3.0f32..3.0)).to_f32(),
            };
            row.push(v);
        }
    }
    row
}

fn quants(rng: &mut ChaCha8Rng) -> Vec<RowQuant> {
    let mut v = vec![RowQuant::Mxfp4];
    for gs in [
        1.0f32,
        448.0,
        2688.0,
        3.0e-3,
        1.0e12,
        rng.random_range(0.5f32..5000.0),
    ] {
        for arith in [SrcDType::F32, SrcDType::BF16, SrcDType::F16] {
            v.push(RowQuant::Nvfp4Ct {
                global_scale: gs,
                arith,
            });
        }
        v.push(RowQuant::Nvfp4ModelOpt {
            weight_scale_2: 1.0 / gs,
        });
    }
    v
}

fn reference(q: RowQuant, row: &[f32], p: &mut [u8], s: &mut [u8]) -> Result<(), Fp4Error> {
    match q {
        RowQuant::Nvfp4Ct {
            global_scale,
            arith,
        } => fp4::quantize_row_nvfp4_in_reference(row, global_scale, arith, p, s),
        RowQuant::Nvfp4ModelOpt { weight_scale_2 } => {
            fp4::quantize_row_nvfp4_modelopt_reference(row, weight_scale_2, p, s)
        }
        RowQuant::Mxfp4 => fp4::quantize_row_mxfp4_reference(row, p, s),
    }
}

fn public_api(q: RowQuant, row: &[f32], p: &mut [u8], s: &mut [u8]) -> Result<(), Fp4Error> {
    match q {
        RowQuant::Nvfp4Ct {
            global_scale,
            arith,
        } => fp4::quantize_row_nvfp4_in(row, global_scale, arith, p, s),
        RowQuant::Nvfp4ModelOpt { weight_scale_2 } => {
            fp4::quantize_row_nvfp4_modelopt(row, weight_scale_2, p, s)
        }
        RowQuant::Mxfp4 => fp4::quantize_row_mxfp4(row, p, s),
    }
}

/// Error statistics the converter computed before the fused entry: dequantize the row through a
/// one-row matrix, then 8 f32 lanes (element i in lane i % 8) summed in f64.
fn reference_error(q: RowQuant, row: &[f32], p: &[u8], s: &[u8]) -> RowError {
    let global_scale = match q {
        RowQuant::Nvfp4Ct { global_scale, .. } => global_scale,
        RowQuant::Nvfp4ModelOpt { weight_scale_2 } => 1.0 / weight_scale_2,
        RowQuant::Mxfp4 => 1.0,
    };
    let m = Fp4Matrix {
        format: q.format(),
        n: 1,
        k: row.len(),
        packed: p.to_vec(),
        scales: s.to_vec(),
        global_scale,
    };
    let mut deq = vec![0f32; row.len()];
    fp4::dequantize_row(&m, 0, &mut deq).expect("dequantize");
    let (mut sg, mut ns, mut mx) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for (i, (&a, &b)) in row.iter().zip(&deq).enumerate() {
        let d = a - b;
        sg[i % 8] += a * a;
        ns[i % 8] += d * d;
        mx[i % 8] = mx[i % 8].max(d.abs());
    }
    RowError {
        signal: sg.iter().map(|&v| v as f64).sum::<f64>(),
        noise: ns.iter().map(|&v| v as f64).sum::<f64>(),
        max_abs: mx.iter().fold(0.0f32, |a, &v| a.max(v)),
    }
}

fn buffers(q: RowQuant, k: usize) -> (Vec<u8>, Vec<u8>) {
    (vec![0xAA; k / 2], vec![0xAA; k / q.format().block_size()])
}

fn same_error(a: RowError, b: RowError, what: &str) {
    assert_eq!(a.signal.to_bits(), b.signal.to_bits(), "{what}: signal");
    assert_eq!(a.noise.to_bits(), b.noise.to_bits(), "{what}: noise");
    assert_eq!(a.max_abs.to_bits(), b.max_abs.to_bits(), "{what}: max_abs");
}

#[test]
fn fast_rows_match_reference_rows_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut blocks = 0usize;
    for trial in 0..40 {
        let k = 32 * rng.random_range(1..40);
        let row = random_row(&mut rng, k);
        for q in quants(&mut rng) {
            let what = format!("trial {trial}, {q:?}");
            let (mut p0, mut s0) = buffers(q, k);
            reference(q, &row, &mut p0, &mut s0).expect("reference");
            let (mut p1, mut s1) = buffers(q, k);
            public_api(q, &row, &mut p1, &mut s1).expect("fast");
            assert_eq!(s1, s0, "{what}: scales");
            assert_eq!(p1, p0, "{what}: packed");
            let (mut p2, mut s2) = buffers(q, k);
            let e2 = rowquant::quantize_row_portable(q, &row, &mut p2, &mut s2).expect("port");
            assert_eq!((&p2, &s2), (&p0, &s0), "{what}: portable build");
            let (mut p3, mut s3) = buffers(q, k);
            let e3 = rowquant::quantize_row_with_error(q, &row, &mut p3, &mut s3).expect("err");
            assert_eq!((&p3, &s3), (&p0, &s0), "{what}: with error");
            let e0 = reference_error(q, &row, &p0, &s0);
            same_error(e2, e0, &format!("{what}: portable"));
            same_error(e3, e0, &what);
            blocks += s0.len();
        }
    }
    assert!(blocks > 10_000, "{blocks}");
}

#[test]
fn bytes_entry_matches_f32_path_for_every_dtype() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for trial in 0..20 {
        let k = 32 * rng.random_range(1..20);
        let raw = random_row(&mut rng, k);
        for dtype in [SrcDType::BF16, SrcDType::F16, SrcDType::F32] {
            // Source bytes and the f32 values they hold.
            let (bytes, row): (Vec<u8>, Vec<f32>) = match dtype {
                SrcDType::BF16 => {
                    let h: Vec<bf16> = raw.iter().map(|&v| bf16::from_f32(v)).collect();
                    let b = h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
                    (b, h.iter().map(|v| v.to_f32()).collect())
                }
                SrcDType::F16 => {
                    // Keep F16 finite: scale into its range.
                    let h: Vec<f16> = raw
                        .iter()
                        .map(|&v| f16::from_f32((v * 1e-3).clamp(-6e4, 6e4)))
                        .collect();
                    let b = h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
                    (b, h.iter().map(|v| v.to_f32()).collect())
                }
                SrcDType::F32 => (
                    raw.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    raw.clone(),
                ),
            };
            for q in quants(&mut rng) {
                let what = format!("trial {trial}, {dtype:?}, {q:?}");
                let (mut p0, mut s0) = buffers(q, k);
                reference(q, &row, &mut p0, &mut s0).expect("reference");
                let (mut p1, mut s1) = buffers(q, k);
                let e1 =
                    rowquant::quantize_row_bytes_with_error(q, dtype, &bytes, &mut p1, &mut s1)
                        .expect("bytes");
                assert_eq!((&p1, &s1), (&p0, &s0), "{what}");
                same_error(e1, reference_error(q, &row, &p0, &s0), &what);
            }
        }
    }
}

#[test]
fn fast_rows_report_the_same_errors_as_the_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let k = 256;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0usize, 15, 16, 100, 255] {
            let mut row = random_row(&mut rng, k);
            row[at] = bad;
            if at < 200 {
                row[210] = f32::NAN; // a later one must not be the one reported
            }
            for q in quants(&mut rng) {
                let (mut p, mut s) = buffers(q, k);
                let want = reference(q, &row, &mut p, &mut s).unwrap_err();
                let got = public_api(q, &row, &mut p, &mut s).unwrap_err();
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "{q:?} at {at}");
                let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
                let got = rowquant::quantize_row_bytes_with_error(
                    q,
                    SrcDType::F32,
                    &bytes,
                    &mut p,
                    &mut s,
                )
                .unwrap_err();
                assert_eq!(
                    format!("{got:?}"),
                    format!("{want:?}"),
                    "{q:?} bytes at {at}"
                );
            }
        }
    }
    // Shape, length and scale errors instead of panics.
    let row = random_row(&mut rng, 64);
    let q = RowQuant::Nvfp4Ct {
        global_scale: 1.0,
        arith: SrcDType::F32,
    };
    let (mut p, mut s) = buffers(q, 64);
    assert!(matches!(
        rowquant::quantize_row(q, &row[..40], &mut p[..20], &mut s),
        Err(Fp4Error::NotBlockMultiple { .. })
    ));
    assert!(matches!(
        rowquant::quantize_row(q, &row, &mut p[..31], &mut s),
        Err(Fp4Error::Length { .. })
    ));
    assert!(matches!(
        rowquant::quantize_row_bytes_with_error(q, SrcDType::BF16, &[0u8; 127], &mut p, &mut s),
        Err(Fp4Error::Length { .. })
    ));
    for bad in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        let q = RowQuant::Nvfp4Ct {
            global_scale: bad,
            arith: SrcDType::F32,
        };
        assert!(matches!(
            rowquant::quantize_row(q, &row, &mut p, &mut s),
            Err(Fp4Error::BadGlobalScale(_))
        ));
        let q = RowQuant::Nvfp4ModelOpt {
            weight_scale_2: bad,
        };
        assert!(matches!(
            rowquant::quantize_row(q, &row, &mut p, &mut s),
            Err(Fp4Error::BadGlobalScale(_))
        ));
    }
    let (mut p, mut s) = buffers(RowQuant::Mxfp4, 64);
    assert!(matches!(
        rowquant::quantize_row(RowQuant::Mxfp4, &row[..48], &mut p[..24], &mut s),
        Err(Fp4Error::NotBlockMultiple {
            format: Fp4Format::Mxfp4,
            ..
        })
    ));
}
