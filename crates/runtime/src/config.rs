//! Typed model configuration parsed from a checkpoint's config.json.
//!
//! Every field that changes the math of a supported architecture is read here, once, with a
//! typed error naming config.json and the key; the decoder never looks at raw JSON.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Largest accepted size of one model dimension (vocab, hidden, intermediate, head count, head
/// dim, expert count, and the q/kv projection widths heads * head_dim). Real models stay well
/// below (vocab ~2^18, hidden ~2^14); the bound keeps every product of two dimensions far from
/// usize overflow and turns absurd values into an error instead of a huge allocation.
pub const MAX_DIM: usize = 1 << 24;

/// Largest accepted `num_hidden_layers` (real models have at most a few hundred); per-layer
/// tables are allocated from it.
pub const MAX_LAYERS: usize = 4096;

/// Errors reading config.json into a [`ModelConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// config.json is not a JSON object.
    #[error("{file}: config is not a JSON object")]
    NotObject {
        /// config.json path
        file: PathBuf,
    },
    /// A required key is missing.
    #[error("{file}: missing key '{key}'")]
    Missing {
        /// config.json path
        file: PathBuf,
        /// the key
        key: String,
    },
    /// A key holds a value of the wrong JSON type or out of range.
    #[error("{file}: key '{key}' should be {expected}, found {found}")]
    WrongType {
        /// config.json path
        file: PathBuf,
        /// the key
        key: String,
        /// what was expected
        expected: &'static str,
        /// what was found (JSON text, shortened)
        found: String,
    },
    /// The architecture (model_type / architectures) is not supported.
    #[error("{file}: unsupported model_type '{model_type}' (supported: llama, mistral, qwen2, qwen3, mimo, mixtral, qwen2_moe, qwen3_moe)")]
    Unsupported {
        /// config.json path
        file: PathBuf,
        /// model_type found
        model_type: String,
    },
    /// Values are individually valid but inconsistent with each other.
    #[error("{file}: key '{key}': {reason}")]
    Invalid {
        /// config.json path
        file: PathBuf,
        /// the key
        key: String,
        /// why
        reason: String,
    },
}

/// Supported decoder architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Llama 1/2/3 (LlamaForCausalLM).
    Llama,
    /// Mistral (LlamaForCausalLM math with sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5 (q/k/v bias).
    Qwen2,
    /// Qwen3 (q/k RMSNorm per head).
    Qwen3,
    /// Xiaomi MiMo: Qwen2 plus multi-token-prediction layers, which are ignored.
    MiMo,
    /// Mixtral sparse MoE.
    Mixtral,
    /// Qwen2-MoE (routed experts plus a gated shared expert).
    Qwen2Moe,
    /// Qwen3-MoE.
    Qwen3Moe,
}

impl Arch {
    /// Parses a config.json `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Arch> {
        Some(match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "mimo" => Arch::MiMo,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            _ => return None,
        })
    }

    /// Maps a config.json `architectures[0]` class name, used when model_type is absent.
    pub fn from_class_name(name: &str) -> Option<Arch> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "MiMoForCausalLM" => Arch::MiMo,
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            _ => return None,
        })
    }

    /// The config.json `model_type` of this architecture.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::MiMo => "mimo",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Whether the architecture has a sparse MoE block.
    pub fn is_moe(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe)
    }
}

/// RoPE frequency scaling (transformers `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// scale factor
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// scale factor
        factor: f64,
        /// low-frequency factor
        low_freq_factor: f64,
        /// high-frequency factor
        high_freq_factor: f64,
        /// context length the model was pre-trained with
        original_max_position_embeddings: f64,
    },
    /// YaRN (NTK-by-parts interpolation with attention scaling).
    Yarn {
        /// scale factor
        factor: f64,
        /// context length the model was pre-trained with
        original_max_position_embeddings: f64,
        /// fast correction boundary (rotations), default 32
        beta_fast: f64,
        /// slow correction boundary (rotations), default 1
        beta_slow: f64,
        /// cos/sin multiplier; derived from mscale when absent
        attention_factor: Option<f64>,
        /// mscale (DeepSeek style), optional
        mscale: Option<f64>,
        /// mscale_all_dim (DeepSeek style), optional
        mscale_all_dim: Option<f64>,
        /// whether the correction range is rounded to whole dimensions (default true)
        truncate: bool,
    },
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Number of leading head dimensions that are rotated (head_dim * partial_rotary_factor).
    pub rotary_dim: usize,
}

