//! The decoder (dense and MoE) on the CPU backend: embeddings, pre-norm attention with RoPE and
//! a KV cache, SwiGLU MLP or a routed mixture of experts, final norm and lm_head.

use std::path::Path;

use crate::arch::Names;
use crate::checkpoint::Checkpoint;
use crate::config::{ModelConfig, MoeConfig};
use crate::cpu::{attention, rms_norm, softmax, swiglu, AttnShape, Rope};
use crate::linear::Linear;
use crate::weights::{LoadError, Loader};

/// Errors of a forward pass (bad input, not bad weights).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForwardError {
    /// The tokens do not fit in the context left in the KV cache.
    #[error(
        "context overflow: {cached} cached + {new} new tokens exceed the context length {max}"
    )]
    ContextOverflow {
        /// tokens already in the cache
        cached: usize,
        /// tokens passed
        new: usize,
        /// cache capacity
        max: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} at position {index} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// the id
        token: u32,
        /// index in the input
        index: usize,
        /// vocab size
        vocab: usize,
    },
    /// No tokens were given.
    #[error("empty input: at least one token is needed")]
    Empty,
    /// A layer-at-a-time call named a missing layer or passed a buffer that is not `[m, hidden]`.
    #[error("layer {layer} of {layers}: hidden states of {len} values are not [m, {hidden}]")]
    BadLayerInput {
        /// the layer asked for
        layer: usize,
        /// layers in the model
        layers: usize,
        /// values passed
        len: usize,
        /// hidden size
        hidden: usize,
    },
}

/// Why [`Model::replace_linear_weight`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplaceError {
    /// No Linear of a decoder layer has this module name.
    #[error("no Linear named '{0}' in the decoder layers")]
    Unknown(String),
    /// The new weight's shape differs from the old one.
    #[error("'{module}': new weight is {got:?}, the layer has {expected:?}")]
    Shape {
        /// module name
        module: String,
        /// [n, k] of the layer
        expected: [usize; 2],
        /// [n, k] given
        got: [usize; 2],
    },
}

/// Which Linear layers consume an input seen by a [`LinearObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Input of q_proj, k_proj and v_proj of a layer.
    Qkv(usize),
    /// Input of o_proj of a layer.
    O(usize),
    /// Input of the dense MLP's gate_proj and up_proj.
    GateUp(usize),
    /// Input of the dense MLP's down_proj.
    Down(usize),
    /// Input of a MoE block (every token reaching it): the router's input.
    MoeInput(usize),
    /// Input of expert `.1`'s gate_proj and up_proj: only the tokens routed to it.
    ExpertGateUp(usize, usize),
    /// Input of expert `.1`'s down_proj: only the tokens routed to it.
    ExpertDown(usize, usize),
    /// Input expert `.1`'s down_proj would get if every token of the MoE input were routed to
    /// it (measurement only, when [`LinearObserver::all_token_experts`] asks for it; the
    /// forward pass keeps the real routing).
    ExpertDownAllTokens(usize, usize),
    /// Input of the shared expert's gate_proj and up_proj (and its sigmoid gate).
    SharedGateUp(usize),
    /// Input of the shared expert's down_proj.
    SharedDown(usize),
}

/// Sees the input `x` (`[m, k]`, f32) of every Linear during [`Model::forward_observed`]
/// (calibration statistics). Calls come in a fixed order: layer by layer, in execution order.
pub trait LinearObserver {
    /// Called with the input of the Linear layers at `site`.
    fn observe(&mut self, site: Site, x: &[f32], m: usize);
    /// If true, every expert of every MoE layer is also run on all tokens of the MoE input (for
    /// [`Site::ExpertDownAllTokens`] only; the output is unchanged).
    fn all_token_experts(&self) -> bool {
        false
    }
    /// Called before expert `expert` of MoE layer `layer` runs, with the rows (token indices
    /// into the MoE input) the router sent to it, in the order its inputs are observed, and
    /// each row's routing weight (what the expert's output is multiplied by) where the backend
    /// has them on the host (the CPU; the GPU passes None).
    fn routed(
        &mut self,
        _layer: usize,
        _expert: usize,
        _tokens: &[usize],
        _weights: Option<&[f32]>,
    ) {
    }
}

