//! GPU kernels (FP4 GEMMs, MoE) against the CPU reference (`fp4::dequantize` + f64
//! matmul) on fresh random data.
//! Skipped with a message where there is no GPU; `MIMO_REQUIRE_GPU=1` turns the skip into a
//! failure. Outputs are poisoned with NaN before every launch, so an unwritten element fails.

use cudarc::driver::CudaSlice;
use half::bf16;
use mimo_kernels::cuda::{
    self, bf16_to_e4m3_rows, bulk_supported, fp4_dequantize, fp4_gemm, fp4_gemm_bulk,
    fp4_gemm_bulk_with, fp4_gemm_fp8, fp4_gemm_swiglu, fp4_gemm_swiglu_bulk,
    fp4_gemm_swiglu_supported, fp4_gemm_swiglu_tiled, fp4_gemm_tiled, fp4_gemm_wgmma,
    fp4_gemm_wgmma_with, fp4_gemm_with, fp4_to_e4m3_rows, fp8_operands, moe_layer, moe_layer_tiled,
    moe_layer_tiled_with, moe_layer_with, moe_tiled_preferred, moe_tiled_supported,
    tiled_preferred, variant_exists, wgmma_preferred, wgmma_supported, BulkConfig, E4m3Rows,
    Fp4GemmConfig, Fp8Gemm, Fp8Scratch, GpuContext, GpuFp4Weight, MoeConfig, MoeWeights,
    MoeWorkspace, ProbeData, ProbeKind, ProbeMode, ProbeStage, StageChain, Tuning, WgmmaConfig,
    MOE_TILED_MIN_PAIRS, WGMMA_CONFIGS,
};
use mimo_kernels::fp4::{amax, dequantize, nvfp4_global_scale, quantize_mxfp4, quantize_nvfp4};
use mimo_kernels::fp8_rows;
use mimo_kernels::{Fp4Format, Fp4Matrix};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> Option<GpuContext> {
    match cuda::gpu_for_tests() {
        Ok(g) => g,
        Err(e) => panic!("MIMO_REQUIRE_GPU=1 but no GPU: {e}"),
    }
}

/// [`gpu`] where it is a Hopper (compute capability 9.0: bulk copies, mbarriers); elsewhere the
/// test named `what` is skipped with a message.
fn hopper_gpu(what: &str) -> Option<GpuContext> {
    let gpu = gpu()?;
    if gpu.compute_capability().0 < 9 {
        eprintln!("SKIP {what}: compute capability below 9.0");
        return None;
    }
    Some(gpu)
}

/// A fresh seed per run (printed so that a failure can be replayed with MIMO_TEST_SEED).
fn rng(tag: &str) -> ChaCha8Rng {
    let seed = std::env::var("MIMO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{tag}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// Roughly Gaussian values with a few outliers per row, like trained weights.
fn random_matrix(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let g: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * scale;
            if rng.random::<f32>() < 0.01 {
                g * 8.0
            } else {
                g
            }
        })
        .collect()
}

fn quantize(format: Fp4Format, w: &[f32], n: usize, k: usize) -> Fp4Matrix {
    match format {
        Fp4Format::Nvfp4 => quantize_nvfp4(w, n, k, nvfp4_global_scale(amax(w))).unwrap(),
        Fp4Format::Mxfp4 => quantize_mxfp4(w, n, k).unwrap(),
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// A random `[n, k]` weight of magnitude `mag` quantized to `format` and uploaded, `m` random
/// bf16 activation rows on the device, and their product on the CPU (the dequantized weight
/// times the bf16 activations, f64): `(m, n, k)`.
fn random_product(
    gpu: &GpuContext,
    rng: &mut ChaCha8Rng,
    format: Fp4Format,
    (m, n, k): (usize, usize, usize),
    mag: f32,
) -> (GpuFp4Weight, CudaSlice<bf16>, Vec<f64>) {
    let wf = random_matrix(rng, n * k, mag);
    let q = quantize(format, &wf, n, k);
    let wd = dequantize(&q).unwrap();
    let xb = to_bf16(&random_matrix(rng, m * k, 1.0));
    let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let want = matmul_ref(&wd, &xf, m, n, k);
    let w = GpuFp4Weight::upload(gpu, "w", &q).unwrap();
    let x = gpu.stream().clone_htod(&xb).unwrap();
    (w, x, want)
}

fn poisoned(gpu: &GpuContext, len: usize) -> CudaSlice<bf16> {
    gpu.stream().clone_htod(&vec![bf16::NAN; len]).unwrap()
}

/// y[t][r] = sum_k w[r][k] x[t][k] in f64.
fn matmul_ref(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; m * n];
    for t in 0..m {
        for r in 0..n {
            y[t * n + r] = (0..k)
                .map(|i| w[r * k + i] as f64 * x[t * k + i] as f64)
                .sum();
        }
    }
    y
}

/// Fails unless every element is finite, the norm-wise relative error is below `rel` and no
/// element is off by more than `elem` times the largest reference magnitude.
fn check_close(what: &str, got: &[bf16], want: &[f64], rel: f64, elem: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let maxref = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (unwritten or overflow), want {w}"
        );
        let d = g - w;
        assert!(
            d.abs() <= elem * maxref + 1e-6,
            "{what}: element {i} = {g}, want {w} (max |ref| {maxref})"
        );
        num += d * d;
        den += w * w;
    }
    let err = (num / den.max(1e-30)).sqrt();
    eprintln!("{what}: relative error {err:.2e}");
    assert!(err < rel, "{what}: relative error {err:.3e} >= {rel:.1e}");
}

const FORMATS: [Fp4Format; 2] = [Fp4Format::Nvfp4, Fp4Format::Mxfp4];

/// Runs a dense product twice into fresh poisoned outputs of `m * n` elements: the first run
/// against the reference `want` ([`check_close`] with the FP4 kernels' tolerances), the second
/// bit-equal to the first (fixed summation order, split tickets left ready). Returns the first.
fn twice_checked(
    gpu: &GpuContext,
    what: &str,
    want: &[f64],
    (m, n): (usize, usize),
    mut run: impl FnMut(&mut CudaSlice<bf16>),
) -> Vec<bf16> {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut y = poisoned(gpu, m * n);
        run(&mut y);
        runs.push(gpu.stream().clone_dtoh(&y).unwrap());
    }
    check_close(what, &runs[0], want, 8e-3, 2e-2);
    for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: run 2, element {i}");
    }
    runs.swap_remove(0)
}

/// Whether NVRTC is there for a compile test; without it the test is skipped with a message
/// (a failure with `MIMO_REQUIRE_GPU=1`).
fn nvrtc_or_skip() -> bool {
    if cuda::nvrtc_available() {
        return true;
    }
    if std::env::var("MIMO_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("MIMO_REQUIRE_GPU=1 but libnvrtc was not found");
    }
    eprintln!("skipping NVRTC compile test: libnvrtc not found");
    false
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    for (file, src) in cuda::kernel_sources() {
        let ptx = cuda::compile_source(file, src, "sm_90a").unwrap();
        assert!(ptx.contains(".entry"), "{file}: no kernel entry in the PTX");
    }
    let gemm = cuda::compile_source("fp4_gemm.cu", cuda::kernel_sources()[0].1, "sm_90a").unwrap();
    assert!(gemm.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(!gemm.contains(".entry stage_probe"));
    // The probe's own program has its kernels and none of the GEMM file's variants.
    let probe =
        cuda::compile_source("stage_probe.cu", cuda::kernel_sources()[2].1, "sm_90a").unwrap();
    assert!(probe.contains(".entry stage_probe_w16"));
    assert!(!probe.contains(".entry fp4_gemm_nv") && !probe.contains(".entry fp4_bulk_nv"));
    assert!(gemm.contains("cvt.rn.satfinite.e4m3x2.f32"));
    // Ampere has no E4M3 conversion: the FP8 kernels compile to a trap there (never selected).
    let ampere = cuda::compile_source("fp4_gemm.cu", cuda::kernel_sources()[0].1, "sm_80").unwrap();
    assert!(!ampere.contains("e4m3x2"));
}

/// The sources as `MIMO_TRACE=1` compiles them (decode timeline, trace.rs): they still compile,
/// with the timer reads and the records' symbol in.
#[test]
fn traced_kernels_compile_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    for (file, src) in cuda::kernel_sources() {
        let ptx = cuda::compile_source_traced(file, src, "sm_90a")
            .unwrap_or_else(|e| panic!("{file} with MIMO_TRACE: {e}"));
        assert!(ptx.contains("%globaltimer"), "{file}: no timer read");
        assert!(ptx.contains("mimo_trace"), "{file}: no trace symbol");
    }
}

/// The FP8 prefill path: conversions bit-exact against `fp8_rows`, the cuBLASLt GEMM against
/// an f64 product of the same E4M3 operands, and the whole path against the FP4 reference.
#[test]
fn fp8_prefill_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let lt = match Fp8Gemm::new(&gpu, false).unwrap() {
        Ok(lt) => lt,
        Err(reason) => {
            assert!(
                std::env::var("MIMO_REQUIRE_FP8").map_or(true, |v| v != "1"),
                "MIMO_REQUIRE_FP8=1 but {reason}"
            );
            eprintln!("skipping the FP8 path: {reason}");
            return;
        }
    };
    let mut rng = rng("fp8 prefill");
    let s = gpu.stream();
    for format in FORMATS {
        for &(n, k, m) in &[
            (208usize, 320usize, 70usize),
            (64, 2048, 5),
            (1040, 544, 129),
            // k <= 1024: a warp per activation row in fp8_operands; longer rows a block each.
            (48, 4160, 3),
        ] {
            let what = format!("{format} [{m}, {k}] x [{n}, {k}]");
            let wf = random_matrix(&mut rng, n * k, 0.05);
            let q = quantize(format, &wf, n, k);
            let w = GpuFp4Weight::upload(&gpu, "w", &q).unwrap();
            let xb = to_bf16(&random_matrix(&mut rng, m * k, 1.0));
            let x = s.clone_htod(&xb).unwrap();
            let poison = |rows: usize, len: usize| E4m3Rows {
                q: s.clone_htod(&vec![0x7Fu8; len]).unwrap(),
                scale: s.clone_htod(&vec![f32::NAN; rows]).unwrap(),
            };
            // Codes and row scales of a device conversion equal to the CPU reference's bits.
            let check_rows = |part: &str, got: &E4m3Rows, want_q: &[u8], want_s: &[f32]| {
                let got_q = s.clone_dtoh(&got.q).unwrap();
                let got_s = s.clone_dtoh(&got.scale).unwrap();
                if let Some(i) = (0..want_q.len()).find(|&i| got_q[i] != want_q[i]) {
                    panic!(
                        "{what}: {part} code {i}: got {:#04x}, want {:#04x}",
                        got_q[i], want_q[i]
                    );
                }
                for (r, want) in want_s.iter().enumerate() {
                    assert_eq!(
                        got_s[r].to_bits(),
                        want.to_bits(),
                        "{what}: {part} row scale {r}"
                    );
                }
            };
            let (wq, ws) = fp8_rows::fp4_to_e4m3_rows(&q);
            let mut wr = poison(n, n * k);
            fp4_to_e4m3_rows(&gpu, &w, &mut wr).unwrap();
            check_rows("weight", &wr, &wq, &ws);
            let (xq, xs) = fp8_rows::bf16_rows_to_e4m3(&xb, m, k);
            let mut xr = poison(m, m * k);
            bf16_to_e4m3_rows(&gpu, &x, m, k, &mut xr).unwrap();
            check_rows("activation", &xr, &xq, &xs);
            // Both operands in one launch (the path's own conversion): the same bits.
            let mut both = Fp8Scratch {
                w: poison(n, n * k),
                x: poison(m, m * k),
            };
            fp8_operands(&gpu, &w, &x, m, &mut both).unwrap();
            check_rows("one-launch weight", &both.w, &wq, &ws);
            check_rows("one-launch activation", &both.x, &xq, &xs);
            // The GEMM alone: the same E4M3 operands multiplied in f64.
            let want = fp8_rows::e4m3_gemm_reference(&xq, &xs, &wq, &ws, m, n, k);
            let mut y = poisoned(&gpu, m * n);
            lt.gemm(&gpu, &wr, &xr, m, n, k, &mut y).unwrap();
            check_close(
                &format!("fp8 gemm {what}"),
                &s.clone_dtoh(&y).unwrap(),
                &want,
                5e-3,
                1e-2,
            );
            // The whole path from fresh buffers against the FP4 weight times the bf16 input.
            let wd = dequantize(&q).unwrap();
            let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let want = matmul_ref(&wd, &xf, m, n, k);
            let mut scratch = Fp8Scratch::new(&gpu).unwrap();
            let mut y = poisoned(&gpu, m * n);
            fp4_gemm_fp8(&gpu, &lt, &w, &x, m, &mut scratch, &mut y).unwrap();
            check_close(
                &format!("fp8 path {what}"),
                &s.clone_dtoh(&y).unwrap(),
                &want,
                6e-2,
                0.25,
            );
        }
    }
}

