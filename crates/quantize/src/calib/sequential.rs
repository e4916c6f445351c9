//! Layer-at-a-time (sequential) calibration: the hidden states of every calibration sequence
//! are held at the input of one decoder layer; all sequences run through that layer while its
//! Linear inputs are accumulated, the layer's statistics are handed to a quantizer, the layer's
//! weights are replaced by the quantized ones, and the sequences run through the layer again so
//! that the next layer is calibrated on the outputs of the QUANTIZED layers before it. Then the
//! layer's statistics are dropped and the next layer follows.
//!
//! This is the scheme of llm-compressor's sequential pipeline
//! (`src/llmcompressor/pipelines/sequential/pipeline.py`): per subgraph (decoder layer), a
//! calibration pass with the observer hooks on, compression at the end of the subgraph
//! (`sequential_epoch_end`), then a propagation pass with hooks off whose outputs replace the
//! cached intermediates for the next subgraph. As there, all Linears of one layer see inputs of
//! that layer's unquantized weights (statistics are gathered in one pass before the layer is
//! quantized).
//!
//! Memory: one layer's statistics (with Hessians, `sum k^2` f64 over that layer's sites) and the
//! hidden states of all sequences at one layer boundary (`tokens * hidden` f32), instead of the
//! statistics of every layer. Determinism: sequences and layers run in a fixed order, and the
//! quantizer's results are assembled in module-name order.

use std::collections::BTreeMap;
use std::sync::Arc;

use mimo_runtime::linear::Weight;
use mimo_runtime::model::{LinearObserver, Model, ReplaceError, Site};

use super::coverage::Coverage;
use super::data::CalibData;
use super::stats::{assign, CollectOptions, Collector, LinearStats, StatsError};
use crate::methods::ApplyError;

/// Errors of a sequential calibration.
#[derive(Debug, thiserror::Error)]
pub enum SequentialError {
    /// A forward pass failed or there was no data.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// Reading a weight from the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] mimo_runtime::checkpoint::CheckpointError),
    /// Quantizing a layer's Linear failed.
    #[error(transparent)]
    Quantize(#[from] ApplyError),
    /// The quantized weight did not fit the model's layer.
    #[error("decoder layer {layer}: {source}")]
    Replace {
        /// the layer
        layer: usize,
        /// the runtime's error
        source: ReplaceError,
    },
}

/// What a sequential run measured (the statistics themselves are gone layer by layer).
#[derive(Debug, Clone, PartialEq)]
pub struct SequentialRun {
    /// Expert coverage of every MoE layer (routing as seen with the layers before quantized).
    pub coverage: Coverage,
    /// Calibration tokens.
    pub tokens: usize,
    /// Calibration sequences.
    pub sequences: usize,
    /// Largest statistics of one layer held at once, bytes.
    pub stats_bytes: usize,
    /// Hidden states of all sequences at one layer boundary, bytes.
    pub activation_bytes: usize,
}

/// The per-layer quantizer: given a layer index and its statistics by module name, returns the
/// new weights of that layer's Linears (empty: the layer stays as it is).
pub type LayerQuantizer<'a> = dyn FnMut(
        usize,
        &BTreeMap<String, Arc<LinearStats>>,
    ) -> Result<Vec<(String, Weight)>, SequentialError>
    + 'a;

/// Sees nothing (the propagation pass).
struct Quiet;

impl LinearObserver for Quiet {
    fn observe(&mut self, _: Site, _: &[f32], _: usize) {}
}

/// Runs `model` over `data` one decoder layer at a time (see the module docs). With
/// `quantize = None` the BF16 outputs are propagated and each layer runs once; with a quantizer
/// each layer runs twice (calibration, then propagation through the replaced weights).
/// `progress(done, total)` is called after each layer.
pub fn run_sequential(
    model: &mut Model,
    data: &CalibData,
    opts: CollectOptions,
    mut quantize: Option<&mut LayerQuantizer<'_>>,
    progress: &dyn Fn(usize, usize),
) -> Result<SequentialRun, SequentialError> {
    if data.sequences.is_empty() {
        return Err(StatsError::Empty.into());
    }
    let cap = model.config.max_position_embeddings.max(1);
    // Hidden states per piece (a sequence longer than the context runs as independent pieces,
    // as in the whole-model collection).
    let mut hidden: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut tokens = 0usize;
    for (index, seq) in data.sequences.iter().enumerate() {
        for piece in seq.chunks(cap) {
            let x = model
                .embed_tokens(piece)
                .map_err(|source| StatsError::Forward { index, source })?;
            hidden.push((index, x));
            tokens += piece.len();
        }
    }
    let activation_bytes = hidden.iter().map(|(_, x)| 4 * x.len()).sum();
    let layers = model.num_layers();
    let mut coverage = Coverage {
        min_tokens: opts.min_expert_tokens,
        tokens_per_layer: 0,
        experts_per_layer: 0,
        experts: Vec::new(),
    };
    let mut stats_bytes = 0usize;
    for l in 0..layers {
        let mut col = Collector::new(model, opts);
        let propagate_now = quantize.is_none();
        for (index, x) in hidden.iter_mut() {
            // Without a quantizer this pass is also the propagation; with one, the outputs of
            // the unquantized layer are thrown away.
            let mut scratch;
            let buf: &mut [f32] = if propagate_now {
                x
            } else {
                scratch = x.clone();
                &mut scratch
            };
            model
                .forward_layer_observed(l, buf, &mut col)
                .map_err(|source| StatsError::Forward {
                    index: *index,
                    source,
                })?;
        }
        stats_bytes = stats_bytes.max(col.bytes());
        let a = assign(model, &col, opts, l..l + 1);
        drop(col);
        coverage.experts.extend(a.experts);
        if a.experts_per_layer > 0 {
            coverage.experts_per_layer = a.experts_per_layer;
            coverage.tokens_per_layer = a.tokens_per_layer;
        }
        if let Some(q) = quantize.as_mut() {
            let new = q(l, &a.by_module)?;
            // This layer's statistics are not needed any more.
            drop(a.by_module);
            for (module, w) in new {
                model
                    .replace_linear_weight(&module, w)
                    .map_err(|source| SequentialError::Replace { layer: l, source })?;
            }
            for (index, x) in hidden.iter_mut() {
                model
                    .forward_layer_observed(l, x, &mut Quiet)
                    .map_err(|source| StatsError::Forward {
                        index: *index,
                        source,
                    })?;
            }
        }
        progress(l + 1, layers);
    }
    Ok(SequentialRun {
        coverage,
        tokens,
        sequences: data.sequences.len(),
        stats_bytes,
        activation_bytes,
    })
}
