//! One calibration run: load the BF16 model into the runtime, tokenize the calibration data,
//! collect statistics, and measure time and peak memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use mimo_runtime::model::Model;
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use mimo_runtime::weights::LoadError;

use super::data::{load_sequences, CalibData, DataError};
use super::stats::{collect, CalibStats, CollectOptions, StatsError};

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
}

/// A finished calibration run.
#[derive(Debug, Clone)]
pub struct CalibRun {
    /// The data used.
    pub data: CalibData,
    /// The statistics.
    pub stats: CalibStats,
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
            "statistics_bytes": self.stats.stats_bytes,
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

/// Calibrates the model in `dir` on `spec` (see [`load_sequences`]). The CPU runtime is used
/// (the CUDA backend has no observer hook yet).
pub fn calibrate(
    dir: &Path,
    spec: &str,
    opts: CollectOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibRun, CalibError> {
    let start = Instant::now();
    let tok = TextTokenizer::from_dir(dir).map_err(|source| CalibError::Tokenizer {
        dir: dir.to_path_buf(),
        source,
    })?;
    let data = load_sequences(spec, &tok)?;
    let model = Model::load(dir).map_err(|source| CalibError::Load {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    })?;
    let stats = collect(&model, &data, opts, progress)?;
    Ok(CalibRun {
        data,
        stats,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}
