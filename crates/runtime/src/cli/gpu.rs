//! The CUDA backend of the commands: choosing the device, GPU generation and the random-weight
//! benchmark.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mimo_kernels::cuda::CudaError;

use crate::config::ModelConfig;
use crate::cuda::{
    bench_random_weights, kind_from_name, BenchOptions, BenchReport, Gpu, GpuError, GpuModel,
};

use super::{BenchArgs, Device};

/// Where a command runs.
pub enum Backend {
    /// The CPU runtime.
    Cpu,
    /// GPU 0, opened and with its kernels loaded.
    Cuda(Arc<Gpu>),
}

impl Backend {
    /// "cpu" or "cuda" (reports).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda(_) => "cuda",
        }
    }

    /// Evaluation (ppl, compare): the FP8 prefill path only where asked for (`--fp8-prefill`
    /// or MIMO_FP8_PREFILL set and not 0), so that quality numbers describe the checkpoint with bf16
    /// activations; generation and bench keep the context's default (FP8 where available).
    pub fn eval_prefill(&self, fp8: bool) {
        if let Backend::Cuda(g) = self {
            let on = fp8 || mimo_kernels::cuda::Tuning::env_flag("MIMO_FP8_PREFILL") == Some(true);
            let t = g.ctx.tuning();
            g.ctx.set_tuning(mimo_kernels::cuda::Tuning {
                fp8_prefill: on,
                ..t
            });
        }
    }

    /// How the GPU's prefill GEMMs of FP4 weights run now ("fp8" or "bf16"; null on the
    /// CPU), for reports.
    pub fn prefill_gemm(&self) -> Option<&'static str> {
        match self {
            Backend::Cpu => None,
            Backend::Cuda(g) => Some(if g.ctx.tuning().fp8_prefill && g.has_fp8() {
                "fp8"
            } else {
                "bf16"
            }),
        }
    }

    /// The backend for `device`; `None` means cuda where a usable GPU is found. A GPU that
    /// cannot be opened falls back to the CPU, with a message where cuda was asked for (or
    /// where a GPU seems present but failed for another reason than its absence).
    pub fn resolve(device: Option<Device>, default_gpu: bool) -> Backend {
        let explicit = match device {
            Some(Device::Cpu) => return Backend::Cpu,
            Some(Device::Cuda) => true,
            None if default_gpu => false,
            None => return Backend::Cpu,
        };
        match Gpu::new(0) {
            Ok(g) => Backend::Cuda(Arc::new(g)),
            Err(e) => {
                let absent = matches!(e, GpuError::Cuda(CudaError::NoDevice(_)));
                if explicit || !absent {
                    eprintln!(
                        "mimo-run: the CUDA backend is unavailable ({e}); falling back to the CPU"
                    );
                }
                Backend::Cpu
            }
        }
    }
}