/// The rows of a layer-at-a-time call's hidden states (`len` values for `layer`), or why they
/// are refused: none, not `[m, hidden]`, no such layer, longer than the context (both backends'
/// `forward_layer_observed`).
pub(crate) fn layer_input_rows(
    c: &ModelConfig,
    layer: usize,
    len: usize,
) -> Result<usize, ForwardError> {
    let hd = c.hidden_size;
    let m = len / hd.max(1);
    if m == 0 {
        return Err(ForwardError::Empty);
    }
    if layer >= c.num_layers || len != m * hd {
        return Err(ForwardError::BadLayerInput {
            layer,
            layers: c.num_layers,
            len,
            hidden: hd,
        });
    }
    if m > c.max_position_embeddings {
        return Err(ForwardError::ContextOverflow {
            cached: 0,
            new: m,
            max: c.max_position_embeddings,
        });
    }
    Ok(m)
}

/// An observer that ignores everything (plain forward passes).
struct NoObserver;

impl LinearObserver for NoObserver {
    fn observe(&mut self, _: Site, _: &[f32], _: usize) {}
}

/// A dense SwiGLU MLP.
#[derive(Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(
        &self,
        x: &[f32],
        m: usize,
        obs: &mut dyn LinearObserver,
        sites: [Site; 2],
    ) -> Vec<f32> {
        obs.observe(sites[0], x, m);
        let mut g = self.gate.apply(x, m);
        let u = self.up.apply(x, m);
        swiglu(&mut g, &u);
        obs.observe(sites[1], &g, m);
        self.down.apply(&g, m)
    }

    fn bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}

/// A routed mixture of experts, with an optional sigmoid-gated shared expert.
#[derive(Debug)]
struct Moe {
    router: Linear,
    experts: Vec<Mlp>,
    shared: Option<(Mlp, Linear)>,
    cfg: MoeConfig,
}

impl Moe {
    /// Per token: softmax over all experts in f32, top-k (ties to the lower index), optional
    /// renormalization; expert outputs are summed in expert-index order as transformers does.
    fn forward(
        &self,
        x: &[f32],
        m: usize,
        hidden: usize,
        layer: usize,
        obs: &mut dyn LinearObserver,
    ) -> Vec<f32> {
        let e = self.cfg.num_experts;
        obs.observe(Site::MoeInput(layer), x, m);
        if obs.all_token_experts() {
            for (ei, ex) in self.experts.iter().enumerate() {
                let mut g = ex.gate.apply(x, m);
                let u = ex.up.apply(x, m);
                swiglu(&mut g, &u);
                obs.observe(Site::ExpertDownAllTokens(layer, ei), &g, m);
            }
        }
        let logits = self.router.apply(x, m);
        // assignments[expert] = [(token, weight)]
        let mut assignments: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for t in 0..m {
            let mut p = logits[t * e..(t + 1) * e].to_vec();
            softmax(&mut p);
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            idx.truncate(self.cfg.top_k);
            let sum: f32 = idx.iter().map(|&i| p[i]).sum();
            for &i in &idx {
                let w = if self.cfg.norm_topk_prob {
                    p[i] / sum
                } else {
                    p[i]
                };
                assignments[i].push((t, w));
            }
        }
        let mut out = vec![0.0f32; m * hidden];
        for (ei, toks) in assignments.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let mut xe = Vec::with_capacity(toks.len() * hidden);
            for &(t, _) in toks {
                xe.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let rows: Vec<usize> = toks.iter().map(|&(t, _)| t).collect();
            let weights: Vec<f32> = toks.iter().map(|&(_, w)| w).collect();
            obs.routed(layer, ei, &rows, Some(&weights));
            let sites = [Site::ExpertGateUp(layer, ei), Site::ExpertDown(layer, ei)];
            let ye = self.experts[ei].forward(&xe, toks.len(), obs, sites);
            for (r, &(t, w)) in toks.iter().enumerate() {
                for (o, y) in out[t * hidden..(t + 1) * hidden]
                    .iter_mut()
                    .zip(&ye[r * hidden..(r + 1) * hidden])
                {
                    *o += w * y;
                }
            }
        }
        if let Some((mlp, gate)) = &self.shared {
            let ys = mlp.forward(
                x,
                m,
                obs,
                [Site::SharedGateUp(layer), Site::SharedDown(layer)],
            );
            let g = gate.apply(x, m);
            for t in 0..m {
                let s = 1.0 / (1.0 + (-g[t]).exp());
                for (o, y) in out[t * hidden..(t + 1) * hidden]
                    .iter_mut()
                    .zip(&ys[t * hidden..(t + 1) * hidden])
                {
                    *o += s * y;
                }
            }
        }
        out
    }

