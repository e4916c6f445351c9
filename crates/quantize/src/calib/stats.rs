//! Calibration statistics: the BF16 model runs through the runtime's CPU decoder on the
//! calibration sequences while a [`LinearObserver`] accumulates, per Linear input site (q/k/v,
//! o, MLP gate/up and down, each routed expert's gate/up and down, shared experts): the token
//! count, the per-channel second moment `E[x_j^2]`, the activation amax and, for GPTQ, the
//! Hessian `X^T X` ([k, k], f64).
//!
//! Memory: the runtime offers whole-model forward passes (with a per-Linear observer hook), not
//! a layer-at-a-time API, so the statistics of every layer are accumulated together: sum over
//! sites of k (+ k^2 with Hessians) f64 values (about 60 MB for mimo-tiny-moe with Hessians),
//! plus the model itself. Activations are those of one sequence at a time.
//!
//! Determinism: sequences run in order; within a call each Hessian row is accumulated by one
//! task over tokens in order, so the sums do not depend on the thread count.

use std::collections::BTreeMap;
use std::sync::Arc;

use mimo_runtime::arch::Names;
use mimo_runtime::config::ModelConfig;
use mimo_runtime::model::{LinearObserver, Logits, Model, Site};
use mimo_runtime::walk::{SiteSums, WalkError};
use rayon::prelude::*;

use super::coverage::{Coverage, ExpertCoverage};
use super::data::CalibData;

/// Errors of statistics collection.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The forward pass refused a calibration sequence.
    #[error("calibration forward pass, sequence {index}: {source}")]
    Forward {
        /// sequence index
        index: usize,
        /// the runtime's error (either backend)
        source: WalkError,
    },
    /// There were no calibration sequences.
    #[error("no calibration sequences")]
    Empty,
    /// A backend's sums for a site did not have the site's shape.
    #[error("calibration sums of {site}: {len} values for inputs of {k} features")]
    Sums {
        /// the site
        site: String,
        /// values given
        len: usize,
        /// input features
        k: usize,
    },
}

/// What to collect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollectOptions {
    /// Accumulate `X^T X` (GPTQ).
    pub hessian: bool,
    /// Experts with fewer routed tokens use statistics over all tokens of their MoE input.
    pub min_expert_tokens: u64,
    /// Routed experts' statistics weight each token's input by its routing weight (the factor
    /// the expert's output is multiplied by): `sum_t w_t^2 x_t x_t^T` and `sum_t w_t^2 x_t^2`,
    /// so each expert's quantization error is measured as it reaches the layer's output
    /// (MoEQuant's affinity-guided GPTQ). Needs a backend that reports the weights (the CPU).
    pub route_weighted: bool,
}

impl Default for CollectOptions {
    fn default() -> Self {
        CollectOptions {
            hessian: false,
            min_expert_tokens: 64,
            route_weighted: false,
        }
    }
}

/// Statistics of the input of one Linear (shared by Linears with the same input).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearStats {
    /// Where they were measured (e.g. "Qkv(3)", "MoeInput(2) [all-token fallback]").
    pub site: String,
    /// Position of the site in its layer: 0 q/k/v, 1 o, 2 MLP/expert gate/up (and the router
    /// input), 3 MLP/expert down ([`stage_of`]); [`HEAD_STAGE`] for the lm_head.
    pub stage: u8,
    /// Tokens seen.
    pub tokens: u64,
    /// Per input channel: mean of x_j^2 (length k).
    pub second_moment: Vec<f64>,
    /// Largest |x| seen.
    pub amax: f32,
    /// `sum_t x_t x_t^T`, [k, k] row-major, when collected.
    pub hessian: Option<Vec<f64>>,
    /// Asymmetric calibration: `sum_t (xf_t - x_t) x_t^T`, [k, k] row-major, where `xf_t` is
    /// the same token's input in the unquantized model and `x_t` in the model whose earlier
    /// layers are quantized (see [`super::sequential`]).
    pub cross: Option<Vec<f64>>,
}