/// Sparse mixture-of-experts parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Number of routed experts.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Hidden size of one routed expert's MLP.
    pub expert_intermediate_size: usize,
    /// Whether the top-k routing weights are renormalized to sum to one.
    pub norm_topk_prob: bool,
    /// Hidden size of the shared expert (Qwen2-MoE), if any.
    pub shared_expert_intermediate_size: Option<usize>,
}

/// Typed configuration of a decoder-only model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding and lm_head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Dense MLP hidden size (dense layers).
    pub intermediate_size: usize,
    /// Number of decoder layers (MTP layers excluded).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// o_proj has a bias.
    pub o_bias: bool,
    /// MLP projections have a bias (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window per layer (None = full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    /// MoE parameters, for MoE architectures.
    pub moe: Option<MoeConfig>,
    /// Per layer: whether its MLP is the sparse MoE block.
    pub moe_layers: Vec<bool>,
    /// End-of-sequence token ids from config.json (may be empty).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token id from config.json.
    pub bos_token_id: Option<u32>,
}

/// Reads typed values from one JSON object, producing errors that name the file and the key.
struct Fields<'a> {
    file: &'a Path,
    obj: &'a Map<String, Value>,
    /// Key prefix for nested objects ("rope_scaling.").
    prefix: String,
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(57).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

impl<'a> Fields<'a> {
    /// The top-level object of config.json `json`, or [`ConfigError::NotObject`].
    fn root(json: &'a Value, file: &'a Path) -> Result<Fields<'a>, ConfigError> {
        let obj = json.as_object().ok_or_else(|| ConfigError::NotObject {
            file: file.to_path_buf(),
        })?;
        Ok(Fields {
            file,
            obj,
            prefix: String::new(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            file: self.file.to_path_buf(),
            key: self.key(key),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::WrongType {
            file: self.file.to_path_buf(),
            key: self.key(key),
            expected,
            found: short(v),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: self.key(key),
            reason: reason.into(),
        }
    }

    /// The value at `key`, treating JSON null as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// The value at `key` converted by `conv`: `None` when absent, a [`ConfigError::WrongType`]
    /// saying `expected` when `conv` rejects it.
    fn opt<T>(
        &self,
        key: &str,
        expected: &'static str,
        conv: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, expected, v)),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.opt(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(self.invalid(key, "must be > 0"));
        }
        Ok(n)
    }

    /// `n` if it is at most `max`, else an error naming the key.
    fn at_most(&self, key: &str, n: usize, max: usize) -> Result<usize, ConfigError> {
        if n > max {
            return Err(self.invalid(key, format!("{n} exceeds the limit {max}")));
        }
        Ok(n)
    }

    /// A required dimension: > 0 and at most [`MAX_DIM`].
    fn dim(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self.positive(key)?;
        self.at_most(key, n, MAX_DIM)
    }

    /// An optional size, at most [`MAX_DIM`] when present.
    fn opt_dim(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        self.opt_usize(key)?
            .map(|n| self.at_most(key, n, MAX_DIM))
            .transpose()
    }

    /// `a * b` (the width `what`), if it neither overflows nor exceeds [`MAX_DIM`].
    fn product(&self, key: &str, a: usize, b: usize, what: &str) -> Result<usize, ConfigError> {
        match a.checked_mul(b) {
            Some(p) if p <= MAX_DIM => Ok(p),
            _ => Err(self.invalid(
                key,
                format!("{what} = {a} * {b} exceeds the limit {MAX_DIM}"),
            )),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.opt(key, "a number", Value::as_f64)
    }

    /// A required number.
    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.opt(key, "true or false", Value::as_bool)
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        self.opt(key, "a string", Value::as_str)
    }

    fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
        self.opt(key, "an object", Value::as_object)
    }

    fn nested(&self, key: &str, obj: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            file: self.file,
            obj,
            prefix: format!("{}{}.", self.prefix, key),
        }
    }

    /// Token id(s): an integer or a list of integers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        let to_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => {
                if let Some(id) = to_id(v) {
                    return Ok(vec![id]);
                }
                if let Some(arr) = v.as_array() {
                    return arr
                        .iter()
                        .map(|x| {
                            to_id(x).ok_or_else(|| {
                                self.wrong(key, "a token id or a list of token ids", v)
                            })
                        })
                        .collect();
                }
                Err(self.wrong(key, "a token id or a list of token ids", v))
            }
        }
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong(key, "a list of layer indices", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| self.wrong(key, "a list of layer indices", v))
                    })
                    .collect()
            }
        }
    }
}

