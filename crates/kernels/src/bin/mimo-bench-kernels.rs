//! mimo-bench-kernels: times the FP4 CUDA kernels and cuBLAS BF16 on the same shapes, in one
//! process, and writes a JSON report.
//!
//! Method: CUDA events around CUDA-graph replays (each graph holds `reps` launches that rotate
//! through enough weight copies that no launch finds its weights in the 50 MB L2), warm-up
//! first, the median of `samples` replays. Eager launches are used where capture fails (the
//! row says so).
//!
//! Usage: mimo-bench-kernels [--out FILE.json] [--quick] [--no-sweep] [--moe-only]
//! [--shapes K:N,...] [--ms M,...] [--moe-tokens T,...] [--moe-sweep] [--layer-probe LAYERS]
//! (`--help` says what each does).

use std::collections::HashSet;
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use serde_json::{json, Value};

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use mimo_kernels::cuda::{
    bf16_gemm, bf16_to_e4m3_rows, bulk_supported, cublas, device_copy, fp4_gemm, fp4_gemm_bulk,
    fp4_gemm_dequant_cublas, fp4_gemm_fp8, fp4_gemm_tiled, fp4_gemm_wgmma, fp4_gemm_wgmma_with,
    fp4_gemm_with, fp4_to_e4m3_rows, fp8_shape_ok, moe_layer_tiled_with, moe_layer_with,
    moe_tile_pairs, moe_tiled_preferred, moe_tiled_supported, qwen3_moe_layer, stage_timings,
    tiled_supported, variant_exists, wgmma_supported, BulkConfig, CudaError, E4m3Rows,
    Fp4GemmConfig, Fp8Gemm, Fp8Scratch, GpuContext, GpuFp4Weight, MoeConfig, MoeWeights,
    MoeWorkspace, PdlGraph, ProbeData, ProbeKind, ProbeMode, ProbeStage, StageChain, StageTiming,
    Tuning, WgmmaConfig, WGMMA_CONFIGS,
};
use mimo_kernels::{Fp4Format, Fp4Matrix};

type Res<T> = Result<T, Box<dyn Error>>;

/// Weight bytes that must stream through the rotation before a copy comes back (> 2x L2).
const ROTATE_BYTES: usize = 256 << 20;

/// Times the FP4 CUDA kernels and cuBLAS BF16 on the same shapes and writes a JSON report.
#[derive(Parser, Debug)]
#[command(name = "mimo-bench-kernels", version)]
struct Args {
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fewer shapes, token counts and replays.
    #[arg(long)]
    quick: bool,
    /// No block-shape sweep (the automatic shapes only).
    #[arg(long)]
    no_sweep: bool,
    /// Only the MoE layer.
    #[arg(long)]
    moe_only: bool,
    /// Dense (K, N) shapes instead of the list (no MoE layer), e.g. 4096:14336,2048:1536.
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    shapes: Option<Vec<(usize, usize)>>,
    /// Token counts instead of the default list, e.g. 16,32.
    #[arg(long, value_delimiter = ',')]
    ms: Option<Vec<usize>>,
    /// MoE token counts instead of 1, 8, 16 and 32 (1 and 16 with --quick).
    #[arg(long, value_delimiter = ',')]
    moe_tokens: Option<Vec<usize>>,
    /// The MoE block-shape sweep from 8 tokens (row tiles, down load groups) even with
    /// --no-sweep.
    #[arg(long)]
    moe_sweep: bool,
    /// Only the persistent stage-chain probe (cuda/probe/) over this many Qwen3-30B-A3B layers'
    /// products; its report replaces the kernel rows.
    #[arg(long)]
    layer_probe: Option<usize>,
    /// With --layer-probe: decode attention over this many keys in each layer (a multiple of
    /// 64, at most 2048), between q/k/v and o_proj.
    #[arg(long)]
    probe_attention: Option<usize>,
    /// With --layer-probe: only these modes (e.g. flagged_no_copy, for a profiler).
    #[arg(long, value_delimiter = ',')]
    probe_modes: Option<Vec<String>>,
}

/// A dense shape `K:N`.
fn parse_shape(p: &str) -> Result<(usize, usize), String> {
    let bad = || format!("'{p}' is not K:N");
    let (k, n) = p.split_once(':').ok_or_else(bad)?;
    Ok((
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    ))
}

/// splitmix64: benchmark data only needs to be varied, not reproducible across tools.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
    fn bf16s(&mut self, len: usize, scale: f32) -> Vec<bf16> {
        (0..len)
            .map(|_| bf16::from_f32((self.unit() - 0.5) * 2.0 * scale))
            .collect()
    }
}

/// Random but valid FP4 buffers: every E2M1 code, block scales in a trained model's range.
fn fp4_parts(
    rng: &mut Rng,
    format: Fp4Format,
    n: usize,
    k: usize,
    experts: usize,
) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let packed = rng.bytes(n * k / 2 * experts);
    let scales: Vec<u8> = (0..n * (k / format.block_size()) * experts)
        .map(|_| match format {
            // E4M3 codes 0x30..0x5F: 0.5 .. 60
            Fp4Format::Nvfp4 => 0x30 + (rng.next() % 0x30) as u8,
            // E8M0 2^-10 .. 2^-4
            Fp4Format::Mxfp4 => 117 + (rng.next() % 7) as u8,
        })
        .collect();
    let gs = vec![
        match format {
            Fp4Format::Nvfp4 => 2688.0 / 0.1,
            Fp4Format::Mxfp4 => 1.0,
        };
        experts
    ];
    (packed, scales, gs)
}

#[derive(Clone, Copy)]
struct Timing {
    us: f64,
    spread: f64,
    graph: bool,
}

/// Times `op(i)` (i = launch index, for rotating copies): warm-up, then `samples` replays of a
/// graph of `reps` launches; median per-launch microseconds and (max-min)/median of samples.
fn time_op(
    gpu: &GpuContext,
    reps: usize,
    samples: usize,
    op: &mut dyn FnMut(usize) -> Result<(), CudaError>,
) -> Res<Timing> {
    time_op_graph(gpu, reps, samples, false, op)
}

