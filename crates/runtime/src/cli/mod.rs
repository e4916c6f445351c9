//! The `mimo-run` command line (the binary is a thin wrapper): clap arguments -> backend and
//! checks -> run. Generate text, measure perplexity, compare a candidate checkpoint with a
//! reference and benchmark prefill/decode speed, on BF16/F16 and FP4 checkpoints, on the CPU or
//! (with `--device cuda`, the default where a GPU is found) on one CUDA GPU.

mod bench;
mod eval;
mod generate;
mod gpu;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::generate::SamplingParams;
use crate::model::Model;
use crate::tokenizer::TextTokenizer;
use bench::run_bench;
use eval::{run_compare, run_ppl};
use generate::run_generate;

/// Where a command runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

/// The `mimo-run` arguments.
#[derive(Parser, Debug)]
#[command(
    name = "mimo-run",
    version,
    about = "Run BF16 and FP4 checkpoints on the CPU or a CUDA GPU"
)]
pub struct Cli {
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
    Generate(GenerateArgs),
    /// Perplexity of a text file.
    Ppl {
        /// Checkpoint folder.
        #[arg(long, short)]
        model: PathBuf,
        // FILE, --ctx, --stride, --max-tokens, --fp8-prefill
        #[command(flatten)]
        text: EvalText,
    },
    /// Compare a candidate checkpoint with a reference on a text file.
    Compare {
        /// Reference checkpoint folder (e.g. BF16).
        #[arg(long)]
        reference: PathBuf,
        /// Candidate checkpoint folder (e.g. NVFP4).
        #[arg(long)]
        candidate: PathBuf,
        // FILE, --ctx, --stride, --max-tokens, --fp8-prefill
        #[command(flatten)]
        text: EvalText,
        /// How many worst positions to list.
        #[arg(long, default_value_t = 10)]
        worst: usize,
    },
    /// Prefill and decode speed on synthetic tokens: of a checkpoint (`--model`), or of a
    /// config's shape with random weights built on the GPU (`--config FILE --random-weights`).
    Bench(BenchArgs),
}

/// The arguments of `bench`.
#[derive(clap::Args, Debug)]
struct BenchArgs {
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
}

/// The arguments of `generate`.
#[derive(clap::Args, Debug)]
struct GenerateArgs {
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
}

impl GenerateArgs {
    /// The sampler's parameters.
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

/// The text and windows of the evaluation commands (ppl, compare).
#[derive(clap::Args, Debug)]
struct EvalText {
    /// UTF-8 text file.
    file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Window step (<= ctx); each token is scored once.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Use at most this many tokens of the file (0 = all).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    // --fp8-prefill
    #[command(flatten)]
    prefill: EvalPrefill,
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

/// Runs the command `cli` asks for.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Generate(args) => {
            // Generation is the one command whose default is the GPU where one is found.
            let backend = gpu::Backend::resolve(cli.device, true);
            run_generate(&backend, &args, cli.json)
        }
        Cmd::Ppl { model, text } => {
            let backend = text.prefill.backend(cli.device);
            run_ppl(&backend, &model, &text, cli.json)
        }
        Cmd::Compare {
            reference,
            candidate,
            text,
            worst,
        } => {
            let backend = text.prefill.backend(cli.device);
            run_compare(&backend, &reference, &candidate, &text, worst, cli.json)
        }
        Cmd::Bench(args) => {
            if args.random_weights {
                return gpu::run_random_bench(cli.device, &args, cli.json);
            }
            let model = args
                .model
                .as_deref()
                .context("bench needs --model DIR (or --config FILE --random-weights)")?;
            let (prompt_tokens, decode_tokens, runs) =
                (args.prompt_tokens, args.decode_tokens, args.runs);
            match gpu::Backend::resolve(cli.device, true) {
                gpu::Backend::Cpu => run_bench(model, prompt_tokens, decode_tokens, runs, cli.json),
                gpu::Backend::Cuda(g) => gpu::run_checkpoint_bench(
                    &g,
                    model,
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
