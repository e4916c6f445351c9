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
//! Asymmetric calibration (`asymmetric = true`, after GPTAQ: Li et al., "GPTAQ: Efficient
//! Finetuning-Free Quantization for Asymmetric Calibration", 2025): a second stream of hidden
//! states runs through the unquantized layers, and every site also accumulates the cross term
//! `sum_t (xf_t - x_t) x_t^T` between the unquantized input `xf_t` and the input `x_t` seen
//! after the quantized layers, for the same token (routed experts: the tokens the quantized
//! stream routes to the expert, with their unquantized-stream inputs). The quantizer can then
//! aim at the unquantized layer's outputs instead of the outputs on the drifted inputs.
//!
//! Memory: one layer's statistics (with Hessians, `sum k^2` f64 over that layer's sites) and the
//! hidden states of all sequences at one layer boundary (`tokens * hidden` f32), instead of the
//! statistics of every layer. Determinism: sequences and layers run in a fixed order, and the
//! quantizer's results are assembled in module-name order.

use std::collections::BTreeMap;
use std::sync::Arc;

use mimo_runtime::arch::Names;
use mimo_runtime::linear::Weight;
use mimo_runtime::model::{LinearObserver, Site};
use mimo_runtime::walk::{LayerWalk, WalkError};

use super::coverage::Coverage;
use super::data::CalibData;
use super::stats::{assign, CollectOptions, Collector, HeadAcc, LinearStats, StatsError};
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
    /// The backend failed to start or finish summing a layer's statistics.
    #[error("decoder layer {layer}: {source}")]
    Walk {
        /// the layer
        layer: usize,
        /// the runtime's error
        source: WalkError,
    },
    /// The quantized weight did not fit the model's layer.
    #[error("decoder layer {layer}: {source}")]
    Replace {
        /// the layer
        layer: usize,
        /// the runtime's error
        source: WalkError,
    },
    /// Route-weighted statistics were asked of a backend that does not report routing weights.
    #[error("route-weighted statistics need the routing weights, which the {backend} backend does not report: calibrate on the CPU")]
    RouteWeights {
        /// the backend ("cuda")
        backend: &'static str,
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

/// Everything one layer shows for one sequence: each site's input and the rows routed to each
/// expert (all-token expert inputs included).
#[derive(Default)]
struct Capture {
    sites: Vec<(Site, Vec<f32>, usize)>,
    /// Expert -> its rows and their routing weights (where the backend gives them).
    routed: BTreeMap<usize, (Vec<usize>, Option<Vec<f32>>)>,
}

impl LinearObserver for Capture {
    fn observe(&mut self, site: Site, x: &[f32], m: usize) {
        self.sites.push((site, x.to_vec(), m));
    }
    fn all_token_experts(&self) -> bool {
        true
    }
    fn routed(&mut self, _layer: usize, expert: usize, tokens: &[usize], weights: Option<&[f32]>) {
        self.routed
            .insert(expert, (tokens.to_vec(), weights.map(<[f32]>::to_vec)));
    }
}

/// Rows `rows` of the row-major `x` with rows of `k` values.
fn gather(x: &[f32], k: usize, rows: &[usize]) -> Option<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len() * k);
    for &r in rows {
        out.extend_from_slice(x.get(r * k..(r + 1) * k)?);
    }
    Some(out)
}