#[test]
fn fp4_gemm_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("fp4_gemm");
    // (m, n, k): n and k off the tile sizes (16/32 rows, 128-element chunks), m across the
    // 8/16/32-token passes.
    // (16, 4352, 288): a wide 16-token product (272 row tiles).
    let shapes = [
        (1, 200, 544),
        (3, 77, 96),
        (8, 64, 4096),
        (16, 333, 1056),
        (13, 50, 32),
        (40, 129, 160),
        (70, 48, 2080),
        (16, 4352, 288),
    ];
    // Weight magnitudes: 3e4 puts MXFP4 block scales above 2^9, where the kernels' scale
    // multipliers need a larger shift (weights.rs, scale_shift); 1e-3 puts them low.
    let magnitudes = [0.02f32, 3e4, 0.02, 1e-3, 0.02, 0.02, 0.02, 0.02];
    for format in FORMATS {
        for (&(m, n, k), &mag) in shapes.iter().zip(&magnitudes) {
            let (w, x, want) = random_product(&gpu, &mut rng, format, (m, n, k), mag);
            let mut configs = vec![None];
            for m_tiles in [1, 2] {
                for group in [1, 2, 4] {
                    for warps in [1, 3, 16] {
                        let c = Fp4GemmConfig {
                            m_tiles,
                            warps,
                            group,
                        };
                        if variant_exists(c, m) {
                            configs.push(Some(c));
                        }
                    }
                }
            }
            assert!(
                configs.len() >= 4,
                "m={m}: too few kernel variants under test"
            );
            for cfg in configs {
                // The automatic shape also runs with the L2 prefetch prologue (Tuning); from 9
                // tokens every shape also runs with staged activations (Tuning::x_stage).
                let mut modes = vec![(false, false)];
                if cfg.is_none() {
                    modes.push((true, false));
                }
                if m > 8 {
                    modes.push((false, true));
                }
                let mut plain: Option<Vec<bf16>> = None;
                for (pf, xs) in modes {
                    let base = gpu.tuning();
                    // The decode kernels under test, not the tiled or bulk ones (their own tests).
                    gpu.set_tuning(Tuning {
                        l2_prefetch: pf,
                        x_stage: xs,
                        tiled_gemm: false,
                        bulk_gemm: false,
                        ..base
                    });
                    let mut y = poisoned(&gpu, m * n);
                    match cfg {
                        None => fp4_gemm(&gpu, &w, &x, m, &mut y).unwrap(),
                        Some(c) => fp4_gemm_with(&gpu, &w, &x, m, &mut y, c).unwrap(),
                    }
                    gpu.set_tuning(base);
                    let got = gpu.stream().clone_dtoh(&y).unwrap();
                    let what =
                        format!("{format} m={m} n={n} k={k} {cfg:?} prefetch {pf} x_stage {xs}");
                    check_close(&what, &got, &want, 8e-3, 2e-2);
                    // Staging moves the activations, not the arithmetic: bit-identical.
                    match (&plain, pf, xs) {
                        (None, false, false) => plain = Some(got),
                        (Some(p), false, true) => {
                            for (i, (a, b)) in got.iter().zip(p).enumerate() {
                                assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}");
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// A one-token product wider than the placement padding caps (more than 16 two-tile blocks per
/// SM, as an lm_head) runs the `_wide` copy of its kernel under `Tuning::spread`: checked
/// against the CPU and bit for bit against the ordinary kernel (spread off), both formats.
#[test]
fn wide_one_token_product_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("wide");
    // Two-tile blocks of 32 rows: 16 per SM and one more, plus a partial tile.
    let (n, k) = (32 * (16 * gpu.sm_count() as usize + 1) + 7, 1024);
    for format in FORMATS {
        let (w, x, want) = random_product(&gpu, &mut rng, format, (1, n, k), 0.02);
        assert_eq!(
            Fp4GemmConfig::auto(1, n, k, gpu.sm_count()),
            Fp4GemmConfig {
                m_tiles: 2,
                warps: 4,
                group: 2
            },
            "the shape the _wide kernels exist for"
        );
        let base = gpu.tuning();
        let mut outs = Vec::new();
        for spread in [true, false] {
            gpu.set_tuning(Tuning { spread, ..base });
            let mut y = poisoned(&gpu, n);
            fp4_gemm(&gpu, &w, &x, 1, &mut y).unwrap();
            gpu.set_tuning(base);
            let got = gpu.stream().clone_dtoh(&y).unwrap();
            check_close(
                &format!("{format} n={n} spread {spread}"),
                &got,
                &want,
                8e-3,
                2e-2,
            );
            outs.push(got);
        }
        for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{format}: element {i}");
        }
    }
}

/// `got[m, n/2]` against `silu(gate) * up` of `full[m, n]` ([gate | up] rows) on the CPU: at
/// most one bf16 step apart (or both below 1e-30), every element finite.
fn check_swiglu_of(full: &[bf16], got: &[bf16], m: usize, n: usize, what: &str) {
    let inter = n / 2;
    for t in 0..m {
        for i in 0..inter {
            let g = full[t * n + i].to_f32();
            let u = full[t * n + inter + i].to_f32();
            let want = bf16::from_f32(g / (1.0 + (-g).exp()) * u);
            let got = got[t * inter + i];
            let step = (got.to_bits() as i32 - want.to_bits() as i32).abs();
            assert!(
                got.is_finite() && (step <= 1 || (got.to_f32() - want.to_f32()).abs() < 1e-30),
                "{what} ({t}, {i}): {got} vs {want}"
            );
        }
    }
}

/// The dense SwiGLU epilogue against fp4_gemm's [gate | up] output and silu on the CPU (the
/// runtime test compares it bit for bit with the SwiGLU kernel): at most one bf16 step apart.
#[test]
fn fp4_gemm_swiglu_matches_gemm_then_silu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("fp4_gemm_swiglu");
    let sm = gpu.sm_count();
    for format in FORMATS {
        for &(m, n, k) in &[
            (1, 400, 544),
            (1, 4160, 1024),
            (5, 200, 256),
            (16, 96, 2048),
            (40, 130, 160),
            (32, 8448, 256),
            (20, 8480, 160),
            // 16 tokens with few enough warps that the staged kernel (_xs) runs.
            (16, 8704, 256),
        ] {
            let wf = random_matrix(&mut rng, n * k, 0.02);
            let q = quantize(format, &wf, n, k);
            let w = GpuFp4Weight::upload(&gpu, "w", &q).unwrap();
            assert!(
                fp4_gemm_swiglu_supported(&w, m, sm),
                "{format} m={m} [{n}, {k}]"
            );
            let xb = to_bf16(&random_matrix(&mut rng, m * k, 1.0));
            let x = gpu.stream().clone_htod(&xb).unwrap();
            // With the decode kernels, the tiled kernels and the bulk kernels (each where it
            // takes the shape; the bulk ones at any size here).
            for (tiled, bulk) in [(false, false), (true, false), (false, true)] {
                let base = gpu.tuning();
                gpu.set_tuning(Tuning {
                    tiled_gemm: tiled,
                    bulk_gemm: bulk,
                    bulk_min_mi: 0,
                    ..base
                });
                let mut full = poisoned(&gpu, m * n);
                fp4_gemm(&gpu, &w, &x, m, &mut full).unwrap();
                let mut y = poisoned(&gpu, m * n / 2);
                fp4_gemm_swiglu(&gpu, &w, &x, m, &mut y).unwrap();
                gpu.set_tuning(base);
                let full = gpu.stream().clone_dtoh(&full).unwrap();
                let got = gpu.stream().clone_dtoh(&y).unwrap();
                check_swiglu_of(
                    &full,
                    &got,
                    m,
                    n,
                    &format!("{format} m={m} [{n}, {k}] tiled {tiled} bulk {bulk}"),
                );
            }
        }
    }
}

/// The tiled kernels (9 to 256 tokens) against the CPU reference: N off the 256-row blocks,
/// token counts off the 16/32-token blocks, K from one chunk to enough for eight K splits
/// (few row blocks), both formats, both epilogues. Each product runs twice: the split
/// products' last-block reduction must give the same bits whichever block finished last, and
/// must leave its tickets ready for the next launch (an unreset ticket leaves NaN behind).
#[test]
fn tiled_gemm_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("fp4_gemm_tiled");
    let shapes = [
        (9, 333, 1024),
        (16, 4352, 256),
        (17, 200, 4096),
        (32, 1000, 512),
        (33, 77, 128),
        (64, 300, 2048),
        (100, 600, 384),
        (256, 130, 1280),
    ];
    for format in FORMATS {
        for &(m, n, k) in &shapes {
            let (w, x, want) = random_product(&gpu, &mut rng, format, (m, n, k), 0.02);
            let what = format!("tiled {format} m={m} n={n} k={k}");
            let first = twice_checked(&gpu, &what, &want, (m, n), |y| {
                fp4_gemm_tiled(&gpu, &w, &x, m, y).unwrap()
            });
            // The gated form on the same weight read as [gate | up] (n even): SwiGLU of the
            // plain product's two halves, at most one bf16 step apart.
            if n % 2 == 1 {
                continue;
            }
            let mut act = poisoned(&gpu, m * n / 2);
            fp4_gemm_swiglu_tiled(&gpu, &w, &x, m, &mut act).unwrap();
            let act = gpu.stream().clone_dtoh(&act).unwrap();
            check_swiglu_of(&first, &act, m, n, &format!("{what} swiglu"));
        }
    }
    // Shapes it does not take are refused, not computed wrongly.
    let q = quantize(
        Fp4Format::Nvfp4,
        &random_matrix(&mut rng, 64 * 96, 0.1),
        64,
        96,
    );
    let w = GpuFp4Weight::upload(&gpu, "k96", &q).unwrap();
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 16 * 96]).unwrap();
    let mut y = poisoned(&gpu, 16 * 64);
    assert!(fp4_gemm_tiled(&gpu, &w, &x, 16, &mut y).is_err(), "K = 96");
}