/// `bench -m DIR` on the GPU: prefill of a fixed pseudo-random prompt (after one warm-up
/// pass), then greedy decode of `decode_tokens` as replays of the captured decode graph;
/// best of `runs`.
pub fn run_checkpoint_bench(
    gpu: &Arc<Gpu>,
    dir: &Path,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    json_out: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let mut model = load_model(gpu, dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = super::bench::bench_prompt(prompt_tokens, model.config.vocab_size)?;
    let ctx = prompt_tokens + decode_tokens + 1;
    model.alloc_cache(1, ctx)?;
    let mut speeds = super::bench::BenchSpeeds::new(prompt_tokens, decode_tokens, runs);
    // Warm-up: compilation, cuBLAS set-up, graph capture.
    let logits = model.forward(&prompt, 0, 0, false)?;
    let first = crate::generate::argmax(&logits) as u32;
    let mut graph = false;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let logits = model.forward(&prompt, 0, 0, false)?;
        speeds.prefill_took(t.elapsed().as_secs_f64());
        let next = crate::generate::argmax(&logits) as u32;
        if next != first {
            eprintln!("warning: two prefills of the same prompt chose different tokens");
        }
        if decode_tokens > 0 {
            graph = model.decode_start(&[next], &[prompt_tokens], true)?;
            model.synchronize()?;
            let t = Instant::now();
            model.decode_steps(1, decode_tokens)?;
            model.synchronize()?;
            speeds.decode_took(t.elapsed().as_secs_f64());
        }
    }
    let (prefill_tok_s, decode_tok_s) = (speeds.prefill_tok_s(), speeds.decode_tok_s());
    let device = gpu.ctx.device_name().to_string();
    if json_out {
        let j = serde_json::json!({
            "model": dir, "architecture": model.config.arch.model_type(), "device": device,
            "weight_bytes": model.weight_bytes(), "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "runs": runs, "load_s": load_s,
            "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s, "cuda_graph": graph,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        let arch = model.config.arch.model_type();
        let note = if graph { ", CUDA graph" } else { "" };
        let place = format!(" on {device}");
        let line = speeds.line(dir, arch, model.weight_bytes(), &place, note);
        crate::outln!("{line}");
    }
    Ok(())
}

/// Loads a checkpoint onto the GPU (refused before any upload if it does not fit).
pub fn load_model(gpu: &Arc<Gpu>, dir: &Path) -> Result<GpuModel> {
    GpuModel::load(gpu.clone(), dir)
        .with_context(|| format!("loading the model from {} onto the GPU", dir.display()))
}

/// `bench --config FILE --random-weights`: builds the config's shape with random weights
/// on the GPU and prints the throughput report (text, or the JSON with `--json`).
pub fn run_random_bench(device: Option<Device>, a: &BenchArgs, json_out: bool) -> Result<()> {
    if device == Some(Device::Cpu) {
        bail!(
            "--random-weights builds the model on the GPU and has no CPU mode; drop --device cpu"
        );
    }
    let config_path = a
        .config
        .as_deref()
        .context("--random-weights needs --config FILE")?;
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let config = ModelConfig::from_json(&json, config_path)?;
    let batches = a
        .batches
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--batches {:?}: comma-separated integers", a.batches))?;
    if batches.contains(&0) {
        bail!("--batches: batch sizes must be at least 1");
    }
    if a.prompt == 0 {
        bail!("--prompt must be at least 1");
    }
    let kinds = a
        .formats
        .split(',')
        .map(|s| {
            kind_from_name(s.trim()).with_context(|| {
                format!(
                    "--formats: unknown format '{}' (bf16, nvfp4, mxfp4, nvfp4-experts, \
                     mxfp4-experts, nvfp4-kv16, mxfp4-kv16, nvfp4-kvo16, mxfp4-kvo16, \
                     nvfp4-qkv16, mxfp4-qkv16)",
                    s.trim()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let gpu = Gpu::new(0).map_err(|e| {
        anyhow::anyhow!("--random-weights builds the model on the GPU and has no CPU mode: {e}")
    })?;
    let name = config_path
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let opts = BenchOptions {
        name,
        config,
        layers: a.layers,
        prompt: a.prompt,
        steps: a.steps,
        batches,
        kinds,
        fp4_head_too: a.fp4_head,
        graphs: !a.no_graph,
        seed: a.seed,
        stage_costs: a.stage_costs,
    };
    let report = bench_random_weights(Arc::new(gpu), &opts)?;
    let js = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.out {
        std::fs::write(p, js.clone() + "\n").with_context(|| format!("writing {}", p.display()))?;
    }
    if json_out {
        crate::outln!("{js}");
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &BenchReport) {
    crate::outln!(
        "{}: {} ({}, {} layers, hidden {}, vocab {}) on {}, copy bandwidth {:.2} TB/s",
        r.mode,
        r.shape,
        r.arch,
        r.layers,
        r.hidden,
        r.vocab,
        r.device,
        r.copy_tb_per_s
    );
    crate::outln!("throughput only: no quality number comes from random weights");
    for run in &r.runs {
        crate::outln!(
            "{}: {:.2} GiB of weights | prefill {} tokens: {:.0} tok/s",
            run.weights,
            run.weight_gib,
            run.prompt_tokens,
            run.prefill_tokens_per_s
        );
        for d in &run.decode {
            let share = d.share_of_bandwidth_limit.map_or(String::new(), |s| {
                format!(", {:.0}% of the bandwidth limit", 100.0 * s)
            });
            crate::outln!(
                "  decode batch {:>3}, lm_head {}: {:.0} tok/s, {:.3} ms/step{}{}",
                d.batch,
                d.lm_head,
                d.tokens_per_s,
                d.ms_per_step,
                if d.cuda_graph { ", CUDA graph" } else { "" },
                share
            );
        }
    }
    if let Some(x) = r.fp4_over_bf16_batch1 {
        crate::outln!("FP4 / BF16 decode at batch 1: {x:.2}x");
    }
}