impl ModelConfig {
    /// Reads and parses `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig, ConfigError> {
        let file = dir.join("config.json");
        let whole_file = |reason: String| ConfigError::Invalid {
            file: file.clone(),
            key: String::new(),
            reason,
        };
        let text =
            std::fs::read_to_string(&file).map_err(|e| whole_file(format!("cannot read: {e}")))?;
        let json: Value =
            serde_json::from_str(&text).map_err(|e| whole_file(format!("invalid JSON: {e}")))?;
        ModelConfig::from_json(&json, &file)
    }

    /// Parses a config.json value; `file` is used in error messages.
    pub fn from_json(json: &Value, file: &Path) -> Result<ModelConfig, ConfigError> {
        let f = Fields::root(json, file)?;

        let arch = parse_arch(&f)?;

        let hidden_size = f.dim("hidden_size")?;
        let num_layers = f.positive("num_hidden_layers")?;
        let num_layers = f.at_most("num_hidden_layers", num_layers, MAX_LAYERS)?;
        let num_heads = f.dim("num_attention_heads")?;
        let num_kv_heads = f.opt_dim("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match f.opt_dim("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(f.invalid(
                        "head_dim",
                        format!("absent, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid("head_dim", format!("{head_dim} must be even and > 0")));
        }
        // The q and k/v projection widths; the decoder multiplies these without checks.
        f.product(
            "num_attention_heads",
            num_heads,
            head_dim,
            "num_attention_heads * head_dim",
        )?;
        f.product(
            "num_key_value_heads",
            num_kv_heads,
            head_dim,
            "num_key_value_heads * head_dim",
        )?;
        let vocab_size = f.dim("vocab_size")?;
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" && act != "swish" {
                return Err(f.invalid(
                    "hidden_act",
                    format!("'{act}' is not supported (only silu)"),
                ));
            }
        }
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        // Every supported architecture's transformers config defaults this to false.
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);

        let rope = parse_rope(&f, head_dim, max_position_embeddings)?;

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            // Qwen2-family attention hard-codes bias on q/k/v and none on o_proj.
            Arch::Qwen2 | Arch::MiMo => (true, false),
            Arch::Qwen2Moe => (f.opt_bool("qkv_bias")?.unwrap_or(true), false),
            Arch::Llama | Arch::Qwen3 | Arch::Qwen3Moe => (attention_bias, attention_bias),
            Arch::Mistral | Arch::Mixtral => (false, false),
        };
        let mlp_bias = match arch {
            Arch::Llama => f.opt_bool("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let qk_norm = matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe);

        let sliding_window = parse_sliding_window(&f, arch, num_layers)?;

        let (moe, moe_layers) = parse_moe(&f, arch, num_layers)?;
        let intermediate_size = match (&moe, f.opt_dim("intermediate_size")?) {
            (_, Some(n)) => n,
            // A model whose every layer is MoE needs no dense size.
            (Some(_), None) if moe_layers.iter().all(|&m| m) => 0,
            _ => return Err(f.missing("intermediate_size")),
        };
        if intermediate_size == 0 && moe_layers.iter().any(|&m| !m) {
            return Err(f.invalid("intermediate_size", "must be > 0 for dense layers"));
        }

        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            sliding_window,
            moe,
            moe_layers,
            eos_token_ids: f.token_ids("eos_token_id")?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
        })
    }

    /// The architecture and `num_hidden_layers` as config.json declares them, without building
    /// per-layer tables or bounding the layer count: a loader checks the declared layers'
    /// tensors exist first, so an absurd count is reported as the first missing layer tensor.
    pub fn declared_layers(json: &Value, file: &Path) -> Result<(Arch, usize), ConfigError> {
        let f = Fields::root(json, file)?;
        Ok((parse_arch(&f)?, f.positive("num_hidden_layers")?))
    }

    /// Query heads per key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// The architecture from `model_type`, or `architectures[0]` when model_type is absent.