/// Accumulator of one site.
#[derive(Debug, Clone)]
struct SiteAcc {
    k: usize,
    tokens: u64,
    sum_sq: Vec<f64>,
    amax: f32,
    hessian: Option<Vec<f64>>,
    cross: Option<Vec<f64>>,
}

impl SiteAcc {
    fn new(k: usize, hessian: bool) -> SiteAcc {
        SiteAcc {
            k,
            tokens: 0,
            sum_sq: vec![0.0; k],
            amax: 0.0,
            hessian: hessian.then(|| vec![0.0; k * k]),
            cross: None,
        }
    }

    /// Adds `sum_t (xf_t - x_t) x_t^T` over the `m` paired rows; row i of the sum is owned by
    /// one task and tokens are added in order, so the result does not depend on the threads.
    fn add_cross(&mut self, x: &[f32], xf: &[f32], m: usize) {
        let k = self.k;
        let c = self.cross.get_or_insert_with(|| vec![0.0; k * k]);
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dd: Vec<f64> = xf
            .iter()
            .zip(x)
            .map(|(&f, &q)| f as f64 - q as f64)
            .collect();
        c.par_chunks_mut(k).enumerate().for_each(|(i, crow)| {
            let (dd, xd) = (&dd, &xd);
            crate::f64ops::add_scaled_rows(crow, m, |t| dd[t * k + i], |t| &xd[t * k..(t + 1) * k]);
        });
    }

    fn add(&mut self, x: &[f32], m: usize) {
        let k = self.k;
        self.tokens += m as u64;
        for row in x.chunks_exact(k) {
            for ((s, &v), _) in self.sum_sq.iter_mut().zip(row).zip(0..k) {
                *s += v as f64 * v as f64;
                self.amax = self.amax.max(v.abs());
            }
        }
        if let Some(h) = &mut self.hessian {
            let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            // Upper triangle, row i owned by one task (tokens in order, four per pass over the
            // row: `f64ops::add_scaled_rows`); mirrored in `finish`.
            h.par_chunks_mut(k).enumerate().for_each(|(i, hrow)| {
                let xd = &xd;
                crate::f64ops::add_scaled_rows(
                    &mut hrow[i..],
                    m,
                    |t| xd[t * k + i],
                    |t| &xd[t * k + i..(t + 1) * k],
                );
            });
        }
    }

    fn finish(&self, site: String, stage: u8) -> LinearStats {
        let n = self.tokens.max(1) as f64;
        let k = self.k;
        let hessian = self.hessian.as_ref().map(|h| {
            let mut full = h.clone();
            for i in 0..k {
                for j in 0..i {
                    full[i * k + j] = full[j * k + i];
                }
            }
            full
        });
        LinearStats {
            site,
            stage,
            tokens: self.tokens,
            second_moment: self.sum_sq.iter().map(|s| s / n).collect(),
            amax: self.amax,
            hessian,
            cross: self.cross.clone(),
        }
    }
}

/// The lm_head's input statistics (the final norm's output after the last decoder layer), summed
/// sequence by sequence in order like any site's: the lm_head is no decoder-layer site, so the
/// sequential walk feeds it itself ([`super::sequential`]).
pub(crate) struct HeadAcc(SiteAcc);

impl HeadAcc {
    /// An empty accumulator for inputs of `k` features (with `sum x x^T` where `hessian`).
    pub(crate) fn new(k: usize, hessian: bool) -> HeadAcc {
        HeadAcc(SiteAcc::new(k, hessian))
    }

    /// Adds `m` rows `x`; with `xf` (asymmetric calibration: the same rows of the unquantized
    /// model), also their cross term.
    pub(crate) fn add(&mut self, x: &[f32], xf: Option<&[f32]>, m: usize) {
        if m == 0 || x.is_empty() {
            return;
        }
        self.0.add(x, m);
        if let Some(xf) = xf.filter(|xf| xf.len() == x.len()) {
            self.0.add_cross(x, xf, m);
        }
    }

    /// The statistics (stage [`HEAD_STAGE`]).
    pub(crate) fn finish(&self) -> LinearStats {
        self.0.finish("Head".into(), HEAD_STAGE)
    }
}

