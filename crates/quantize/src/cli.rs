//! The `mimo-quant` command line: clap arguments -> validated configuration -> run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::format::Layout;

use crate::convert::{convert_resumable, ConvertConfig, Progress};
use crate::plan::{Plan, PlanOptions};

/// Convert BF16/FP16 checkpoints to NVFP4 and MXFP4.
#[derive(Debug, Parser)]
#[command(name = "mimo-quant", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert a checkpoint folder (or hub repo id) to FP4.
    Convert(ConvertArgs),
    /// Dry run: what would be quantized, bytes before/after, bits per weight.
    Plan(PlanArgs),
    /// Run the BF16 model on calibration data: statistics cost and expert coverage report.
    Calibrate(crate::calib::cli::CalibrateArgs),
    /// Picture (report.svg) and summary of per-layer and per-expert quantization error.
    Report(crate::report::ReportArgs),
    /// Summarise any checkpoint folder.
    Inspect {
        /// Checkpoint folder.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a tiny random checkpoint of a supported architecture, or a synthetic Llama-shaped
    /// one of about --synthetic-gb GB (tests, demos, benchmarks).
    Fixture {
        /// Output folder.
        dir: PathBuf,
        /// Architecture (llama, mistral, qwen2, qwen3, mimo, mixtral, qwen2_moe, qwen3_moe, deepseek_v3).
        #[arg(long, default_value = "mimo")]
        arch: String,
        /// Size of a synthetic Llama-shaped checkpoint instead, in GB.
        #[arg(long)]
        synthetic_gb: Option<f64>,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Shard size limit (e.g. 2GB); default one file.
        #[arg(long)]
        max_shard_size: Option<String>,
    },
    /// Write a Hadamard-rotated copy of a BF16/F16 checkpoint: the same architecture and names,
    /// with the rotation folded into the weights so that FP4 blocks see fewer outliers.
    Rotate {
        /// Source checkpoint folder.
        src: PathBuf,
        /// Output folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Seed of the random signs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rotate only the residual stream, not each attention head's values.
        #[arg(long)]
        no_heads: bool,
        /// Replace an existing output folder.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check hashes, shapes, dtypes and scales; with --source, the error against the original.
    Verify {
        /// Converted checkpoint folder.
        dir: PathBuf,
        /// The original checkpoint to compare against.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// FP4 format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// NVFP4: 16-element blocks, E4M3 scales, FP32 global scale.
    Nvfp4,
    /// MXFP4: 32-element blocks, E8M0 scales.
    Mxfp4,
}

/// On-disk layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// compressed-tensors (vLLM, SGLang, transformers).
    CompressedTensors,
    /// NVIDIA ModelOpt (hf_quant_config.json); NVFP4 only.
    Modelopt,
}

/// Options shared by convert and plan.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Source checkpoint folder, or a hub repo id (ORG/NAME).
    pub source: String,
    /// FP4 format.
    #[arg(long, value_enum, default_value = "nvfp4")]
    pub format: FormatArg,
    /// On-disk layout.
    #[arg(long, value_enum, default_value = "compressed-tensors")]
    pub layout: LayoutArg,
    /// Keep tensors matching this glob (tensor or module name) dense; repeatable.
    #[arg(long = "ignore", value_name = "PATTERN")]
    pub ignore: Vec<String>,
    /// Quantize lm_head too (with --method mse|gptq calibrated on the final norm's output;
    /// costs quality: bench/README.md, "lm_head NVFP4 too").
    #[arg(long)]
    pub quantize_lm_head: bool,
    /// Quantize only the routed experts of a MoE model; attention, dense MLPs and shared
    /// experts stay dense (gpt-oss's layout: better quality, more bytes per decoded token).
    #[arg(long)]
    pub experts_only: bool,
    /// Hub revision (with a repo id).
    #[arg(long)]
    pub revision: Option<String>,
    /// Hub token (with a repo id); else HF_TOKEN, else the token file under HF_HOME.
    #[arg(long)]
    pub token: Option<String>,
    /// Use only the hub cache, never the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress or warnings on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// convert's arguments.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Plan options.
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Output folder.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Largest shard, e.g. 5GB, 500MB, 2GiB or bytes.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Continue a run that was killed (kill -9, OOM, power loss): reuse the shards it finished,
    /// after checking each one's sha256 against the record written when it was completed and
    /// that source, options and tool build are the same; everything else is redone. Without a
    /// killed run's temporary folder this is a normal conversion.
    #[arg(long)]
    pub resume: bool,
    /// Worker threads (default: all cores; RAYON_NUM_THREADS also works).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Quantization method and calibration.
    #[command(flatten)]
    pub calib: crate::calib::cli::CalibArgs,
}