/// The warpgroup kernels (Hopper `wgmma`) against the CPU reference: N off the 128-row blocks,
/// token counts off every token tile (one token to a block of 256 and past it), K from one
/// chunk to enough for eight K splits, both formats, every shape of `WGMMA_CONFIGS` on one
/// product. Each
/// product runs twice: bit-equal (the split reduction's order is fixed). Skipped with a message
/// off sm_90 (a failure with `MIMO_REQUIRE_GPU=1`).
#[test]
fn wgmma_gemm_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("fp4_gemm_wgmma");
    let probe = GpuFp4Weight::upload(
        &gpu,
        "probe",
        &quantize(
            Fp4Format::Nvfp4,
            &random_matrix(&mut rng, 16 * 128, 0.1),
            16,
            128,
        ),
    )
    .unwrap();
    if !wgmma_supported(&gpu, &probe, 1) {
        let cc = gpu.compute_capability();
        assert!(
            std::env::var("MIMO_REQUIRE_GPU").as_deref() != Ok("1"),
            "MIMO_REQUIRE_GPU=1 but compute capability {cc:?} has no wgmma"
        );
        eprintln!("skipped: the warpgroup kernels need an sm_90 GPU (this one is {cc:?})");
        return;
    }
    let shapes = [
        (1, 130, 256),
        (16, 333, 1024),
        (17, 200, 4096),
        (40, 77, 128),
        (64, 300, 2048),
        (100, 600, 384),
        (256, 130, 1280),
        (300, 257, 512),
        (600, 129, 256),
    ];
    for format in FORMATS {
        for &(m, n, k) in &shapes {
            let (w, x, want) = random_product(&gpu, &mut rng, format, (m, n, k), 0.02);
            let what = format!("wgmma {format} m={m} n={n} k={k}");
            twice_checked(&gpu, &what, &want, (m, n), |y| {
                fp4_gemm_wgmma(&gpu, &w, &x, m, y).unwrap()
            });
        }
        // Every shape on one product (tiles larger than the tokens leave slots empty).
        let (m, n, k) = (70, 260, 640);
        let (w, x, want) = random_product(&gpu, &mut rng, format, (m, n, k), 0.02);
        for cfg in WGMMA_CONFIGS {
            let mut y = poisoned(&gpu, m * n);
            fp4_gemm_wgmma_with(&gpu, &w, &x, m, &mut y, cfg).unwrap();
            let got = gpu.stream().clone_dtoh(&y).unwrap();
            check_close(
                &format!("wgmma {format} m={m} {cfg:?}"),
                &got,
                &want,
                8e-3,
                2e-2,
            );
        }
    }
    // The automatic launcher takes it where it would have taken the tiled kernels from 33
    // tokens (a product with enough work for them): the same bits as the direct launch.
    let (m, n, k) = (48, 4096, 4096);
    let q = quantize(
        Fp4Format::Nvfp4,
        &random_matrix(&mut rng, n * k, 0.02),
        n,
        k,
    );
    let w = GpuFp4Weight::upload(&gpu, "auto", &q).unwrap();
    assert!(tiled_preferred(&gpu.tuning(), &w, m, false));
    assert!(wgmma_preferred(&gpu.tuning(), &gpu, &w, m));
    let x = gpu
        .stream()
        .clone_htod(&to_bf16(&random_matrix(&mut rng, m * k, 1.0)))
        .unwrap();
    let (mut auto, mut direct) = (poisoned(&gpu, m * n), poisoned(&gpu, m * n));
    fp4_gemm(&gpu, &w, &x, m, &mut auto).unwrap();
    fp4_gemm_wgmma(&gpu, &w, &x, m, &mut direct).unwrap();
    let (auto, direct) = (
        gpu.stream().clone_dtoh(&auto).unwrap(),
        gpu.stream().clone_dtoh(&direct).unwrap(),
    );
    assert!(
        auto.iter()
            .zip(&direct)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "fp4_gemm at {m} tokens is not the warpgroup product"
    );
    // Shapes and tiles it does not take are refused, not computed wrongly.
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 16 * 128]).unwrap();
    let mut y = poisoned(&gpu, 16 * 16);
    let odd = WgmmaConfig {
        tokens: 48,
        stages: 4,
    };
    assert!(
        fp4_gemm_wgmma_with(&gpu, &probe, &x, 16, &mut y, odd).is_err(),
        "48 tokens"
    );
    let q = quantize(
        Fp4Format::Nvfp4,
        &random_matrix(&mut rng, 64 * 96, 0.1),
        64,
        96,
    );
    let w = GpuFp4Weight::upload(&gpu, "k96", &q).unwrap();
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 16 * 96]).unwrap();
    let mut y = poisoned(&gpu, 16 * 64);
    assert!(fp4_gemm_wgmma(&gpu, &w, &x, 16, &mut y).is_err(), "K = 96");
}

/// The bulk-copy kernels (1 to 16 tokens, Hopper) against the CPU reference: N off the 16-row
/// tiles and the row blocks, K with a last half-filled stage (NVFP4: K % 512 = 256), token
/// counts off the 8-token boxes, both formats; the automatic shape and forced ones that take
/// every path (one to sixteen row tiles, K warps that alternate between stages, K splits with
/// the last-block reduction, two to eight stages). Each product runs twice: same bits.
#[test]
fn bulk_gemm_matches_cpu_reference() {
    let Some(gpu) = hopper_gpu("bulk kernels") else {
        return;
    };
    let mut rng = rng("fp4_gemm_bulk");
    let forced = [
        (1, 16, 1, 2),
        (2, 3, 3, 8),
        (7, 2, 2, 3),
        (16, 1, 1, 2),
        (2, 8, 1, 2),
        (6, 2, 2, 3),
        (8, 2, 1, 2),
        (1, 31, 2, 2),
    ]
    .map(|(row_tiles, k_warps, splits, stages)| BulkConfig {
        row_tiles,
        k_warps,
        splits,
        stages,
    });
    let shapes = [
        (1, 333, 1024),
        (3, 77, 512),
        (8, 1000, 2048),
        (9, 200, 4096),
        (16, 4352, 1536),
        (1, 130, 2560),
        (16, 64, 7168),
        (5, 100, 768),
        (16, 300, 1280),
        (17, 500, 1024),
        (32, 1000, 2048),
        (24, 130, 2560),
    ];
    for format in FORMATS {
        for &(m, n, k) in &shapes {
            let (w, x, want) = random_product(&gpu, &mut rng, format, (m, n, k), 0.02);
            if format == Fp4Format::Mxfp4 && k % 512 != 0 {
                assert!(!bulk_supported(&gpu, &w, m, false), "MXFP4 k={k}");
                continue;
            }
            assert!(bulk_supported(&gpu, &w, m, false), "{format} {m} {n} {k}");
            let sms = gpu.sm_count() as usize;
            let autos = [16, 31].map(|wp| BulkConfig::auto_with(format, m, n, k, sms, false, wp));
            for cfg in autos.into_iter().chain(forced) {
                // 32-token blocks: at most 16 consumer warps, and the eight-stage forced shape
                // does not fit.
                let big = m > 16 && (cfg.row_tiles * cfg.k_warps > 16 || cfg.stages > 4);
                if cfg.splits > k.div_ceil(512) || big {
                    continue;
                }
                let what = format!("bulk {format} m={m} n={n} k={k} {cfg:?}");
                twice_checked(&gpu, &what, &want, (m, n), |y| {
                    fp4_gemm_bulk_with(&gpu, &w, &x, m, y, &cfg, false).unwrap()
                });
            }
            let mut y = poisoned(&gpu, m * n);
            fp4_gemm_bulk(&gpu, &w, &x, m, &mut y).unwrap();
            // The gated form on the same weight read as [gate | up] (n even): SwiGLU of the
            // plain product's two halves, computed with the same K splits and K warps (so the
            // same sums), at most one bf16 step apart; automatic and forced shapes (split K,
            // the most row tiles, gate rows past the end of the gate half).
            if n % 2 == 1 {
                continue;
            }
            let gated = [
                BulkConfig::auto_with(format, m, n, k, sms, true, 16),
                BulkConfig {
                    row_tiles: 2,
                    k_warps: 4,
                    splits: 2,
                    stages: 3,
                },
                BulkConfig {
                    row_tiles: 16,
                    k_warps: 1,
                    splits: 1,
                    stages: 2,
                },
            ];
            for cfg in gated {
                if cfg.splits > k.div_ceil(512) {
                    continue;
                }
                let mut full = poisoned(&gpu, m * n);
                fp4_gemm_bulk_with(&gpu, &w, &x, m, &mut full, &cfg, false).unwrap();
                let full = gpu.stream().clone_dtoh(&full).unwrap();
                let mut act = poisoned(&gpu, m * n / 2);
                fp4_gemm_bulk_with(&gpu, &w, &x, m, &mut act, &cfg, true).unwrap();
                let act = gpu.stream().clone_dtoh(&act).unwrap();
                let what = format!("bulk swiglu {format} m={m} n={n} k={k} {cfg:?}");
                check_swiglu_of(&full, &act, m, n, &what);
            }
            let mut act = poisoned(&gpu, m * n / 2);
            fp4_gemm_swiglu_bulk(&gpu, &w, &x, m, &mut act).unwrap();
        }
    }
    // Shapes it does not take are refused, not computed wrongly.
    for (format, k, m) in [
        (Fp4Format::Nvfp4, 128, 1),
        (Fp4Format::Mxfp4, 768, 1),
        (Fp4Format::Nvfp4, 256, 33),
    ] {
        let q = quantize(format, &random_matrix(&mut rng, 64 * k, 0.1), 64, k);
        let w = GpuFp4Weight::upload(&gpu, "refused", &q).unwrap();
        let x = gpu.stream().clone_htod(&vec![bf16::ONE; m * k]).unwrap();
        let mut y = poisoned(&gpu, m * 64);
        assert!(!bulk_supported(&gpu, &w, m, false));
        assert!(
            fp4_gemm_bulk(&gpu, &w, &x, m, &mut y).is_err(),
            "{format} k={k} m={m}"
        );
    }
}

#[test]
fn fp4_dequantize_is_bit_exact() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("fp4_dequantize");
    for format in FORMATS {
        for &(n, k) in &[(37, 96), (5, 2048), (130, 544)] {
            let wf = random_matrix(&mut rng, n * k, 0.05);
            let q = quantize(format, &wf, n, k);
            let want: Vec<bf16> = to_bf16(&dequantize(&q).unwrap());
            let w = GpuFp4Weight::upload(&gpu, "w", &q).unwrap();
            let mut out = poisoned(&gpu, n * k);
            fp4_dequantize(&gpu, &w, &mut out).unwrap();
            let got = gpu.stream().clone_dtoh(&out).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{format} [{n}, {k}] element {i}: got {g}, want {w}"
                );
            }
        }
    }
}