/// [`LinearStats::stage`] of the lm_head's input: after every decoder layer.
pub const HEAD_STAGE: u8 = 4;

/// Accumulates the statistics of every site it is shown.
pub(crate) struct Collector {
    hessian: bool,
    all_tokens: bool,
    sites: BTreeMap<Site, SiteAcc>,
    /// With [`CollectOptions::route_weighted`]: each expert's routing weights of the rows it
    /// was last routed (`routed`), applied to its next inputs; None where weighting is off.
    route_weights: Option<BTreeMap<(usize, usize), Vec<f32>>>,
}

impl Collector {
    /// An empty collector for a model of configuration `config` with `opts`.
    pub(crate) fn new(config: &ModelConfig, opts: CollectOptions) -> Collector {
        Collector {
            hessian: opts.hessian,
            all_tokens: config.moe.is_some() && opts.min_expert_tokens > 0,
            sites: BTreeMap::new(),
            route_weights: opts.route_weighted.then(BTreeMap::new),
        }
    }

    /// `x` with each row scaled by its routing weight where `site` is a routed expert's input
    /// and weighting is on (the weights of the expert's last `routed` call; a count that does
    /// not match leaves `x` as it is), else None.
    fn route_scaled(&self, site: Site, x: &[f32], m: usize) -> Option<Vec<f32>> {
        let key = match site {
            Site::ExpertGateUp(l, e) | Site::ExpertDown(l, e) => (l, e),
            _ => return None,
        };
        let w = self.route_weights.as_ref()?.get(&key)?;
        if w.len() != m || m == 0 {
            return None;
        }
        let k = x.len() / m;
        Some(
            x.chunks_exact(k)
                .zip(w)
                .flat_map(|(row, &wt)| row.iter().map(move |&v| v * wt))
                .collect(),
        )
    }

    /// Bytes of statistics held.
    pub(crate) fn bytes(&self) -> usize {
        self.sites
            .values()
            .map(|a| {
                8 * (a.k
                    + a.hessian.as_ref().map_or(0, Vec::len)
                    + a.cross.as_ref().map_or(0, Vec::len))
            })
            .sum()
    }

    /// Adds sums a backend accumulated itself (the GPU: [`LayerWalk::begin_device_sums`]).
    ///
    /// [`LayerWalk::begin_device_sums`]: mimo_runtime::walk::LayerWalk::begin_device_sums
    pub(crate) fn add_sums(&mut self, s: &SiteSums) -> Result<(), StatsError> {
        let bad = |len: usize, k: usize| StatsError::Sums {
            site: format!("{:?}", s.site),
            len,
            k,
        };
        if s.sum_sq.len() != s.k {
            return Err(bad(s.sum_sq.len(), s.k));
        }
        if let Some(g) = s.gram.as_ref().filter(|g| g.len() != s.k * s.k) {
            return Err(bad(g.len(), s.k));
        }
        if s.rows == 0 {
            return Ok(());
        }
        let acc = self.site_acc(s.site, s.k);
        if acc.k != s.k {
            return Err(bad(s.sum_sq.len(), acc.k));
        }
        if let Some(h) = &mut acc.hessian {
            // The whole matrix; `finish` keeps the upper triangle, mirrored.
            let g = s.gram.as_ref().ok_or_else(|| bad(0, s.k * s.k))?;
            for (a, b) in h.iter_mut().zip(g) {
                *a += b;
            }
        }
        acc.tokens += s.rows;
        acc.amax = acc.amax.max(s.amax);
        for (v, d) in acc.sum_sq.iter_mut().zip(&s.sum_sq) {
            *v += d;
        }
        Ok(())
    }

