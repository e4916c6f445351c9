//! `mimo-run-cuda-bench bench --config config.json --random-weights [--layers N]`: decode and
//! prefill throughput of a real architecture's shape with random weights built on the GPU
//! (BF16 and FP4 in the same run). Thin wrapper over `mimo_runtime::cuda::bench_random_weights`;
//! to be folded into `mimo-run bench`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mimo_kernels::Fp4Format;
use mimo_runtime::config::ModelConfig;
use mimo_runtime::cuda::{bench_random_weights, BenchOptions, Gpu, WeightKind};

#[derive(Parser)]
#[command(about = "GPU end-to-end benchmark of mimo-run (random weights)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Decode/prefill throughput of a config's shape with random weights.
    Bench {
        /// config.json of the architecture (HF format).
        #[arg(long)]
        config: PathBuf,
        /// Build random weights on the GPU (the only mode for now; required as a reminder
        /// that no quality number comes from this run).
        #[arg(long)]
        random_weights: bool,
        /// Keep only the first N layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Prompt tokens before decoding.
        #[arg(long, default_value_t = 512)]
        prompt: usize,
        /// Timed decode steps per batch size.
        #[arg(long, default_value_t = 128)]
        steps: usize,
        /// Decode batch sizes, comma separated.
        #[arg(long, default_value = "1,8,32")]
        batches: String,
        /// Weight formats, comma separated (bf16, nvfp4, mxfp4).
        #[arg(long, default_value = "bf16,nvfp4")]
        formats: String,
        /// Also time FP4 runs with an FP4 lm_head.
        #[arg(long)]
        fp4_head: bool,
        /// Decode without CUDA graphs (eager launches).
        #[arg(long)]
        no_graph: bool,
        /// Write the JSON report here (also printed to stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bench {
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
        } => {
            if !random_weights {
                bail!("only --random-weights is implemented by this benchmark");
            }
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config.display()))?;
            let cfg = ModelConfig::from_json(&json, &config)?;
            let batches = batches
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .context("--batches: comma-separated integers")?;
            let kinds = formats
                .split(',')
                .map(|s| match s.trim() {
                    "bf16" => Ok(WeightKind::Bf16),
                    "nvfp4" => Ok(WeightKind::Fp4(Fp4Format::Nvfp4)),
                    "mxfp4" => Ok(WeightKind::Fp4(Fp4Format::Mxfp4)),
                    other => bail!("--formats: unknown format '{other}' (bf16, nvfp4, mxfp4)"),
                })
                .collect::<Result<Vec<_>>>()?;
            let name = config
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned());
            println!("random weights: {name} (throughput only; no quality numbers)");
            let gpu = std::sync::Arc::new(Gpu::new(0).context("opening GPU 0")?);
            let opts = BenchOptions {
                name,
                config: cfg,
                layers,
                prompt,
                steps,
                batches,
                kinds,
                fp4_head_too: fp4_head,
                graphs: !no_graph,
                seed,
            };
            let report = bench_random_weights(gpu, &opts)?;
            let text = serde_json::to_string_pretty(&report)?;
            println!("{text}");
            if let Some(p) = out {
                std::fs::write(&p, text + "\n")
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
    }
    Ok(())
}
