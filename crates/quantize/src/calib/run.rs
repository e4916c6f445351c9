//! One calibration run: load the BF16 model into the runtime, tokenize the calibration data,
//! walk the model one decoder layer at a time ([`super::sequential`]) gathering statistics (and,
//! for a conversion, quantizing each layer as it goes), and measure time and peak memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mimo_runtime::checkpoint::{Checkpoint, CheckpointError};
use mimo_runtime::cuda::{Gpu, GpuError, GpuModel};
use mimo_runtime::model::Model;
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use mimo_runtime::walk::LayerWalk;
use mimo_runtime::weights::LoadError;

use super::data::{load_sequences, CalibData, DataError};
use super::selfgen::{CpuContinuer, GpuContinuer};
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
    /// The model could not be loaded onto the GPU (or `--device cuda` found no usable GPU).
    #[error("{dir}: loading the model onto the GPU for calibration: {source}")]
    GpuLoad {
        /// model folder
        dir: PathBuf,
        /// the CUDA backend's error (boxed: it is large)
        source: Box<GpuError>,
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
    /// Where the layers ran: "cpu" or "cuda".
    pub backend: &'static str,
    /// The device's name ("cpu", or the GPU's).
    pub device_name: String,
    /// GPU memory in use (all of the device's, total minus free) at the end of the walk, bytes;
    /// None on the CPU.
    pub gpu_memory_bytes: Option<u64>,
    /// Why `--device auto` ran on the CPU although a GPU seemed present (shown to the user).
    pub fallback: Option<String>,
}

/// Progress of a calibration run, for the terminal.
#[derive(Clone, Copy)]
pub struct Progress<'a> {
    /// Decoder layers done: `(done, total)`.
    pub layers: &'a dyn Fn(usize, usize),
    /// Self-generated samples done: `(done, total)`, called from worker threads.
    pub samples: &'a (dyn Fn(usize, usize) + Sync),
}

fn nothing(_: usize, _: usize) {}

impl Progress<'static> {
    /// No progress reports.
    pub const NONE: Progress<'static> = Progress {
        layers: &nothing,
        samples: &nothing,
    };
}

/// Where calibration runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CalibDevice {
    /// The GPU where one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU runtime (f32 activations; output reproducible on any machine).
    Cpu,
    /// The CUDA runtime (an error if no GPU is usable).
    Cuda,
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
            "backend": self.backend,
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
        v["device"] = serde_json::json!(self.device_name);
        v["gpu_memory_bytes"] = serde_json::json!(self.gpu_memory_bytes);
        v["cpu_fallback"] = serde_json::json!(self.fallback);
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

/// The model of a calibration run on one backend (boxed: the two differ in size, and one lives
/// for the whole run).
enum Opened {
    Cpu(Box<Model>),
    Gpu(Box<GpuModel>),
}

impl Opened {
    fn walk(&mut self) -> &mut dyn LayerWalk {
        match self {
            Opened::Cpu(m) => m.as_mut(),
            Opened::Gpu(m) => m.as_mut(),
        }
    }
}

/// The model of a calibration run on `device`, and why `auto` fell back to the CPU where a GPU
/// seemed present but could not be used.
fn open_model(dir: &Path, device: CalibDevice) -> Result<(Opened, Option<String>), CalibError> {
    let cpu = || -> Result<Opened, CalibError> {
        let model = Model::load(dir).map_err(|source| CalibError::Load {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(Opened::Cpu(Box::new(model)))
    };
    let gpu_err = |source: GpuError| CalibError::GpuLoad {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    };
    if device == CalibDevice::Cpu {
        return Ok((cpu()?, None));
    }
    let gpu = match Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) if device == CalibDevice::Cuda => return Err(gpu_err(e)),
        Err(e) => {
            let absent = matches!(
                e,
                GpuError::Cuda(mimo_kernels::cuda::CudaError::NoDevice(_))
            );
            let note = (!absent).then(|| format!("the CUDA backend is unavailable ({e})"));
            return Ok((cpu()?, note));
        }
    };
    match GpuModel::load(gpu, dir) {
        Ok(model) => Ok((Opened::Gpu(Box::new(model)), None)),
        Err(e) if device == CalibDevice::Cuda => Err(gpu_err(e)),
        // `auto`: a model the GPU backend cannot take (its shapes, its size) runs on the CPU.
        Err(e) => Ok((
            cpu()?,
            Some(format!("the model does not run on the GPU ({e})")),
        )),
    }
}