#[test]
fn gpu_rejects_bad_shapes() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("bad shapes");
    // k = 48 is a valid NVFP4 matrix but not 16-byte aligned per row: refused with an error.
    let q = quantize(
        Fp4Format::Nvfp4,
        &random_matrix(&mut rng, 4 * 48, 0.1),
        4,
        48,
    );
    assert!(GpuFp4Weight::upload(&gpu, "odd", &q).is_err());
    let q = quantize(
        Fp4Format::Nvfp4,
        &random_matrix(&mut rng, 4 * 64, 0.1),
        4,
        64,
    );
    let w = GpuFp4Weight::upload(&gpu, "w", &q).unwrap();
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 2 * 64]).unwrap();
    let mut y = poisoned(&gpu, 3 * 4);
    assert!(
        fp4_gemm(&gpu, &w, &x, 3, &mut y).is_err(),
        "x too short must be refused"
    );
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// The MoE layer in f64 from dequantized experts (`[2 inter, hidden]` gate/up and `[hidden,
/// inter]` down per expert) and bf16 inputs `xf` (`[tokens, hidden]`): pairs with an id outside
/// the experts contribute nothing.
fn moe_reference(
    (gu_f, d_f): (&[Vec<f32>], &[Vec<f32>]),
    xf: &[f64],
    (ids, wts): (&[i32], &[f32]),
    top_k: usize,
    (hidden, inter): (usize, usize),
) -> Vec<f64> {
    let tokens = xf.len() / hidden;
    let mut want = vec![0.0f64; tokens * hidden];
    for t in 0..tokens {
        for j in 0..top_k {
            let Some(e) = usize::try_from(ids[t * top_k + j])
                .ok()
                .filter(|&e| e < gu_f.len())
            else {
                continue;
            };
            let x = &xf[t * hidden..(t + 1) * hidden];
            let gu: Vec<f64> = (0..2 * inter)
                .map(|r| {
                    (0..hidden)
                        .map(|i| gu_f[e][r * hidden + i] as f64 * x[i])
                        .sum()
                })
                .collect();
            let act: Vec<f64> = (0..inter).map(|i| silu(gu[i]) * gu[inter + i]).collect();
            for h in 0..hidden {
                let y: f64 = (0..inter)
                    .map(|i| d_f[e][h * inter + i] as f64 * act[i])
                    .sum();
                want[t * hidden + h] += wts[t * top_k + j] as f64 * y;
            }
        }
    }
    want
}

#[test]
fn moe_layer_tiled_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe tiled");
    // hidden 384: the down projection's 384 rows end half way through a 256-row block.
    let (experts, hidden, inter, top_k) = (12usize, 384usize, 256usize, 3usize);
    let max_tokens = 150usize;
    for format in FORMATS {
        let mut gu_q = Vec::new();
        let mut d_q = Vec::new();
        for _ in 0..experts {
            let gu = random_matrix(&mut rng, 2 * inter * hidden, 0.1);
            gu_q.push(quantize(format, &gu, 2 * inter, hidden));
            let d = random_matrix(&mut rng, hidden * inter, 0.1);
            d_q.push(quantize(format, &d, hidden, inter));
        }
        let gu_f: Vec<Vec<f32>> = gu_q.iter().map(|q| dequantize(q).unwrap()).collect();
        let d_f: Vec<Vec<f32>> = d_q.iter().map(|q| dequantize(q).unwrap()).collect();
        let w = MoeWeights {
            gate_up: GpuFp4Weight::upload_experts(&gpu, "gate_up", &gu_q).unwrap(),
            down: GpuFp4Weight::upload_experts(&gpu, "down", &d_q).unwrap(),
        };
        assert!(moe_tiled_supported(&w));
        let mut ws = MoeWorkspace::new(&gpu, &w, max_tokens, top_k).unwrap();
        // 150 tokens: the low experts get 100+ pairs (several tiles of 32, the last partly
        // filled); the last expert is never chosen (no tile); one pair has an invalid id.
        for tokens in [2usize, 40, max_tokens] {
            let xb = to_bf16(&random_matrix(&mut rng, tokens * hidden, 1.0));
            let xf: Vec<f64> = xb.iter().map(|v| v.to_f64()).collect();
            let mut ids = Vec::new();
            let mut wts = Vec::new();
            for _ in 0..tokens {
                let mut chosen: Vec<i32> = Vec::new();
                while chosen.len() < top_k {
                    let e = (rng.random::<f32>().powi(2) * (experts - 1) as f32) as i32;
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                ids.extend(&chosen);
                wts.extend((0..top_k).map(|_| rng.random::<f32>()));
            }
            ids[top_k + 1] = experts as i32 + 3;
            let want = moe_reference((&gu_f, &d_f), &xf, (&ids, &wts), top_k, (hidden, inter));
            let s = gpu.stream();
            let x = s.clone_htod(&xb).unwrap();
            let idd = s.clone_htod(&ids).unwrap();
            let wd = s.clone_htod(&wts).unwrap();
            let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // Tiles of 32 and of 64 pairs, each twice: the same bits both times.
            let mut runs = Vec::new();
            for tile in [32usize, 64] {
                let what = format!("moe tiled {format} tokens={tokens} tile {tile}");
                let mut twice = Vec::new();
                for _ in 0..2 {
                    let mut out = poisoned(&gpu, tokens * hidden);
                    let io = (&x, &idd, &wd);
                    moe_layer_tiled_with(&gpu, &w, io, (tokens, top_k), &mut ws, &mut out, tile)
                        .unwrap();
                    twice.push(s.clone_dtoh(&out).unwrap());
                    assert_eq!(ws.invalid_ids(&gpu).unwrap(), 1);
                }
                check_close(&what, &twice[0], &want, 2e-2, 6e-2);
                assert_eq!(bits(&twice[0]), bits(&twice[1]), "{what}: two runs differ");
                runs.push(twice.swap_remove(0));
            }
            let what = format!("moe tiled {format} tokens={tokens}");
            let mut out = poisoned(&gpu, tokens * hidden);
            moe_layer_tiled(&gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out).unwrap();
            let auto = s.clone_dtoh(&out).unwrap();
            let tile = cuda::moe_tile_pairs(tokens * top_k, experts);
            assert_eq!(
                bits(&auto),
                bits(&runs[tile / 32 - 1]),
                "{what}: auto tile {tile}"
            );
            // The automatic launcher takes the tiled path from MOE_TILED_MIN_PAIRS pairs per
            // expert on average: the same bits then.
            let tiled = moe_tiled_preferred(&gpu.tuning(), &w, tokens, top_k);
            assert_eq!(tiled, tokens * top_k >= MOE_TILED_MIN_PAIRS * experts);
            let mut out = poisoned(&gpu, tokens * hidden);
            moe_layer(&gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out).unwrap();
            let got = s.clone_dtoh(&out).unwrap();
            check_close(&format!("{what} auto"), &got, &want, 2e-2, 6e-2);
            if tiled {
                assert_eq!(bits(&got), bits(&runs[0]), "{what}: auto path differs");
            }
        }
        // Shapes the tiled kernels cannot take are refused, not run.
        let odd = MoeWeights {
            gate_up: GpuFp4Weight::upload_experts(&gpu, "gate_up", &gu_q[..1]).unwrap(),
            down: GpuFp4Weight::upload_experts(&gpu, "down", &d_q[..2]).unwrap(),
        };
        assert!(!moe_tiled_supported(&odd));
    }
}

#[test]
fn moe_layer_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe");
    let (experts, hidden, inter, top_k) = (12usize, 160usize, 288usize, 3usize);
    for format in FORMATS {
        let mut gu_q = Vec::new();
        let mut d_q = Vec::new();
        for _ in 0..experts {
            gu_q.push(quantize(
                format,
                &random_matrix(&mut rng, 2 * inter * hidden, 0.1),
                2 * inter,
                hidden,
            ));
            d_q.push(quantize(
                format,
                &random_matrix(&mut rng, hidden * inter, 0.1),
                hidden,
                inter,
            ));
        }
        let gu_f: Vec<Vec<f32>> = gu_q.iter().map(|q| dequantize(q).unwrap()).collect();
        let d_f: Vec<Vec<f32>> = d_q.iter().map(|q| dequantize(q).unwrap()).collect();
        let w = MoeWeights {
            gate_up: GpuFp4Weight::upload_experts(&gpu, "gate_up", &gu_q).unwrap(),
            down: GpuFp4Weight::upload_experts(&gpu, "down", &d_q).unwrap(),
        };
        let mut ws = MoeWorkspace::new(&gpu, &w, 20, top_k).unwrap();
        // 20 tokens: some experts get more than 16 pairs (several passes per expert).
        for tokens in [1usize, 5, 20] {
            let xb = to_bf16(&random_matrix(&mut rng, tokens * hidden, 1.0));
            let xf: Vec<f64> = xb.iter().map(|v| v.to_f64()).collect();
            let mut ids = Vec::new();
            let mut wts = Vec::new();
            for _ in 0..tokens {
                let mut chosen: Vec<i32> = Vec::new();
                while chosen.len() < top_k {
                    // skew towards low ids so that experts collect many pairs
                    let e = (rng.random::<f32>().powi(2) * experts as f32) as i32;
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                ids.extend(&chosen);
                wts.extend((0..top_k).map(|_| rng.random::<f32>()));
            }
            let want = moe_reference((&gu_f, &d_f), &xf, (&ids, &wts), top_k, (hidden, inter));
            let s = gpu.stream();
            let x = s.clone_htod(&xb).unwrap();
            let idd = s.clone_htod(&ids).unwrap();
            let wd = s.clone_htod(&wts).unwrap();
            let mut out = poisoned(&gpu, tokens * hidden);
            moe_layer(&gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out).unwrap();
            let got = s.clone_dtoh(&out).unwrap();
            assert_eq!(ws.invalid_ids(&gpu).unwrap(), 0);
            // bf16 intermediates (gate/up, activation, down outputs) as in every engine.
            check_close(
                &format!("moe {format} tokens={tokens}"),
                &got,
                &want,
                2e-2,
                6e-2,
            );
            // Explicit block shapes (split-K over 1, 3 or 16 warps; several row tiles per block
            // in turn; two-chunk load groups in the down launch) give the same layer.
            for (gu, d, gt, dt, dg, pp) in [
                (1u32, 1u32, 1u32, 1u32, 1u32, 16u32),
                (3, 2, 1, 1, 1, 16),
                (16, 16, 1, 1, 1, 16),
                (2, 1, 3, 5, 2, 16),
                (4, 2, 64, 2, 2, 8),
                (2, 1, 1, 1, 1, 8),
            ] {
                let cfg = MoeConfig {
                    gate_up_warps: gu,
                    down_warps: d,
                    gate_up_row_tiles: gt,
                    down_row_tiles: dt,
                    down_group: dg,
                    pairs_per_pass: pp,
                };
                let mut out = poisoned(&gpu, tokens * hidden);
                moe_layer_with(
                    &gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out, cfg,
                )
                .unwrap();
                let got = s.clone_dtoh(&out).unwrap();
                check_close(
                    &format!("moe {format} tokens={tokens} {cfg:?}"),
                    &got,
                    &want,
                    2e-2,
                    6e-2,
                );
            }
            // One token takes the direct two-launch path by default; the grouped path must
            // give the same layer.
            if tokens == 1 {
                let on = gpu.tuning();
                gpu.set_tuning(Tuning {
                    moe_direct: false,
                    ..on
                });
                let mut out = poisoned(&gpu, tokens * hidden);
                moe_layer(&gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out).unwrap();
                gpu.set_tuning(on);
                let got = s.clone_dtoh(&out).unwrap();
                check_close(
                    &format!("moe {format} tokens=1 grouped path"),
                    &got,
                    &want,
                    2e-2,
                    6e-2,
                );
                check_moe_norm_out(&gpu, &mut rng, &w, &mut ws, (&x, &idd, &wd), top_k, format);
                // The down launch with one warp per pair and with each pair's K split over
                // two warps (K = 288: three chunks, the first two to one warp, the partial
                // third to the other) gives the same layer.
                for split in [1u32, 2] {
                    gpu.set_tuning(Tuning {
                        moe_down_split: split,
                        ..on
                    });
                    let mut out = poisoned(&gpu, tokens * hidden);
                    moe_layer(&gpu, &w, &x, &idd, &wd, tokens, top_k, &mut ws, &mut out).unwrap();
                    let got = s.clone_dtoh(&out).unwrap();
                    check_close(
                        &format!("moe {format} tokens=1 down split {split}"),
                        &got,
                        &want,
                        2e-2,
                        6e-2,
                    );
                    check_moe_norm_out(&gpu, &mut rng, &w, &mut ws, (&x, &idd, &wd), top_k, format);
                    gpu.set_tuning(on);
                }
            }
        }
        // An out-of-range router id is counted and its pair left out.
        let x = gpu.stream().clone_htod(&vec![bf16::ONE; hidden]).unwrap();
        let ids: Vec<i32> = vec![0, experts as i32 + 5, 1];
        let idd = gpu.stream().clone_htod(&ids).unwrap();
        let wd = gpu.stream().clone_htod(&[0.5f32, 0.25, 0.25]).unwrap();
        let mut out = poisoned(&gpu, hidden);
        moe_layer(&gpu, &w, &x, &idd, &wd, 1, top_k, &mut ws, &mut out).unwrap();
        assert_eq!(ws.invalid_ids(&gpu).unwrap(), 1);
        let got = gpu.stream().clone_dtoh(&out).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn auto_config_always_has_a_kernel() {
    // CPU-only: every shape the dispatcher can see maps to a compiled variant.
    for m in [1usize, 2, 4, 8, 9, 16, 17, 32, 64, 256, 2048] {
        for &(k, n) in &[
            (4096usize, 14336usize),
            (14336, 4096),
            (4096, 4096),
            (2048, 1536),
            (768, 2048),
            (2048, 151936),
            (32, 1),
            (96, 77),
        ] {
            let c = Fp4GemmConfig::auto(m, n, k, 132);
            assert!(
                variant_exists(c, m),
                "m={m} k={k} n={n}: {c:?} has no kernel"
            );
            if m == 1 || m == 16 {
                eprintln!("m={m} k={k} n={n}: {c:?}");
            }
        }
    }
}

/// Values rounded to bf16 (what the device holds), and the rounded values as f32.
fn bf16_pair(v: &[f32]) -> (Vec<bf16>, Vec<f32>) {
    let b = to_bf16(v);
    let f = b.iter().map(|x| x.to_f32()).collect();
    (b, f)
}

/// The experts of a BF16 expert launch: `w` with `(n, k, experts)`.
fn bf16_experts(
    w: &CudaSlice<bf16>,
    (n, k, experts): (usize, usize, usize),
) -> cuda::Bf16Experts<'_> {
    cuda::Bf16Experts { w, n, k, experts }
}

/// The pairs of a BF16 expert launch: `ids` with `(pairs, in_div, swiglu_in)`.
fn bf16_pairs(
    ids: &CudaSlice<i32>,
    (pairs, in_div, swiglu_in): (usize, usize, bool),
) -> cuda::Bf16Pairs<'_> {
    cuda::Bf16Pairs {
        ids,
        pairs,
        in_div,
        swiglu_in,
    }
}