/// Feeds the quantized stream's capture `q` to `col` as the plain collector would see it, plus
/// the cross terms against the unquantized stream's capture `f` of the same sequence.
fn add_pair(col: &mut Collector, q: &Capture, f: &Capture) {
    let fsite: BTreeMap<Site, (&[f32], usize)> = f
        .sites
        .iter()
        .map(|(s, x, m)| (*s, (x.as_slice(), *m)))
        .collect();
    let wants_all = col.all_token_experts();
    let rows_of = |site: Site, e: usize| -> Option<Vec<f32>> {
        let (x, mm) = fsite.get(&site).copied()?;
        let (rows, _) = q.routed.get(&e)?;
        gather(x, x.len() / mm.max(1), rows)
    };
    for (site, xq, m) in &q.sites {
        if matches!(site, Site::ExpertDownAllTokens(..)) && !wants_all {
            continue;
        }
        // The expert's routing (for route-weighted statistics), as the plain walk reports it.
        if let Site::ExpertGateUp(l, e) = *site {
            if let Some((rows, w)) = q.routed.get(&e) {
                col.routed(l, e, rows, w.as_deref());
            }
        }
        col.observe(*site, xq, *m);
        let xf: Option<Vec<f32>> = match *site {
            Site::ExpertGateUp(l, e) => rows_of(Site::MoeInput(l), e),
            Site::ExpertDown(l, e) => rows_of(Site::ExpertDownAllTokens(l, e), e),
            other => fsite
                .get(&other)
                .filter(|(x, mm)| *mm == *m && x.len() == xq.len())
                .map(|(x, _)| x.to_vec()),
        };
        if let Some(xf) = xf.filter(|v| v.len() == xq.len()) {
            col.observe_cross(*site, xq, &xf, *m);
        }
    }
}

/// The lm_head's input statistics over the hidden states `hidden` leaving the last layer (and
/// the unquantized stream's `hidden_f` for the cross term), pieces in order.
fn head_stats(
    model: &mut dyn LayerWalk,
    hidden: &[(usize, Vec<f32>)],
    hidden_f: Option<&Vec<Vec<f32>>>,
    opts: CollectOptions,
) -> Result<LinearStats, SequentialError> {
    let k = model.config().hidden_size;
    let mut acc = HeadAcc::new(k, opts.hessian);
    for (p, (index, x)) in hidden.iter().enumerate() {
        let fwd = |source| StatsError::Forward {
            index: *index,
            source,
        };
        let mut xn = x.clone();
        model.final_norm(&mut xn).map_err(fwd)?;
        let xf = match hidden_f.and_then(|f| f.get(p)) {
            Some(f) => {
                let mut f = f.clone();
                model.final_norm(&mut f).map_err(fwd)?;
                Some(f)
            }
            None => None,
        };
        acc.add(&xn, xf.as_deref(), xn.len() / k.max(1));
    }
    Ok(acc.finish())
}

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
    model: &mut dyn LayerWalk,
    data: &CalibData,
    opts: CollectOptions,
    quantize: Option<&mut LayerQuantizer<'_>>,
    progress: &dyn Fn(usize, usize),
) -> Result<SequentialRun, SequentialError> {
    let modes = SequentialModes::default();
    run_sequential_with(model, data, opts, modes, quantize, progress)
}

/// Variants of the layer-at-a-time walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequentialModes {
    /// Asymmetric calibration (see the module docs).
    pub asymmetric: bool,
    /// Inside each layer too: q/k/v, then o, then gate/up (experts, router input), then down
    /// are each quantized before the next stage's statistics are gathered, so every Linear is
    /// calibrated on the outputs of the quantized Linears before it in the layer (GPTQ's
    /// "true sequential"); costs four calibration passes per layer instead of one.
    pub within_layer: bool,
    /// After the last layer, the lm_head's input statistics too (the final norm's output of
    /// the quantized stream, with the cross term under `asymmetric`): handed to the quantizer
    /// as layer `num_layers` under the lm_head's module name. Its result replaces nothing
    /// (no layer runs after the head).
    pub head: bool,
}