    /// Adds the cross term of `site` from paired rows (`x` as observed, `xf` unquantized).
    pub(crate) fn observe_cross(&mut self, site: Site, x: &[f32], xf: &[f32], m: usize) {
        if m == 0 || x.is_empty() || x.len() != xf.len() {
            return;
        }
        // Route weighting: w^2 (xf - x) x^T, both rows scaled by w.
        if let (Some(xs), Some(xfs)) = (
            self.route_scaled(site, x, m),
            self.route_scaled(site, xf, m),
        ) {
            self.site_acc(site, x.len() / m).add_cross(&xs, &xfs, m);
            return;
        }
        self.site_acc(site, x.len() / m).add_cross(x, xf, m);
    }

    /// The accumulator of `site`, created for inputs of `k` features on first use.
    fn site_acc(&mut self, site: Site, k: usize) -> &mut SiteAcc {
        let h = self.hessian;
        self.sites.entry(site).or_insert_with(|| SiteAcc::new(k, h))
    }
}

/// The stage of a site inside its decoder layer (see [`LinearStats::stage`]): a Linear's input
/// depends only on the weights of earlier stages of the same layer.
pub fn stage_of(site: Site) -> u8 {
    match site {
        Site::Qkv(_) => 0,
        Site::O(_) => 1,
        Site::GateUp(_) | Site::MoeInput(_) | Site::ExpertGateUp(..) | Site::SharedGateUp(_) => 2,
        Site::Down(_)
        | Site::ExpertDown(..)
        | Site::ExpertDownAllTokens(..)
        | Site::SharedDown(_) => 3,
    }
}

/// Statistics of some layers, by module name, with those layers' expert coverage.
pub(crate) struct Assigned {
    /// Module name -> input statistics.
    pub by_module: BTreeMap<String, Arc<LinearStats>>,
    /// Coverage of the experts of these layers.
    pub experts: Vec<ExpertCoverage>,
    /// Tokens that reached a MoE layer (0 if none among these layers).
    pub tokens_per_layer: u64,
    /// Experts per MoE layer (0 if none).
    pub experts_per_layer: usize,
}

impl LinearObserver for Collector {
    fn observe(&mut self, site: Site, x: &[f32], m: usize) {
        if m == 0 || x.is_empty() {
            return;
        }
        match self.route_scaled(site, x, m) {
            Some(xs) => {
                // The sums take the weighted rows; amax stays that of the input itself.
                let acc = self.site_acc(site, x.len() / m);
                let amax = acc.amax;
                acc.add(&xs, m);
                acc.amax = x.iter().fold(amax, |a, &v| a.max(v.abs()));
            }
            None => self.site_acc(site, x.len() / m).add(x, m),
        }
    }

    fn all_token_experts(&self) -> bool {
        self.all_tokens
    }

    fn routed(&mut self, layer: usize, expert: usize, _tokens: &[usize], weights: Option<&[f32]>) {
        if let (Some(map), Some(w)) = (self.route_weights.as_mut(), weights) {
            map.insert((layer, expert), w.to_vec());
        }
    }
}

/// Statistics of a calibration run, by Linear module name.
#[derive(Debug, Clone)]
pub struct CalibStats {
    /// Module name (e.g. "model.layers.0.self_attn.q_proj") -> its input statistics.
    pub by_module: BTreeMap<String, Arc<LinearStats>>,
    /// Expert coverage (empty for dense models).
    pub coverage: Coverage,
    /// Calibration tokens.
    pub tokens: usize,
    /// Calibration sequences.
    pub sequences: usize,
    /// Bytes of statistics held (all sites).
    pub stats_bytes: usize,
}

impl CalibStats {
    /// The statistics of `module`, if it was observed.
    pub fn get(&self, module: &str) -> Option<&LinearStats> {
        self.by_module.get(module).map(|a| a.as_ref())
    }
}