fn parse_arch(f: &Fields<'_>) -> Result<Arch, ConfigError> {
    let unsupported = |name: &str| ConfigError::Unsupported {
        file: f.file.to_path_buf(),
        model_type: name.to_string(),
    };
    Ok(match f.opt_str("model_type")? {
        Some(mt) => Arch::from_model_type(mt).ok_or_else(|| unsupported(mt))?,
        None => {
            let class = f
                .get("architectures")
                .and_then(|a| a.as_array())
                .and_then(|a| a.first())
                .and_then(|c| c.as_str())
                .ok_or_else(|| f.missing("model_type"))?;
            Arch::from_class_name(class).ok_or_else(|| unsupported(class))?
        }
    })
}

/// RoPE from `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
fn parse_rope(f: &Fields<'_>, head_dim: usize, max_pos: usize) -> Result<RopeConfig, ConfigError> {
    let params = f.opt_object("rope_parameters")?;
    let (scaling_obj, scaling_key, theta) = match params {
        Some(p) => {
            let pf = f.nested("rope_parameters", p);
            let theta = match pf.opt_f64("rope_theta")? {
                Some(t) => t,
                None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
            };
            (Some(p), "rope_parameters", theta)
        }
        None => (
            f.opt_object("rope_scaling")?,
            "rope_scaling",
            f.opt_f64("rope_theta")?.unwrap_or(10000.0),
        ),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(f.invalid("rope_theta", format!("{theta} must be a finite number > 1")));
    }
    let partial = f.opt_f64("partial_rotary_factor")?.unwrap_or(1.0);
    let rotary_dim = ((head_dim as f64) * partial) as usize;
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
        return Err(f.invalid(
            "partial_rotary_factor",
            format!("gives rotary dim {rotary_dim} for head_dim {head_dim}"),
        ));
    }
    let scaling = match scaling_obj {
        None => RopeScaling::None,
        Some(obj) => {
            let s = f.nested(scaling_key, obj);
            let kind = match s.opt_str("rope_type")? {
                Some(t) => t,
                None => s.opt_str("type")?.unwrap_or("default"),
            };
            let factor = || -> Result<f64, ConfigError> {
                let v = s.f64("factor")?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(s.invalid("factor", format!("{v} must be > 0")));
                }
                Ok(v)
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear { factor: factor()? },
                "llama3" => RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: s.f64("low_freq_factor")?,
                    high_freq_factor: s.f64("high_freq_factor")?,
                    original_max_position_embeddings: s.f64("original_max_position_embeddings")?,
                },
                "yarn" => RopeScaling::Yarn {
                    factor: factor()?,
                    original_max_position_embeddings: s
                        .opt_f64("original_max_position_embeddings")?
                        .unwrap_or(max_pos as f64),
                    beta_fast: s.opt_f64("beta_fast")?.unwrap_or(32.0),
                    beta_slow: s.opt_f64("beta_slow")?.unwrap_or(1.0),
                    attention_factor: s.opt_f64("attention_factor")?,
                    mscale: s.opt_f64("mscale")?,
                    mscale_all_dim: s.opt_f64("mscale_all_dim")?,
                    truncate: s.opt_bool("truncate")?.unwrap_or(true),
                },
                other => {
                    return Err(s.invalid(
                        "rope_type",
                        format!("'{other}' is not supported (default, linear, llama3, yarn)"),
                    ))
                }
            }
        }
    };
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
    })
}