/// One (token, expert) pair of the BF16 expert kernels: its gate/up and down output rows and
/// its input row.
#[derive(Clone, Copy)]
struct BF16Pair<'a> {
    gu: &'a [bf16],
    y: &'a [bf16],
    x: &'a [f32],
}

/// A pair's outputs against f64: gate/up from expert `e`'s rows (`guf`, `[experts, 2 inter,
/// hidden]`) and the input row; down (`dnf`) from the SwiGLU of the device's own gate/up
/// outputs, rounded to bf16 as the kernels round it.
fn check_bf16_pair(
    what: &str,
    pair: BF16Pair<'_>,
    guf: &[f32],
    dnf: &[f32],
    e: usize,
    (hidden, inter): (usize, usize),
) {
    let rows = 2 * inter;
    let want_gu = matmul_ref(
        &guf[e * rows * hidden..(e + 1) * rows * hidden],
        pair.x,
        1,
        rows,
        hidden,
    );
    check_close(&format!("{what} gate/up"), pair.gu, &want_gu, 5e-3, 1e-2);
    let a: Vec<f32> = (0..inter)
        .map(|i| {
            let g = pair.gu[i].to_f64();
            let u = pair.gu[inter + i].to_f64();
            bf16::from_f64(silu(g) * u).to_f32()
        })
        .collect();
    let w_dn = &dnf[e * hidden * inter..(e + 1) * hidden * inter];
    let want_y = matmul_ref(w_dn, &a, 1, hidden, inter);
    check_close(&format!("{what} down"), pair.y, &want_y, 5e-3, 1e-2);
}

/// The folded-norm output side of the one-token MoE layer (`moe_down_norm_out`) against the
/// direct path's stored output `d` on random residual, pending and norm rows: the residual
/// becomes `resid + bf16(pending) + d` (that order; `d` may differ from the stored one by one
/// bf16 rounding, the two kernels being compiled apart), the next input is exactly
/// `bf16(w * resid')`, and each of the 16-row partial sums is the sum of `resid'^2`.
fn check_moe_norm_out(
    gpu: &GpuContext,
    rng: &mut ChaCha8Rng,
    w: &MoeWeights,
    ws: &mut MoeWorkspace,
    (x, ids, wts): (&CudaSlice<bf16>, &CudaSlice<i32>, &CudaSlice<f32>),
    top_k: usize,
    format: Fp4Format,
) {
    let s = gpu.stream();
    let hidden = x.len();
    let mut out = poisoned(gpu, hidden);
    moe_layer(gpu, w, x, ids, wts, 1, top_k, ws, &mut out).unwrap();
    let d = s.clone_dtoh(&out).unwrap();
    let resid0 = random_matrix(rng, hidden, 1.0);
    let pend = to_bf16(&random_matrix(rng, hidden, 0.5));
    let normw = random_matrix(rng, hidden, 1.0);
    let mut resid = s.clone_htod(&resid0).unwrap();
    let (pend_d, normw_d) = (s.clone_htod(&pend).unwrap(), s.clone_htod(&normw).unwrap());
    let mut h = poisoned(gpu, hidden);
    let nparts = cuda::moe_fold_parts(hidden);
    let mut parts = s.clone_htod(&vec![f32::NAN; nparts]).unwrap();
    let route = cuda::OneTokenRoute::TopK { ids, weights: wts };
    cuda::moe_one_token_gate_up(gpu, w, x, route, top_k, ws).unwrap();
    let norm_out = cuda::NormOut {
        resid: &mut resid,
        weight: &normw_d,
        h: &mut h,
        parts: &mut parts,
    };
    let got_n = cuda::moe_down_norm_out(gpu, w, route, top_k, ws, Some(&pend_d), norm_out).unwrap();
    assert_eq!(got_n, nparts);
    let (r, hh, pp) = (
        s.clone_dtoh(&resid).unwrap(),
        s.clone_dtoh(&h).unwrap(),
        s.clone_dtoh(&parts).unwrap(),
    );
    for i in 0..hidden {
        let want = resid0[i] + pend[i].to_f32() + d[i].to_f32();
        let tol = d[i].to_f32().abs() / 128.0 + 1e-6 * want.abs();
        assert!(
            (r[i] - want).abs() <= tol,
            "moe {format} norm out: resid[{i}] {} vs {want}",
            r[i]
        );
        assert_eq!(
            hh[i].to_bits(),
            bf16::from_f32(normw[i] * r[i]).to_bits(),
            "moe {format} norm out: h[{i}]"
        );
    }
    for (b, &got) in pp.iter().enumerate() {
        let want: f64 = r[b * 16..((b + 1) * 16).min(hidden)]
            .iter()
            .map(|&v| v as f64 * v as f64)
            .sum();
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want.max(1e-12),
            "moe {format} norm out: part {b} {got} vs {want}"
        );
    }
    check_logits_route(gpu, rng, w, ws, x, top_k, format, (&resid0, &normw_d));
}

/// The one-token MoE layer routed from the router's logits (`OneTokenRoute::Logits`: each
/// kernel takes the softmax and top-k itself) against the same layer given the reference
/// top-k ids and weights of those logits (f64 softmax, ties to the lower index), with and
/// without renormalisation: the residual within one bf16 rounding of the combined row.
#[allow(clippy::too_many_arguments)]
fn check_logits_route(
    gpu: &GpuContext,
    rng: &mut ChaCha8Rng,
    w: &MoeWeights,
    ws: &mut MoeWorkspace,
    x: &CudaSlice<bf16>,
    top_k: usize,
    format: Fp4Format,
    (resid0, normw_d): (&[f32], &CudaSlice<f32>),
) {
    let s = gpu.stream();
    let (experts, hidden, _) = w.dims().unwrap();
    for renorm in [true, false] {
        // Random logits whose top-k + 1 are clear of ties.
        let logits: Vec<f32> = (0..experts)
            .map(|_| rng.random::<f32>() * 6.0 - 3.0)
            .collect();
        let lf: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let (want_ids, want_w) = topk_ref(&lf, top_k, renorm);
        let mut sorted = lf.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if (0..top_k.min(experts - 1)).any(|j| sorted[j] - sorted[j + 1] < 1e-4) {
            eprintln!("moe {format} logits route: near tie, skipped");
            continue;
        }
        let ids_d = s
            .clone_htod(&want_ids.iter().map(|&i| i as i32).collect::<Vec<_>>())
            .unwrap();
        let wts_d = s
            .clone_htod(&want_w.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .unwrap();
        let logits_d = s.clone_htod(&logits).unwrap();
        let mut results = Vec::new();
        for route in [
            cuda::OneTokenRoute::TopK {
                ids: &ids_d,
                weights: &wts_d,
            },
            cuda::OneTokenRoute::Logits {
                logits: &logits_d,
                renorm,
            },
        ] {
            let mut resid = s.clone_htod(resid0).unwrap();
            let mut h = poisoned(gpu, hidden);
            let mut parts = s
                .clone_htod(&vec![f32::NAN; cuda::moe_fold_parts(hidden)])
                .unwrap();
            cuda::moe_one_token_gate_up(gpu, w, x, route, top_k, ws).unwrap();
            let out = cuda::NormOut {
                resid: &mut resid,
                weight: normw_d,
                h: &mut h,
                parts: &mut parts,
            };
            cuda::moe_down_norm_out(gpu, w, route, top_k, ws, None, out).unwrap();
            results.push(s.clone_dtoh(&resid).unwrap());
        }
        let (a, b) = (&results[0], &results[1]);
        let mut differ = 0;
        for i in 0..hidden {
            let d = (a[i] - resid0[i]).abs();
            assert!(
                (a[i] - b[i]).abs() <= d / 128.0 + 1e-6 * a[i].abs().max(1e-30),
                "moe {format} logits route (renorm {renorm}): resid[{i}] {} vs {}",
                b[i],
                a[i]
            );
            differ += usize::from(a[i] != b[i]);
        }
        eprintln!(
            "moe {format} logits route (renorm {renorm}): {differ} of {hidden} rows differ by a rounding"
        );
    }
}

/// The reference router: softmax of `logits`, the top-k by probability (ties to the lower
/// index), optionally renormalised. Returns (ids, weights).
fn topk_ref(logits: &[f64], top_k: usize, renorm: bool) -> (Vec<usize>, Vec<f64>) {
    let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
    let sum: f64 = ex.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let ids: Vec<usize> = order[..top_k].to_vec();
    let mut w: Vec<f64> = ids.iter().map(|&i| ex[i] / sum).collect();
    if renorm {
        let s: f64 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= s);
    }
    (ids, w)
}

