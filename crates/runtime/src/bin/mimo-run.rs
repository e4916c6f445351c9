//! `mimo-run`: generate text, measure perplexity, compare a candidate checkpoint with a reference
//! and benchmark prefill/decode speed, on BF16/F16 and FP4 checkpoints, on the CPU or (with
//! `--device cuda`, the default where a GPU is found) on one CUDA GPU.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mimo_runtime::eval;
use mimo_runtime::generate::{generate, GenerationStats, SamplingParams};
use mimo_runtime::model::{Logits, Model};
use mimo_runtime::tokenizer::{Message, TextTokenizer};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Parser, Debug)]
#[command(
    name = "mimo-run",
    version,
    about = "Run BF16 and FP4 checkpoints on the CPU or a CUDA GPU"
)]
struct Cli {
    /// Backend: cuda where a usable GPU is found, else cpu. An explicit `cuda` without a
    /// usable GPU falls back to the CPU with a message.
    #[arg(long, value_enum, global = true)]
    device: Option<Device>,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print one JSON object with the results instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text from a prompt, streaming tokens as they come.
    Generate {
        /// Checkpoint folder.
        #[arg(long, short)]
        model: PathBuf,
        /// The prompt.
        prompt: String,
        /// Maximum number of new tokens.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt as a user message with the checkpoint's chat template.
        #[arg(long)]
        chat: bool,
        /// System message (with --chat).
        #[arg(long)]
        system: Option<String>,
        /// Context length (prompt + generated tokens).
        #[arg(long, default_value_t = 4096)]
        ctx: usize,
    },
    /// Perplexity of a text file.
    Ppl {
        /// Checkpoint folder.
        #[arg(long, short)]
        model: PathBuf,
        /// UTF-8 text file.
        file: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Window step (<= ctx); each token is scored once.
        #[arg(long, default_value_t = 256)]
        stride: usize,
        /// Score at most this many tokens of the file (0 = all).
        #[arg(long, default_value_t = 0)]
        max_tokens: usize,
        // --fp8-prefill
        #[command(flatten)]
        prefill: EvalPrefill,
    },
    /// Compare a candidate checkpoint with a reference on a text file.
    Compare {
        /// Reference checkpoint folder (e.g. BF16).
        #[arg(long)]
        reference: PathBuf,
        /// Candidate checkpoint folder (e.g. NVFP4).
        #[arg(long)]
        candidate: PathBuf,
        /// UTF-8 text file.
        file: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Window step (<= ctx).
        #[arg(long, default_value_t = 256)]
        stride: usize,
        /// Use at most this many tokens of the file (0 = all).
        #[arg(long, default_value_t = 0)]
        max_tokens: usize,
        /// How many worst positions to list.
        #[arg(long, default_value_t = 10)]
        worst: usize,
        // --fp8-prefill
        #[command(flatten)]
        prefill: EvalPrefill,
    },
    /// Prefill and decode speed on synthetic tokens: of a checkpoint (`--model`), or of a
    /// config's shape with random weights built on the GPU (`--config FILE --random-weights`).
    Bench {
        /// Checkpoint folder.
        #[arg(long, short, required_unless_present = "random_weights")]
        model: Option<PathBuf>,
        /// config.json of the architecture (HF format), with --random-weights.
        #[arg(long, requires = "random_weights", conflicts_with = "model")]
        config: Option<PathBuf>,
        /// Build random weights on the GPU (GPU only; throughput numbers only, never quality).
        #[arg(long, requires = "config")]
        random_weights: bool,
        /// Random weights: keep only the first N layers.
        #[arg(long, requires = "random_weights")]
        layers: Option<usize>,
        /// Random weights: prompt tokens before decoding.
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Random weights: timed decode steps per batch size.
        #[arg(long, default_value_t = 128)]
        steps: usize,
        /// Random weights: decode batch sizes, comma separated.
        #[arg(long, default_value = "1,8,32")]
        batches: String,
        /// Random weights: weight formats, comma separated: bf16, nvfp4, mxfp4; nvfp4-experts /
        /// mxfp4-experts (FP4 routed experts, other Linear layers BF16: `convert
        /// --experts-only`); nvfp4-kv16 / mxfp4-kv16 (FP4 but k_proj and v_proj BF16);
        /// nvfp4-kvo16 / mxfp4-kvo16 (FP4 but k_proj, v_proj and o_proj BF16); nvfp4-qkv16 /
        /// mxfp4-qkv16 (FP4 but q_proj, k_proj and v_proj BF16).
        #[arg(long, default_value = "bf16,nvfp4")]
        formats: String,
        /// Random weights: also time FP4 runs with an FP4 lm_head.
        #[arg(long)]
        fp4_head: bool,
        /// Random weights: decode without CUDA graphs (eager launches).
        #[arg(long)]
        no_graph: bool,
        /// Random weights: also write the JSON report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Random weights: seed of the weights and prompt.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Random weights: also time batch-1 decode with each layer stage left out in turn
        /// (what each stage adds to the graph-replayed step; timings only).
        #[arg(long)]
        stage_costs: bool,
        /// Checkpoint: prompt length for the prefill measurement.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prompt.
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        /// Repetitions; the best run is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

/// The prefill option of the evaluation commands (ppl, compare).
#[derive(clap::Args, Debug)]
struct EvalPrefill {
    /// GPU: run the prefill GEMMs of FP4 weights on the FP8 tensor cores (E4M3 activations,
    /// as generation does by default). Off by default: ppl and compare measure the checkpoint
    /// with bf16 activations, as engines serving FP4 weights on Hopper do. Also on with
    /// MIMO_FP8_PREFILL=1.
    #[arg(long)]
    fp8_prefill: bool,
}

impl EvalPrefill {
    /// The backend of an evaluation command (cuda where a usable GPU is found), with the GPU's
    /// prefill GEMMs set by `--fp8-prefill` / MIMO_FP8_PREFILL.
    fn backend(&self, device: Option<Device>) -> gpu::Backend {
        let backend = gpu::Backend::resolve(device, true);
        backend.eval_prefill(self.fp8_prefill);
        backend
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

fn error_text(e: &anyhow::Error) -> String {
    mimo_runtime::error_text::error_text(e.as_ref())
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            chat,
            system,
            ctx,
        } => {
            let params = SamplingParams {
                temperature,
                top_p,
                seed,
            };
            // Generation is the one command whose default is the GPU where one is found.
            let backend = gpu::Backend::resolve(cli.device, true);
            run_generate(
                &backend, &model, &prompt, max_tokens, params, chat, system, ctx, cli.json,
            )
        }
        Cmd::Ppl {
            model,
            file,
            ctx,
            stride,
            max_tokens,
            prefill,
        } => {
            let backend = prefill.backend(cli.device);
            run_ppl(&backend, &model, &file, ctx, stride, max_tokens, cli.json)
        }
        Cmd::Compare {
            reference,
            candidate,
            file,
            ctx,
            stride,
            max_tokens,
            worst,
            prefill,
        } => {
            let backend = prefill.backend(cli.device);
            run_compare(
                &backend, &reference, &candidate, &file, ctx, stride, max_tokens, worst, cli.json,
            )
        }
        Cmd::Bench {
            model,
            config,
            random_weights,
            layers,
            prompt,
            steps,
            batches,
            formats,
            fp4_head,
            no_graph,
            out,
            seed,
            stage_costs,
            prompt_tokens,
            decode_tokens,
            runs,
        } => {
            if random_weights {
                let config = config.context("--random-weights needs --config FILE")?;
                let args = gpu::RandomBenchArgs {
                    config,
                    layers,
                    prompt,
                    steps,
                    batches,
                    formats,
                    fp4_head,
                    graphs: !no_graph,
                    out,
                    seed,
                    stage_costs,
                };
                return gpu::run_random_bench(cli.device, &args, cli.json);
            }
            let model =
                model.context("bench needs --model DIR (or --config FILE --random-weights)")?;
            match gpu::Backend::resolve(cli.device, true) {
                gpu::Backend::Cpu => {
                    run_bench(&model, prompt_tokens, decode_tokens, runs, cli.json)
                }
                gpu::Backend::Cuda(g) => gpu::run_checkpoint_bench(
                    &g,
                    &model,
                    prompt_tokens,
                    decode_tokens,
                    runs,
                    cli.json,
                ),
            }
        }
    }
}

fn load_model(dir: &Path) -> Result<Model> {
    Model::load(dir).with_context(|| format!("loading the model from {}", dir.display()))
}

fn load_tokenizer(dir: &Path) -> Result<TextTokenizer> {
    Ok(TextTokenizer::from_dir(dir)?)
}

#[allow(clippy::too_many_arguments)]
fn run_generate(
    backend: &gpu::Backend,
    dir: &Path,
    prompt: &str,
    max_tokens: usize,
    params: SamplingParams,
    chat: bool,
    system: Option<String>,
    ctx: usize,
    json_out: bool,
) -> Result<()> {
    let tok = load_tokenizer(dir)?;
    // Loaded only on the CPU path; the GPU path reads the checkpoint straight to the device.
    let (cpu_model, mut gpu_model) = match backend {
        gpu::Backend::Cpu => (Some(load_model(dir)?), None),
        gpu::Backend::Cuda(g) => (None, Some(gpu::load_model(g, dir)?)),
    };
    let config = match (&cpu_model, &gpu_model) {
        (Some(m), _) => &m.config,
        (_, Some(m)) => &m.config,
        _ => bail!("no model loaded"),
    }
    .clone();
    let ids = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message {
                role: "system".into(),
                content: s,
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: prompt.to_string(),
        });
        let text = tok.apply_chat_template(&msgs)?;
        // The template already holds any BOS token.
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    };
    let mut eos: Vec<u32> = config.eos_token_ids.clone();
    eos.extend(tok.eos_id());
    if chat {
        // Chat models end a turn with these even when eos_token says otherwise.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            eos.extend(tok.token_to_id(t));
        }
    }
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let on_token = |t: u32| {
        generated.push(t);
        if json_out {
            return;
        }
        // Decode the whole continuation and print what is new; hold back a trailing partial
        // UTF-8 sequence (shown as U+FFFD) until the next token completes it.
        if let Ok(text) = tok.decode(&generated) {
            if !text.ends_with('\u{FFFD}')
                && text.len() > printed.len()
                && text.starts_with(&printed)
            {
                mimo_runtime::out!("{}", &text[printed.len()..]);
                printed = text;
            }
        }
    };
    let (out, stats): (Vec<u32>, GenerationStats) = match (&cpu_model, &mut gpu_model) {
        (Some(m), _) => generate(m, &ids, max_tokens, ctx, params, &eos, on_token)?,
        (_, Some(m)) => gpu::generate(m, &ids, max_tokens, ctx, params, &eos, on_token)?,
        _ => bail!("no model loaded"),
    };
    let text = tok.decode(&out)?;
    if json_out {
        let v = json!({"prompt_tokens": ids.len(), "tokens": out, "text": text, "stats": stats});
        mimo_runtime::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            mimo_runtime::out!("{}", &text[printed.len()..]);
        }
        mimo_runtime::outln!();
        // Stats go to stderr; flush the text first so the two never interleave.
        let _ = std::io::stdout().flush();
        eprintln!(
            "[{} prompt tokens: {:.1} tok/s prefill | {} generated: {:.2} tok/s decode{}]",
            stats.prompt_tokens,
            stats.prefill_tok_s,
            stats.generated_tokens,
            stats.decode_tok_s,
            if stats.stopped_at_eos {
                ", stopped at EOS"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn read_tokens(tok: &TextTokenizer, file: &Path, max_tokens: usize) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut ids = tok.encode(&text, true)?;
    if max_tokens > 0 {
        ids.truncate(max_tokens);
    }
    if ids.len() < 2 {
        bail!(
            "{}: the text has {} tokens; at least 2 are needed",
            file.display(),
            ids.len()
        );
    }
    Ok(ids)
}

fn run_ppl(
    backend: &gpu::Backend,
    dir: &Path,
    file: &Path,
    ctx: usize,
    stride: usize,
    max_tokens: usize,
    json_out: bool,
) -> Result<()> {
    let tok = load_tokenizer(dir)?;
    let ids = read_tokens(&tok, file, max_tokens)?;
    let t0 = Instant::now();
    let p = match backend {
        gpu::Backend::Cpu => eval::perplexity(&load_model(dir)?, &ids, ctx, stride)?,
        gpu::Backend::Cuda(g) => {
            let mut m = gpu::load_model(g, dir)?;
            eval::perplexity_on(&mut m, &ids, ctx, stride)?
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let v = json!({"model": dir, "file": file, "device": backend.name(), "prefill_gemm": backend.prefill_gemm(), "ctx": p.ctx, "stride": stride.min(p.ctx), "result": p, "seconds": secs});
        mimo_runtime::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        mimo_runtime::outln!(
            "perplexity {:.4} (mean NLL {:.4} nats) over {} tokens, {} windows of {} (stride {}), {:.1}s",
            p.ppl,
            p.mean_nll,
            p.tokens,
            p.windows,
            p.ctx,
            stride.min(p.ctx),
            secs
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_compare(
    backend: &gpu::Backend,
    reference: &Path,
    candidate: &Path,
    file: &Path,
    ctx: usize,
    stride: usize,
    max_tokens: usize,
    worst: usize,
    json_out: bool,
) -> Result<()> {
    let tok = load_tokenizer(reference)?;
    let ids = read_tokens(&tok, file, max_tokens)?;
    let cmp = match backend {
        gpu::Backend::Cpu => {
            let (r, c) = (load_model(reference)?, load_model(candidate)?);
            eval::compare(&r, &c, &ids, ctx, stride, worst)?
        }
        gpu::Backend::Cuda(g) => {
            // Both models resident (each refused before loading if it does not fit).
            let mut r = gpu::load_model(g, reference)?;
            let mut c = gpu::load_model(g, candidate)?;
            eval::compare_on(&mut r, &mut c, &ids, ctx, stride, worst)?
        }
    };
    if json_out {
        let v = json!({"reference": reference, "candidate": candidate, "file": file, "device": backend.name(), "prefill_gemm": backend.prefill_gemm(), "ctx": cmp.reference.ctx, "stride": stride.min(cmp.reference.ctx),
            "result": cmp});
        mimo_runtime::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    mimo_runtime::outln!("tokens scored      {}", cmp.reference.tokens);
    mimo_runtime::outln!("reference ppl      {:.4}", cmp.reference.ppl);
    mimo_runtime::outln!(
        "candidate ppl      {:.4}  ({:+.2}%)",
        cmp.candidate.ppl,
        100.0 * (cmp.candidate.ppl / cmp.reference.ppl - 1.0)
    );
    mimo_runtime::outln!("mean KL(ref||cand) {:.6} nats", cmp.mean_kl);
    mimo_runtime::outln!("top-1 agreement    {:.2}%", 100.0 * cmp.top1_agreement);
    mimo_runtime::outln!("  by the reference's margin between its first and second choice:");
    for b in &cmp.top1_by_margin {
        let range = match b.hi {
            Some(hi) => format!("[{:.1}, {:.1})", b.lo, hi),
            None => format!(">= {:.1}", b.lo),
        };
        let share = if b.positions > 0 {
            format!("{:.2}%", 100.0 * b.agree as f64 / b.positions as f64)
        } else {
            "-".to_string()
        };
        mimo_runtime::outln!(
            "  margin {range:>11} nats: {:6} positions, agreement {share}",
            b.positions
        );
    }
    mimo_runtime::outln!("worst positions:");
    for d in &cmp.worst {
        let show = |t: u32| tok.decode(&[t]).unwrap_or_default().replace('\n', "\\n");
        mimo_runtime::outln!(
            "  pos {:6}  KL {:.4}  token {:?}  ref top-1 {:?}  cand top-1 {:?}",
            d.position,
            d.kl,
            show(d.token),
            show(d.reference_top1),
            show(d.candidate_top1)
        );
    }
    Ok(())
}

fn run_bench(
    dir: &Path,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    json_out: bool,
) -> Result<()> {
    let t0 = Instant::now();
    let model = load_model(dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = bench_prompt(prompt_tokens, model.config.vocab_size)?;
    let ctx = prompt_tokens + decode_tokens + 1;
    let mut speeds = BenchSpeeds::new(prompt_tokens, decode_tokens, runs);
    let mut best_decode_cpu = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let mut cache = model.new_cache(ctx);
        if cache.capacity() < ctx {
            bail!(
                "prompt + decode tokens ({ctx}) exceed the model's context {}",
                cache.capacity()
            );
        }
        let t = Instant::now();
        let mut logits = model.forward(&prompt, &mut cache, Logits::Last)?;
        speeds.prefill_took(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let cpu0 = process_cpu_seconds();
        for _ in 0..decode_tokens {
            let next = mimo_runtime::generate::argmax(&logits) as u32;
            logits = model.forward(&[next], &mut cache, Logits::Last)?;
        }
        speeds.decode_took(t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, process_cpu_seconds()) {
            best_decode_cpu = best_decode_cpu.min(b - a);
        }
    }
    // CPU seconds per decoded token (all threads, stalls on memory included): on a shared,
    // loaded machine this is steadier than wall time. Only meaningful with --threads 1, since
    // idle rayon workers spin for a while before they sleep.
    let decode_cpu_s_per_token = (decode_tokens > 0 && best_decode_cpu.is_finite())
        .then(|| best_decode_cpu / decode_tokens as f64);
    let (prefill_tok_s, decode_tok_s) = (speeds.prefill_tok_s(), speeds.decode_tok_s());
    let threads = rayon::current_num_threads();
    if json_out {
        let j = json!({
            "model": dir, "architecture": model.config.arch.model_type(), "weight_bytes": model.weight_bytes(),
            "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs,
            "load_s": load_s, "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
            "decode_cpu_s_per_token": decode_cpu_s_per_token,
        });
        mimo_runtime::outln!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        let arch = model.config.arch.model_type();
        let place = format!(", {threads} threads");
        let line = speeds.line(dir, arch, model.weight_bytes(), &place, "");
        mimo_runtime::outln!("{line}");
    }
    Ok(())
}

/// What `bench -m` measured (best of `runs`), reported alike by the CPU and the GPU backend.
struct BenchSpeeds {
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    /// Best prefill wall time, seconds.
    best_prefill: f64,
    /// Best decode wall time, seconds.
    best_decode: f64,
}

impl BenchSpeeds {
    /// No run timed yet (best times infinite).
    fn new(prompt_tokens: usize, decode_tokens: usize, runs: usize) -> BenchSpeeds {
        BenchSpeeds {
            prompt_tokens,
            decode_tokens,
            runs,
            best_prefill: f64::INFINITY,
            best_decode: f64::INFINITY,
        }
    }

    /// Records one prefill's wall time (seconds).
    fn prefill_took(&mut self, s: f64) {
        self.best_prefill = self.best_prefill.min(s);
    }

    /// Records one decode's wall time (seconds).
    fn decode_took(&mut self, s: f64) {
        self.best_decode = self.best_decode.min(s);
    }

    /// Prefill tokens per second.
    fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.best_prefill
    }

    /// Decode tokens per second (0 when no token is decoded).
    fn decode_tok_s(&self) -> f64 {
        if self.decode_tokens > 0 {
            self.decode_tokens as f64 / self.best_decode
        } else {
            0.0
        }
    }

    /// The one-line text report: `place` follows the weight size (", N threads" or
    /// " on DEVICE"), `decode_note` the decode speed.
    fn line(
        &self,
        dir: &Path,
        arch: &str,
        weight_bytes: usize,
        place: &str,
        decode_note: &str,
    ) -> String {
        format!(
            "{}: {} weights {:.1} MiB{place} | prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.2} tok/s{decode_note} (best of {})",
            dir.display(),
            arch,
            weight_bytes as f64 / (1 << 20) as f64,
            self.prompt_tokens,
            self.prefill_tok_s(),
            self.decode_tokens,
            self.decode_tok_s(),
            self.runs.max(1)
        )
    }
}

/// The fixed pseudo-random prompt of `bench -m` (CPU and GPU): benchmark numbers do not depend
/// on a tokenizer.
fn bench_prompt(prompt_tokens: usize, vocab: usize) -> Result<Vec<u32>> {
    if prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    Ok((0..prompt_tokens)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect())
}

/// User + system CPU time of this process in seconds (Linux /proc; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux target we build for.
    Some(ticks / 100.0)
}

/// The CUDA backend of the commands: choosing the device, GPU generation and the random-weight
/// benchmark.
mod gpu {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use mimo_kernels::cuda::CudaError;
    use mimo_runtime::config::ModelConfig;
    use mimo_runtime::cuda::{
        bench_random_weights, kind_from_name, BenchOptions, BenchReport, Gpu, GpuError, GpuModel,
    };
    use mimo_runtime::generate::{GenerateError, GenerationStats, Sampler, SamplingParams};

    use super::Device;

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
                let on =
                    fp8 || mimo_kernels::cuda::Tuning::env_flag("MIMO_FP8_PREFILL") == Some(true);
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
                        eprintln!("mimo-run: the CUDA backend is unavailable ({e}); falling back to the CPU");
                    }
                    Backend::Cpu
                }
            }
        }
    }

    /// Loads a checkpoint onto the GPU (refused before any upload if it does not fit).
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
        let prompt = super::bench_prompt(prompt_tokens, model.config.vocab_size)?;
        let ctx = prompt_tokens + decode_tokens + 1;
        model.alloc_cache(1, ctx)?;
        let mut speeds = super::BenchSpeeds::new(prompt_tokens, decode_tokens, runs);
        // Warm-up: compilation, cuBLAS set-up, graph capture.
        let logits = model.forward(&prompt, 0, 0, false)?;
        let first = mimo_runtime::generate::argmax(&logits) as u32;
        let mut graph = false;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let logits = model.forward(&prompt, 0, 0, false)?;
            speeds.prefill_took(t.elapsed().as_secs_f64());
            let next = mimo_runtime::generate::argmax(&logits) as u32;
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
            mimo_runtime::outln!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            let arch = model.config.arch.model_type();
            let note = if graph { ", CUDA graph" } else { "" };
            let place = format!(" on {device}");
            let line = speeds.line(dir, arch, model.weight_bytes(), &place, note);
            mimo_runtime::outln!("{line}");
        }
        Ok(())
    }

    pub fn load_model(gpu: &Arc<Gpu>, dir: &Path) -> Result<GpuModel> {
        GpuModel::load(gpu.clone(), dir)
            .with_context(|| format!("loading the model from {} onto the GPU", dir.display()))
    }

    /// Same contract as `mimo_runtime::generate::generate`, on the GPU. The first token comes
    /// from the prefill's logits (read back once) through the CPU runtime's sampler; every
    /// later one is drawn on the device inside the replayed decode graph (greedy, temperature
    /// and nucleus sampling alike: `GpuModel::set_sampling`), read back in growing chunks (the
    /// tokens after an end-of-sequence token in a chunk are dropped). Nucleus ties at the
    /// boundary are all kept on the device (see `generate::nucleus`); the samples differ from
    /// the CPU's for the same seed (different random streams).
    pub fn generate(
        model: &mut GpuModel,
        prompt: &[u32],
        max_tokens: usize,
        ctx: usize,
        params: SamplingParams,
        eos: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, GenerationStats)> {
        let context = ctx.min(model.config.max_position_embeddings);
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt.into());
        }
        if prompt.len() >= context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                context,
            }
            .into());
        }
        // Greedy, temperature and nucleus sampling all run inside the decode graph: the next
        // token is picked on the device, with no per-token read-back.
        let mut sampler = Sampler::new(params)?;
        model.set_sampling(params.temperature, params.top_p, params.seed)?;
        model.alloc_cache(1, context)?;
        let cap = model.cache().map_or(context, |c| c.capacity());
        let p = prompt.len();
        let t0 = Instant::now();
        let logits = model.forward(prompt, 0, 0, false)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut out = Vec::new();
        let mut stopped_at_eos = false;
        let first = sampler.sample(&logits);
        out.push(first);
        on_token(first);
        if eos.contains(&first) {
            stopped_at_eos = true;
        } else {
            // Step i runs the token at position p + i - 1 and writes its successor to the
            // history at p + i; the cache holds positions < cap.
            model.decode_start(&[first], &[p], true)?;
            let mut done = 0usize;
            let mut chunk = 1usize;
            'outer: while out.len() < max_tokens {
                let n = chunk.min(max_tokens - out.len()).min(cap - p - done);
                if n == 0 {
                    break;
                }
                model.decode_steps(1, n)?;
                let toks = model.decode_tokens(1, p + 1 + done, p + 1 + done + n)?;
                done += n;
                chunk = (chunk * 2).min(32);
                for &t in toks.first().map_or(&[][..], |v| &v[..]) {
                    out.push(t);
                    on_token(t);
                    if eos.contains(&t) {
                        stopped_at_eos = true;
                        break 'outer;
                    }
                }
            }
        }
        // Later decode steps of this model are greedy again unless asked otherwise.
        model.set_sampling(0.0, 1.0, 0)?;
        let bad = model.bad_token_count()?;
        if bad != 0 {
            bail!("the GPU saw {bad} token ids outside the vocabulary");
        }
        let decode_s = t1.elapsed().as_secs_f64();
        let steps = out.len().saturating_sub(1);
        let stats = GenerationStats {
            prompt_tokens: p,
            generated_tokens: out.len(),
            prefill_s,
            decode_s,
            prefill_tok_s: p as f64 / prefill_s.max(1e-9),
            decode_tok_s: if steps > 0 {
                steps as f64 / decode_s.max(1e-9)
            } else {
                0.0
            },
            stopped_at_eos,
        };
        Ok((out, stats))
    }

    /// Arguments of `bench --config FILE --random-weights`.
    pub struct RandomBenchArgs {
        pub config: PathBuf,
        pub layers: Option<usize>,
        pub prompt: usize,
        pub steps: usize,
        pub batches: String,
        pub formats: String,
        pub fp4_head: bool,
        pub graphs: bool,
        pub out: Option<PathBuf>,
        pub seed: u64,
        pub stage_costs: bool,
    }

    /// `bench --config FILE --random-weights`: builds the config's shape with random weights
    /// on the GPU and prints the throughput report (text, or the JSON with `--json`).
    pub fn run_random_bench(
        device: Option<Device>,
        a: &RandomBenchArgs,
        json_out: bool,
    ) -> Result<()> {
        if device == Some(Device::Cpu) {
            bail!("--random-weights builds the model on the GPU and has no CPU mode; drop --device cpu");
        }
        let text = std::fs::read_to_string(&a.config)
            .with_context(|| format!("reading {}", a.config.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", a.config.display()))?;
        let config = ModelConfig::from_json(&json, &a.config)?;
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
        let name = a
            .config
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
            graphs: a.graphs,
            seed: a.seed,
            stage_costs: a.stage_costs,
        };
        let report = bench_random_weights(Arc::new(gpu), &opts)?;
        let js = serde_json::to_string_pretty(&report)?;
        if let Some(p) = &a.out {
            std::fs::write(p, js.clone() + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
        }
        if json_out {
            mimo_runtime::outln!("{js}");
        } else {
            print_report(&report);
        }
        Ok(())
    }

    fn print_report(r: &BenchReport) {
        mimo_runtime::outln!(
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
        mimo_runtime::outln!("throughput only: no quality number comes from random weights");
        for run in &r.runs {
            mimo_runtime::outln!(
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
                mimo_runtime::outln!(
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
            mimo_runtime::outln!("FP4 / BF16 decode at batch 1: {x:.2}x");
        }
    }
}
