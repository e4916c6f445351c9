//! Command-line pieces of calibration: `--method/--calib/--damp/--min-expert-tokens` for
//! `convert`, and the `calibrate` subcommand (statistics and expert coverage without writing a
//! checkpoint).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;

use super::run::{calibrate, calibrate_and_quantize, CalibDevice, CalibRun, Progress};
use super::stats::CollectOptions;
use crate::methods::gptq::{BlockScale, DEFAULT_DAMP};
use crate::methods::{Method, QuantOptions};
use crate::plan::PlanOptions;
use crate::writer::write_synced;

/// Quantization method and calibration options (flattened into `convert`).
#[derive(Debug, Clone, Args)]
pub struct CalibArgs {
    /// Quantizer: rtn (round to nearest), mse (per-block scale search weighted by the input's
    /// second moment), gptq (error feedback through the Hessian).
    #[arg(long, default_value = "rtn")]
    pub method: Method,
    /// Calibration data: "default" (the embedded set and recipe), "self" (the model's own
    /// continuations of the embedded set's openings, written where the calibration runs), a
    /// recipe .json, or a .txt / .jsonl file. mse and gptq use "default" when not given; rtn
    /// ignores it unless given.
    #[arg(long, value_name = "FILE|default|self")]
    pub calib: Option<String>,
    /// GPTQ damping, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = DEFAULT_DAMP)]
    pub damp: f64,
    /// GPTQ activation order: scale blocks in decreasing order of their input energy
    /// (sum of diag H), columns inside a block likewise; blocks stay whole.
    #[arg(long)]
    pub act_order: bool,
    /// How GPTQ picks a block's scale when it reaches it: diag (diag(H)-weighted squared error)
    /// or loss (the GPTQ loss with the feedback inside the block, per candidate).
    #[arg(long, default_value = "diag")]
    pub gptq_block_scale: BlockScale,
    /// GPTQ refinement: after GPTQ, up to N passes of coordinate descent on the same loss
    /// (each element to a neighbouring FP4 value, each block scale one code up or down, taken
    /// only where the loss falls); 0 turns it off.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub gptq_refine: usize,
    /// NVFP4 with mse or gptq: search each fused set's tensor (global) scale, over one octave
    /// below the converter's, for the smallest activation-weighted error of the block search
    /// (gptq then quantizes with the chosen scale).
    #[arg(long)]
    pub mse_scale_search: bool,
    /// Asymmetric calibration (mse, gptq): also run the unquantized model alongside and make
    /// each layer's quantized weights reproduce the unquantized outputs from the drifted inputs.
    #[arg(long)]
    pub asymmetric: bool,
    /// Strength of the asymmetric correction (1: the least-squares target; GPTAQ uses 0.25).
    #[arg(long, default_value_t = 0.25)]
    pub asymmetric_alpha: f64,
    /// Sequential inside each decoder layer too (mse, gptq): q/k/v, o, gate/up, down are
    /// quantized in that order, each calibrated on the quantized ones before it.
    #[arg(long)]
    pub within_layer: bool,
    /// Experts with fewer routed calibration tokens get statistics from all tokens of their
    /// layer's MoE input (measurement only).
    #[arg(long, default_value_t = 64)]
    pub min_expert_tokens: u64,
    /// Weight each routed expert's calibration tokens by their routing weight (the factor the
    /// expert's output is multiplied by), so that its error is measured as it reaches the
    /// layer's output (MoEQuant's affinity-guided GPTQ). Calibrates on the CPU (the GPU does
    /// not report the weights).
    #[arg(long)]
    pub route_weighted: bool,
    /// Where calibration runs the model: auto (the GPU where one is usable, else the CPU), cpu,
    /// cuda. The two backends give slightly different statistics (the GPU's activations are
    /// BF16), so use cpu for output that is byte-identical on every machine.
    #[arg(long, value_enum, default_value_t = CalibDevice::Auto)]
    pub calib_device: CalibDevice,
}