/// Runs `model` over `data` and gathers the statistics; `progress` is called after each sequence
/// with (done, total).
pub fn collect(
    model: &Model,
    data: &CalibData,
    opts: CollectOptions,
    progress: &dyn Fn(usize, usize),
) -> Result<CalibStats, StatsError> {
    if data.sequences.is_empty() {
        return Err(StatsError::Empty);
    }
    let c = &model.config;
    let mut col = Collector::new(&model.config, opts);
    let cap = c.max_position_embeddings.max(1);
    let mut tokens = 0usize;
    let total = data.sequences.len();
    for (index, seq) in data.sequences.iter().enumerate() {
        for piece in seq.chunks(cap) {
            let mut cache = model.new_cache(piece.len());
            model
                .forward_observed(piece, &mut cache, Logits::Last, &mut col)
                .map_err(|source| StatsError::Forward {
                    index,
                    source: source.into(),
                })?;
            tokens += piece.len();
        }
        progress(index + 1, total);
    }
    let stats_bytes = col.bytes();
    let a = assign(&model.config, &col, opts, 0..c.num_layers);
    Ok(CalibStats {
        by_module: a.by_module,
        coverage: Coverage {
            min_tokens: opts.min_expert_tokens,
            tokens_per_layer: a.tokens_per_layer,
            experts_per_layer: a.experts_per_layer,
            experts: a.experts,
        },
        tokens,
        sequences: total,
        stats_bytes,
    })
}

