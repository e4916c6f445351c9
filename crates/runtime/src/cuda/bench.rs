//! `bench --config config.json --random-weights`: decode and prefill throughput of a real
//! architecture's shape with random weights built on the GPU, BF16 and FP4 in one run.

use std::sync::Arc;
use std::time::Instant;

use mimo_kernels::cuda::{Tuning, ATTN_PREFETCH_MIB};

use mimo_kernels::Fp4Format;
use serde::Serialize;

use super::error::{drv, GpuError};
use super::model::{GpuModel, Stage};
use super::random::{random_head, WeightKind};
use super::timeline::{grid_spans, GridSpan};
use super::weights::Gpu;
use crate::config::ModelConfig;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Name of the shape (file stem of the config).
    pub name: String,
    /// The architecture and sizes.
    pub config: ModelConfig,
    /// Keep only the first N layers (quick runs); None = all.
    pub layers: Option<usize>,
    /// Prompt length before decoding (the KV cache holds this many positions when decoding).
    pub prompt: usize,
    /// Timed decode steps per batch size.
    pub steps: usize,
    /// Decode batch sizes.
    pub batches: Vec<usize>,
    /// Weight formats to build, one model after the other (BF16 first).
    pub kinds: Vec<WeightKind>,
    /// For FP4 kinds, also time decoding with an FP4 lm_head (BF16 otherwise).
    pub fp4_head_too: bool,
    /// Capture decode steps as CUDA graphs.
    pub graphs: bool,
    /// Seed of the random weights and prompt.
    pub seed: u64,
    /// Batch 1 with graphs: also time the decode with each layer stage left out in turn.
    pub stage_costs: bool,
}

/// What one layer stage adds to a graph-replayed batch-1 decode step: the step timed with the
/// stage left out of every layer (`GpuModel::set_skipped_stage`), against the full step.
#[derive(Debug, Clone, Serialize)]
pub struct StageCost {
    /// The stage left out (`Stage::name`).
    pub stage: String,
    /// Tokens/s without it (the outputs are then wrong: a timing only).
    pub tokens_per_s_without: f64,
    /// Microseconds per layer the stage adds: (full step - step without it) / layers.
    pub us_per_layer: f64,
}

/// Decode throughput at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    /// Sequences decoded together.
    pub batch: usize,
    /// lm_head format of this measurement ("bf16" or the FP4 format).
    pub lm_head: String,
    /// Generated tokens per second, all sequences together.
    pub tokens_per_s: f64,
    /// Milliseconds per decode step (one token of every sequence): the median of
    /// `DECODE_TIMINGS` timed runs of `steps` steps.
    pub ms_per_step: f64,
    /// Milliseconds per step of each timed run, in the order they ran.
    pub ms_per_step_runs: Vec<f64>,
    /// Whether the step ran as a captured CUDA graph.
    pub cuda_graph: bool,
    /// Bytes of weights one step reads (batch 1 counting: touched experts only).
    pub weight_bytes_per_step: u64,
    /// Bytes of K/V one step reads.
    pub kv_bytes_per_step: u64,
    /// Tokens/s if every step moved its bytes at the measured copy bandwidth (batch 1 only).
    pub bandwidth_limit_tokens_per_s: Option<f64>,
    /// tokens_per_s / bandwidth_limit_tokens_per_s.
    pub share_of_bandwidth_limit: Option<f64>,
    /// Batch 1: milliseconds per op kind of one eagerly launched, event-timed step (host
    /// launch gaps included; the graph removes most of them), summed over layers.
    pub eager_step_profile_ms: Option<Vec<(String, f64)>>,
    /// Latency features in force for `tokens_per_s` (mimo_kernels::cuda::Tuning).
    pub tuning: String,
    /// Kernel -> kernel edges of the decode graph and how many of them are programmatic.
    pub graph_edges: Option<(usize, usize)>,
    /// Batch 1: tokens/s with each latency feature flipped in turn, then all off, in the same
    /// process (the graph captured again for each).
    pub tuning_ablation: Option<Vec<(String, f64)>>,
    /// Batch 1: tokens/s of the same graph-replayed decode when the next token is sampled on the
    /// device instead of taken greedily ("T=1" temperature; "T=0.6 top_p=0.95" nucleus, the
    /// sampling of Qwen3's generation_config), in the same process.
    pub sampling: Option<Vec<(String, f64)>>,
    /// Batch 1 with `--stage-costs`: what each layer stage adds to the step, same process.
    pub stage_costs: Option<Vec<StageCost>>,
    /// Batch 1 in a process started with `MIMO_TRACE=1`: one graph-replayed step's kernel
    /// launches as the kernels recorded them (timeline.rs). The tracing kernels are compiled
    /// differently (one atomic and two timer reads per block), so every number of such a run
    /// is a diagnostic, not a measurement to report.
    pub timeline: Option<Vec<GridSpan>>,
}

