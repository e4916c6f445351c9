//! One calibration run: load the BF16 model into the runtime, tokenize the calibration data,
//! walk the model one decoder layer at a time ([`super::sequential`]) gathering statistics (and,
//! for a conversion, quantizing each layer as it goes), and measure time and peak memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mimo_kernels::fp4::Fp4Matrix;
use mimo_runtime::checkpoint::{Checkpoint, CheckpointError};
use mimo_runtime::model::Model;
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use mimo_runtime::weights::LoadError;

use super::data::{load_sequences, CalibData, DataError};
use super::sequential::{run_sequential, SequentialError, SequentialRun};
use super::stats::{CalibStats, CollectOptions, StatsError};
use crate::methods::gptq::GptqOptions;
use crate::methods::Method;
use crate::plan::{Plan, PlanError, PlanOptions};

/// Errors of a calibration run.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// The model could not be loaded by the runtime.
    #[error("{dir}: loading the model for calibration: {source}")]
    Load {
        /// model folder
        dir: PathBuf,
        /// the runtime's error (boxed: it is large)
        source: Box<LoadError>,
    },
    /// The tokenizer could not be loaded.
    #[error("{dir}: loading the tokenizer for calibration: {source}")]
    Tokenizer {
        /// model folder
        dir: PathBuf,
        /// the error
        source: TokenizerError,
    },
    /// The calibration data could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Collecting statistics failed.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// Layer-at-a-time calibration (or quantization inside it) failed.
    #[error(transparent)]
    Sequential(#[from] SequentialError),
    /// The source checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Planning which tensors to quantize failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// A finished calibration run.
#[derive(Debug, Clone)]
pub struct CalibRun {
    /// The data used.
    pub data: CalibData,
    /// Tokens, sequences, coverage and statistics size (the per-module statistics themselves
    /// are dropped layer by layer: `by_module` is empty).
    pub stats: CalibStats,
    /// Hidden states of all sequences at one layer boundary, bytes.
    pub activation_bytes: usize,
    /// Wall-clock seconds (load, tokenize, forward passes, statistics).
    pub seconds: f64,
    /// Peak resident memory of the process so far (VmHWM), bytes; None where unavailable.
    pub peak_rss_bytes: Option<u64>,
}

impl CalibRun {
    /// The deterministic part of the summary, written into the manifest: source, recipe, sets,
    /// tokens, coverage. Timing and memory stay out of it so that the same input and options give
    /// byte-identical output files on every run and thread count.
    pub fn manifest_json(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.data.source,
            "recipe": self.data.recipe,
            "samples_per_set": self.data.samples_per_set,
            "sequences": self.stats.sequences,
            "tokens": self.stats.tokens,
            "backend": "cpu",
            "mode": "layer at a time",
            "statistics_bytes": self.stats.stats_bytes,
            "activation_bytes": self.activation_bytes,
            "expert_coverage": self.stats.coverage,
        })
    }

    /// Summary for `--json` and the terminal: the manifest part plus wall-clock seconds and peak RSS.
    pub fn summary_json(&self) -> serde_json::Value {
        let mut v = self.manifest_json();
        v["seconds"] = serde_json::json!(self.seconds);
        v["peak_rss_bytes"] = serde_json::json!(self.peak_rss_bytes);
        v
    }
}

/// Peak resident set size of this process (Linux VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Tokenizer, data and model of a calibration run.
fn load(dir: &Path, spec: &str) -> Result<(CalibData, Model), CalibError> {
    let tok = TextTokenizer::from_dir(dir).map_err(|source| CalibError::Tokenizer {
        dir: dir.to_path_buf(),
        source,
    })?;
    let data = load_sequences(spec, &tok)?;
    let model = Model::load(dir).map_err(|source| CalibError::Load {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    Ok((data, model))
}

fn finish(data: CalibData, run: SequentialRun, start: Instant) -> CalibRun {
    CalibRun {
        data,
        stats: CalibStats {
            by_module: BTreeMap::new(),
            coverage: run.coverage,
            tokens: run.tokens,
            sequences: run.sequences,
            stats_bytes: run.stats_bytes,
        },
        activation_bytes: run.activation_bytes,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    }
}

/// Calibrates the BF16 model in `dir` on `spec` (see [`load_sequences`]) one layer at a time,
/// without quantizing: coverage and the cost of the statistics. The CPU runtime is used (the
/// CUDA backend has no observer hook yet). `progress(layer, layers)`.
pub fn calibrate(
    dir: &Path,
    spec: &str,
    opts: CollectOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibRun, CalibError> {
    let start = Instant::now();
    let (data, mut model) = load(dir, spec)?;
    let run = run_sequential(&mut model, &data, opts, None, progress)?;
    Ok(finish(data, run, start))
}

/// Calibrates the model in `dir` one layer at a time with `method` (mse or gptq) in the loop:
/// each layer's Linears that `plan` quantizes are quantized from statistics gathered on the
/// outputs of the quantized layers before it. Returns the run and the quantized weights by
/// module name (for [`crate::methods::QuantOptions::precomputed`]).
#[allow(clippy::too_many_arguments)]
pub fn calibrate_and_quantize(
    dir: &Path,
    spec: &str,
    plan: &PlanOptions,
    method: Method,
    gptq: &GptqOptions,
    min_expert_tokens: u64,
    asymmetric: Option<f64>,
    within_layer: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<(CalibRun, BTreeMap<String, Fp4Matrix>), CalibError> {
    let start = Instant::now();
    let (data, mut model) = load(dir, spec)?;
    let ck = Checkpoint::open(dir)?;
    let plan = Plan::build(&ck, plan)?;
    let (run, weights) = crate::methods::sequential::quantize_sequential(
        &ck,
        &plan,
        &mut model,
        &data,
        method,
        gptq,
        min_expert_tokens,
        asymmetric,
        within_layer,
        progress,
    )?;
    Ok((finish(data, run, start), weights))
}