/// Turns the accumulated sites of `layers` into statistics per module name (fused inputs share
/// one `Arc`), applying the expert coverage threshold.
pub(crate) fn assign(
    c: &ModelConfig,
    col: &Collector,
    opts: CollectOptions,
    layers: std::ops::Range<usize>,
) -> Assigned {
    let names = Names::new(c.arch);
    let mut finished: BTreeMap<(Site, bool), Arc<LinearStats>> = BTreeMap::new();
    let mut by_module = BTreeMap::new();
    let mut get = |site: Site, fallback: bool| -> Option<Arc<LinearStats>> {
        let acc = col.sites.get(&site)?;
        Some(
            finished
                .entry((site, fallback))
                .or_insert_with(|| {
                    let label = if fallback {
                        format!("{site:?} [all-token fallback]")
                    } else {
                        format!("{site:?}")
                    };
                    Arc::new(acc.finish(label, stage_of(site)))
                })
                .clone(),
        )
    };
    let mut experts = Vec::new();
    let mut tokens_per_layer = 0u64;
    let mut experts_per_layer = 0usize;
    for l in layers {
        for p in ["q_proj", "k_proj", "v_proj"] {
            if let Some(s) = get(Site::Qkv(l), false) {
                by_module.insert(names.attn(l, p), s);
            }
        }
        if let Some(s) = get(Site::O(l), false) {
            by_module.insert(names.attn(l, "o_proj"), s);
        }
        let moe = c
            .moe
            .as_ref()
            .filter(|_| c.moe_layers.get(l) == Some(&true));
        match moe {
            Some(mc) => {
                experts_per_layer = mc.num_experts;
                if let Some(s) = get(Site::MoeInput(l), false) {
                    tokens_per_layer = s.tokens;
                    by_module.insert(names.router(l), s.clone());
                    by_module.insert(names.shared_expert_gate(l), s);
                }
                for e in 0..mc.num_experts {
                    let routed = col
                        .sites
                        .get(&Site::ExpertGateUp(l, e))
                        .map_or(0, |a| a.tokens);
                    let fallback = routed < opts.min_expert_tokens;
                    let [g, u, d] = names.expert(l, e);
                    let (gu, dn) = if fallback {
                        (
                            get(Site::MoeInput(l), true),
                            get(Site::ExpertDownAllTokens(l, e), true),
                        )
                    } else {
                        (
                            get(Site::ExpertGateUp(l, e), false),
                            get(Site::ExpertDown(l, e), false),
                        )
                    };
                    if let Some(s) = gu {
                        by_module.insert(g, s.clone());
                        by_module.insert(u, s);
                    }
                    if let Some(s) = dn {
                        by_module.insert(d, s);
                    }
                    experts.push(ExpertCoverage {
                        layer: l,
                        expert: e,
                        tokens: routed,
                        all_token_fallback: fallback,
                    });
                }
                let [g, u, d] = names.shared_expert(l);
                if let Some(s) = get(Site::SharedGateUp(l), false) {
                    by_module.insert(g, s.clone());
                    by_module.insert(u, s);
                }
                if let Some(s) = get(Site::SharedDown(l), false) {
                    by_module.insert(d, s);
                }
            }
            None => {
                let [g, u, d] = names.mlp(l);
                if let Some(s) = get(Site::GateUp(l), false) {
                    by_module.insert(g, s.clone());
                    by_module.insert(u, s);
                }
                if let Some(s) = get(Site::Down(l), false) {
                    by_module.insert(d, s);
                }
            }
        }
    }
    Assigned {
        by_module,
        experts,
        tokens_per_layer,
        experts_per_layer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with zeros (skipped terms) and a token count off the 4-token pass.
    fn rows(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|e| {
                let v = ((e * 7919 + 13) % 1000) as f32 / 250.0 - 2.0;
                if e % 5 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// The Hessian and cross term equal plain token-by-token f64 sums bit for bit.
    #[test]
    fn hessian_and_cross_match_sequential_sums() {
        let (m, k) = (11, 9);
        let x = rows(m, k);
        let xf: Vec<f32> = x.iter().map(|v| v * 1.25 + 0.5).collect();
        let mut acc = SiteAcc::new(k, true);
        acc.add(&x[..5 * k], 5);
        acc.add(&x[5 * k..], m - 5);
        acc.add_cross(&x, &xf, m);
        let s = acc.finish("site".into(), 0);
        let h = s.hessian.unwrap();
        let c = s.cross.unwrap();
        for i in 0..k {
            for j in 0..k {
                let (a, b) = (i.min(j), i.max(j));
                let mut want = 0.0f64;
                for t in 0..m {
                    want += x[t * k + a] as f64 * x[t * k + b] as f64;
                }
                assert_eq!(h[i * k + j].to_bits(), want.to_bits(), "H ({i}, {j})");
                let mut want = 0.0f64;
                for t in 0..m {
                    want += (xf[t * k + i] as f64 - x[t * k + i] as f64) * x[t * k + j] as f64;
                }
                assert_eq!(c[i * k + j].to_bits(), want.to_bits(), "cross ({i}, {j})");
            }
        }
        assert_eq!(s.tokens, m as u64);
    }

    /// Route weighting scales a routed expert's rows by their weights in the Hessian and the
    /// second moments (not in amax, not other sites, not when the counts disagree).
    #[test]
    fn route_weighting_scales_expert_rows() {
        let (m, k) = (6, 5);
        let x = rows(m, k);
        let w: Vec<f32> = (0..m).map(|t| 0.15 + 0.13 * t as f32).collect();
        let mut col = Collector {
            hessian: true,
            all_tokens: false,
            sites: BTreeMap::new(),
            route_weights: Some(BTreeMap::new()),
        };
        let tokens: Vec<usize> = (0..m).collect();
        col.routed(2, 3, &tokens, Some(&w));
        col.observe(Site::ExpertGateUp(2, 3), &x, m);
        col.observe(Site::Qkv(2), &x, m);
        // Expert 4 was routed fewer rows than it shows: left unweighted.
        col.routed(2, 4, &tokens[..2], Some(&w[..2]));
        col.observe(Site::ExpertDown(2, 4), &x, m);
        let scaled: Vec<f32> = x
            .chunks_exact(k)
            .zip(&w)
            .flat_map(|(r, &wt)| r.iter().map(move |&v| v * wt))
            .collect();
        let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
        for (site, want_rows) in [
            (Site::ExpertGateUp(2, 3), &scaled),
            (Site::Qkv(2), &x),
            (Site::ExpertDown(2, 4), &x),
        ] {
            let mut plain = SiteAcc::new(k, true);
            plain.add(want_rows, m);
            let want = plain.finish("want".into(), 0);
            let got = col.sites[&site].finish("got".into(), 0);
            assert_eq!(got.hessian, want.hessian, "{site:?}");
            assert_eq!(got.second_moment, want.second_moment, "{site:?}");
            assert_eq!(got.amax, amax, "{site:?}");
            assert_eq!(got.tokens, m as u64);
        }
        assert_ne!(scaled, x);
    }
}