/// One weight format.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    /// "bf16", "nvfp4" or "mxfp4".
    pub weights: String,
    /// GiB of weights on the device.
    pub weight_gib: f64,
    /// Seconds to build the random model.
    pub build_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefill tokens per second (one pass over the prompt, batch 1).
    pub prefill_tokens_per_s: f64,
    /// GEMMs of that timed prefill that ran on the FP8 tensor cores (Tuning::fp8_prefill).
    pub prefill_fp8_gemms: usize,
    /// Prefill tokens/s with one prefill switch flipped (`prefill_attention_mma`; FP4 weights
    /// also `fp8_prefill` and `fp8_resident`), in the same process.
    pub prefill_ablation: Vec<(String, f64)>,
    /// Decode results.
    pub decode: Vec<DecodeResult>,
}

/// The report `bench --random-weights` prints and saves.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Always "random weights": no quality number comes from this mode.
    pub mode: String,
    /// Device name.
    pub device: String,
    /// Shape name.
    pub shape: String,
    /// model_type.
    pub arch: String,
    /// Layers built.
    pub layers: usize,
    /// hidden_size.
    pub hidden: usize,
    /// vocab_size.
    pub vocab: usize,
    /// Measured device copy bandwidth, TB/s (bytes read + written).
    pub copy_tb_per_s: f64,
    /// One entry per weight format.
    pub runs: Vec<BenchRun>,
    /// decode tokens/s at batch 1: FP4 over BF16 (same lm_head as the FP4 run's first entry).
    pub fp4_over_bf16_batch1: Option<f64>,
}

/// The name `--formats` takes for `k`.
pub fn kind_name(k: WeightKind) -> String {
    let f = |f: Fp4Format| match f {
        Fp4Format::Nvfp4 => "nvfp4",
        Fp4Format::Mxfp4 => "mxfp4",
    };
    match k {
        WeightKind::Bf16 => "bf16".into(),
        WeightKind::Fp4(x) => f(x).into(),
        WeightKind::Fp4Experts(x) => format!("{}-experts", f(x)),
        WeightKind::Fp4DenseKv(x) => format!("{}-kv16", f(x)),
        WeightKind::Fp4DenseKvO(x) => format!("{}-kvo16", f(x)),
        WeightKind::Fp4DenseQkv(x) => format!("{}-qkv16", f(x)),
    }
}

/// The weight kind `--formats` names `name` (the inverse of [`kind_name`]).
pub fn kind_from_name(name: &str) -> Option<WeightKind> {
    [
        WeightKind::Bf16,
        WeightKind::Fp4(Fp4Format::Nvfp4),
        WeightKind::Fp4(Fp4Format::Mxfp4),
        WeightKind::Fp4Experts(Fp4Format::Nvfp4),
        WeightKind::Fp4Experts(Fp4Format::Mxfp4),
        WeightKind::Fp4DenseKv(Fp4Format::Nvfp4),
        WeightKind::Fp4DenseKv(Fp4Format::Mxfp4),
        WeightKind::Fp4DenseKvO(Fp4Format::Nvfp4),
        WeightKind::Fp4DenseKvO(Fp4Format::Mxfp4),
        WeightKind::Fp4DenseQkv(Fp4Format::Nvfp4),
        WeightKind::Fp4DenseQkv(Fp4Format::Mxfp4),
    ]
    .into_iter()
    .find(|&k| kind_name(k) == name)
}