/// Per-layer sliding window, following each architecture's transformers rules.
fn parse_sliding_window(
    f: &Fields<'_>,
    arch: Arch,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, ConfigError> {
    let window = f.opt_usize("sliding_window")?;
    let per_layer = match arch {
        // Mistral and Mixtral apply `sliding_window` (when set) to every layer.
        Arch::Mistral | Arch::Mixtral => vec![window; num_layers],
        // Qwen2-family: only when use_sliding_window, and only from layer max_window_layers on.
        Arch::Qwen2 | Arch::MiMo | Arch::Qwen2Moe | Arch::Qwen3 | Arch::Qwen3Moe => {
            if !f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                vec![None; num_layers]
            } else if let Some(types) = f.get("layer_types") {
                let list = types
                    .as_array()
                    .filter(|a| a.len() == num_layers)
                    .ok_or_else(|| {
                        f.wrong("layer_types", "a list with one entry per layer", types)
                    })?;
                list.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(window),
                        Some("full_attention") => Ok(None),
                        _ => Err(f.wrong(
                            "layer_types",
                            "'full_attention' or 'sliding_attention' entries",
                            t,
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let from = f.opt_usize("max_window_layers")?.unwrap_or(num_layers);
                (0..num_layers)
                    .map(|l| if l >= from { window } else { None })
                    .collect()
            }
        }
        Arch::Llama => vec![None; num_layers],
    };
    if per_layer.contains(&Some(0)) {
        return Err(f.invalid("sliding_window", "must be > 0"));
    }
    Ok(per_layer)
}

/// MoE parameters and which layers are sparse.
fn parse_moe(
    f: &Fields<'_>,
    arch: Arch,
    num_layers: usize,
) -> Result<(Option<MoeConfig>, Vec<bool>), ConfigError> {
    match arch {
        Arch::Mixtral => {
            let num_experts = f.dim("num_local_experts")?;
            let top_k = f.positive("num_experts_per_tok")?;
            let expert_intermediate_size = f.dim("intermediate_size")?;
            check_top_k(f, top_k, num_experts)?;
            // Mixtral always renormalizes the top-k weights.
            let moe = MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                norm_topk_prob: true,
                shared_expert_intermediate_size: None,
            };
            Ok((Some(moe), vec![true; num_layers]))
        }
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            let num_experts = f.dim("num_experts")?;
            let top_k = f.positive("num_experts_per_tok")?;
            check_top_k(f, top_k, num_experts)?;
            let expert_intermediate_size = f.dim("moe_intermediate_size")?;
            let norm_topk_prob = f
                .opt_bool("norm_topk_prob")?
                .unwrap_or(arch == Arch::Qwen3Moe);
            let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1);
            let mlp_only = f.usize_list("mlp_only_layers")?;
            let shared_expert_intermediate_size = if arch == Arch::Qwen2Moe {
                match f.opt_dim("shared_expert_intermediate_size")? {
                    Some(0) | None => None,
                    Some(n) => Some(n),
                }
            } else {
                None
            };
            // transformers: sparse iff not in mlp_only_layers, num_experts > 0 and (l + 1) % step == 0.
            let layers = (0..num_layers)
                .map(|l| !mlp_only.contains(&l) && step > 0 && (l + 1) % step == 0)
                .collect();
            let moe = MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                norm_topk_prob,
                shared_expert_intermediate_size,
            };
            Ok((Some(moe), layers))
        }
        _ => Ok((None, vec![false; num_layers])),
    }
}