impl clap::ValueEnum for BlockScale {
    fn value_variants<'a>() -> &'a [Self] {
        &[BlockScale::Diag, BlockScale::Loss]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(match self {
            BlockScale::Diag => "diag",
            BlockScale::Loss => "loss",
        }))
    }
}

impl clap::ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Self] {
        &[Method::Rtn, Method::Mse, Method::Gptq]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// `mimo-quant calibrate` arguments.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// BF16 model folder.
    pub source: PathBuf,
    /// Calibration data: "default", "self", a recipe .json, or a .txt / .jsonl file.
    #[arg(long, default_value = "default")]
    pub calib: String,
    /// Also accumulate the Hessians X^T X (what gptq needs), to measure their cost.
    #[arg(long)]
    pub hessian: bool,
    /// Expert coverage threshold (see convert --min-expert-tokens).
    #[arg(long, default_value_t = 64)]
    pub min_expert_tokens: u64,
    /// Route-weighted expert statistics (see convert --route-weighted).
    #[arg(long)]
    pub route_weighted: bool,
    /// Where the model runs: auto (the GPU where one is usable, else the CPU), cpu, cuda.
    #[arg(long, value_enum, default_value_t = CalibDevice::Auto)]
    pub device: CalibDevice,
    /// Also write the calibration samples as jsonl to FILE (for `--calib self`: the text the
    /// model wrote; usable as `--calib FILE` later). An existing FILE is not overwritten.
    #[arg(long, value_name = "FILE")]
    pub save_text: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Where route-weighted statistics can be gathered: the CPU runtime reports each routed row's
/// weight, the GPU's does not, so `auto` becomes `cpu` and `cuda` is refused.
fn stats_device(route_weighted: bool, device: CalibDevice) -> Result<CalibDevice> {
    match (route_weighted, device) {
        (false, d) => Ok(d),
        (true, CalibDevice::Cuda) => {
            bail!("--route-weighted needs the routing weights on the host: use --calib-device cpu")
        }
        (true, _) => Ok(CalibDevice::Cpu),
    }
}

/// Progress on stderr: `what` done of total (a line rewritten in place).
fn progress_line(what: &'static str, quiet: bool) -> impl Fn(usize, usize) + Sync {
    move |done: usize, total: usize| {
        if !quiet {
            eprint!("\r{what} {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    }
}

/// Runs `f` with the terminal's progress callbacks (none when `quiet`).
fn with_progress<T>(quiet: bool, f: impl FnOnce(&Progress) -> T) -> T {
    let layers = progress_line("calibrating: layer", quiet);
    let samples = progress_line("writing calibration text with the model: sample", quiet);
    f(&Progress {
        layers: &layers,
        samples: &samples,
    })
}

fn run(
    source: &Path,
    spec: &str,
    opts: CollectOptions,
    device: CalibDevice,
    quiet: bool,
) -> Result<CalibRun> {
    Ok(with_progress(quiet, |p| {
        calibrate(source, spec, opts, device, p)
    })?)
}

fn print_summary(r: &CalibRun) {
    if let Some(why) = &r.fallback {
        eprintln!("note: calibrating on the CPU: {why}");
    }
    let gpu = r
        .gpu_memory_bytes
        .map(|b| format!(", GPU memory in use {:.0} MB", b as f64 / 1e6))
        .unwrap_or_default();
    eprintln!(
        "calibration (layer at a time, {} on {}): {} ({} sequences, {} tokens; sets {:?}), {:.1} s, peak RSS {:.0} MB{gpu}, statistics {:.1} MB per layer, hidden states {:.1} MB",
        r.backend,
        r.device_name,
        r.data.source,
        r.stats.sequences,
        r.stats.tokens,
        r.data.samples_per_set,
        r.seconds,
        r.peak_rss_bytes.unwrap_or(0) as f64 / 1e6,
        r.stats.stats_bytes as f64 / 1e6,
        r.activation_bytes as f64 / 1e6
    );
    eprint!("{}", r.stats.coverage.render());
}

/// Builds the quantizer options of a conversion, calibrating when the method needs it or
/// `--calib` is given. mse and gptq quantize the decoder layers during calibration (one layer
/// at a time, each calibrated on the quantized layers' outputs), for the tensors `plan` selects.
pub fn quant_options(
    a: &CalibArgs,
    source: &Path,
    plan: &PlanOptions,
    quiet: bool,
) -> Result<QuantOptions> {
    if !(a.damp.is_finite() && a.damp >= 0.0) {
        bail!("--damp {} must be finite and >= 0", a.damp);
    }
    if !a.asymmetric_alpha.is_finite() {
        bail!("--asymmetric-alpha {} must be finite", a.asymmetric_alpha);
    }
    let device = stats_device(a.route_weighted, a.calib_device)?;
    let stats = CollectOptions {
        hessian: false,
        min_expert_tokens: a.min_expert_tokens,
        route_weighted: a.route_weighted,
    };
    let spec = match (&a.calib, a.method) {
        (Some(s), _) => Some(s.clone()),
        (None, Method::Rtn) => None,
        (None, _) => Some("default".to_string()),
    };
    let mut q = QuantOptions {
        method: a.method,
        damp: a.damp,
        act_order: a.act_order,
        block_scale: a.gptq_block_scale,
        refine: a.gptq_refine,
        mse_scale_search: a.mse_scale_search,
        ..QuantOptions::default()
    };
    if let Some(spec) = spec {
        let r = if a.method == Method::Rtn {
            run(source, &spec, stats, device, quiet)?
        } else {
            let (r, weights) = with_progress(quiet, |p| {
                calibrate_and_quantize(
                    source,
                    &spec,
                    plan,
                    a.method,
                    &q.gptq(),
                    stats,
                    a.asymmetric.then_some(a.asymmetric_alpha),
                    a.within_layer,
                    device,
                    p,
                )
            })?;
            q.precomputed = Some(Arc::new(weights.weights));
            q.precomputed_scales = Some(Arc::new(weights.scales));
            r
        };
        if !quiet {
            print_summary(&r);
        }
        let mut info = r.manifest_json();
        info["method"] = serde_json::json!(a.method.name());
        if a.method != Method::Rtn {
            info["asymmetric"] = serde_json::json!(a.asymmetric.then_some(a.asymmetric_alpha));
            info["within_layer"] = serde_json::json!(a.within_layer);
            if a.route_weighted {
                info["route_weighted"] = serde_json::json!(true);
            }
            if a.mse_scale_search {
                info["mse_scale_search"] = serde_json::json!(true);
            }
        }
        if a.method == Method::Gptq {
            info["damp"] = serde_json::json!(a.damp);
            info["act_order"] = serde_json::json!(a.act_order);
            info["gptq_block_scale"] = serde_json::json!(a.gptq_block_scale);
            info["gptq_refine"] = serde_json::json!(a.gptq_refine);
        }
        let mut report = info.clone();
        report["seconds"] = serde_json::json!(r.seconds);
        report["peak_rss_bytes"] = serde_json::json!(r.peak_rss_bytes);
        report["device"] = serde_json::json!(r.device_name);
        report["gpu_memory_bytes"] = serde_json::json!(r.gpu_memory_bytes);
        q.manifest_info = Some(info);
        q.report_info = Some(report);
    }
    Ok(q)
}

/// Runs `mimo-quant calibrate`.
pub fn run_calibrate(a: CalibrateArgs) -> Result<i32> {
    let opts = CollectOptions {
        hessian: a.hessian,
        min_expert_tokens: a.min_expert_tokens,
        route_weighted: a.route_weighted,
    };
    let device = stats_device(a.route_weighted, a.device)?;
    if let Some(f) = &a.save_text {
        if f.exists() {
            bail!(
                "{}: already exists; remove it or name another file",
                f.display()
            );
        }
    }
    let r = run(&a.source, &a.calib, opts, device, a.quiet || a.json)?;
    if let Some(f) = &a.save_text {
        // Through a temporary file beside it: never half-written.
        write_synced(f, super::data::samples_jsonl(&r.data.samples).as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r.summary_json())?);
    } else {
        print_summary(&r);
    }
    Ok(0)
}