/// Device copy bandwidth in TB/s (read + write), 1 GiB buffers, median of 10.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64, GpuError> {
    let len = 1usize << 30;
    let s = gpu.ctx.stream();
    let src = s.alloc_zeros::<u8>(len).map_err(drv("alloc copy buffer"))?;
    let mut dst = s.alloc_zeros::<u8>(len).map_err(drv("alloc copy buffer"))?;
    mimo_kernels::cuda::device_copy(&gpu.ctx, &src, &mut dst)?;
    gpu.ctx.synchronize()?;
    let mut t = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        mimo_kernels::cuda::device_copy(&gpu.ctx, &src, &mut dst)?;
        gpu.ctx.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(2.0 * len as f64 / t[t.len() / 2] / 1e12)
}

/// Runs the benchmark; progress lines go to stderr.
pub fn bench_random_weights(gpu: Arc<Gpu>, opts: &BenchOptions) -> Result<BenchReport, GpuError> {
    let mut c = opts.config.clone();
    if let Some(n) = opts.layers {
        let n = n.clamp(1, c.num_layers);
        c.num_layers = n;
        c.sliding_window.truncate(n);
        c.moe_layers.truncate(n);
    }
    eprintln!(
        "random weights: {} ({}), {} layers, on {}",
        opts.name,
        c.arch.model_type(),
        c.num_layers,
        gpu.ctx.device_name()
    );
    let copy = copy_bandwidth(&gpu)?;
    eprintln!("device copy bandwidth {copy:.2} TB/s");
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1).max(1);
    let capacity = opts.prompt + opts.steps + 32;
    let mut runs = Vec::new();
    for &kind in &opts.kinds {
        let t0 = Instant::now();
        let mut model = GpuModel::random(gpu.clone(), c.clone(), kind, false, opts.seed)?;
        let build_s = t0.elapsed().as_secs_f64();
        let weight_gib = model.weight_bytes() as f64 / (1u64 << 30) as f64;
        eprintln!(
            "{}: {weight_gib:.2} GiB of weights built in {build_s:.1} s",
            kind_name(kind)
        );
        model.alloc_cache(max_batch, capacity)?;
        let vocab = c.vocab_size as u64;
        let prompt: Vec<u32> = (0..opts.prompt as u64)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(opts.seed)) % vocab) as u32)
            .collect();
        // Prefill: once to warm up (compilation, cuBLAS), once timed.
        let logits = model.forward(&prompt, 0, 0, false)?;
        let fp8_before = gpu.fp8_calls();
        let t0 = Instant::now();
        let logits2 = model.forward(&prompt, 0, 0, false)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        if logits
            .iter()
            .zip(&logits2)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            eprintln!("warning: two prefills of the same prompt gave different logits");
        }
        let first = crate::generate::argmax(&logits2) as u32;
        let prefill = opts.prompt as f64 / prefill_s;
        let fp8_gemms = gpu.fp8_calls() - fp8_before;
        eprintln!(
            "  prefill {} tokens: {prefill:.0} tokens/s ({fp8_gemms} FP8 GEMMs)",
            opts.prompt
        );
        // Prefill switches flipped one at a time, same process: the tensor-core attention, the
        // tiled MoE kernels (MoE models) and the FP8 GEMMs (FP4 weights only).
        let mut prefill_ablation = Vec::new();
        let base = gpu.ctx.tuning();
        let mut flips: Vec<(&str, Tuning)> = vec![(
            "prefill_attention_mma",
            Tuning {
                prefill_attention_mma: !base.prefill_attention_mma,
                ..base
            },
        )];
        // The tiled grouped MoE kernels (FP4 and BF16 experts).
        if c.moe.is_some() {
            flips.push((
                "moe_tiled",
                Tuning {
                    moe_tiled: !base.moe_tiled,
                    ..base
                },
            ));
        }
        // Only where some dense Linear is FP4 (routed experts take their own kernels).
        if kind.formats(false).dense_fp4() {
            flips.push((
                "fp8_prefill",
                Tuning {
                    fp8_prefill: !base.fp8_prefill,
                    ..base
                },
            ));
            // Prompts of 64 to `wgmma_max_tokens` tokens (Hopper): the warpgroup kernels.
            flips.push((
                "wgmma_gemm",
                Tuning {
                    wgmma_gemm: !base.wgmma_gemm,
                    ..base
                },
            ));
            // Last: turning it on leaves the E4M3 copies allocated.
            flips.push((
                "fp8_resident",
                Tuning {
                    fp8_resident: !base.fp8_resident,
                    ..base
                },
            ));
        }
        for (name, t) in flips {
            gpu.ctx.set_tuning(t);
            model.forward(&prompt, 0, 0, false)?;
            let t0 = Instant::now();
            model.forward(&prompt, 0, 0, false)?;
            let tps = opts.prompt as f64 / t0.elapsed().as_secs_f64();
            let on = match name {
                "fp8_prefill" => t.fp8_prefill,
                "fp8_resident" => t.fp8_resident,
                "moe_tiled" => t.moe_tiled,
                "wgmma_gemm" => t.wgmma_gemm,
                _ => t.prefill_attention_mma,
            };
            let label = format!("{name}={}", if on { "on" } else { "off" });
            eprintln!("  prefill with {label}: {tps:.0} tokens/s");
            prefill_ablation.push((label, tps));
        }
        gpu.ctx.set_tuning(base);
        let mut decode = Vec::new();
        let heads: Vec<(String, bool)> = match kind {
            WeightKind::Fp4(_) if opts.fp4_head_too => {
                vec![("bf16".into(), false), (kind_name(kind), true)]
            }
            _ => vec![("bf16".into(), false)],
        };
        for (head_name, fp4_head) in heads {
            if fp4_head {
                let h = random_head(&gpu, &c, kind.fp4(), opts.seed ^ 0x5EED)?;
                model.set_lm_head(Some(h));
            }
            for &b in &opts.batches {
                let r = time_decode(&mut model, b, first, opts, copy, &head_name)?;
                eprintln!(
                    "  decode batch {b:>2} (lm_head {head_name}): {:.0} tokens/s, {:.3} ms/step{}",
                    r.tokens_per_s,
                    r.ms_per_step,
                    r.share_of_bandwidth_limit
                        .map_or(String::new(), |s| format!(
                            ", {:.0}% of the bandwidth limit",
                            s * 100.0
                        ))
                );
                if let Some(p) = &r.eager_step_profile_ms {
                    let total: f64 = p.iter().map(|x| x.1).sum();
                    let parts: Vec<String> =
                        p.iter().map(|(n, ms)| format!("{n} {ms:.3}")).collect();
                    eprintln!("    eager step {total:.3} ms: {}", parts.join(", "));
                }
                decode.push(r);
            }
        }
        runs.push(BenchRun {
            weights: kind_name(kind),
            weight_gib,
            build_s,
            prompt_tokens: opts.prompt,
            prefill_tokens_per_s: prefill,
            prefill_fp8_gemms: fp8_gemms,
            prefill_ablation,
            decode,
        });
        drop(model);
        gpu.ctx.synchronize()?;
    }
    let b1 = |r: &BenchRun| {
        r.decode
            .iter()
            .find(|d| d.batch == 1 && d.lm_head == "bf16")
            .map(|d| d.tokens_per_s)
    };
    let bf = runs.iter().find(|r| r.weights == "bf16").and_then(b1);
    // The first all-FP4 run (mixed layouts are reported beside it, not in the ratio).
    let fp = opts
        .kinds
        .iter()
        .zip(&runs)
        .find(|(k, _)| matches!(k, WeightKind::Fp4(_)))
        .and_then(|(_, r)| b1(r));
    Ok(BenchReport {
        mode: "random weights".into(),
        device: gpu.ctx.device_name().to_string(),
        shape: opts.name.clone(),
        arch: c.arch.model_type().into(),
        layers: c.num_layers,
        hidden: c.hidden_size,
        vocab: c.vocab_size,
        copy_tb_per_s: copy,
        runs,
        fp4_over_bf16_batch1: match (fp, bf) {
            (Some(f), Some(b)) => Some(f / b),
            _ => None,
        },
    })
}