/// Tokenizer, model and data of a calibration run. A self-generated recipe's text is written
/// by the same model, on the same backend, before the walk.
fn load(
    dir: &Path,
    spec: &str,
    device: CalibDevice,
    progress: &Progress,
) -> Result<(CalibData, Opened, Option<String>), CalibError> {
    let tok = TextTokenizer::from_dir(dir).map_err(|source| CalibError::Tokenizer {
        dir: dir.to_path_buf(),
        source,
    })?;
    // The data first (without a model), so that a bad calibration file is reported before a
    // long model load; a generating recipe asks for the model and is read again once it is open.
    let ready = match load_sequences(spec, &tok, None) {
        Ok(data) => Some(data),
        Err(DataError::NeedsModel { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let (mut model, fallback) = open_model(dir, device)?;
    let data = match (ready, &mut model) {
        (Some(data), _) => data,
        (None, Opened::Cpu(m)) => {
            let mut c = CpuContinuer {
                model: m,
                progress: progress.samples,
            };
            load_sequences(spec, &tok, Some(&mut c))?
        }
        (None, Opened::Gpu(m)) => {
            let mut c = GpuContinuer {
                model: m,
                progress: progress.samples,
            };
            load_sequences(spec, &tok, Some(&mut c))?
        }
    };
    Ok((data, model, fallback))
}

fn finish(
    data: CalibData,
    run: SequentialRun,
    start: Instant,
    model: &dyn LayerWalk,
    fallback: Option<String>,
) -> CalibRun {
    CalibRun {
        backend: model.backend(),
        device_name: model.device_name(),
        gpu_memory_bytes: model.device_memory_used(),
        fallback,
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
/// without quantizing: coverage and the cost of the statistics, on `device`.
pub fn calibrate(
    dir: &Path,
    spec: &str,
    opts: CollectOptions,
    device: CalibDevice,
    progress: &Progress,
) -> Result<CalibRun, CalibError> {
    let start = Instant::now();
    let (data, mut model, fallback) = load(dir, spec, device, progress)?;
    let run = run_sequential(model.walk(), &data, opts, None, progress.layers)?;
    Ok(finish(data, run, start, model.walk(), fallback))
}

/// Calibrates the model in `dir` one layer at a time with `method` (mse or gptq) in the loop:
/// each layer's Linears that `plan` quantizes are quantized from statistics gathered on the
/// outputs of the quantized layers before it. Returns the run and the quantized weights by
/// module name with the searched tensor scales (for [`crate::methods::QuantOptions::precomputed`]
/// and [`crate::methods::QuantOptions::precomputed_scales`]).
#[allow(clippy::too_many_arguments)]
pub fn calibrate_and_quantize(
    dir: &Path,
    spec: &str,
    plan: &PlanOptions,
    method: Method,
    gptq: &GptqOptions,
    stats: CollectOptions,
    asymmetric: Option<f64>,
    within_layer: bool,
    device: CalibDevice,
    progress: &Progress,
) -> Result<(CalibRun, crate::methods::sequential::Precomputed), CalibError> {
    let start = Instant::now();
    let (data, mut model, fallback) = load(dir, spec, device, progress)?;
    let ck = Checkpoint::open(dir)?;
    let plan = Plan::build(&ck, plan)?;
    let (run, weights) = crate::methods::sequential::quantize_sequential(
        &ck,
        &plan,
        model.walk(),
        &data,
        method,
        gptq,
        stats,
        asymmetric,
        within_layer,
        progress.layers,
    )?;
    Ok((finish(data, run, start, model.walk(), fallback), weights))
}