/// [`run_sequential`] with [`SequentialModes`] (meaningful with a quantizer).
pub fn run_sequential_with(
    model: &mut dyn LayerWalk,
    data: &CalibData,
    opts: CollectOptions,
    modes: SequentialModes,
    mut quantize: Option<&mut LayerQuantizer<'_>>,
    progress: &dyn Fn(usize, usize),
) -> Result<SequentialRun, SequentialError> {
    let asymmetric = modes.asymmetric;
    // Stages quantized one after the other inside a layer (None: all at once).
    let stages: Vec<Option<u8>> = if modes.within_layer && quantize.is_some() {
        vec![Some(0), Some(1), Some(2), Some(3)]
    } else {
        vec![None]
    };
    if data.sequences.is_empty() {
        return Err(StatsError::Empty.into());
    }
    if opts.route_weighted && !model.reports_route_weights() {
        return Err(SequentialError::RouteWeights {
            backend: model.backend(),
        });
    }
    let cap = model.config().max_position_embeddings.max(1);
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
    // The unquantized stream (asymmetric calibration only).
    let mut hidden_f: Vec<Vec<f32>> = if asymmetric {
        hidden.iter().map(|(_, x)| x.clone()).collect()
    } else {
        Vec::new()
    };
    let activation_bytes = hidden.iter().map(|(_, x)| 4 * x.len()).sum::<usize>()
        + hidden_f.iter().map(|x| 4 * x.len()).sum::<usize>();
    let layers = model.config().num_layers;
    let mut coverage = Coverage {
        min_tokens: opts.min_expert_tokens,
        tokens_per_layer: 0,
        experts_per_layer: 0,
        experts: Vec::new(),
    };
    let mut stats_bytes = 0usize;
    for l in 0..layers {
        for (si, stage) in stages.iter().enumerate() {
            let last_stage = si + 1 == stages.len();
            let mut col = Collector::new(model.config(), opts);
            let propagate_now = quantize.is_none() && !asymmetric;
            // The GPU sums the statistics itself (asymmetric calibration pairs two streams'
            // rows on the host instead).
            let device_sums = !asymmetric
                && !opts.route_weighted
                && model
                    .begin_device_sums(col.all_token_experts(), opts.hessian)
                    .map_err(|source| SequentialError::Walk { layer: l, source })?;
            for (p, (index, x)) in hidden.iter_mut().enumerate() {
                if asymmetric {
                    let fwd = |source| StatsError::Forward {
                        index: *index,
                        source,
                    };
                    // Both streams through the (still unquantized) layer; the unquantized stream
                    // moves on now, the quantized one after the layer is quantized.
                    let (mut cf, mut cq) = (Capture::default(), Capture::default());
                    let mut sf = hidden_f[p].clone();
                    model
                        .forward_layer_observed(l, &mut sf, &mut cf)
                        .map_err(fwd)?;
                    if last_stage {
                        hidden_f[p] = sf;
                    }
                    let mut scratch = x.clone();
                    model
                        .forward_layer_observed(l, &mut scratch, &mut cq)
                        .map_err(fwd)?;
                    add_pair(&mut col, &cq, &cf);
                    continue;
                }
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
            if device_sums {
                let sums = model
                    .take_device_sums()
                    .map_err(|source| SequentialError::Walk { layer: l, source })?;
                for s in &sums {
                    col.add_sums(s)?;
                }
            }
            stats_bytes = stats_bytes.max(col.bytes());
            let mut a = assign(model.config(), &col, opts, l..l + 1);
            drop(col);
            // Coverage as the experts' own statistics saw the routing.
            if matches!(stage, None | Some(2)) {
                coverage.experts.extend(std::mem::take(&mut a.experts));
                if a.experts_per_layer > 0 {
                    coverage.experts_per_layer = a.experts_per_layer;
                    coverage.tokens_per_layer = a.tokens_per_layer;
                }
            }
            if let Some(st) = stage {
                a.by_module.retain(|_, s| s.stage == *st);
            }
            if quantize.is_some() || asymmetric {
                let new = match quantize.as_mut() {
                    Some(q) => q(l, &a.by_module)?,
                    None => Vec::new(),
                };
                // This stage's statistics are not needed any more.
                drop(a.by_module);
                for (module, w) in new {
                    model
                        .replace_linear_weight(&module, w)
                        .map_err(|source| SequentialError::Replace { layer: l, source })?;
                }
            }
        }
        if quantize.is_some() || asymmetric {
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
    if modes.head {
        if let Some(q) = quantize.as_mut() {
            let stats = head_stats(model, &hidden, asymmetric.then_some(&hidden_f), opts)?;
            let name = Names::new(model.config().arch).lm_head();
            let by_module = BTreeMap::from([(name, Arc::new(stats))]);
            q(layers, &by_module)?;
        }
    }
    Ok(SequentialRun {
        coverage,
        tokens,
        sequences: data.sequences.len(),
        stats_bytes,
        activation_bytes,
    })
}