/// Timed runs behind each decode measurement (their median is reported).
pub const DECODE_TIMINGS: usize = 3;

fn time_decode(
    model: &mut GpuModel,
    batch: usize,
    first: u32,
    opts: &BenchOptions,
    copy_tb_s: f64,
    head: &str,
) -> Result<DecodeResult, GpuError> {
    let vocab = model.config.vocab_size as u32;
    let tokens: Vec<u32> = (0..batch as u32)
        .map(|b| (first + 7919 * b) % vocab)
        .collect();
    // Every sequence decodes after `prompt` cached positions (sequence 0 holds the prefilled
    // prompt; the others' cache rows are zeros: attention reads them all the same).
    let positions = vec![opts.prompt; batch];
    // The median of a few timed runs: the first run after a model or lm_head change came out
    // up to 1.5 % below the runs after it (H100, Qwen3-30B-A3B NVFP4 with the FP4 head: 469
    // vs 474-478 tokens/s for ablation rows that change nothing).
    let mut graph = false;
    let mut runs = Vec::with_capacity(DECODE_TIMINGS);
    for _ in 0..DECODE_TIMINGS {
        let (g, dt) = timed_steps(model, &tokens, &positions, opts)?;
        graph = g;
        runs.push(dt);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let dt = sorted[sorted.len() / 2];
    // Right after the timed steps, while their decode session is live.
    let timeline = if batch == 1 && model.gpu().ctx.tracing() {
        Some(traced_step(model)?)
    } else {
        None
    };
    // The profile is a diagnostic: its failure does not void the measurement. Every batch size
    // gets one, so that the larger batches show where their step goes too.
    let profile = match model.profile_decode_step(batch) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("    (no step profile: {e})");
            None
        }
    };
    let edges = model.decode_graph_edges(batch);
    let tuning = model.gpu().ctx.tuning();
    let ablation = if batch == 1 && opts.graphs {
        Some(tuning_ablation(model, &tokens, &positions, opts)?)
    } else {
        None
    };
    let sampling = if batch == 1 && opts.graphs {
        Some(sampling_speed(model, &tokens, &positions, opts)?)
    } else {
        None
    };
    let stage_costs = if batch == 1 && opts.graphs && opts.stage_costs {
        Some(stage_costs(model, &tokens, &positions, opts, dt)?)
    } else {
        None
    };
    let bad = model.bad_token_count()?;
    if bad != 0 {
        return Err(GpuError::DeviceCheck(format!(
            "{bad} sampled token ids were outside the vocabulary"
        )));
    }
    let steps = opts.steps.max(1) as f64;
    let ms = dt * 1e3 / steps;
    let wbytes = model.decode_weight_bytes() as u64;
    let kv = (model.kv_bytes_per_token(opts.prompt + opts.steps / 2) * batch) as u64;
    let limit = (batch == 1).then(|| copy_tb_s * 1e12 / (wbytes + kv) as f64);
    let tps = batch as f64 * steps / dt;
    Ok(DecodeResult {
        batch,
        lm_head: head.to_string(),
        tokens_per_s: tps,
        ms_per_step: ms,
        ms_per_step_runs: runs.iter().map(|r| r * 1e3 / steps).collect(),
        cuda_graph: graph,
        weight_bytes_per_step: wbytes,
        kv_bytes_per_step: kv,
        bandwidth_limit_tokens_per_s: limit,
        share_of_bandwidth_limit: limit.map(|l| tps / l),
        eager_step_profile_ms: profile,
        tuning: format!("{tuning:?}"),
        graph_edges: edges,
        tuning_ablation: ablation,
        sampling,
        stage_costs,
        timeline,
    })
}