/// The one-token BF16 expert kernels (gate/up, then down with SwiGLU on its input) against an
/// f64 reference, on shapes with several rows per block and k off the 256-element chunk; a pair
/// with an out-of-range expert id keeps its poisoned output rows; bad shapes refused.
#[test]
fn moe_bf16_pairs_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe bf16 pairs");
    for (experts, hidden, inter, top_k) in [
        (6usize, 512usize, 200usize, 4usize),
        (5, 2048, 768, 4),
        (3, 136, 64, 2),
    ] {
        let rows = 2 * inter;
        let (gub, guf) = bf16_pair(&random_matrix(&mut rng, experts * rows * hidden, 0.1));
        let (dnb, dnf) = bf16_pair(&random_matrix(&mut rng, experts * hidden * inter, 0.1));
        let (xb, xf) = bf16_pair(&random_matrix(&mut rng, hidden, 1.0));
        let mut ids: Vec<i32> = (0..top_k).map(|j| ((j * 2 + 1) % experts) as i32).collect();
        ids[top_k - 1] = experts as i32;
        let gu = gpu.stream().clone_htod(&gub).unwrap();
        let dn = gpu.stream().clone_htod(&dnb).unwrap();
        let x = gpu.stream().clone_htod(&xb).unwrap();
        let ids_d = gpu.stream().clone_htod(&ids).unwrap();
        let mut act = poisoned(&gpu, top_k * rows);
        cuda::moe_bf16_pairs(
            &gpu,
            bf16_experts(&gu, (rows, hidden, experts)),
            bf16_pairs(&ids_d, (top_k, top_k, false)),
            &x,
            &mut act,
        )
        .unwrap();
        let mut y = poisoned(&gpu, top_k * hidden);
        cuda::moe_bf16_pairs(
            &gpu,
            bf16_experts(&dn, (hidden, inter, experts)),
            bf16_pairs(&ids_d, (top_k, 1, true)),
            &act,
            &mut y,
        )
        .unwrap();
        let act_h = gpu.stream().clone_dtoh(&act).unwrap();
        let y_h = gpu.stream().clone_dtoh(&y).unwrap();
        for (p, &e) in ids.iter().enumerate() {
            let got_gu = &act_h[p * rows..(p + 1) * rows];
            let got_y = &y_h[p * hidden..(p + 1) * hidden];
            let what = format!("{experts}x[{rows}, {hidden}] pair {p}");
            if e < 0 || e as usize >= experts {
                assert!(
                    got_gu.iter().chain(got_y).all(|v| v.is_nan()),
                    "{what}: written"
                );
                continue;
            }
            let pair = BF16Pair {
                gu: got_gu,
                y: got_y,
                x: &xf,
            };
            check_bf16_pair(&what, pair, &guf, &dnf, e as usize, (hidden, inter));
        }
    }
    // Refused: k not a multiple of 8, a SwiGLU row over the staged limit, x too short.
    let w = gpu.stream().clone_htod(&vec![bf16::ONE; 2 * 8200]).unwrap();
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 2 * 8200]).unwrap();
    let ids = gpu.stream().clone_htod(&[0i32]).unwrap();
    let mut y = poisoned(&gpu, 8);
    let big = cuda::MOE_BF16_PAIRS_MAX_SWIGLU_K + 8;
    // Whether a launch of one pair over `w` with experts of `shape` is taken.
    let mut takes = |shape, swiglu_in, x: &CudaSlice<bf16>| {
        let p = bf16_pairs(&ids, (1, 1, swiglu_in));
        cuda::moe_bf16_pairs(&gpu, bf16_experts(&w, shape), p, x, &mut y).is_ok()
    };
    assert!(!takes((1, 12, 1), false, &x));
    assert!(!takes((1, big, 1), true, &x));
    assert!(takes((2, 8200, 1), false, &x));
    let short = gpu.stream().clone_htod(&vec![bf16::ONE; 100]).unwrap();
    assert!(!takes((2, 8200, 1), false, &short));
}

/// The one-token BF16 gate/up routed from the router's logits: the ids and weights it writes
/// are the reference top-k (f64 softmax, ties to the lower index; with and without
/// renormalisation, weights within f32 rounding), and its rows equal the same kernel given those
/// ids, bit for bit (the same dot products in the same order). Too many pairs or logits of the
/// wrong length are refused.
#[test]
fn moe_bf16_pairs_from_logits_matches_ids_route() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe bf16 pairs from logits");
    let s = gpu.stream();
    for (experts, hidden, inter, top_k) in [(128usize, 256usize, 96usize, 8usize), (20, 136, 64, 3)]
    {
        let rows = 2 * inter;
        let (gub, _) = bf16_pair(&random_matrix(&mut rng, experts * rows * hidden, 0.1));
        let (xb, _) = bf16_pair(&random_matrix(&mut rng, hidden, 1.0));
        let gu = s.clone_htod(&gub).unwrap();
        let x = s.clone_htod(&xb).unwrap();
        for renorm in [true, false] {
            let logits: Vec<f32> = (0..experts)
                .map(|_| rng.random::<f32>() * 6.0 - 3.0)
                .collect();
            let lf: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
            let mut sorted = lf.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if (0..top_k).any(|j| sorted[j] - sorted[j + 1] < 1e-4) {
                eprintln!("moe bf16 logits route: near tie, skipped");
                continue;
            }
            let (want_ids, want_w) = topk_ref(&lf, top_k, renorm);
            let logits_d = s.clone_htod(&logits).unwrap();
            let mut ids_d = s.clone_htod(&vec![-7i32; top_k]).unwrap();
            let mut wts_d = s.clone_htod(&vec![f32::NAN; top_k]).unwrap();
            let mut y = poisoned(&gpu, top_k * rows);
            let route = cuda::Bf16LogitsRoute {
                logits: &logits_d,
                renorm,
                ids: &mut ids_d,
                weights: &mut wts_d,
            };
            let e = bf16_experts(&gu, (rows, hidden, experts));
            cuda::moe_bf16_pairs_from_logits(&gpu, e, route, top_k, &x, &mut y).unwrap();
            let ids_h = s.clone_dtoh(&ids_d).unwrap();
            let wts_h = s.clone_dtoh(&wts_d).unwrap();
            let what = format!("{experts} experts, top-{top_k}, renorm {renorm}");
            let want: Vec<i32> = want_ids.iter().map(|&i| i as i32).collect();
            assert_eq!(ids_h, want, "{what}: ids");
            for (j, (&got, &w)) in wts_h.iter().zip(&want_w).enumerate() {
                assert!(
                    (got as f64 - w).abs() <= 1e-5 * w.abs() + 1e-7,
                    "{what}: weight {j} {got} vs {w}"
                );
            }
            // The same launch routed by those ids.
            let mut y_ids = poisoned(&gpu, top_k * rows);
            let p = bf16_pairs(&ids_d, (top_k, top_k, false));
            cuda::moe_bf16_pairs(&gpu, e, p, &x, &mut y_ids).unwrap();
            let a = s.clone_dtoh(&y).unwrap();
            let b = s.clone_dtoh(&y_ids).unwrap();
            assert!(
                a.iter().all(|v| v.is_finite()),
                "{what}: a row left unwritten"
            );
            assert!(
                a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()),
                "{what}: rows differ from the ids route"
            );
        }
    }
    // Refused: more pairs than selection slots, logits of the wrong length.
    let w = s.clone_htod(&vec![bf16::ONE; 20 * 16 * 64]).unwrap();
    let x = s.clone_htod(&vec![bf16::ONE; 64]).unwrap();
    let logits = s.clone_htod(&vec![0f32; 20]).unwrap();
    let short = s.clone_htod(&vec![0f32; 19]).unwrap();
    let mut ids = s.clone_htod(&vec![0i32; 17]).unwrap();
    let mut wts = s.clone_htod(&vec![0f32; 17]).unwrap();
    let mut y = poisoned(&gpu, 17 * 16);
    let e = bf16_experts(&w, (16, 64, 20));
    for (lg, top_k) in [(&logits, cuda::MOE_ONE_TOKEN_MAX_TOPK + 1), (&short, 4)] {
        let route = cuda::Bf16LogitsRoute {
            logits: lg,
            renorm: true,
            ids: &mut ids,
            weights: &mut wts,
        };
        assert!(cuda::moe_bf16_pairs_from_logits(&gpu, e, route, top_k, &x, &mut y).is_err());
    }
}

