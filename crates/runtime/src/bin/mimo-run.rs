//! `mimo-run`: generate text, measure perplexity, compare a candidate checkpoint with a reference
//! and benchmark prefill/decode speed, on BF16/F16 and FP4 checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mimo_runtime::eval;
use mimo_runtime::generate::{generate, SamplingParams};
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
    about = "Run BF16 and FP4 checkpoints on the CPU"
)]
struct Cli {
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Cpu, global = true)]
    device: Device,
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
    },
    /// Prefill and decode speed on synthetic tokens.
    Bench {
        /// Checkpoint folder.
        #[arg(long, short)]
        model: PathBuf,
        /// Prompt length for the prefill measurement.
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.device == Device::Cuda {
        eprintln!("mimo-run: the CUDA backend is not yet supported, using cpu");
    }
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
            run_generate(
                &model, &prompt, max_tokens, params, chat, system, ctx, cli.json,
            )
        }
        Cmd::Ppl {
            model,
            file,
            ctx,
            stride,
            max_tokens,
        } => run_ppl(&model, &file, ctx, stride, max_tokens, cli.json),
        Cmd::Compare {
            reference,
            candidate,
            file,
            ctx,
            stride,
            max_tokens,
            worst,
        } => run_compare(
            &reference, &candidate, &file, ctx, stride, max_tokens, worst, cli.json,
        ),
        Cmd::Bench {
            model,
            prompt_tokens,
            decode_tokens,
            runs,
        } => run_bench(&model, prompt_tokens, decode_tokens, runs, cli.json),
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
    let model = load_model(dir)?;
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
    let mut eos: Vec<u32> = model.config.eos_token_ids.clone();
    eos.extend(tok.eos_id());
    if chat {
        // Chat models end a turn with these even when eos_token says otherwise.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            eos.extend(tok.token_to_id(t));
        }
    }
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout();
    let (out, stats) = generate(&model, &ids, max_tokens, ctx, params, &eos, |t| {
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
                let _ = write!(stdout, "{}", &text[printed.len()..]);
                let _ = stdout.flush();
                printed = text;
            }
        }
    })?;
    let text = tok.decode(&out)?;
    if json_out {
        let v = json!({"prompt_tokens": ids.len(), "tokens": out, "text": text, "stats": stats});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if text.len() > printed.len() && text.starts_with(&printed) {
            print!("{}", &text[printed.len()..]);
        }
        println!();
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
    dir: &Path,
    file: &Path,
    ctx: usize,
    stride: usize,
    max_tokens: usize,
    json_out: bool,
) -> Result<()> {
    let tok = load_tokenizer(dir)?;
    let model = load_model(dir)?;
    let ids = read_tokens(&tok, file, max_tokens)?;
    let t0 = Instant::now();
    let p = eval::perplexity(&model, &ids, ctx, stride)?;
    let secs = t0.elapsed().as_secs_f64();
    if json_out {
        let v = json!({"model": dir, "file": file, "ctx": p.ctx, "stride": stride.min(p.ctx), "result": p, "seconds": secs});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
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
    let r = load_model(reference)?;
    let c = load_model(candidate)?;
    let ids = read_tokens(&tok, file, max_tokens)?;
    let cmp = eval::compare(&r, &c, &ids, ctx, stride, worst)?;
    if json_out {
        let v = json!({"reference": reference, "candidate": candidate, "file": file, "ctx": cmp.reference.ctx, "stride": stride.min(cmp.reference.ctx),
            "result": cmp});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("tokens scored      {}", cmp.reference.tokens);
    println!("reference ppl      {:.4}", cmp.reference.ppl);
    println!(
        "candidate ppl      {:.4}  ({:+.2}%)",
        cmp.candidate.ppl,
        100.0 * (cmp.candidate.ppl / cmp.reference.ppl - 1.0)
    );
    println!("mean KL(ref||cand) {:.6} nats", cmp.mean_kl);
    println!("top-1 agreement    {:.2}%", 100.0 * cmp.top1_agreement);
    println!("worst positions:");
    for d in &cmp.worst {
        let show = |t: u32| tok.decode(&[t]).unwrap_or_default().replace('\n', "\\n");
        println!(
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
    let v = model.config.vocab_size;
    if prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    // Fixed pseudo-random prompt: benchmark numbers do not depend on a tokenizer.
    let prompt: Vec<u32> = (0..prompt_tokens)
        .map(|i| ((i * 7919 + 13) % v) as u32)
        .collect();
    let ctx = prompt_tokens + decode_tokens + 1;
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
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
        best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let cpu0 = process_cpu_seconds();
        for _ in 0..decode_tokens {
            let next = mimo_runtime::generate::argmax(&logits) as u32;
            logits = model.forward(&[next], &mut cache, Logits::Last)?;
        }
        best_decode = best_decode.min(t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, process_cpu_seconds()) {
            best_decode_cpu = best_decode_cpu.min(b - a);
        }
    }
    // CPU seconds per decoded token (all threads, stalls on memory included): on a shared,
    // loaded machine this is steadier than wall time. Only meaningful with --threads 1, since
    // idle rayon workers spin for a while before they sleep.
    let decode_cpu_s_per_token = (decode_tokens > 0 && best_decode_cpu.is_finite())
        .then(|| best_decode_cpu / decode_tokens as f64);
    let prefill_tok_s = prompt_tokens as f64 / best_prefill;
    let decode_tok_s = if decode_tokens > 0 {
        decode_tokens as f64 / best_decode
    } else {
        0.0
    };
    let threads = rayon::current_num_threads();
    if json_out {
        let j = json!({
            "model": dir, "architecture": model.config.arch.model_type(), "weight_bytes": model.weight_bytes(),
            "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "runs": runs,
            "load_s": load_s, "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s,
            "decode_cpu_s_per_token": decode_cpu_s_per_token,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "{}: {} weights {:.1} MiB, {} threads | prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.2} tok/s (best of {})",
            dir.display(),
            model.config.arch.model_type(),
            model.weight_bytes() as f64 / (1 << 20) as f64,
            threads,
            prompt_tokens,
            prefill_tok_s,
            decode_tokens,
            decode_tok_s,
            runs.max(1)
        );
    }
    Ok(())
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