/// One more decode step (after the timed ones) with the timeline buffer emptied before it.
fn traced_step(model: &mut GpuModel) -> Result<Vec<GridSpan>, GpuError> {
    // The reset is queued on the stream behind the timed steps.
    model.gpu().ctx.trace_reset()?;
    model.decode_steps(1, 1)?;
    model.synchronize()?;
    let Some((records, dropped)) = model.gpu().ctx.trace_read()? else {
        return Ok(Vec::new());
    };
    if dropped != 0 {
        eprintln!("    (timeline: {dropped} records did not fit the trace buffer)");
    }
    Ok(grid_spans(&records))
}

/// Decodes `tokens` (one per sequence) from `positions`: starts (capturing the step's graph on
/// first use with `opts.graphs`), runs up to 4 warm-up steps, starts again at the same positions
/// and times `opts.steps` steps. Returns whether a graph ran and the seconds of the timed steps.
fn timed_steps(
    model: &mut GpuModel,
    tokens: &[u32],
    positions: &[usize],
    opts: &BenchOptions,
) -> Result<(bool, f64), GpuError> {
    let batch = tokens.len();
    let graph = model.decode_start(tokens, positions, opts.graphs)?;
    model.decode_steps(batch, 4.min(opts.steps))?;
    model.synchronize()?;
    model.decode_start(tokens, positions, opts.graphs)?;
    model.synchronize()?;
    let t0 = Instant::now();
    model.decode_steps(batch, opts.steps)?;
    model.synchronize()?;
    Ok((graph, t0.elapsed().as_secs_f64()))
}