/// The folded norm (fold.rs): a one-token producer adds its product to the residual row and
/// writes `bf16(w ⊙ v)` with its partial sums of `v²`; the consumers (plain and SwiGLU) scale by
/// `1 / rms(v)`. Against the unfolded computation in f64: `v = v0 + bf16(x · Wo^T)`, then
/// `RMSNorm(v) · Wc^T` and `silu(RMSNorm(v) · Wg^T) * (RMSNorm(v) · Wu^T)`, with the norm not
/// rounded to bf16 (the two GPU paths round at different places).
#[test]
fn folded_norm_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("folded_norm");
    let eps = 1e-5f32;
    // (hidden, producer K, consumer N, SwiGLU width): K and hidden off the 128-element chunks
    // (FP4 weights need K % 32 == 0), consumer widths off the 16/32-row tiles.
    for &(hd, ko, nc, inter) in &[
        (416, 544, 300, 272),
        (4096, 1024, 1040, 96),
        (1056, 160, 64, 200),
    ] {
        for format in FORMATS {
            let what = format!("{format} hidden {hd}");
            let wo = quantize(format, &random_matrix(&mut rng, hd * ko, 0.02), hd, ko);
            let wc = quantize(format, &random_matrix(&mut rng, nc * hd, 0.02), nc, hd);
            let wgu = quantize(
                format,
                &random_matrix(&mut rng, 2 * inter * hd, 0.02),
                2 * inter,
                hd,
            );
            let xb = to_bf16(&random_matrix(&mut rng, ko, 1.0));
            let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let v0 = random_matrix(&mut rng, hd, 4.0);
            let nw: Vec<f32> = (0..hd).map(|_| 0.5 + rng.random::<f32>()).collect();
            // The reference.
            let yo = matmul_ref(&dequantize(&wo).unwrap(), &xf, 1, hd, ko);
            let v: Vec<f32> = v0
                .iter()
                .zip(&yo)
                .map(|(a, y)| a + bf16::from_f64(*y).to_f32())
                .collect();
            let ms = v.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / hd as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            let h: Vec<f32> = v
                .iter()
                .zip(&nw)
                .map(|(&a, &w)| (w as f64 * a as f64 * inv) as f32)
                .collect();
            let want_c = matmul_ref(&dequantize(&wc).unwrap(), &h, 1, nc, hd);
            let gu = matmul_ref(&dequantize(&wgu).unwrap(), &h, 1, 2 * inter, hd);
            let want_act: Vec<f64> = (0..inter).map(|i| silu(gu[i]) * gu[inter + i]).collect();
            // The GPU.
            let s = gpu.stream();
            let (gwo, gwc, gwgu) = (
                GpuFp4Weight::upload(&gpu, "wo", &wo).unwrap(),
                GpuFp4Weight::upload(&gpu, "wc", &wc).unwrap(),
                GpuFp4Weight::upload(&gpu, "wgu", &wgu).unwrap(),
            );
            let x = s.clone_htod(&xb).unwrap();
            let mut resid = s.clone_htod(&v0).unwrap();
            let normw = s.clone_htod(&nw).unwrap();
            let mut hout = poisoned(&gpu, hd);
            let mut parts = s.clone_htod(&vec![f32::NAN; 2 * hd]).unwrap();
            let nparts = cuda::fp4_gemm_norm_out(
                &gpu,
                &gwo,
                &x,
                cuda::NormOut {
                    resid: &mut resid,
                    weight: &normw,
                    h: &mut hout,
                    parts: &mut parts,
                },
            )
            .unwrap();
            assert_eq!(nparts, cuda::fold_parts(&gpu, &gwo), "{what}");
            let input = cuda::NormIn {
                parts: &parts,
                nparts,
                len: hd,
                eps,
            };
            let mut yc = poisoned(&gpu, nc);
            cuda::fp4_gemm_norm_in(&gpu, &gwc, &hout, input, &mut yc).unwrap();
            let mut act = poisoned(&gpu, inter);
            cuda::fp4_gemm_swiglu_norm_in(&gpu, &gwgu, &hout, input, &mut act).unwrap();
            // A BF16 consumer (a Linear a mixed checkpoint keeps dense), rows off the 8-row
            // blocks.
            let nb = nc + 3;
            let wb = to_bf16(&random_matrix(&mut rng, nb * hd, 0.02));
            let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want_b = matmul_ref(&wbf, &h, 1, nb, hd);
            let gwb = s.clone_htod(&wb).unwrap();
            let mut yb = poisoned(&gpu, nb);
            cuda::bf16_gemv_norm_in(&gpu, &gwb, nb, hd, &hout, input, &mut yb).unwrap();
            let yb = s.clone_dtoh(&yb).unwrap();
            // Both row counts per warp (two where a lane holds two rows' pieces), bit-equal.
            for rw in [1, 2]
                .into_iter()
                .filter(|&rw| hd * rw <= cuda::BF16_NORM_IN_MAX_K)
            {
                let mut yr = poisoned(&gpu, nb);
                cuda::bf16_gemv_norm_in_rows(&gpu, rw, &gwb, nb, hd, &hout, input, &mut yr)
                    .unwrap();
                let yr = s.clone_dtoh(&yr).unwrap();
                assert!(
                    yr.iter().zip(&yb).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: BF16 consumer, {rw} rows per warp"
                );
            }
            // The FP4 and the BF16 consumer in one launch: both outputs bit-equal to their
            // own launches'.
            let (mut y1, mut y2) = (poisoned(&gpu, nc), poisoned(&gpu, nb));
            cuda::fp4_bf16_gemv_norm_in(&gpu, &gwc, &gwb, nb, &hout, input, &mut y1, &mut y2)
                .unwrap();
            let yc_h = s.clone_dtoh(&yc).unwrap();
            for (got, want, part) in [(&y1, &yc_h, "FP4"), (&y2, &yb, "BF16")] {
                let got = s.clone_dtoh(got).unwrap();
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: one launch, {part} part"
                );
            }
            // ... and refused with a BF16 weight of another shape.
            assert!(cuda::fp4_bf16_gemv_norm_in(
                &gpu,
                &gwc,
                &gwb,
                nb - 1,
                &hout,
                input,
                &mut y1,
                &mut y2
            )
            .is_err());
            // The residual row: v, up to the bf16 rounding of the product (its f32 sum may
            // round to the neighbouring bf16 value).
            let got_v = s.clone_dtoh(&resid).unwrap();
            for i in 0..hd {
                let tol = (yo[i].abs() as f32) * 2f32.powi(-7) + 1e-6;
                assert!(
                    (got_v[i] - v[i]).abs() <= tol,
                    "{what}: residual {i} = {}, want {}",
                    got_v[i],
                    v[i]
                );
            }
            let want_h: Vec<f64> = v.iter().zip(&nw).map(|(&a, &w)| (w * a) as f64).collect();
            check_close(
                &format!("{what}: h"),
                &s.clone_dtoh(&hout).unwrap(),
                &want_h,
                8e-3,
                2e-2,
            );
            check_close(
                &format!("{what}: consumer"),
                &s.clone_dtoh(&yc).unwrap(),
                &want_c,
                8e-3,
                2e-2,
            );
            check_close(
                &format!("{what}: SwiGLU consumer"),
                &s.clone_dtoh(&act).unwrap(),
                &want_act,
                1.5e-2,
                3e-2,
            );
            check_close(&format!("{what}: BF16 consumer"), &yb, &want_b, 8e-3, 2e-2);
        }
    }
    // The BF16 consumer refuses a K it cannot hold or split into 16-byte pieces (rows per warp
    // chosen by the launcher: None), a K two rows per warp cannot hold, and three rows per warp.
    let s = gpu.stream();
    let parts = s.clone_htod(&[1.0f32; 4]).unwrap();
    for (rw, k) in [(None, 4104), (None, 36), (Some(2), 4096), (Some(3), 64)] {
        let w = s.clone_htod(&vec![bf16::ONE; 8 * k]).unwrap();
        let x = s.clone_htod(&vec![bf16::ONE; k]).unwrap();
        let mut y = poisoned(&gpu, 8);
        let input = cuda::NormIn {
            parts: &parts,
            nparts: 4,
            len: k,
            eps,
        };
        let r = match rw {
            None => cuda::bf16_gemv_norm_in(&gpu, &w, 8, k, &x, input, &mut y),
            Some(rw) => cuda::bf16_gemv_norm_in_rows(&gpu, rw, &w, 8, k, &x, input, &mut y),
        };
        assert!(r.is_err(), "K {k}, {rw:?} rows per warp accepted");
    }
}

/// The grouped BF16 expert kernel (batches and prefill of the BF16 baseline) against an f64
/// reference: several tokens whose pairs share experts (one expert with more than one group of 8
/// pairs), an out-of-range id whose rows stay poisoned, SwiGLU inputs staged in shared memory
/// (width <= 2048) and formed per weight row (wider); bad shapes refused.
/// A random BF16 MoE case on the device: `[experts, 2 inter, hidden]` gate/up and `[experts,
/// hidden, inter]` down stacks, `tokens` input rows, and router ids with expert 0 in every
/// token's first slot, the other slots drawn from `others`, and the last pair's id out of range
/// (`experts + 2`). Returns the device buffers (gate/up, down, x, ids) and the host copies
/// (gate/up, down, x as f32; ids).
#[allow(clippy::type_complexity)]
fn bf16_moe_case(
    gpu: &GpuContext,
    rng: &mut ChaCha8Rng,
    (experts, hidden, inter, tokens, top_k): (usize, usize, usize, usize, usize),
    others: std::ops::Range<i32>,
) -> (
    [CudaSlice<bf16>; 3],
    CudaSlice<i32>,
    [Vec<f32>; 3],
    Vec<i32>,
) {
    let rows = 2 * inter;
    let pairs = tokens * top_k;
    let (gub, guf) = bf16_pair(&random_matrix(rng, experts * rows * hidden, 0.1));
    let (dnb, dnf) = bf16_pair(&random_matrix(rng, experts * hidden * inter, 0.1));
    let (xb, xf) = bf16_pair(&random_matrix(rng, tokens * hidden, 1.0));
    let mut ids: Vec<i32> = (0..pairs)
        .map(|p| {
            if p % top_k == 0 {
                0
            } else {
                rng.random_range(others.clone())
            }
        })
        .collect();
    ids[pairs - 1] = experts as i32 + 2;
    let s = gpu.stream();
    let dev = [
        s.clone_htod(&gub).unwrap(),
        s.clone_htod(&dnb).unwrap(),
        s.clone_htod(&xb).unwrap(),
    ];
    let ids_d = s.clone_htod(&ids).unwrap();
    (dev, ids_d, [guf, dnf, xf], ids)
}

#[test]
fn moe_bf16_tiled_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe bf16 tiled");
    // hidden 320 and inter 192: the down rows end a quarter into a 256-row block and the gate
    // rows half way through a 128-row one.
    let (experts, hidden, inter, tokens, top_k) = (5usize, 320usize, 192usize, 100usize, 2usize);
    let rows = 2 * inter;
    let pairs = tokens * top_k;
    // Expert 0 in every token's first slot (100 pairs: four tiles, the last partly filled),
    // experts 1-3 at random, expert 4 never (no tile), one id out of range.
    let shape = (experts, hidden, inter, tokens, top_k);
    let ([gu, dn, x], ids_d, [guf, dnf, xf], ids) =
        bf16_moe_case(&gpu, &mut rng, shape, 1..experts as i32 - 1);
    let s = gpu.stream();
    assert!(cuda::moe_bf16_tiled_supported(rows, hidden, true));
    assert!(!cuda::moe_bf16_tiled_supported(rows, hidden + 8, true));
    for tile in [32usize, 64] {
        let mut route = cuda::MoeRoute::new(&gpu, pairs, experts).unwrap();
        let mut bad = s.clone_htod(&[0i32]).unwrap();
        route
            .build(&gpu, &ids_d, (pairs, tile), Some(&mut bad))
            .unwrap();
        assert_eq!(s.clone_dtoh(&bad).unwrap(), vec![1]);
        assert_eq!(route.tile_pairs(), tile);
        let run = |w: &CudaSlice<bf16>, shape, in_div, gated, x: &CudaSlice<bf16>, out_len| {
            let mut y = poisoned(&gpu, out_len);
            cuda::moe_bf16_tiled(
                &gpu,
                bf16_experts(w, shape),
                &route,
                pairs,
                in_div,
                gated,
                x,
                &mut y,
            )
            .unwrap();
            s.clone_dtoh(&y).unwrap()
        };
        let gu_h = run(&gu, (rows, hidden, experts), top_k, false, &x, pairs * rows);
        let act_h = run(&gu, (rows, hidden, experts), top_k, true, &x, pairs * inter);
        let act2 = run(&gu, (rows, hidden, experts), top_k, true, &x, pairs * inter);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&act_h), bits(&act2), "two runs differ");
        let act_d = s.clone_htod(&act_h).unwrap();
        let y_h = run(
            &dn,
            (hidden, inter, experts),
            1,
            false,
            &act_d,
            pairs * hidden,
        );
        for (p, &e) in ids.iter().enumerate() {
            let got_gu = &gu_h[p * rows..(p + 1) * rows];
            let got_act = &act_h[p * inter..(p + 1) * inter];
            let got_y = &y_h[p * hidden..(p + 1) * hidden];
            let what = format!("tiled {tile} pair {p} (expert {e})");
            if e as usize >= experts {
                let all = got_gu.iter().chain(got_act).chain(got_y);
                assert!(all.copied().all(|v| v.is_nan()), "{what}: written");
                continue;
            }
            let e = e as usize;
            let t = p / top_k;
            let xr = &xf[t * hidden..(t + 1) * hidden];
            let w_gu = &guf[e * rows * hidden..(e + 1) * rows * hidden];
            let want_gu = matmul_ref(w_gu, xr, 1, rows, hidden);
            check_close(&format!("{what} gate/up"), got_gu, &want_gu, 5e-3, 1e-2);
            let want_act: Vec<f64> = (0..inter)
                .map(|i| silu(want_gu[i]) * want_gu[inter + i])
                .collect();
            check_close(&format!("{what} swiglu"), got_act, &want_act, 1e-2, 2e-2);
            // down from the device's own bf16 activations
            let a: Vec<f32> = got_act.iter().map(|v| v.to_f32()).collect();
            let w_dn = &dnf[e * hidden * inter..(e + 1) * hidden * inter];
            let want_y = matmul_ref(w_dn, &a, 1, hidden, inter);
            check_close(&format!("{what} down"), got_y, &want_y, 5e-3, 1e-2);
        }
    }
    // A table built for other experts is refused.
    let other = cuda::MoeRoute::new(&gpu, pairs, experts + 1).unwrap();
    let mut route = cuda::MoeRoute::new(&gpu, pairs, experts).unwrap();
    assert!(route.build(&gpu, &ids_d, (pairs, 48), None).is_err());
    // A launch over fewer pairs than the table was built for (its entries index rows past
    // them) is refused.
    route.build(&gpu, &ids_d, (pairs, 32), None).unwrap();
    let mut y = poisoned(&gpu, (pairs - 1) * rows);
    let e = bf16_experts(&gu, (rows, hidden, experts));
    assert!(cuda::moe_bf16_tiled(&gpu, e, &route, pairs - 1, top_k, false, &x, &mut y).is_err());
    let mut y = poisoned(&gpu, pairs * rows);
    let e = bf16_experts(&gu, (rows, hidden, experts));
    assert!(cuda::moe_bf16_tiled(&gpu, e, &other, pairs, top_k, false, &x, &mut y).is_err());
}