/// [`time_op`]; with `pdl`, consecutive launches of the graph are joined by programmatic edges
/// (`PdlGraph`), as in the runtime's decode graphs with `Tuning::pdl`: each launch may start
/// (and issue its weight loads) while the previous one finishes. Returns an error rather than
/// falling back to eager launches, so a PDL row is always a PDL measurement.
fn time_op_graph(
    gpu: &GpuContext,
    reps: usize,
    samples: usize,
    pdl: bool,
    op: &mut dyn FnMut(usize) -> Result<(), CudaError>,
) -> Res<Timing> {
    let s: &Arc<CudaStream> = gpu.stream();
    run_ops(reps.max(3), op)?;
    gpu.synchronize()?;
    if pdl {
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
        let res = run_ops(reps, op);
        let aware: HashSet<usize> = gpu.pdl_kernels().into_iter().collect();
        let g = PdlGraph::end_capture(s, &aware, true)?;
        res?;
        let g = g.ok_or("PDL capture produced no graph")?;
        if g.programmatic_edges + 1 < reps {
            return Err(format!(
                "only {} of {} edges became programmatic",
                g.programmatic_edges, g.kernel_edges
            )
            .into());
        }
        g.launch()?;
        g.launch()?;
        gpu.synchronize()?;
        return sample_runs(gpu, reps, samples, true, &mut || Ok(g.launch()?));
    }
    let mut graph = None;
    if s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .is_ok()
    {
        let ok = run_ops(reps, op).is_ok();
        let g = s.end_capture(CUgraphInstantiate_flags(0));
        if ok {
            if let Ok(Some(g)) = g {
                graph = Some(g);
            }
        }
        // A failed capture can leave a sticky error on the context's record; clear it.
        let _ = gpu.context().check_err();
    }
    match &graph {
        Some(g) => {
            g.launch()?;
            g.launch()?;
            gpu.synchronize()?;
            sample_runs(gpu, reps, samples, true, &mut || Ok(g.launch()?))
        }
        None => sample_runs(gpu, reps, samples, false, &mut || Ok(run_ops(reps, op)?)),
    }
}

/// Queues `op(0)`, ..., `op(n - 1)`, stopping at the first error.
fn run_ops(n: usize, op: &mut dyn FnMut(usize) -> Result<(), CudaError>) -> Result<(), CudaError> {
    (0..n).try_for_each(op)
}

/// `samples` timings of `run` (which queues `reps` launches) between two events: the median per
/// launch in microseconds and the spread (max - min) / median.
fn sample_runs(
    gpu: &GpuContext,
    reps: usize,
    samples: usize,
    graph: bool,
    run: &mut dyn FnMut() -> Res<()>,
) -> Res<Timing> {
    let s = gpu.stream();
    let ctx = gpu.context();
    let ev0 = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ev1 = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        ev0.record(s)?;
        run()?;
        ev1.record(s)?;
        ev1.synchronize()?;
        times.push(ev0.elapsed_ms(&ev1)? as f64 * 1000.0 / reps as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    Ok(Timing {
        us: med,
        spread: (times[times.len() - 1] - times[0]) / med,
        graph,
    })
}

/// Device-to-device copy bandwidth (bytes read + written per second, TB/s) of a 1 GiB buffer:
/// (driver memcpy, a 16-byte-per-thread copy kernel).
fn copy_bandwidth(gpu: &GpuContext) -> Res<(f64, f64)> {
    let bytes = 1usize << 30;
    let s = gpu.stream();
    let src = s.alloc_zeros::<u8>(bytes)?;
    let mut dst = s.alloc_zeros::<u8>(bytes)?;
    let t = time_op(gpu, 10, 7, &mut |_| {
        s.memcpy_dtod(&src, &mut dst)
            .map_err(|source| CudaError::Driver {
                what: "copy",
                source,
            })
    })?;
    let t2 = time_op(gpu, 10, 7, &mut |_| device_copy(gpu, &src, &mut dst))?;
    let tb = |t: Timing| 2.0 * bytes as f64 / (t.us * 1e-6) / 1e12;
    Ok((tb(t), tb(t2)))
}

#[derive(Clone)]
struct Row {
    group: &'static str,
    kernel: String,
    format: &'static str,
    k: usize,
    n: usize,
    m: usize,
    us: f64,
    spread: f64,
    graph: bool,
    weight_bytes: usize,
    flops: f64,
    speedup: Option<f64>,
    note: String,
}

fn rotation(bytes_per_copy: usize, max_copies: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes_per_copy).clamp(2, max_copies)
}