/// Batch-1 decode with each layer stage left out in turn (`full_s`: the full step's timed
/// seconds), the full model restored at the end.
fn stage_costs(
    model: &mut GpuModel,
    tokens: &[u32],
    positions: &[usize],
    opts: &BenchOptions,
    full_s: f64,
) -> Result<Vec<StageCost>, GpuError> {
    let steps = opts.steps.max(1) as f64;
    let layers = model.config.num_layers.max(1) as f64;
    let mut out = Vec::new();
    for stage in Stage::ALL {
        model.set_skipped_stage(Some(stage));
        let r = timed_steps(model, tokens, positions, opts);
        model.set_skipped_stage(None);
        let (_, dt) = r?;
        let us = (full_s - dt) / steps / layers * 1e6;
        eprintln!(
            "    batch 1 without {}: {:.1} tok/s ({us:.2} us per layer)",
            stage.name(),
            steps / dt
        );
        out.push(StageCost {
            stage: stage.name().to_string(),
            tokens_per_s_without: steps / dt,
            us_per_layer: us,
        });
    }
    Ok(out)
}

/// Batch-1 decode tokens/s with device sampling (temperature; temperature + nucleus), greedy
/// restored at the end. Random weights give flat logits, so the nucleus holds a large share of
/// the vocabulary: the nucleus kernels' costly case.
fn sampling_speed(
    model: &mut GpuModel,
    tokens: &[u32],
    positions: &[usize],
    opts: &BenchOptions,
) -> Result<Vec<(String, f64)>, GpuError> {
    let mut out = Vec::new();
    for (name, t, p) in [("T=1", 1.0f32, 1.0f32), ("T=0.6 top_p=0.95", 0.6, 0.95)] {
        model.set_sampling(t, p, opts.seed)?;
        let (_, dt) = timed_steps(model, tokens, positions, opts)?;
        let tps = opts.steps.max(1) as f64 / dt;
        eprintln!("    batch 1 sampling {name}: {tps:.1} tok/s");
        out.push((name.to_string(), tps));
    }
    model.set_sampling(0.0, 1.0, 0)?;
    model.reset_decode_sessions();
    Ok(out)
}