/// Parses sizes like `5GB`, `500MB`, `2GiB`, `1000`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("--max-shard-size '{s}': not a number"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => bail!("--max-shard-size '{s}': unknown unit '{u}'"),
    };
    let bytes = (v * mult) as u64;
    if bytes == 0 {
        bail!("--max-shard-size '{s}' must be positive");
    }
    Ok(bytes)
}

fn layout_of(a: &PlanArgs) -> Result<Layout> {
    Ok(match (a.format, a.layout) {
        (FormatArg::Nvfp4, LayoutArg::CompressedTensors) => Layout::CtNvfp4,
        (FormatArg::Mxfp4, LayoutArg::CompressedTensors) => Layout::CtMxfp4,
        (FormatArg::Nvfp4, LayoutArg::Modelopt) => Layout::ModelOptNvfp4,
        (FormatArg::Mxfp4, LayoutArg::Modelopt) => bail!("--layout modelopt is NVFP4 only"),
    })
}

/// A local folder, or a hub repo id fetched into the cache: (folder, repo and commit).
fn resolve_source(a: &PlanArgs) -> Result<(PathBuf, Option<(String, String)>)> {
    let p = Path::new(&a.source);
    if p.exists() || !crate::hub::looks_like_repo_id(&a.source) {
        return Ok((p.to_path_buf(), None));
    }
    let opts =
        crate::hub::HubOptions::from_env(a.token.as_deref(), a.revision.as_deref(), a.offline);
    let f = crate::hub::fetch_model(&a.source, &opts)?;
    Ok((f.snapshot_dir, Some((f.repo_id, f.commit))))
}