fn check_top_k(f: &Fields<'_>, top_k: usize, num_experts: usize) -> Result<(), ConfigError> {
    if top_k > num_experts {
        return Err(f.invalid(
            "num_experts_per_tok",
            format!("{top_k} exceeds the number of experts {num_experts}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(&v, Path::new("/m/config.json"))
    }

    fn llama() -> Value {
        json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 256
        })
    }

    #[test]
    fn llama_defaults_and_gqa() {
        let c = parse(llama()).unwrap();
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.gqa_group(), 2);
        assert_eq!(c.rope.theta, 500000.0);
        assert_eq!(c.rope.scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert!(c.moe.is_none());
    }

    #[test]
    fn llama3_scaling_and_rope_parameters() {
        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(v).unwrap();
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));

        let mut v = llama();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
            "original_max_position_embeddings": 32768});
        let c = parse(v).unwrap();
        assert_eq!(c.rope.theta, 1e6);
        assert!(
            matches!(c.rope.scaling, RopeScaling::Yarn { factor, beta_fast, .. } if factor == 4.0 && beta_fast == 32.0)
        );
    }

    #[test]
    fn qwen_family_flags() {
        let mut v = llama();
        v["model_type"] = json!("qwen2");
        v["tie_word_embeddings"] = json!(true);
        let c = parse(v.clone()).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        v["model_type"] = json!("qwen3");
        v["head_dim"] = json!(32);
        let c = parse(v.clone()).unwrap();
        assert!(c.qk_norm && !c.qkv_bias && c.head_dim == 32);
        v["model_type"] = json!("mimo");
        v["num_nextn_predict_layers"] = json!(1);
        let c = parse(v).unwrap();
        assert_eq!(c.arch, Arch::MiMo);
        assert_eq!(c.num_layers, 2);
    }

    #[test]
    fn qwen3_moe_sparse_layers() {
        let mut v = llama();
        v["model_type"] = json!("qwen3_moe");
        v["num_hidden_layers"] = json!(4);
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(2);
        v["moe_intermediate_size"] = json!(32);
        v["decoder_sparse_step"] = json!(2);
        v["mlp_only_layers"] = json!([3]);
        let c = parse(v).unwrap();
        assert_eq!(c.moe_layers, vec![false, true, false, false]);
        let moe = c.moe.unwrap();
        assert!(moe.norm_topk_prob);
        assert_eq!(
            (moe.num_experts, moe.top_k, moe.expert_intermediate_size),
            (8, 2, 32)
        );
    }

    #[test]
    fn mixtral_and_qwen2_moe() {
        let mut v = llama();
        v["model_type"] = json!("mixtral");
        v["num_local_experts"] = json!(4);
        v["num_experts_per_tok"] = json!(2);
        v["sliding_window"] = json!(64);
        let c = parse(v).unwrap();
        assert_eq!(c.moe.as_ref().unwrap().expert_intermediate_size, 128);
        assert_eq!(c.sliding_window, vec![Some(64), Some(64)]);

        let mut v = llama();
        v["model_type"] = json!("qwen2_moe");
        v["num_experts"] = json!(4);
        v["num_experts_per_tok"] = json!(2);
        v["moe_intermediate_size"] = json!(16);
        v["shared_expert_intermediate_size"] = json!(48);
        let c = parse(v).unwrap();
        let moe = c.moe.unwrap();
        assert_eq!(moe.shared_expert_intermediate_size, Some(48));
        assert!(!moe.norm_topk_prob);
    }

    #[test]
    fn errors_name_file_and_key() {
        let mut v = llama();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("/m/config.json") && e.contains("'hidden_size'"),
            "{e}"
        );

        let mut v = llama();
        v["num_attention_heads"] = json!("four");
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("'num_attention_heads'") && e.contains("integer"),
            "{e}"
        );

        let mut v = llama();
        v["num_key_value_heads"] = json!(3);
        assert!(matches!(parse(v), Err(ConfigError::Invalid { .. })));

        let mut v = llama();
        v["model_type"] = json!("gpt2");
        assert!(matches!(parse(v), Err(ConfigError::Unsupported { .. })));

        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }
    /// Absurd dimensions and products are errors naming the key (F7, F8), never an overflow
    /// panic or a huge allocation; the largest accepted values still parse.
    #[test]
    fn absurd_dimensions_are_errors_naming_the_key() {
        let huge = json!(4611686018427387904u64);
        for key in [
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "num_hidden_layers",
        ] {
            let mut v = llama();
            v[key] = huge.clone();
            let e = parse(v).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { .. }), "{key}: {e}");
            let e = e.to_string();
            assert!(
                e.contains("/m/config.json") && e.contains(key),
                "{key}: {e}"
            );
        }
        // Each factor in range, the product not: heads * head_dim = 2^12 * 2^14 > 2^24.
        let mut v = llama();
        v["num_attention_heads"] = json!(4096);
        v["num_key_value_heads"] = json!(1);
        v["head_dim"] = json!(16384);
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("'num_attention_heads'") && e.contains("exceeds the limit"),
            "{e}"
        );
        let mut v = llama();
        v["num_hidden_layers"] = json!(MAX_LAYERS + 1);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("'num_hidden_layers'"), "{e}");
        // The limits themselves are accepted.
        let mut v = llama();
        v["num_hidden_layers"] = json!(MAX_LAYERS);
        v["vocab_size"] = json!(MAX_DIM);
        v["num_attention_heads"] = json!(4096);
        v["num_key_value_heads"] = json!(4096);
        v["head_dim"] = json!(4096);
        let c = parse(v).unwrap();
        assert_eq!(
            (c.num_layers, c.sliding_window.len()),
            (MAX_LAYERS, MAX_LAYERS)
        );
        // declared_layers does not bound the count (the loader checks tensors first).
        let mut v = llama();
        v["num_hidden_layers"] = json!(100_000_000_000u64);
        let d = ModelConfig::declared_layers(&v, Path::new("/m/config.json")).unwrap();
        assert_eq!(d, (Arch::Llama, 100_000_000_000));
        let mut v = llama();
        v["model_type"] = json!("mixtral");
        v["num_local_experts"] = huge.clone();
        v["num_experts_per_tok"] = json!(2);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("'num_local_experts'"), "{e}");
    }
}