    fn bytes(&self) -> usize {
        self.router.weight_bytes()
            + self.experts.iter().map(Mlp::bytes).sum::<usize>()
            + self
                .shared
                .as_ref()
                .map_or(0, |(m, g)| m.bytes() + g.weight_bytes())
    }
}

#[derive(Debug)]
enum Ffn {
    Dense(Box<Mlp>),
    Moe(Box<Moe>),
}

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    window: Option<usize>,
    ffn: Ffn,
}

/// Keys and values of every layer for the tokens seen so far, f32 `[len, kv_heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
        for k in &mut self.keys {
            k.clear();
        }
        for v in &mut self.values {
            v.clear();
        }
    }
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[vocab]`.
    Last,
    /// Every new position: `[m, vocab]`.
    All,
}

/// Checks that every layer config.json declares has its input norm tensor, before the config's
/// per-layer tables are built: an absurd `num_hidden_layers` (1e11) is reported as the first
/// missing layer tensor instead of aborting on a huge allocation. Stops at the first missing
/// layer, so the work is bounded by the number of tensors.
fn check_declared_layers(ck: &Checkpoint, config_file: &Path) -> Result<(), LoadError> {
    let (arch, declared) = ModelConfig::declared_layers(ck.config(), config_file)?;
    let names = Names::new(arch);
    for l in 0..declared {
        let tensor = names.input_norm(l);
        if !ck.contains(&tensor) {
            return Err(LoadError::Data {
                file: ck.root().to_path_buf(),
                tensor,
                reason: format!(
                    "not found, but config.json num_hidden_layers = {declared} declares layers 0..{}",
                    declared - 1
                ),
            });
        }
    }
    Ok(())
}

/// A loaded decoder-only model.
#[derive(Debug)]
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Linear>,
    rope: Rope,
}

impl Model {
    /// Opens a checkpoint folder and loads the model.
    pub fn load(dir: &Path) -> Result<Model, LoadError> {
        let ck = Checkpoint::open(dir)?;
        Model::from_checkpoint(&ck)
    }

    /// Loads the model from an opened checkpoint, checking every tensor's shape against the
    /// config.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Model, LoadError> {
        let config_file = ck.root().join("config.json");
        check_declared_layers(ck, &config_file)?;
        let config = ModelConfig::from_json(ck.config(), &config_file)?;
        let c = &config;
        let names = Names::new(c.arch);
        let ld = Loader::new(ck)?;
        let (hd, d) = (c.hidden_size, c.head_dim);
        let embed = ld.linear(&names.embed(), c.vocab_size, hd, false)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(ld.linear(&names.lm_head(), c.vocab_size, hd, false)?)
        };
        let norm = ld.vector(&names.final_norm(), hd)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let att = |p: &str| names.attn(l, p);
            let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(ld.vector(&format!("{}.weight", att("q_norm")), d)?),
                    Some(ld.vector(&format!("{}.weight", att("k_norm")), d)?),
                )
            } else {
                (None, None)
            };
            let ffn = if c.moe_layers[l] {
                let mc = c.moe.clone().ok_or_else(|| {
                    LoadError::Config(crate::config::ConfigError::Invalid {
                        file: ck.root().join("config.json"),
                        key: "num_experts".into(),
                        reason: "MoE layer without MoE parameters".into(),
                    })
                })?;
                let ei = mc.expert_intermediate_size;
                let experts = (0..mc.num_experts)
                    .map(|e| {
                        let [g, u, dn] = names.expert(l, e);
                        Ok(Mlp {
                            gate: ld.linear(&g, ei, hd, false)?,
                            up: ld.linear(&u, ei, hd, false)?,
                            down: ld.linear(&dn, hd, ei, false)?,
                        })
                    })
                    .collect::<Result<Vec<_>, LoadError>>()?;
                let shared = match mc.shared_expert_intermediate_size {
                    Some(si) => {
                        let [g, u, dn] = names.shared_expert(l);
                        let mlp = Mlp {
                            gate: ld.linear(&g, si, hd, false)?,
                            up: ld.linear(&u, si, hd, false)?,
                            down: ld.linear(&dn, hd, si, false)?,
                        };
                        Some((mlp, ld.linear(&names.shared_expert_gate(l), 1, hd, false)?))
                    }
                    None => None,
                };
                let router = ld.linear(&names.router(l), mc.num_experts, hd, false)?;
                Ffn::Moe(Box::new(Moe {
                    router,
                    experts,
                    shared,
                    cfg: mc,
                }))
            } else {
                let [g, u, dn] = names.mlp(l);
                let i = c.intermediate_size;
                Ffn::Dense(Box::new(Mlp {
                    gate: ld.linear(&g, i, hd, c.mlp_bias)?,
                    up: ld.linear(&u, i, hd, c.mlp_bias)?,
                    down: ld.linear(&dn, hd, i, c.mlp_bias)?,
                }))
            };
            layers.push(Layer {
                input_norm: ld.vector(&names.input_norm(l), hd)?,
                post_norm: ld.vector(&names.post_attention_norm(l), hd)?,
                q: ld.linear(&att("q_proj"), qn, hd, c.qkv_bias)?,
                k: ld.linear(&att("k_proj"), kvn, hd, c.qkv_bias)?,
                v: ld.linear(&att("v_proj"), kvn, hd, c.qkv_bias)?,
                o: ld.linear(&att("o_proj"), hd, qn, c.o_bias)?,
                q_norm,
                k_norm,
                window: c.sliding_window[l],
                ffn,
            });
        }
        let rope = Rope::new(&c.rope);
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Bytes of all weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let mut b =
            self.embed.weight_bytes() + self.lm_head.as_ref().map_or(0, Linear::weight_bytes);
        for l in &self.layers {
            b += l.q.weight_bytes() + l.k.weight_bytes() + l.v.weight_bytes() + l.o.weight_bytes();
            b += match &l.ffn {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => m.bytes(),
            };
        }
        b
    }

    /// An empty KV cache for up to `capacity` positions (capped at the model's maximum).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let n = self.layers.len();
        KvCache {
            keys: vec![Vec::new(); n],
            values: vec![Vec::new(); n],
            len: 0,
            capacity: capacity.min(self.config.max_position_embeddings),
        }
    }

    /// Runs `tokens` after the cached positions, appends them to the cache and returns logits.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Vec<f32>, ForwardError> {
        self.forward_observed(tokens, cache, which, &mut NoObserver)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The embedding rows of `tokens`: hidden states `[m, hidden]` entering layer 0.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let hd = c.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * hd];
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= c.vocab_size {
                return Err(ForwardError::TokenOutOfRange {
                    token: t,
                    index: i,
                    vocab: c.vocab_size,
                });
            }
            self.embed
                .row_into(t as usize, &mut x[i * hd..(i + 1) * hd]);
        }
        Ok(x)
    }

    /// Layer-at-a-time execution (calibration): runs decoder layer `layer` on the hidden states
    /// `x` (`[m, hidden]`, one sequence at positions `0..m`, as [`Model::embed_tokens`] or the
    /// previous layer left them) in place, showing its Linear inputs to `obs`. Only this layer's
    /// keys and values are held, for the duration of the call. Running every layer in order on
    /// [`Model::embed_tokens`]'s output gives bit-identical hidden states to [`Model::forward`].
    pub fn forward_layer_observed(
        &self,
        layer: usize,
        x: &mut [f32],
        obs: &mut dyn LinearObserver,
    ) -> Result<(), ForwardError> {
        let m = layer_input_rows(&self.config, layer, x.len())?;
        let (mut kc, mut vc) = (Vec::new(), Vec::new());
        self.layer_step(layer, x, m, 0, &mut kc, &mut vc, obs);
        Ok(())
    }

    /// The final RMSNorm, in place, on hidden states `x` (`[m, hidden]`) leaving the last
    /// decoder layer: the lm_head's input (its calibration statistics).
    pub fn final_norm_rows(&self, x: &mut [f32]) -> Result<(), ForwardError> {
        let last = self.config.num_layers.saturating_sub(1);
        layer_input_rows(&self.config, last, x.len())?;
        rms_norm(x, &self.norm, self.config.rms_norm_eps);
        Ok(())
    }

    /// Replaces the weight of Linear `module` (checkpoint module name, e.g.
    /// `model.layers.3.mlp.experts.5.down_proj`) of a decoder layer with `weight` (same shape),
    /// e.g. its quantized version, so that later layers see the quantized layer's outputs
    /// (sequential calibration). The bias is kept.
    pub fn replace_linear_weight(
        &mut self,
        module: &str,
        weight: crate::linear::Weight,
    ) -> Result<(), ReplaceError> {
        let names = Names::new(self.config.arch);
        // The layer whose tensor prefix ("model.layers.{l}.") the module name starts with.
        let li = (0..self.layers.len())
            .find(|&l| {
                let norm = names.input_norm(l);
                module.starts_with(norm.trim_end_matches("input_layernorm.weight"))
            })
            .ok_or_else(|| ReplaceError::Unknown(module.to_string()))?;
        let layer = &mut self.layers[li];
        let mut slots: Vec<(String, &mut Linear)> = vec![
            (names.attn(li, "q_proj"), &mut layer.q),
            (names.attn(li, "k_proj"), &mut layer.k),
            (names.attn(li, "v_proj"), &mut layer.v),
            (names.attn(li, "o_proj"), &mut layer.o),
        ];
        match &mut layer.ffn {
            Ffn::Dense(mlp) => {
                let [g, u, d] = names.mlp(li);
                slots.push((g, &mut mlp.gate));
                slots.push((u, &mut mlp.up));
                slots.push((d, &mut mlp.down));
            }
            Ffn::Moe(moe) => {
                slots.push((names.router(li), &mut moe.router));
                for (e, ex) in moe.experts.iter_mut().enumerate() {
                    let [g, u, d] = names.expert(li, e);
                    slots.push((g, &mut ex.gate));
                    slots.push((u, &mut ex.up));
                    slots.push((d, &mut ex.down));
                }
                if let Some((mlp, gate)) = &mut moe.shared {
                    let [g, u, d] = names.shared_expert(li);
                    slots.push((g, &mut mlp.gate));
                    slots.push((u, &mut mlp.up));
                    slots.push((d, &mut mlp.down));
                    slots.push((names.shared_expert_gate(li), gate));
                }
            }
        }
        let (_, slot) = slots
            .into_iter()
            .find(|(n, _)| n == module)
            .ok_or_else(|| ReplaceError::Unknown(module.to_string()))?;
        let new = Linear {
            weight,
            bias: slot.bias.clone(),
        };
        if (new.n(), new.k()) != (slot.n(), slot.k()) {
            return Err(ReplaceError::Shape {
                module: module.to_string(),
                expected: [slot.n(), slot.k()],
                got: [new.n(), new.k()],
            });
        }
        *slot = new;
        Ok(())
    }

    /// [`Model::forward`] that shows the input of every Linear layer to `obs` (calibration).
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        obs: &mut dyn LinearObserver,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let m = tokens.len();
        if m == 0 {
            return Err(ForwardError::Empty);
        }
        if cache.len + m > cache.capacity {
            return Err(ForwardError::ContextOverflow {
                cached: cache.len,
                new: m,
                max: cache.capacity,
            });
        }
        let hd = c.hidden_size;
        let mut x = self.embed_tokens(tokens)?;
        let start = cache.len;
        for li in 0..self.layers.len() {
            let (kc, vc) = (&mut cache.keys[li], &mut cache.values[li]);
            self.layer_step(li, &mut x, m, start, kc, vc, obs);
        }
        cache.len += m;
        let (rows, n) = match which {
            Logits::Last => (x[(m - 1) * hd..].to_vec(), 1),
            Logits::All => (x, m),
        };
        let mut rows = rows;
        rms_norm(&mut rows, &self.norm, c.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(head.apply(&rows, n))
    }

    /// Decoder layer `li` on the hidden states `x` (`[m, hidden]`, positions `start..start+m`),
    /// in place, appending its keys and values to `kc` / `vc`.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        li: usize,
        x: &mut [f32],
        m: usize,
        start: usize,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
        obs: &mut dyn LinearObserver,
    ) {
        let c = &self.config;
        let hd = c.hidden_size;
        let layer = &self.layers[li];
        let mut h = x.to_vec();
        rms_norm(&mut h, &layer.input_norm, c.rms_norm_eps);
        let attn = self.attention(li, obs, layer, &h, m, start, kc, vc);
        for (a, b) in x.iter_mut().zip(&attn) {
            *a += b;
        }
        let mut h = x.to_vec();
        rms_norm(&mut h, &layer.post_norm, c.rms_norm_eps);
        let y = match &layer.ffn {
            Ffn::Dense(mlp) => mlp.forward(&h, m, obs, [Site::GateUp(li), Site::Down(li)]),
            Ffn::Moe(moe) => moe.forward(&h, m, hd, li, obs),
        };
        for (a, b) in x.iter_mut().zip(&y) {
            *a += b;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        obs: &mut dyn LinearObserver,
        l: &Layer,
        h: &[f32],
        m: usize,
        start: usize,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
    ) -> Vec<f32> {
        let c = &self.config;
        let d = c.head_dim;
        obs.observe(Site::Qkv(li), h, m);
        let mut q = l.q.apply(h, m);
        let mut k = l.k.apply(h, m);
        let v = l.v.apply(h, m);
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            rms_norm(&mut q, qn, c.rms_norm_eps);
            rms_norm(&mut k, kn, c.rms_norm_eps);
        }
        for (i, row) in q.chunks_exact_mut(c.num_heads * d).enumerate() {
            for head in row.chunks_exact_mut(d) {
                self.rope.apply(head, start + i);
            }
        }
        for (i, row) in k.chunks_exact_mut(c.num_kv_heads * d).enumerate() {
            for head in row.chunks_exact_mut(d) {
                self.rope.apply(head, start + i);
            }
        }
        kc.extend_from_slice(&k);
        vc.extend_from_slice(&v);
        let shape = AttnShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: d,
            window: l.window,
        };
        let a = attention(&q, kc, vc, start, m, shape);
        obs.observe(Site::O(li), &a, m);
        l.o.apply(&a, m)
    }
}