fn reps_for(copies: usize, est_us: f64) -> usize {
    // about 20 launches, at least one full rotation, at most ~50 ms per graph
    let mut r = copies.max(20).div_ceil(copies) * copies;
    while r > copies && est_us * r as f64 > 50_000.0 {
        r -= copies;
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn dense_shape(
    gpu: &GpuContext,
    blas: &cudarc::cublas::CudaBlas,
    fp8: &[(&'static str, Fp8Gemm)],
    rng: &mut Rng,
    k: usize,
    n: usize,
    ms: &[usize],
    sweep: bool,
    samples: usize,
    rows: &mut Vec<Row>,
    checks: &mut Vec<Value>,
) -> Res<()> {
    let s = gpu.stream().clone();
    let mmax = *ms.iter().max().unwrap_or(&1);
    // activations and outputs, rotated too (small)
    let x = s.clone_htod(&rng.bf16s(mmax * k, 1.0))?;
    let mut y = s.alloc_zeros::<bf16>(mmax * n)?;
    // cuBLAS BF16 weights
    let bf_bytes = n * k * 2;
    let bf_copies = rotation(bf_bytes, 8);
    let host_bf = rng.bf16s(n * k, 0.05);
    let wbf: Vec<CudaSlice<bf16>> = (0..bf_copies)
        .map(|_| s.clone_htod(&host_bf))
        .collect::<Result<_, _>>()?;
    drop(host_bf);
    let mut scratch = s.alloc_zeros::<bf16>(n * k)?;
    let mut cublas_us = vec![0.0f64; ms.len()];
    for (mi, &m) in ms.iter().enumerate() {
        let xs = x.slice(0..m * k);
        let est = (bf_bytes as f64 / 2.5e6).max(2.0 * m as f64 * n as f64 * k as f64 / 6e8);
        let reps = reps_for(bf_copies, est);
        let t = time_op(gpu, reps, samples, &mut |i| {
            let mut ys = y.slice_mut(0..m * n);
            bf16_gemm_view(blas, &wbf[i % bf_copies], &xs, m, n, k, &mut ys)
        })?;
        cublas_us[mi] = t.us;
        rows.push(Row {
            group: "dense",
            kernel: "cublas_bf16".into(),
            format: "bf16",
            k,
            n,
            m,
            us: t.us,
            spread: t.spread,
            graph: t.graph,
            weight_bytes: bf_bytes,
            flops: 2.0 * (m * n * k) as f64,
            speedup: Some(1.0),
            note: format!("{bf_copies} weight copies"),
        });
        eprintln!("  cublas k={k} n={n} m={m}: {:.2} us", t.us);
    }
    drop(wbf);
    for format in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
        let (p, sc, gs) = fp4_parts(rng, format, n, k, 1);
        let w0 = GpuFp4Weight::from_parts(gpu, format, n, k, 1, &p, &sc, &gs)?;
        let fp_bytes = w0.bytes_per_matrix();
        let copies = rotation(fp_bytes, 16);
        let mut ws = vec![w0];
        for _ in 1..copies {
            ws.push(GpuFp4Weight::from_parts(
                gpu, format, n, k, 1, &p, &sc, &gs,
            )?);
        }
        let fname = format.name();
        let mut fp8s = Fp8Scratch::new(gpu)?;
        // correctness spot check at full size: fused kernel vs dequantize + cuBLAS
        {
            let m = 1;
            let xs = s.clone_htod(&rng.bf16s(m * k, 1.0))?;
            let mut y1 = s.clone_htod(&vec![bf16::NAN; m * n])?;
            let mut y2 = s.clone_htod(&vec![bf16::NAN; m * n])?;
            fp4_gemm(gpu, &ws[0], &xs, m, &mut y1)?;
            fp4_gemm_dequant_cublas(gpu, blas, &ws[0], &xs, m, &mut scratch, &mut y2)?;
            let (rel, bad) = rel_err(&s.clone_dtoh(&y1)?, &s.clone_dtoh(&y2)?);
            checks.push(json!({
                "format": fname, "k": k, "n": n, "m": 1,
                "rel_err_fused_vs_dequant_cublas": sig4(rel), "non_finite": bad,
            }));
            eprintln!("  check {fname} k={k} n={n}: rel err {rel:.2e}, non-finite {bad}");
        }
        for (mi, &m) in ms.iter().enumerate() {
            let xs = x.slice(0..m * k);
            let xo = s.clone_htod(&s.clone_dtoh(&xs)?)?; // owned copy: launchers take &CudaSlice
            let est = fp_bytes as f64 / 2.5e6 * m.div_ceil(32) as f64;
            let reps = reps_for(copies, est);
            let push = |rows: &mut Vec<Row>, kernel: String, t: Timing, note: String| {
                rows.push(Row {
                    group: "dense",
                    kernel,
                    format: fname,
                    k,
                    n,
                    m,
                    us: t.us,
                    spread: t.spread,
                    graph: t.graph,
                    weight_bytes: fp_bytes,
                    flops: 2.0 * (m * n * k) as f64,
                    speedup: Some(cublas_us[mi] / t.us),
                    note,
                });
            };
            // A launcher's plain row and, with `pdl`, its PDL-chained row (`kernel` + "_pdl");
            // `shape`: its launch shape for the log line and the note ("" for none).
            let timed = |rows: &mut Vec<Row>,
                         label: &str,
                         kernel: &str,
                         shape: String,
                         pdl: bool,
                         op: &mut dyn FnMut(usize) -> Result<(), CudaError>|
             -> Res<()> {
                let (sp, np) = if shape.is_empty() {
                    (String::new(), String::new())
                } else {
                    (format!(" {shape}"), format!("{shape}; "))
                };
                let t = time_op(gpu, reps, samples, op)?;
                eprintln!("  {label} {fname} k={k} n={n} m={m}{sp}: {:.2} us", t.us);
                push(
                    rows,
                    kernel.into(),
                    t,
                    format!("{np}{copies} weight copies"),
                );
                if pdl {
                    let t = time_op_graph(gpu, reps, samples, true, op)?;
                    eprintln!("  {label}+PDL {fname} k={k} n={n} m={m}: {:.2} us", t.us);
                    push(
                        rows,
                        format!("{kernel}_pdl"),
                        t,
                        format!("{np}{copies} weight copies; launches chained by PDL"),
                    );
                }
                Ok(())
            };
            if tiled_supported(&ws[0], m, false) {
                let mut ys = s.alloc_zeros::<bf16>(m * n)?;
                timed(
                    rows,
                    "tiled",
                    "fp4_tiled",
                    String::new(),
                    m <= 64,
                    &mut |i| fp4_gemm_tiled(gpu, &ws[i % copies], &xo, m, &mut ys),
                )?;
            }
            if bulk_supported(gpu, &ws[0], m, false) {
                let cfg = BulkConfig::auto(format, m, n, k, gpu.sm_count() as usize, false);
                let mut ys = s.alloc_zeros::<bf16>(m * n)?;
                timed(
                    rows,
                    "bulk",
                    "fp4_bulk",
                    format!("{cfg:?}"),
                    true,
                    &mut |i| fp4_gemm_bulk(gpu, &ws[i % copies], &xo, m, &mut ys),
                )?;
            }
            if m >= 16 && wgmma_supported(gpu, &ws[0], m) {
                let auto = WgmmaConfig::auto(m, n.div_ceil(128), k / 128, gpu.sm_count() as usize);
                let mut ys = s.alloc_zeros::<bf16>(m * n)?;
                timed(
                    rows,
                    "wgmma",
                    "fp4_wgmma",
                    format!("{auto:?}"),
                    m <= 256,
                    &mut |i| fp4_gemm_wgmma(gpu, &ws[i % copies], &xo, m, &mut ys),
                )?;
                // The other shapes of the automatic token tile and of its neighbours (half and
                // twice as many tokens), so that each run shows whether the rule picked the
                // fastest.
                for cfg in WGMMA_CONFIGS {
                    let near = [auto.tokens / 2, auto.tokens, auto.tokens * 2];
                    if cfg == auto || !near.contains(&cfg.tokens) {
                        continue;
                    }
                    timed(
                        rows,
                        "wgmma",
                        &format!("fp4_wgmma_n{}_s{}", cfg.tokens, cfg.stages),
                        format!("{cfg:?}"),
                        false,
                        &mut |i| fp4_gemm_wgmma_with(gpu, &ws[i % copies], &xo, m, &mut ys, cfg),
                    )?;
                }
            }
            if m <= 256 {
                let cfg = Fp4GemmConfig::auto(m, n, k, gpu.sm_count());
                let mut ys = s.alloc_zeros::<bf16>(m * n)?;
                let t = time_op(gpu, reps, samples, &mut |i| {
                    fp4_gemm(gpu, &ws[i % copies], &xo, m, &mut ys)
                })?;
                eprintln!("  fused {fname} k={k} n={n} m={m} {cfg:?}: {:.2} us", t.us);
                push(
                    rows,
                    "fp4_fused".into(),
                    t,
                    format!("auto {cfg:?}; {copies} weight copies"),
                );
                // The auto shape as a PDL chain (decode graphs); at one token with the sweep it is
                // also where the sweep's PDL rows start from.
                let mut best_pdl: Option<(Timing, String)> = None;
                if m <= 16 {
                    let t = time_op_graph(gpu, reps, samples, true, &mut |i| {
                        fp4_gemm(gpu, &ws[i % copies], &xo, m, &mut ys)
                    })?;
                    eprintln!("  fused+PDL {fname} k={k} n={n} m={m}: {:.2} us", t.us);
                    push(
                        rows,
                        "fp4_fused_pdl".into(),
                        t,
                        format!(
                            "auto {cfg:?}; {copies} weight copies; launches chained by PDL: \
                             each one's first weight loads before griddepcontrol.wait"
                        ),
                    );
                    if sweep && m == 1 {
                        best_pdl = Some((t, format!("{cfg:?}")));
                    }
                }
                let mut best = (t, format!("{cfg:?}"));
                if sweep && (m == 1 || m == 16 || m == 32) {
                    // At 32 tokens one and two warps stage their activations (48 KiB).
                    let warp_list: &[u32] = if m == 32 {
                        &[1, 2, 4, 8, 16]
                    } else {
                        &[2, 4, 8, 16]
                    };
                    for m_tiles in [1u32, 2] {
                        for group in [1u32, 2, 4] {
                            for &warps in warp_list {
                                let c = Fp4GemmConfig {
                                    m_tiles,
                                    warps,
                                    group,
                                };
                                if c == cfg || !variant_exists(c, m) {
                                    continue;
                                }
                                let t = time_op(gpu, reps, samples, &mut |i| {
                                    fp4_gemm_with(gpu, &ws[i % copies], &xo, m, &mut ys, c)
                                })?;
                                push(
                                    rows,
                                    format!("fp4_fused_mt{m_tiles}_g{group}_w{warps}"),
                                    t,
                                    "sweep".into(),
                                );
                                if t.us < best.0.us {
                                    best = (t, format!("{c:?}"));
                                }
                                // At one token also as a PDL chain, as decode graphs run it.
                                if let Some(bp) = best_pdl.as_mut() {
                                    let t = time_op_graph(gpu, reps, samples, true, &mut |i| {
                                        fp4_gemm_with(gpu, &ws[i % copies], &xo, m, &mut ys, c)
                                    })?;
                                    push(
                                        rows,
                                        format!("fp4_fused_pdl_mt{m_tiles}_g{group}_w{warps}"),
                                        t,
                                        "sweep; launches chained by PDL".into(),
                                    );
                                    if t.us < bp.0.us {
                                        *bp = (t, format!("{c:?}"));
                                    }
                                }
                            }
                        }
                    }
                    push(
                        rows,
                        "fp4_fused_tuned".into(),
                        best.0,
                        format!("best of the sweep in this run: {}", best.1),
                    );
                    if let Some((t, c)) = best_pdl {
                        eprintln!(
                            "  best PDL chain {fname} k={k} n={n} m={m}: {c} {:.2} us",
                            t.us
                        );
                        push(
                            rows,
                            "fp4_fused_pdl_tuned".into(),
                            t,
                            format!("best of the PDL-chain sweep in this run: {c}"),
                        );
                    }
                }
            }
            if m >= 16 {
                let est2 =
                    est.max(2.0 * (m * n * k) as f64 / 6e8) + n as f64 * k as f64 * 2.0 / 2.5e6;
                let reps2 = reps_for(copies, est2);
                let mut ys = s.alloc_zeros::<bf16>(m * n)?;
                let t = time_op(gpu, reps2, samples, &mut |i| {
                    fp4_gemm_dequant_cublas(
                        gpu,
                        blas,
                        &ws[i % copies],
                        &xo,
                        m,
                        &mut scratch,
                        &mut ys,
                    )
                })?;
                eprintln!("  dequant+cublas {fname} k={k} n={n} m={m}: {:.2} us", t.us);
                push(
                    rows,
                    "fp4_dequant_cublas".into(),
                    t,
                    format!("{copies} weight copies"),
                );
                if m >= 64 && fp8_shape_ok(n, k) {
                    for (label, lt) in fp8 {
                        // Whole path per call: weight and activations to E4M3, then the GEMM.
                        let t = time_op(gpu, reps2, samples, &mut |i| {
                            fp4_gemm_fp8(gpu, lt, &ws[i % copies], &xo, m, &mut fp8s, &mut ys)
                        })?;
                        eprintln!("  {label} {fname} k={k} n={n} m={m}: {:.2} us", t.us);
                        push(
                            rows,
                            label.to_string(),
                            t,
                            format!("{copies} weight copies; converts the weight every call"),
                        );
                    }
                    if let Some((_, lt)) = fp8.first() {
                        // The GEMM alone, weights already E4M3 (what resident FP8 copies would cost).
                        let wcopies = rotation(n * k, 4);
                        let mut w8 = Vec::new();
                        for c in 0..wcopies {
                            let mut r = E4m3Rows::alloc(gpu, n, k)?;
                            fp4_to_e4m3_rows(gpu, &ws[c % copies], &mut r)?;
                            w8.push(r);
                        }
                        bf16_to_e4m3_rows(gpu, &xo, m, k, &mut fp8s.x)?;
                        let t = time_op(gpu, reps_for(wcopies, est2), samples, &mut |i| {
                            lt.gemm(gpu, &w8[i % wcopies], &fp8s.x, m, n, k, &mut ys)
                        })?;
                        eprintln!("  fp8 gemm only {fname} k={k} n={n} m={m}: {:.2} us", t.us);
                        push(
                            rows,
                            "fp8_cublaslt_gemm_only".into(),
                            t,
                            format!("{wcopies} E4M3 weight copies; activations already E4M3"),
                        );
                        if m == *ms.iter().max().unwrap_or(&m) {
                            // Numerics at full size: FP8 path vs dequantize + cuBLAS BF16.
                            let mut y1 = s.clone_htod(&vec![bf16::NAN; m * n])?;
                            let mut y2 = s.clone_htod(&vec![bf16::NAN; m * n])?;
                            fp4_gemm_fp8(gpu, lt, &ws[0], &xo, m, &mut fp8s, &mut y1)?;
                            fp4_gemm_dequant_cublas(
                                gpu,
                                blas,
                                &ws[0],
                                &xo,
                                m,
                                &mut scratch,
                                &mut y2,
                            )?;
                            let (rel, bad) = rel_err(&s.clone_dtoh(&y1)?, &s.clone_dtoh(&y2)?);
                            checks.push(json!({
                                "format": fname, "k": k, "n": n, "m": m,
                                "rel_err_fp8_vs_dequant_cublas": sig4(rel), "non_finite": bad,
                            }));
                            eprintln!("  check fp8 {fname} k={k} n={n} m={m}: rel err {rel:.2e}, non-finite {bad}");
                        }
                    }
                }
            }
        }
        let _ = &mut y;
    }
    Ok(())
}

/// Norm-wise relative error of `a` against `b`, and the number of non-finite values in `a`.
fn rel_err(a: &[bf16], b: &[bf16]) -> (f64, usize) {
    let (mut num, mut den, mut bad) = (0.0f64, 0.0f64, 0usize);
    for (u, v) in a.iter().zip(b) {
        let (u, v) = (u.to_f64(), v.to_f64());
        if !u.is_finite() {
            bad += 1;
        }
        num += (u - v) * (u - v);
        den += v * v;
    }
    ((num / den.max(1e-30)).sqrt(), bad)
}

/// cuBLAS on views (the benchmark slices one activation buffer for every M).
fn bf16_gemm_view(
    blas: &cudarc::cublas::CudaBlas,
    w: &CudaSlice<bf16>,
    x: &cudarc::driver::CudaView<bf16>,
    m: usize,
    n: usize,
    k: usize,
    y: &mut cudarc::driver::CudaViewMut<bf16>,
) -> Result<(), CudaError> {
    use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::ONE,
        lda: k as i32,
        ldb: k as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let _ = bf16_gemm; // the library entry point does the same on whole slices
                       // SAFETY: w is n*k, x m*k and y m*n elements (sliced by the caller).
    unsafe { blas.gemm(cfg, w, x, y) }.map_err(|source| CudaError::Cublas {
        what: "bf16 gemm",
        source,
    })
}

fn moe_bench(
    gpu: &GpuContext,
    rng: &mut Rng,
    format: Fp4Format,
    tokens_list: &[usize],
    samples: usize,
    (sweep, moe_shape_sweep): (bool, bool),
    rows: &mut Vec<Row>,
) -> Res<()> {
    // Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, expert width 768.
    let (experts, hidden, inter, top_k) = (128usize, 2048usize, 768usize, 8usize);
    let s = gpu.stream().clone();
    let (p, sc, gs) = fp4_parts(rng, format, 2 * inter, hidden, experts);
    let gate_up = GpuFp4Weight::from_parts(gpu, format, 2 * inter, hidden, experts, &p, &sc, &gs)?;
    let (p, sc, gs) = fp4_parts(rng, format, hidden, inter, experts);
    let down = GpuFp4Weight::from_parts(gpu, format, hidden, inter, experts, &p, &sc, &gs)?;
    let per_expert = gate_up.bytes_per_matrix() + down.bytes_per_matrix();
    let w = MoeWeights { gate_up, down };
    for &tokens in tokens_list {
        let mut ws = MoeWorkspace::new(gpu, &w, tokens, top_k)?;
        let x = s.clone_htod(&rng.bf16s(tokens * hidden, 1.0))?;
        let mut out = s.alloc_zeros::<bf16>(tokens * hidden)?;
        // 32 different routings, rotated, so that the used experts change every call
        let nr = 32;
        let mut ids_d = Vec::new();
        let mut w_d = Vec::new();
        let mut used_total = 0usize;
        for _ in 0..nr {
            let mut ids = Vec::new();
            for _ in 0..tokens {
                let mut chosen: Vec<i32> = Vec::new();
                while chosen.len() < top_k {
                    let e = (rng.next() % experts as u64) as i32;
                    if !chosen.contains(&e) {
                        chosen.push(e);
                    }
                }
                ids.extend(chosen);
            }
            let mut distinct = ids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            used_total += distinct.len();
            let wts: Vec<f32> = (0..tokens * top_k)
                .map(|_| rng.unit() / top_k as f32)
                .collect();
            ids_d.push(s.clone_htod(&ids)?);
            w_d.push(s.clone_htod(&wts)?);
        }
        let bytes = used_total as f64 / nr as f64 * per_expert as f64;
        let auto = MoeConfig::auto(hidden, inter, tokens);
        let mut configs = vec![auto];
        if sweep {
            for (gu, d) in [(16, 6), (8, 3), (8, 2), (4, 2), (4, 1), (2, 2), (2, 1)] {
                let c = MoeConfig {
                    gate_up_warps: gu,
                    down_warps: d,
                    ..auto
                };
                if c != auto {
                    configs.push(c);
                }
            }
        }
        // From 8 tokens: row tiles per block (one routing prologue for several tiles) and the
        // down launch's load groups, around the automatic shape.
        if tokens >= 8 && (sweep || moe_shape_sweep) {
            for (gt, dt, dg, dw, pp) in [
                (1, 1, 2, 1, 16),
                (1, 1, 2, 2, 16),
                (1, 1, 1, 2, 16),
                (2, 2, 1, 1, 16),
                (4, 4, 1, 1, 16),
                (2, 4, 2, 1, 16),
                (4, 8, 2, 1, 16),
                (1, 1, 1, 1, 8),
                (1, 1, 2, 1, 8),
                (2, 4, 2, 1, 8),
                (4, 8, 2, 1, 8),
                (4, 8, 2, 2, 8),
            ] {
                let c = MoeConfig {
                    gate_up_row_tiles: gt,
                    down_row_tiles: dt,
                    down_group: dg,
                    down_warps: dw,
                    pairs_per_pass: pp,
                    ..auto
                };
                if !configs.contains(&c) {
                    configs.push(c);
                }
            }
        }
        let distinct_per_call = used_total as f64 / nr as f64;
        let mut push = |kernel: String, note: String, t: Timing| {
            rows.push(Row {
                group: "moe",
                kernel,
                format: format.name(),
                k: hidden,
                n: inter,
                m: tokens,
                us: t.us,
                spread: t.spread,
                graph: t.graph,
                weight_bytes: bytes.round() as usize,
                flops: 2.0 * (tokens * top_k) as f64 * (3 * hidden * inter) as f64,
                speedup: None,
                note: format!(
                    "{note}Qwen3-30B-A3B layer: 128 experts, top-8, hidden 2048, inter 768; {distinct_per_call:.1} distinct experts per call; route+gate_up+silu+down+combine"
                ),
            });
        };
        for (ci, cfg) in configs.into_iter().enumerate() {
            // The auto configuration also as a PDL chain at one token (as decode runs it).
            let modes: &[bool] = if ci == 0 && tokens == 1 {
                &[false, true]
            } else {
                &[false]
            };
            for &pdl in modes {
                let t = time_op_graph(gpu, nr, samples, pdl, &mut |i| {
                    moe_layer_with(
                        gpu,
                        &w,
                        &x,
                        &ids_d[i % nr],
                        &w_d[i % nr],
                        tokens,
                        top_k,
                        &mut ws,
                        &mut out,
                        cfg,
                    )
                })?;
                eprintln!(
                    "  moe {} tokens={tokens} {cfg:?}{}: {:.2} us",
                    format.name(),
                    if pdl { " PDL chain" } else { "" },
                    t.us
                );
                let (kernel, note) = match (ci, pdl) {
                    (0, false) => ("fp4_moe_layer".to_string(), format!("auto {cfg:?}; ")),
                    (0, true) => (
                        "fp4_moe_layer_pdl".to_string(),
                        format!("auto {cfg:?}; launches chained by PDL; "),
                    ),
                    _ => (
                        format!(
                            "fp4_moe_layer_gu{}_d{}_gt{}_dt{}_dg{}_p{}",
                            cfg.gate_up_warps,
                            cfg.down_warps,
                            cfg.gate_up_row_tiles,
                            cfg.down_row_tiles,
                            cfg.down_group,
                            cfg.pairs_per_pass
                        ),
                        format!("sweep {cfg:?}; "),
                    ),
                };
                push(kernel, note, t);
            }
        }
        // The tiled grouped path (prefill-sized batches; `moe_layer` takes it from
        // Tuning::moe_tiled_min_pairs pairs per expert): tiles of 32 pairs, and of 64 from 64
        // tokens.
        let tiles: &[usize] = if tokens >= 64 { &[32, 64] } else { &[32] };
        for &tile in tiles {
            if tokens < 2 || !moe_tiled_supported(&w) {
                break;
            }
            let t = time_op_graph(gpu, nr, samples, false, &mut |i| {
                let io = (&x, &ids_d[i % nr], &w_d[i % nr]);
                moe_layer_tiled_with(gpu, &w, io, (tokens, top_k), &mut ws, &mut out, tile)
            })?;
            let auto = moe_tiled_preferred(&gpu.tuning(), &w, tokens, top_k)
                && moe_tile_pairs(tokens * top_k, experts) == tile;
            eprintln!(
                "  moe {} tokens={tokens} tiled {tile}{}: {:.2} us",
                format.name(),
                if auto { " (auto)" } else { "" },
                t.us
            );
            let kernel = if tile == 32 {
                "fp4_moe_layer_tiled".to_string()
            } else {
                format!("fp4_moe_layer_tiled{tile}")
            };
            push(
                kernel,
                format!(
                    "tiled grouped kernels (moe_layer_tiled_with), tiles of {tile} pairs{}; ",
                    if auto {
                        ", the automatic path here"
                    } else {
                        ""
                    }
                ),
                t,
            );
        }
    }
    Ok(())
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `x` to four significant digits (the report's relative errors).
fn sig4(x: f64) -> f64 {
    format!("{x:.3e}").parse().unwrap_or(x)
}

/// `x` to `d` decimals (the report's times and rates).
fn dec(x: f64, d: i32) -> f64 {
    let f = 10f64.powi(d);
    (x * f).round() / f
}

/// The report: machine, date, commit, command, method, the accuracy checks and one object per
/// timed row (microseconds, weight TB/s, share of the copy bandwidth, TFLOP/s, speedup over
/// cuBLAS BF16 where there is one; what bench/tables.py reads).
#[allow(clippy::too_many_arguments)]
fn report(
    device: &str,
    sms: u32,
    copy_tbps: f64,
    date: String,
    commit: &str,
    command: &str,
    samples: usize,
    checks: Vec<Value>,
    rows: &[Row],
) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let tbps = r.weight_bytes as f64 / (r.us * 1e-6) / 1e12;
            json!({
                "group": r.group, "kernel": r.kernel, "format": r.format,
                "k": r.k, "n": r.n, "m": r.m,
                "us": dec(r.us, 3), "spread": dec(r.spread, 3), "graph": r.graph,
                "weight_bytes": r.weight_bytes,
                "weight_tbps": dec(tbps, 4), "copy_share": dec(tbps / copy_tbps, 4),
                "tflops": dec(r.flops / (r.us * 1e-6) / 1e12, 2),
                "speedup_vs_cublas": r.speedup.map(|x| dec(x, 3)),
                "note": r.note,
            })
        })
        .collect();
    json!({
        "machine": {"device": device, "sms": sms, "copy_tbps": dec(copy_tbps, 4)},
        "date": date,
        "commit": commit,
        "command": command,
        "method": format!("CUDA events around CUDA-graph replays; median of {samples} replays; warm-up first; weights rotated through copies totalling >= 256 MB"),
        "checks": checks,
        "rows": rows,
    })
}

/// The persistent stage-chain probe over `layers` Qwen3-30B-A3B layers (cuda/probe/):
/// per mode, the launch's median time, per layer and as weight TB/s; per stage of a layer
/// (layers after the first, averaged), where the time went.
fn layer_probe(
    gpu: &GpuContext,
    rng: &mut Rng,
    layers: usize,
    context: Option<usize>,
    only: Option<&[String]>,
    samples: usize,
) -> Res<Value> {
    let layer = qwen3_moe_layer(context);
    let per = layer.len();
    let stages: Vec<_> = (0..layers).flat_map(|_| layer.clone()).collect();
    // Each stage's matrix, or its keys and values (4 KV heads x context x 128, random bf16).
    let mats: Vec<Option<Fp4Matrix>> = stages
        .iter()
        .map(|st| {
            (st.kind == ProbeKind::Product).then(|| {
                let (packed, scales, gs) = fp4_parts(rng, Fp4Format::Nvfp4, st.n, st.k, 1);
                Fp4Matrix {
                    format: Fp4Format::Nvfp4,
                    n: st.n,
                    k: st.k,
                    packed,
                    scales,
                    global_scale: gs[0],
                }
            })
        })
        .collect();
    let kv: Vec<Option<(Vec<bf16>, Vec<bf16>)>> = stages
        .iter()
        .map(|st| match st.kind {
            ProbeKind::AttentionSplits {
                kv_heads, context, ..
            } => Some((
                rng.bf16s(kv_heads * context * 128, 1.0),
                rng.bf16s(kv_heads * context * 128, 1.0),
            )),
            _ => None,
        })
        .collect();
    let pairs: Vec<(ProbeStage, ProbeData)> = stages
        .iter()
        .zip(mats.iter().zip(&kv))
        .map(|(st, (m, kv))| {
            let data = match (m, kv) {
                (Some(m), _) => ProbeData::Weights(m),
                (_, Some((k, v))) => ProbeData::KvCache { k, v },
                _ => ProbeData::None,
            };
            (*st, data)
        })
        .collect();
    // Bytes a layer must read: the products' weights and scales, the keys and values.
    let layer_bytes: usize = layer
        .iter()
        .map(|st| match st.kind {
            ProbeKind::Product => st.n * st.k * 9 / 16,
            ProbeKind::AttentionSplits {
                kv_heads, context, ..
            } => 2 * kv_heads * context * 128 * 2,
            ProbeKind::AttentionCombine { .. } => 0,
        })
        .sum();
    let mut chain = StageChain::new(gpu, &pairs)?;
    let x0: Vec<u16> = rng
        .bf16s(stages[0].k, 1.0)
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let x0 = gpu.stream().clone_htod(&x0)?;
    eprintln!(
        "layer probe: {layers} layers, {} stages, {} blocks, {} bytes of shared memory, {:.1} MB per layer",
        stages.len(),
        chain.grid(),
        chain.smem_bytes(),
        layer_bytes as f64 / 1e6
    );
    let reps = 10;
    let mut modes = Vec::new();
    let m = ProbeMode::default();
    let flagged = ProbeMode { flagged: true, ..m };
    for (name, mode) in [
        ("barrier", m),
        ("flagged", flagged),
        (
            "flagged_experts_not_late",
            ProbeMode {
                no_late: true,
                ..flagged
            },
        ),
        (
            "flagged_no_prefetch",
            ProbeMode {
                all_late: true,
                ..flagged
            },
        ),
        (
            "flagged_no_compute",
            ProbeMode {
                skip_compute: true,
                ..flagged
            },
        ),
        (
            "flagged_no_copy",
            ProbeMode {
                skip_copy: true,
                ..flagged
            },
        ),
        (
            "flagged_16_warps",
            ProbeMode {
                wide: true,
                ..flagged
            },
        ),
        (
            "flagged_16_warps_no_copy",
            ProbeMode {
                wide: true,
                skip_copy: true,
                ..flagged
            },
        ),
        (
            "flagged_rolled",
            ProbeMode {
                rolled: true,
                ..flagged
            },
        ),
        (
            "flagged_rolled_no_copy",
            ProbeMode {
                rolled: true,
                skip_copy: true,
                ..flagged
            },
        ),
        (
            "flagged_rolled_16_warps_no_copy",
            ProbeMode {
                rolled: true,
                wide: true,
                skip_copy: true,
                ..flagged
            },
        ),
        (
            "barrier_no_compute",
            ProbeMode {
                skip_compute: true,
                ..m
            },
        ),
        (
            "barrier_no_copy",
            ProbeMode {
                skip_copy: true,
                ..m
            },
        ),
        ("barrier_again", m),
        ("flagged_again", flagged),
    ] {
        if only.is_some_and(|o| !o.iter().any(|m| m == name)) {
            continue;
        }
        let t = sample_runs(gpu, reps, samples, false, &mut || {
            for _ in 0..reps {
                chain.launch(gpu, &x0, mode)?;
            }
            Ok(())
        })?;
        let stamps = chain.stamps(gpu)?;
        let st = stage_timings(&stamps, chain.grid(), stages.len());
        // Per stage of a layer, averaged over the layers after the first.
        let names: &[&str] = if context.is_some() {
            &[
                "qkv",
                "attention_splits",
                "attention_combine",
                "o_proj",
                "experts_gate_up",
                "experts_down",
            ]
        } else {
            &["qkv", "o_proj", "experts_gate_up", "experts_down"]
        };
        let per_stage: Vec<Value> = (0..per)
            .map(|i| {
                let of = |f: &dyn Fn(&StageTiming) -> f64| -> f64 {
                    let v: Vec<f64> = (1..layers).map(|l| f(&st[per * l + i])).collect();
                    dec(v.iter().sum::<f64>() / v.len().max(1) as f64, 2)
                };
                json!({
                    "stage": names[i],
                    "n": stages[i].n, "k": stages[i].k,
                    "span_us": of(&|t| t.span_us),
                    "input_us": of(&|t| t.input_us),
                    "weights_wait_us": of(&|t| t.weights_wait_us),
                    "compute_us": of(&|t| t.compute_us),
                })
            })
            .collect();
        let per_layer = t.us / layers as f64;
        eprintln!(
            "  {name}: {:.1} us per launch, {per_layer:.2} us per layer, {:.2} TB/s",
            t.us,
            layer_bytes as f64 / (per_layer * 1e-6) / 1e12
        );
        modes.push(json!({
            "mode": name,
            "us_per_launch": dec(t.us, 2),
            "spread": dec(t.spread, 3),
            "us_per_layer": dec(per_layer, 2),
            "weight_tbps": dec(layer_bytes as f64 / (per_layer * 1e-6) / 1e12, 3),
            "stages_of_a_layer": per_stage,
        }));
    }
    Ok(json!({
        "layers": layers,
        "attention_context": context,
        "layer_bytes": layer_bytes,
        "blocks": chain.grid(),
        "smem_bytes": chain.smem_bytes(),
        "launches_per_sample": reps,
        "samples": samples,
        "modes": modes,
    }))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = Args::parse();
    let gpu = GpuContext::new(0)?;
    // "fp4_fused" rows time the decode kernels; the tiled and bulk ones have rows of their own.
    gpu.set_tuning(Tuning {
        tiled_gemm: false,
        bulk_gemm: false,
        ..gpu.tuning()
    });
    let blas = cublas(&gpu)?;
    // FP8 prefill path, with cuBLASLt's default (accurate) and fast FP8 accumulation.
    let mut fp8 = Vec::new();
    for (label, fast) in [
        ("fp4_fp8_cublaslt", false),
        ("fp4_fp8_cublaslt_fastacc", true),
    ] {
        match Fp8Gemm::new(&gpu, fast)? {
            Ok(lt) => fp8.push((label, lt)),
            Err(reason) => eprintln!("no FP8 rows: {reason}"),
        }
    }
    let samples = if args.quick { 5 } else { 15 };
    eprintln!("device: {} ({} SMs)", gpu.device_name(), gpu.sm_count());
    let (memcpy_tbps, kernel_tbps) = copy_bandwidth(&gpu)?;
    // The reference ceiling is the better of the two copies.
    let copy_tbps = memcpy_tbps.max(kernel_tbps);
    eprintln!("device copy: memcpy {memcpy_tbps:.3} TB/s, copy kernel {kernel_tbps:.3} TB/s (read + write)");
    let mut rng = Rng(0x5EED_0FF4_u64);
    if let Some(layers) = args.layer_probe {
        let only = args.probe_modes.as_deref();
        let probe = layer_probe(
            &gpu,
            &mut rng,
            layers.max(2),
            args.probe_attention,
            only,
            samples,
        )?;
        let commit = std::env::var("MIMO_COMMIT").unwrap_or_else(|_| "unknown".into());
        let cmd: Vec<String> = std::env::args().collect();
        let j = json!({
            "device": gpu.device_name(),
            "sms": gpu.sm_count(),
            "date": utc_now(),
            "commit": commit,
            "command": cmd.join(" "),
            "copy_tbps": sig4(copy_tbps),
            "method": "CUDA events around eager launches of the whole chain (medians); stage times from %globaltimer stamps of the last launch of each mode",
            "layer_probe": probe,
        });
        let text = serde_json::to_string_pretty(&j)?;
        if let Some(p) = &args.out {
            std::fs::write(p, text.clone() + "\n")
                .map_err(|e| format!("writing {}: {e}", p.display()))?;
        }
        println!("{text}");
        return Ok(());
    }
    let shapes: &[(usize, usize)] = if args.moe_only {
        &[]
    } else if let Some(list) = &args.shapes {
        list
    } else if args.quick {
        &[(4096, 14336), (768, 2048)]
    } else {
        &[
            (4096, 14336),
            (14336, 4096),
            (4096, 4096),
            (2048, 1536),
            (768, 2048),
            (2048, 151936),
        ]
    };
    let ms: &[usize] = if let Some(list) = &args.ms {
        list
    } else if args.quick {
        &[1, 16, 2048]
    } else {
        &[1, 4, 16, 64, 256, 2048]
    };
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for &(k, n) in shapes {
        eprintln!("shape k={k} n={n}");
        dense_shape(
            &gpu,
            &blas,
            &fp8,
            &mut rng,
            k,
            n,
            ms,
            !args.no_sweep,
            samples,
            &mut rows,
            &mut checks,
        )?;
    }
    // `--shapes` times just those dense shapes.
    let moe_formats: &[Fp4Format] = if args.shapes.is_some() {
        &[]
    } else {
        &[Fp4Format::Nvfp4, Fp4Format::Mxfp4]
    };
    for &format in moe_formats {
        moe_bench(
            &gpu,
            &mut rng,
            format,
            args.moe_tokens.as_deref().unwrap_or(if args.quick {
                &[1, 16]
            } else {
                &[1, 8, 16, 32]
            }),
            samples,
            (!args.no_sweep, args.moe_sweep),
            &mut rows,
        )?;
    }

    // report
    let commit = std::env::var("MIMO_COMMIT").unwrap_or_else(|_| "unknown".into());
    let cmd: Vec<String> = std::env::args().collect();
    let j = report(
        gpu.device_name(),
        gpu.sm_count(),
        copy_tbps,
        utc_now(),
        &commit,
        &cmd.join(" "),
        samples,
        checks,
        &rows,
    );
    if let Some(p) = &args.out {
        let text = serde_json::to_string_pretty(&j)?;
        std::fs::write(p, text + "\n").map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    // table
    println!("| kernel | fmt | K | N | M | us | weight TB/s | % copy | TFLOP/s | x cuBLAS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| !r.note.starts_with("sweep")) {
        let tbps = r.weight_bytes as f64 / (r.us * 1e-6) / 1e12;
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.0}% | {:.1} | {} |",
            r.kernel,
            r.format,
            r.k,
            r.n,
            r.m,
            r.us,
            tbps,
            100.0 * tbps / copy_tbps,
            r.flops / (r.us * 1e-6) / 1e12,
            r.speedup
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_bad_shapes_are_refused() {
        let a = Args::try_parse_from([
            "mimo-bench-kernels",
            "--no-sweep",
            "--shapes",
            "4096:14336,2048:151936",
            "--ms",
            "1,16",
            "--out",
            "k.json",
        ])
        .unwrap();
        assert!(a.no_sweep && !a.quick && !a.moe_only && !a.moe_sweep);
        assert_eq!(a.shapes, Some(vec![(4096, 14336), (2048, 151936)]));
        assert_eq!(a.ms, Some(vec![1, 16]));
        assert_eq!(a.out, Some(PathBuf::from("k.json")));
        let e = Args::try_parse_from(["mimo-bench-kernels", "--shapes", "4096x14336"]).unwrap_err();
        assert!(e.to_string().contains("'4096x14336' is not K:N"), "{e}");
        let p = Args::try_parse_from([
            "mimo-bench-kernels",
            "--layer-probe",
            "8",
            "--probe-modes",
            "flagged,barrier_no_copy",
        ])
        .unwrap();
        assert_eq!(p.layer_probe, Some(8));
        assert_eq!(
            p.probe_modes,
            Some(vec!["flagged".to_string(), "barrier_no_copy".to_string()])
        );
        assert!(Args::try_parse_from(["mimo-bench-kernels", "--layer-probe", "x"]).is_err());
        assert!(Args::try_parse_from(["mimo-bench-kernels", "--ms", "1,x"]).is_err());
        assert!(Args::try_parse_from(["mimo-bench-kernels", "--unknown"]).is_err());
    }

    #[test]
    fn the_report_holds_what_the_tables_read() {
        let row = Row {
            group: "dense",
            kernel: "fp4_fused".into(),
            format: "nvfp4",
            k: 4096,
            n: 14336,
            m: 1,
            us: 14.0,
            spread: 0.01,
            graph: true,
            weight_bytes: 33_030_144,
            flops: 2.0 * 4096.0 * 14336.0,
            speedup: Some(2.9512),
            note: "a \"quoted\" note".into(),
        };
        let checks =
            vec![json!({"format": "nvfp4", "rel_err_fused_vs_dequant_cublas": sig4(0.0026984)})];
        let j = report(
            "H100",
            132,
            2.83,
            "2026-11-27T00:00:00Z".into(),
            "abc",
            "cmd --x",
            15,
            checks,
            &[row],
        );
        // Round trip through the text a file holds.
        let j: Value = serde_json::from_str(&serde_json::to_string_pretty(&j).unwrap()).unwrap();
        assert_eq!(j["machine"]["sms"], 132);
        assert_eq!(j["checks"][0]["rel_err_fused_vs_dequant_cublas"], 0.002698);
        let r = &j["rows"][0];
        assert_eq!(r["kernel"], "fp4_fused");
        assert_eq!(r["note"], "a \"quoted\" note");
        assert_eq!(r["us"], 14.0);
        // 33,030,144 bytes in 14 us: 2.3593 TB/s, 83.37 % of 2.83.
        assert_eq!(r["weight_tbps"], 2.3593);
        assert_eq!(r["copy_share"], 0.8337);
        assert_eq!(r["speedup_vs_cublas"], 2.951);
        assert!(j["method"]
            .as_str()
            .unwrap()
            .contains("median of 15 replays"));
    }
}