#[test]
fn moe_bf16_grouped_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rng("moe bf16 grouped");
    for (experts, hidden, inter, tokens, top_k) in [
        (4usize, 512usize, 200usize, 7usize, 3usize),
        (3, 64, 2056, 5, 2),
    ] {
        let rows = 2 * inter;
        let pairs = tokens * top_k;
        // Expert 0 in every token's first slot (more than 8 pairs in the first case), the rest
        // at random, and one id out of range.
        let shape = (experts, hidden, inter, tokens, top_k);
        let ([gu, dn, x], ids_d, [guf, dnf, xf], ids) =
            bf16_moe_case(&gpu, &mut rng, shape, 0..experts as i32);
        let s = gpu.stream();
        let mut act = poisoned(&gpu, pairs * rows);
        cuda::moe_bf16_grouped(
            &gpu,
            bf16_experts(&gu, (rows, hidden, experts)),
            bf16_pairs(&ids_d, (pairs, top_k, false)),
            &x,
            &mut act,
        )
        .unwrap();
        let mut y = poisoned(&gpu, pairs * hidden);
        cuda::moe_bf16_grouped(
            &gpu,
            bf16_experts(&dn, (hidden, inter, experts)),
            bf16_pairs(&ids_d, (pairs, 1, true)),
            &act,
            &mut y,
        )
        .unwrap();
        let act_h = s.clone_dtoh(&act).unwrap();
        let y_h = s.clone_dtoh(&y).unwrap();
        for (p, &e) in ids.iter().enumerate() {
            let got_gu = &act_h[p * rows..(p + 1) * rows];
            let got_y = &y_h[p * hidden..(p + 1) * hidden];
            let what = format!("{experts}x[{rows}, {hidden}] pair {p}");
            if e as usize >= experts {
                assert!(
                    got_gu.iter().chain(got_y).all(|v| v.is_nan()),
                    "{what}: written"
                );
                continue;
            }
            let t = p / top_k;
            let pair = BF16Pair {
                gu: got_gu,
                y: got_y,
                x: &xf[t * hidden..(t + 1) * hidden],
            };
            check_bf16_pair(&what, pair, &guf, &dnf, e as usize, (hidden, inter));
        }
    }
    // Refused: k not a multiple of 8, no experts, x too short.
    let w = gpu.stream().clone_htod(&vec![bf16::ONE; 64]).unwrap();
    let x = gpu.stream().clone_htod(&vec![bf16::ONE; 16]).unwrap();
    let ids = gpu.stream().clone_htod(&[0i32]).unwrap();
    let mut y = poisoned(&gpu, 8);
    // Whether a launch of one pair over `w` with experts of `shape` is taken.
    let mut takes = |shape| {
        let p = bf16_pairs(&ids, (1, 1, false));
        cuda::moe_bf16_grouped(&gpu, bf16_experts(&w, shape), p, &x, &mut y).is_ok()
    };
    assert!(!takes((1, 12, 1)));
    assert!(!takes((1, 8, 0)));
    assert!(takes((4, 16, 1)));
    assert!(!takes((2, 32, 1)));
}

/// The stage-chain probe (stage_probe.cu): every stage's output against the CPU product of the
/// GPU's previous output, on a chain with 2-3 tiles per block, a late gated stage of 4 tiles
/// per block, blocks without tiles, decode attention (32 heads over 4 KV heads and 384 keys: one
/// or two split units per block, their combine against an f64 softmax), and two launches (the
/// grid barrier's arrival count goes on across launches); every word carries its launch's tag. Launches with flagged waits (no
/// barrier) and with every stage copied late give the same bits; the timing modes run to the
/// end; the stamps show no block starting a stage before every block stored the previous one.
#[test]
fn stage_probe_matches_cpu_reference() {
    let Some(gpu) = hopper_gpu("stage probe") else {
        return;
    };
    let mut rng = rng("stage_probe");
    let sms = gpu.sm_count() as usize;
    let st = ProbeStage::product;
    let (heads, kv_heads, context) = (32, 4, 384);
    let [splits, combine] = ProbeStage::attention(heads, kv_heads, context);
    let stages = [
        st(16 * (2 * sms + 7), 256, false, false),
        splits,
        combine,
        st(32 * 2 * sms, 1024, true, true),
        st(16 * sms + 32, (32 * sms / 128) * 128, false, false),
        st(16 * 40, 512, false, false),
    ];
    let (is_splits, is_combine) = (|i: usize| i == 1, |i: usize| i == 2);
    let mats: Vec<Option<Fp4Matrix>> = stages
        .iter()
        .map(|s| {
            (s.kind == ProbeKind::Product).then(|| {
                let w = random_matrix(&mut rng, s.n * s.k, 1.7 / (s.k as f32).sqrt());
                quantize(Fp4Format::Nvfp4, &w, s.n, s.k)
            })
        })
        .collect();
    let cache = |rng: &mut ChaCha8Rng| -> Vec<bf16> {
        (0..kv_heads * context * 128)
            .map(|_| bf16::from_f32(rng.random::<f32>() * 2.0 - 1.0))
            .collect()
    };
    let (kc, vc) = (cache(&mut rng), cache(&mut rng));
    let pairs: Vec<(ProbeStage, ProbeData)> = stages
        .iter()
        .zip(&mats)
        .enumerate()
        .map(|(i, (s, m))| {
            let data = match m {
                Some(m) => ProbeData::Weights(m),
                None if is_splits(i) => ProbeData::KvCache { k: &kc, v: &vc },
                None => ProbeData::None,
            };
            (*s, data)
        })
        .collect();
    let mut chain = StageChain::new(&gpu, &pairs).unwrap();
    let x0: Vec<u16> = (0..stages[0].k)
        .map(|_| bf16::from_f32(rng.random::<f32>() * 2.0 - 1.0).to_bits())
        .collect();
    let x0_dev = gpu.stream().clone_htod(&x0).unwrap();
    let full = ProbeMode::default();
    let run = |chain: &mut StageChain, mode: ProbeMode| -> Vec<Vec<u16>> {
        chain.fill_outputs(&gpu, 0x7FC0).unwrap();
        let epoch = chain.launches();
        chain.launch(&gpu, &x0_dev, mode).unwrap();
        (0..stages.len())
            .map(|i| {
                let words = chain.output_words(&gpu, i).unwrap();
                let tag = cuda::probe_tag(epoch, stages.len(), i);
                if is_splits(i) {
                    // 64-bit words: f32 bits, then the tag. Returned as the f32's top halves.
                    for (e, w) in words.chunks_exact(2).enumerate() {
                        assert_eq!(w[1], tag, "{mode:?}: splits, word {e}");
                        assert!(
                            mode.skip_copy || f32::from_bits(w[0]).is_finite(),
                            "{mode:?}: splits, word {e}"
                        );
                    }
                    return words.chunks_exact(2).map(|w| (w[0] >> 16) as u16).collect();
                }
                for (e, w) in words.iter().enumerate() {
                    assert_eq!(w >> 16, tag, "{mode:?}: stage {i}, element {e}");
                }
                words.iter().map(|w| (w & 0xFFFF) as u16).collect()
            })
            .collect()
    };
    let bf = |v: &[u16]| -> Vec<bf16> { v.iter().map(|&b| bf16::from_bits(b)).collect() };
    let check = |outs: &[Vec<u16>], what: &str| {
        for (i, (s, m)) in stages.iter().zip(&mats).enumerate() {
            // A product reads the previous output; after the combine, the combine's.
            let input = bf(if i == 0 { &x0 } else { &outs[i - 1] });
            let want = if is_combine(i) {
                let q = bf(&outs[0][..heads * 128]);
                cuda::attention_reference(&q, &kc, &vc, heads, kv_heads, context)
            } else if let Some(m) = m {
                cuda::stage_reference(s, m, &input).unwrap()
            } else {
                continue;
            };
            check_close(
                &format!("probe {what} stage {i}"),
                &bf(&outs[i]),
                &want,
                8e-3,
                2e-2,
            );
        }
    };
    // 16 warps sum in another order: checked against the reference, not bit for bit.
    let wide = run(
        &mut chain,
        ProbeMode {
            wide: true,
            flagged: true,
            ..full
        },
    );
    check(&wide, "16 warps");
    let rolled = run(
        &mut chain,
        ProbeMode {
            rolled: true,
            flagged: true,
            ..full
        },
    );
    check(&rolled, "rolled tiles");
    let first = run(&mut chain, full);
    check(&first, "8 warps");
    let stamps = chain.stamps(&gpu).unwrap();
    let g = chain.grid();
    for s in 1..stages.len() {
        let done_prev = (0..g).map(|b| stamps[((s - 1) * g + b) * 4 + 3]).max();
        let in_next = (0..g).map(|b| stamps[(s * g + b) * 4 + 1]).min();
        assert!(
            in_next >= done_prev,
            "stage {s}: {in_next:?} < {done_prev:?}"
        );
    }
    for mode in [
        full,
        ProbeMode {
            flagged: true,
            ..full
        },
        ProbeMode {
            all_late: true,
            ..full
        },
        ProbeMode {
            flagged: true,
            no_late: true,
            ..full
        },
    ] {
        assert_eq!(run(&mut chain, mode), first, "{mode:?}");
    }
    for mode in [
        ProbeMode {
            skip_compute: true,
            flagged: true,
            ..full
        },
        ProbeMode {
            skip_copy: true,
            ..full
        },
    ] {
        run(&mut chain, mode);
    }
    // A chain that does not fit one block per SM is refused before anything is uploaded.
    let wide = st(16 * 9 * sms, 256, false, false);
    let m = quantize(
        Fp4Format::Nvfp4,
        &vec![0.5; wide.n * wide.k],
        wide.n,
        wide.k,
    );
    let e = StageChain::new(&gpu, &[(wide, ProbeData::Weights(&m))])
        .err()
        .unwrap();
    assert!(e.to_string().contains("9 tiles per block"), "{e}");
}