fn plan_options(a: &PlanArgs) -> Result<PlanOptions> {
    Ok(PlanOptions {
        layout: layout_of(a)?,
        ignore: a.ignore.clone(),
        quantize_lm_head: a.quantize_lm_head,
        experts_only: a.experts_only,
    })
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Plan(a) => {
            let opts = plan_options(&a)?;
            let (src, _) = resolve_source(&a)?;
            let ck = Checkpoint::open(&src)?;
            let plan = Plan::build(&ck, &opts)?;
            if a.json {
                let entries: Vec<_> = plan
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        serde_json::json!({
                            "name": e.name, "dtype": e.dtype.to_string(), "shape": e.shape,
                            "action": match &e.action { crate::plan::Action::Quantize { .. } => "quantize".to_string(), crate::plan::Action::Keep { reason } => format!("keep: {reason}") },
                            "bytes_in": e.bytes_in(), "bytes_out": plan.bytes_out(i)
                        })
                    })
                    .collect();
                let t = plan.totals();
                let v = serde_json::json!({
                    "architecture": plan.arch, "layout": plan.layout.name(), "warnings": plan.warnings,
                    "totals": t, "bits_per_weight": t.bits_per_weight(), "tensors": entries
                });
                mimo_runtime::outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if !a.quiet {
                    for w in &plan.warnings {
                        eprintln!("warning: {w}");
                    }
                }
                mimo_runtime::out!("{}", plan.render());
            }
            Ok(0)
        }
        Command::Convert(a) => run_convert(a),
        Command::Calibrate(a) => crate::calib::cli::run_calibrate(a),
        Command::Report(a) => crate::report::run_report(a),
        Command::Inspect { dir, json } => {
            let i = crate::inspect::inspect(&dir)?;
            if json {
                mimo_runtime::outln!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                mimo_runtime::out!("{}", i.render());
            }
            Ok(0)
        }
        Command::Fixture {
            dir,
            arch,
            synthetic_gb,
            seed,
            max_shard_size,
        } => {
            use mimo_runtime::fixtures::{spec, write_spec, Arch, SyntheticSpec, WriteOptions};
            let spec = match synthetic_gb {
                Some(gb) => SyntheticSpec::about_gb(gb).spec(),
                None => match Arch::ALL.iter().find(|a| a.model_type() == arch) {
                    Some(a) => spec(*a),
                    None => bail!("unknown --arch '{arch}'"),
                },
            };
            let max_shard_bytes = max_shard_size.as_deref().map(parse_size).transpose()?;
            write_spec(
                &dir,
                &spec,
                WriteOptions {
                    seed,
                    max_shard_bytes,
                },
            )?;
            mimo_runtime::outln!(
                "{}: {} tensors, {} bytes",
                dir.display(),
                spec.tensors.len(),
                spec.total_bytes()
            );
            Ok(0)
        }
        Command::Rotate {
            src,
            output,
            seed,
            no_heads,
            force,
            json,
        } => {
            let opts = crate::rotate::RotateOptions {
                seed,
                heads: !no_heads,
                force,
            };
            let s = crate::rotate::rotate(&src, &output, &opts)?;
            if json {
                mimo_runtime::outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                mimo_runtime::outln!(
                    "{} -> {}: {} tensors rotated, {} copied (hidden {} in Hadamard blocks of {}{})",
                    s.source.display(),
                    s.output.display(),
                    s.rotated,
                    s.copied,
                    s.hidden,
                    s.block,
                    s.head_block
                        .map(|(d, b)| format!(", heads of {d} in blocks of {b}"))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        Command::Verify { dir, source, json } => {
            let r = crate::verify::verify(&dir, source.as_deref())?;
            if json {
                mimo_runtime::outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                mimo_runtime::out!("{}", r.render());
            }
            Ok(if r.ok { 0 } else { 1 })
        }
    }
}

fn run_convert(a: ConvertArgs) -> Result<i32> {
    let opts = plan_options(&a.plan)?;
    let max_shard_size = parse_size(&a.max_shard_size)?;
    let (source, source_repo) = resolve_source(&a.plan)?;
    let cfg = ConvertConfig {
        source,
        source_repo,
        output: a.output.clone(),
        plan: opts,
        max_shard_size,
        force: a.force,
    };
    let quiet = a.plan.quiet;
    let quant = crate::calib::cli::quant_options(&a.calib, &cfg.source, &cfg.plan, quiet)?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let c = cancel.clone();
        // A second Ctrl-C would kill us mid-cleanup; the flag makes the first one clean up.
        let _ = ctrlc::set_handler(move || c.store(true, Ordering::Relaxed));
    }
    let mut plan_warnings = Vec::new();
    if !quiet {
        let ck = Checkpoint::open(&cfg.source)?;
        let plan = Plan::build(&ck, &cfg.plan)?;
        plan_warnings.clone_from(&plan.warnings);
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
        if plan.family == crate::arch::Family::Unknown {
            eprint!("{}", plan.render());
        }
    }
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let tensors_done = std::sync::atomic::AtomicUsize::new(0);
    let total_tensors = std::sync::atomic::AtomicUsize::new(0);
    let progress = |p: Progress<'_>| match p {
        Progress::Start { tensors, bytes } => {
            total_tensors.store(tensors, Ordering::Relaxed);
            bar.set_length(bytes);
        }
        Progress::Phase(name) => bar.set_message(name.to_string()),
        Progress::Tensor { bytes, .. } => {
            let d = tensors_done.fetch_add(1, Ordering::Relaxed) + 1;
            bar.inc(bytes);
            bar.set_message(format!("{d}/{}", total_tensors.load(Ordering::Relaxed)));
        }
    };
    let start = Instant::now();
    let result = match a.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()?
            .install(|| convert_resumable(&cfg, &quant, a.resume, &cancel, &progress)),
        None => convert_resumable(&cfg, &quant, a.resume, &cancel, &progress),
    };
    bar.finish_and_clear();
    let summary = result?;
    let secs = start.elapsed().as_secs_f64();
    if !quiet {
        for n in &summary.notes {
            eprintln!("note: {n}");
        }
        // Warnings found while converting (skipped side files, removed leftovers).
        for w in summary
            .warnings
            .iter()
            .filter(|w| !plan_warnings.contains(w))
        {
            eprintln!("warning: {w}");
        }
    }
    if a.plan.json {
        let mut v = serde_json::to_value(&summary)?;
        v["seconds"] = serde_json::json!(secs);
        if let Some(info) = &quant.report_info {
            v["calibration"] = info.clone();
        }
        v["input_gb_per_s"] =
            serde_json::json!(summary.totals.bytes_in as f64 / 1e9 / secs.max(1e-9));
        mimo_runtime::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else if !quiet {
        let t = &summary.totals;
        mimo_runtime::outln!(
            "{} -> {} ({}): {} quantized, {} kept, {} -> {} bytes, {:.3} bits/weight, min SQNR {:.2} dB, {:.1} s ({:.2} GB/s)",
            cfg.source.display(),
            summary.output.display(),
            summary.layout,
            t.quantized,
            t.kept,
            t.bytes_in,
            t.bytes_out,
            t.bits_per_weight(),
            summary.min_sqnr_db.unwrap_or(f64::NAN),
            secs,
            t.bytes_in as f64 / 1e9 / secs.max(1e-9)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("GB").is_err());
    }
}