/// Batch-1 decode tokens/s with each latency feature flipped in turn, then all off; the features
/// in force before the call are restored (and the decode graph captured again) at the end.
fn tuning_ablation(
    model: &mut GpuModel,
    tokens: &[u32],
    positions: &[usize],
    opts: &BenchOptions,
) -> Result<Vec<(String, f64)>, GpuError> {
    let base = model.gpu().ctx.tuning();
    // Each feature flipped from the state in force, then everything off.
    let flip = |f: fn(&mut Tuning) -> &mut bool, name: &str| {
        let mut t = base;
        let v = f(&mut t);
        *v = !*v;
        (format!("{name}={}", if *v { "on" } else { "off" }), t)
    };
    let variants = [
        flip(|t| &mut t.pdl, "pdl"),
        flip(|t| &mut t.l2_prefetch, "l2_prefetch"),
        flip(|t| &mut t.l2_prefetch_small, "l2_prefetch_small"),
        flip(|t| &mut t.moe_direct, "moe_direct"),
        flip(|t| &mut t.norm_router, "norm_router"),
        flip(|t| &mut t.dense_swiglu, "dense_swiglu"),
        flip(|t| &mut t.norm_fold, "norm_fold"),
        flip(|t| &mut t.expert_topk, "expert_topk"),
        flip(|t| &mut t.warp_attention, "warp_attention"),
        flip(|t| &mut t.spread, "spread"),
        flip(|t| &mut t.moe_down_prefetch, "moe_down_prefetch"),
        flip(|t| &mut t.bf16_fold, "bf16_fold"),
        flip(|t| &mut t.bf16_tail, "bf16_tail"),
        {
            let mut t = base;
            t.moe_down_split = if base.moe_down_split == 1 { 2 } else { 1 };
            (format!("moe_down_split={}", t.moe_down_split), t)
        },
        {
            let mut t = base;
            t.attn_prefetch_mib = if base.attn_prefetch_mib == 0 {
                ATTN_PREFETCH_MIB
            } else {
                0
            };
            (format!("attn_prefetch_mib={}", t.attn_prefetch_mib), t)
        },
        (
            "all_off".to_string(),
            Tuning {
                pdl: false,
                l2_prefetch: false,
                l2_prefetch_small: false,
                l2_prefetch_small_mib: base.l2_prefetch_small_mib,
                moe_direct: false,
                norm_router: false,
                dense_swiglu: false,
                norm_fold: false,
                expert_topk: false,
                x_stage: base.x_stage,
                spread: false,
                attn_prefetch_mib: 0,
                moe_down_prefetch: false,
                moe_down_split: 1,
                bf16_fold: false,
                bf16_tail: false,
                warp_attention: false,
                gqa_attention: false,
                gqa_split: base.gqa_split,
                fp8_prefill: base.fp8_prefill,
                prefill_attention_mma: base.prefill_attention_mma,
                tiled_gemm: base.tiled_gemm,
                tiled_min_work: base.tiled_min_work,
                fp8_resident: base.fp8_resident,
                bulk_gemm: base.bulk_gemm,
                bulk_min_mi: base.bulk_min_mi,
                bulk_max_tokens: base.bulk_max_tokens,
                moe_tiled: base.moe_tiled,
                moe_tiled_min_pairs: base.moe_tiled_min_pairs,
                wgmma_gemm: base.wgmma_gemm,
                wgmma_max_tokens: base.wgmma_max_tokens,
            },
        ),
    ];
    let mut out = Vec::new();
    let run = |model: &mut GpuModel, t: Tuning| -> Result<f64, GpuError> {
        model.gpu().ctx.set_tuning(t);
        model.reset_decode_sessions();
        let (_, dt) = timed_steps(model, tokens, positions, opts)?;
        Ok(opts.steps.max(1) as f64 / dt)
    };
    for (name, t) in variants {
        if t == base {
            continue;
        }
        let tps = run(model, t)?;
        eprintln!("    batch 1 with {name}: {tps:.1} tok/s");
        out.push((name, tps));
    }
    model.gpu().ctx.set_tuning(base);
    model.reset_decode_sessions();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip_and_mixed_layouts_keep_their_parts() {
        for name in [
            "bf16",
            "nvfp4",
            "mxfp4",
            "nvfp4-experts",
            "mxfp4-experts",
            "nvfp4-kv16",
            "mxfp4-kv16",
            "nvfp4-kvo16",
            "mxfp4-kvo16",
            "nvfp4-qkv16",
            "mxfp4-qkv16",
        ] {
            let k = kind_from_name(name).unwrap();
            assert_eq!(kind_name(k), name);
        }
        assert_eq!(kind_from_name("fp4"), None);
        let nv = Some(Fp4Format::Nvfp4);
        let e = WeightKind::Fp4Experts(Fp4Format::Nvfp4).formats(true);
        assert_eq!(
            (e.experts, e.q, e.kv, e.o, e.mlp, e.head),
            (nv, None, None, None, None, nv)
        );
        assert!(e.dense_fp4());
        assert!(!WeightKind::Fp4Experts(Fp4Format::Nvfp4)
            .formats(false)
            .dense_fp4());
        let kv = WeightKind::Fp4DenseKv(Fp4Format::Nvfp4).formats(false);
        assert_eq!(
            (kv.experts, kv.q, kv.kv, kv.o, kv.mlp, kv.head),
            (nv, nv, None, nv, nv, None)
        );
        let kvo = WeightKind::Fp4DenseKvO(Fp4Format::Nvfp4).formats(false);
        assert_eq!(
            (kvo.experts, kvo.q, kvo.kv, kvo.o, kvo.mlp, kvo.head),
            (nv, nv, None, None, nv, None)
        );
        let qkv = WeightKind::Fp4DenseQkv(Fp4Format::Nvfp4).formats(false);
        assert_eq!(
            (qkv.experts, qkv.q, qkv.kv, qkv.o, qkv.mlp, qkv.head),
            (nv, None, None, nv, nv, None)
        );
        assert_eq!(
            WeightKind::Fp4(Fp4Format::Mxfp4).formats(false),
            crate::cuda::Formats::uniform(Some(Fp4Format::Mxfp4), false)
        );
    }
}
