//! Tiny random checkpoints in the genuine layout of each supported architecture.
//!
//! Tensor names and config.json keys follow the real Hugging Face checkpoints (Llama-3, Mistral-7B,
//! Qwen2, Qwen3, XiaomiMiMo/MiMo-7B with its MTP layer, Mixtral-8x7B, Qwen1.5/Qwen2-MoE, Qwen3-MoE,
//! DeepSeek-V3); only the sizes are tiny. Every dimension a Linear layer multiplies along (its
//! in-features) is a multiple of 32, so NVFP4 and MXFP4 blocks divide them. Values are BF16 and
//! deterministic for a seed: each tensor's stream is seeded from the seed and the tensor name, so
//! tensors can be generated one at a time (the synthetic benchmark checkpoints rely on that).
//!
//! MiMo's MTP tensor names were read from vLLM's `mimo_mtp.py` (`model.mtp_layers.N.` +
//! `token_layernorm`, `hidden_layernorm`, `input_proj` [hidden, 2*hidden], `final_layernorm`, and a
//! Qwen2 decoder block `self_attn.*`, `mlp.*`, `input_layernorm`, `post_attention_layernorm`).

use std::io::Write;
use std::path::Path;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::checkpoint::{
    header_bytes, CheckpointError, DType, HeaderEntry, CONFIG_FILE, INDEX_FILE, SINGLE_FILE,
};

/// The architectures a fixture can be written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// LlamaForCausalLM.
    Llama,
    /// MistralForCausalLM.
    Mistral,
    /// Qwen2ForCausalLM (q/k/v biases).
    Qwen2,
    /// Qwen3ForCausalLM (q/k norms, tied embeddings as the small Qwen3 models have).
    Qwen3,
    /// MiMoForCausalLM (Qwen2 body plus one MTP layer).
    Mimo,
    /// MixtralForCausalLM (block_sparse_moe, w1/w2/w3 experts).
    Mixtral,
    /// Qwen2MoeForCausalLM (experts, shared expert and its gate).
    Qwen2Moe,
    /// Qwen3MoeForCausalLM.
    Qwen3Moe,
    /// DeepseekV3ForCausalLM (MLA, shared experts, first_k_dense_replace, e_score_correction_bias).
    DeepseekV3,
}

impl Arch {
    /// Every architecture.
    pub const ALL: [Arch; 9] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Mimo,
        Arch::Mixtral,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::DeepseekV3,
    ];

    /// The config.json `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mimo => "mimo",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::DeepseekV3 => "deepseek_v3",
        }
    }

    /// The config.json `architectures[0]`.
    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Mimo => "MiMoForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }
}

/// Sizes shared by every tiny fixture.
const HIDDEN: usize = 64;
const INTER: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;
const VOCAB: usize = 256;
const EXPERTS: usize = 4;
const MOE_INTER: usize = 64;

/// What a checkpoint holds: its config and tensor list (names, dtypes, shapes), before any data.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    /// config.json content.
    pub config: Value,
    /// Tensors in the order they are written.
    pub tensors: Vec<HeaderEntry>,
}

impl FixtureSpec {
    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.byte_len()).sum()
    }
}

fn t(name: String, shape: &[usize]) -> HeaderEntry {
    HeaderEntry {
        name,
        dtype: DType::BF16,
        shape: shape.to_vec(),
    }
}

/// Decoder attention (Llama/Qwen family), with optional q/k/v biases and q/k norms.
#[allow(clippy::too_many_arguments)]
fn attention(
    v: &mut Vec<HeaderEntry>,
    p: &str,
    hidden: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    bias: bool,
    qk_norm: bool,
) {
    v.push(t(
        format!("{p}.self_attn.q_proj.weight"),
        &[heads * hd, hidden],
    ));
    v.push(t(
        format!("{p}.self_attn.k_proj.weight"),
        &[kv * hd, hidden],
    ));
    v.push(t(
        format!("{p}.self_attn.v_proj.weight"),
        &[kv * hd, hidden],
    ));
    v.push(t(
        format!("{p}.self_attn.o_proj.weight"),
        &[hidden, heads * hd],
    ));
    if bias {
        v.push(t(format!("{p}.self_attn.q_proj.bias"), &[heads * hd]));
        v.push(t(format!("{p}.self_attn.k_proj.bias"), &[kv * hd]));
        v.push(t(format!("{p}.self_attn.v_proj.bias"), &[kv * hd]));
    }
    if qk_norm {
        v.push(t(format!("{p}.self_attn.q_norm.weight"), &[hd]));
        v.push(t(format!("{p}.self_attn.k_norm.weight"), &[hd]));
    }
}

/// SwiGLU MLP with gate/up/down names under `p` (e.g. `model.layers.0.mlp`).
fn glu(v: &mut Vec<HeaderEntry>, p: &str, hidden: usize, inter: usize) {
    v.push(t(format!("{p}.gate_proj.weight"), &[inter, hidden]));
    v.push(t(format!("{p}.up_proj.weight"), &[inter, hidden]));
    v.push(t(format!("{p}.down_proj.weight"), &[hidden, inter]));
}

fn norms(v: &mut Vec<HeaderEntry>, p: &str, hidden: usize) {
    v.push(t(format!("{p}.input_layernorm.weight"), &[hidden]));
    v.push(t(format!("{p}.post_attention_layernorm.weight"), &[hidden]));
}

fn base_config(arch: Arch, tie: bool) -> Value {
    json!({
        "architectures": [arch.architecture()],
        "model_type": arch.model_type(),
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "transformers_version": "4.51.0"
    })
}

fn set(cfg: &mut Value, pairs: Value) {
    if let (Some(o), Some(p)) = (cfg.as_object_mut(), pairs.as_object()) {
        for (k, v) in p {
            o.insert(k.clone(), v.clone());
        }
    }
}

/// The config and tensor list of the tiny fixture for `arch`.
pub fn spec(arch: Arch) -> FixtureSpec {
    let tie = matches!(arch, Arch::Qwen3);
    let mut cfg = base_config(arch, tie);
    let mut v = vec![t("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN])];
    let qwen_bias = matches!(arch, Arch::Qwen2 | Arch::Mimo | Arch::Qwen2Moe);
    let qk_norm = matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe);
    match arch {
        Arch::Llama => set(
            &mut cfg,
            json!({"head_dim": HEAD_DIM, "attention_bias": false, "mlp_bias": false, "pretraining_tp": 1, "rope_scaling": null}),
        ),
        Arch::Mistral => set(
            &mut cfg,
            json!({"head_dim": HEAD_DIM, "sliding_window": null}),
        ),
        Arch::Qwen2 => set(
            &mut cfg,
            json!({"sliding_window": 4096, "use_sliding_window": false, "max_window_layers": LAYERS}),
        ),
        Arch::Qwen3 => set(
            &mut cfg,
            json!({"head_dim": HEAD_DIM, "attention_bias": false, "sliding_window": null, "use_sliding_window": false, "max_window_layers": LAYERS}),
        ),
        Arch::Mimo => set(
            &mut cfg,
            json!({
                "num_nextn_predict_layers": 1,
                "sliding_window": 4096, "use_sliding_window": false, "max_window_layers": LAYERS,
                "auto_map": {"AutoConfig": "configuration_mimo.MiMoConfig", "AutoModel": "modeling_mimo.MiMoModel", "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM"}
            }),
        ),
        Arch::Mixtral => set(
            &mut cfg,
            json!({"num_local_experts": EXPERTS, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "output_router_logits": false, "sliding_window": null, "head_dim": HEAD_DIM}),
        ),
        Arch::Qwen2Moe => set(
            &mut cfg,
            json!({
                "num_experts": EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": MOE_INTER,
                "shared_expert_intermediate_size": INTER, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": false, "output_router_logits": false, "router_aux_loss_coef": 0.001,
                "sliding_window": 4096, "use_sliding_window": false, "max_window_layers": LAYERS
            }),
        ),
        Arch::Qwen3Moe => set(
            &mut cfg,
            json!({
                "head_dim": HEAD_DIM, "attention_bias": false, "num_experts": EXPERTS, "num_experts_per_tok": 2,
                "moe_intermediate_size": MOE_INTER, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": true, "output_router_logits": false, "router_aux_loss_coef": 0.001,
                "sliding_window": null, "use_sliding_window": false, "max_window_layers": LAYERS
            }),
        ),
        Arch::DeepseekV3 => set(
            &mut cfg,
            json!({
                "num_key_value_heads": HEADS, "moe_intermediate_size": 32, "n_routed_experts": EXPERTS,
                "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
                "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16,
                "v_head_dim": 16, "attention_bias": false, "num_nextn_predict_layers": 0,
                "ep_size": 1, "aux_loss_alpha": 0.001, "seq_aux": true, "rope_scaling": null
            }),
        ),
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        norms(&mut v, &p, HIDDEN);
        if arch == Arch::DeepseekV3 {
            deepseek_layer(&mut v, &p, l);
            continue;
        }
        attention(
            &mut v, &p, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, qwen_bias, qk_norm,
        );
        match arch {
            Arch::Mixtral => {
                v.push(t(
                    format!("{p}.block_sparse_moe.gate.weight"),
                    &[EXPERTS, HIDDEN],
                ));
                for e in 0..EXPERTS {
                    let q = format!("{p}.block_sparse_moe.experts.{e}");
                    v.push(t(format!("{q}.w1.weight"), &[INTER, HIDDEN]));
                    v.push(t(format!("{q}.w2.weight"), &[HIDDEN, INTER]));
                    v.push(t(format!("{q}.w3.weight"), &[INTER, HIDDEN]));
                }
            }
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                v.push(t(format!("{p}.mlp.gate.weight"), &[EXPERTS, HIDDEN]));
                for e in 0..EXPERTS {
                    glu(&mut v, &format!("{p}.mlp.experts.{e}"), HIDDEN, MOE_INTER);
                }
                if arch == Arch::Qwen2Moe {
                    glu(&mut v, &format!("{p}.mlp.shared_expert"), HIDDEN, INTER);
                    v.push(t(
                        format!("{p}.mlp.shared_expert_gate.weight"),
                        &[1, HIDDEN],
                    ));
                }
            }
            _ => glu(&mut v, &format!("{p}.mlp"), HIDDEN, INTER),
        }
    }
    if arch == Arch::Mimo {
        let p = "model.mtp_layers.0";
        v.push(t(format!("{p}.token_layernorm.weight"), &[HIDDEN]));
        v.push(t(format!("{p}.hidden_layernorm.weight"), &[HIDDEN]));
        v.push(t(format!("{p}.input_proj.weight"), &[HIDDEN, 2 * HIDDEN]));
        v.push(t(format!("{p}.final_layernorm.weight"), &[HIDDEN]));
        norms(&mut v, p, HIDDEN);
        attention(&mut v, p, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, true, false);
        glu(&mut v, &format!("{p}.mlp"), HIDDEN, INTER);
    }
    v.push(t("model.norm.weight".into(), &[HIDDEN]));
    if !tie {
        v.push(t("lm_head.weight".into(), &[VOCAB, HIDDEN]));
    }
    FixtureSpec {
        config: cfg,
        tensors: v,
    }
}

fn deepseek_layer(v: &mut Vec<HeaderEntry>, p: &str, layer: usize) {
    let (q_rank, kv_rank, nope, rope, vd) = (32, 32, 16, 16, 16);
    let a = format!("{p}.self_attn");
    v.push(t(format!("{a}.q_a_proj.weight"), &[q_rank, HIDDEN]));
    v.push(t(format!("{a}.q_a_layernorm.weight"), &[q_rank]));
    v.push(t(
        format!("{a}.q_b_proj.weight"),
        &[HEADS * (nope + rope), q_rank],
    ));
    v.push(t(
        format!("{a}.kv_a_proj_with_mqa.weight"),
        &[kv_rank + rope, HIDDEN],
    ));
    v.push(t(format!("{a}.kv_a_layernorm.weight"), &[kv_rank]));
    v.push(t(
        format!("{a}.kv_b_proj.weight"),
        &[HEADS * (nope + vd), kv_rank],
    ));
    v.push(t(format!("{a}.o_proj.weight"), &[HIDDEN, HEADS * vd]));
    // first_k_dense_replace = 1: layer 0 is dense, later layers are MoE.
    if layer == 0 {
        glu(v, &format!("{p}.mlp"), HIDDEN, INTER);
    } else {
        v.push(t(format!("{p}.mlp.gate.weight"), &[EXPERTS, HIDDEN]));
        v.push(t(
            format!("{p}.mlp.gate.e_score_correction_bias"),
            &[EXPERTS],
        ));
        for e in 0..EXPERTS {
            glu(v, &format!("{p}.mlp.experts.{e}"), HIDDEN, 32);
        }
        glu(v, &format!("{p}.mlp.shared_experts"), HIDDEN, 32);
    }
}

/// Sizes of a synthetic Llama-shaped checkpoint (benchmarks).
#[derive(Debug, Clone, Copy)]
pub struct SyntheticSpec {
    /// hidden_size.
    pub hidden: usize,
    /// intermediate_size.
    pub intermediate: usize,
    /// num_hidden_layers.
    pub layers: usize,
    /// num_attention_heads.
    pub heads: usize,
    /// num_key_value_heads.
    pub kv_heads: usize,
    /// vocab_size.
    pub vocab: usize,
}

impl SyntheticSpec {
    /// A Llama-like shape of about `gb` GB of BF16 (hidden 2048, intermediate 8192, vocab 32000).
    pub fn about_gb(gb: f64) -> SyntheticSpec {
        let (hidden, intermediate, vocab) = (2048usize, 8192usize, 32000usize);
        let per_layer =
            2 * (2 * hidden * hidden + 2 * hidden * hidden / 4 + 3 * hidden * intermediate);
        let fixed = 2 * 2 * vocab * hidden;
        let layers = (((gb * 1e9) - fixed as f64) / per_layer as f64)
            .round()
            .max(1.0) as usize;
        SyntheticSpec {
            hidden,
            intermediate,
            layers,
            heads: 16,
            kv_heads: 4,
            vocab,
        }
    }

    /// The config and tensor list.
    pub fn spec(&self) -> FixtureSpec {
        let hd = self.hidden / self.heads;
        let mut cfg = base_config(Arch::Llama, false);
        set(
            &mut cfg,
            json!({
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "head_dim": hd
            }),
        );
        let mut v = vec![t(
            "model.embed_tokens.weight".into(),
            &[self.vocab, self.hidden],
        )];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            norms(&mut v, &p, self.hidden);
            attention(
                &mut v,
                &p,
                self.hidden,
                self.heads,
                self.kv_heads,
                hd,
                false,
                false,
            );
            glu(&mut v, &format!("{p}.mlp"), self.hidden, self.intermediate);
        }
        v.push(t("model.norm.weight".into(), &[self.hidden]));
        v.push(t("lm_head.weight".into(), &[self.vocab, self.hidden]));
        FixtureSpec {
            config: cfg,
            tensors: v,
        }
    }
}

/// How to write a fixture.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Seed of the random values.
    pub seed: u64,
    /// Shard size limit in bytes; `None` writes one model.safetensors.
    pub max_shard_bytes: Option<u64>,
}

/// Writes the tiny fixture of `arch` into `dir` (created if needed) with default options.
pub fn write_fixture(dir: &Path, arch: Arch, seed: u64) -> Result<(), CheckpointError> {
    write_spec(
        dir,
        &spec(arch),
        WriteOptions {
            seed,
            max_shard_bytes: None,
        },
    )
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Deterministic BF16 values of one tensor: norms near 1, biases and weights small and centred
/// with a sprinkle of outliers (so block scales differ), never NaN/Inf.
pub fn tensor_values(entry: &HeaderEntry, seed: u64, out: &mut impl Write) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&entry.name));
    let n: usize = entry.shape.iter().product();
    let is_norm = entry.name.contains("norm");
    let (base, scale) = if is_norm {
        (1.0f32, 0.05f32)
    } else {
        (0.0, 0.04)
    };
    let mut buf = Vec::with_capacity(2 * 65536);
    let mut left = n;
    while left > 0 {
        let m = left.min(65536);
        buf.clear();
        for _ in 0..m {
            // Sum of three uniforms: a cheap bell shape.
            let u: f32 = rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5;
            let outlier = if rng.random::<u32>() % 257 == 0 {
                8.0
            } else {
                1.0
            };
            buf.extend_from_slice(&bf16::from_f32(base + u * scale * outlier).to_le_bytes());
        }
        out.write_all(&buf)?;
        left -= m;
    }
    Ok(())
}

/// Writes `spec` into `dir` (created if needed): config.json, generation_config.json and the
/// weights, one file or shards of at most `max_shard_bytes` with an index. Streams tensor by tensor.
pub fn write_spec(
    dir: &Path,
    spec: &FixtureSpec,
    opts: WriteOptions,
) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg_text = serde_json::to_string_pretty(&spec.config).unwrap_or_default();
    std::fs::write(&cfg_path, cfg_text).map_err(io(&cfg_path))?;
    let gen_path = dir.join("generation_config.json");
    std::fs::write(
        &gen_path,
        r#"{"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.51.0"}"#,
    )
    .map_err(io(&gen_path))?;

    // Split into shards in order.
    let mut shards: Vec<Vec<&HeaderEntry>> = vec![Vec::new()];
    let mut cur = 0u64;
    for e in &spec.tensors {
        let len = e.byte_len();
        if let Some(max) = opts.max_shard_bytes {
            if cur > 0 && cur + len > max {
                shards.push(Vec::new());
                cur = 0;
            }
        }
        cur += len;
        if let Some(last) = shards.last_mut() {
            last.push(e);
        }
    }
    let n = shards.len();
    let sharded = opts.max_shard_bytes.is_some();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = if sharded {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        } else {
            SINGLE_FILE.to_string()
        };
        let path = dir.join(&name);
        let entries: Vec<HeaderEntry> = shard.iter().map(|e| (*e).clone()).collect();
        let f = std::fs::File::create(&path).map_err(io(&path))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&header_bytes(&entries, &[("format".into(), "pt".into())]))
            .map_err(io(&path))?;
        for e in shard {
            tensor_values(e, opts.seed, &mut w).map_err(io(&path))?;
            weight_map.insert(e.name.clone(), Value::String(name.clone()));
        }
        w.flush().map_err(io(&path))?;
    }
    if sharded {
        let index =
            json!({"metadata": {"total_size": spec.total_bytes()}, "weight_map": weight_map});
        let p = dir.join(INDEX_FILE);
        std::fs::write(&p, serde_json::to_string_pretty(&index).unwrap_or_default())
            .map_err(io(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;

    #[test]
    fn every_fixture_opens_small_and_consistent() {
        for arch in Arch::ALL {
            let d = tempfile::tempdir().unwrap();
            write_fixture(d.path(), arch, 7).unwrap();
            let ck = Checkpoint::open(d.path()).unwrap();
            let size = std::fs::metadata(d.path().join(SINGLE_FILE)).unwrap().len();
            assert!(size < 1_000_000, "{arch:?}: {size} bytes");
            assert_eq!(ck.config()["model_type"], arch.model_type());
            assert_eq!(ck.len(), spec(arch).tensors.len());
            let cfg = ck.config();
            let h = cfg["hidden_size"].as_u64().unwrap() as usize;
            for name in ck.tensor_names() {
                let t = ck.tensor(name).unwrap();
                assert_eq!(t.dtype, DType::BF16);
                if t.shape.len() == 2 {
                    assert_eq!(t.shape[1] % 32, 0, "{arch:?} {name}");
                }
                if name.ends_with("layernorm.weight")
                    && !name.contains("_a_")
                    && !name.contains("mtp")
                {
                    assert_eq!(t.shape, [h]);
                }
            }
            assert!(ck.contains("model.embed_tokens.weight"));
            assert_eq!(
                ck.contains("lm_head.weight"),
                !cfg["tie_word_embeddings"].as_bool().unwrap()
            );
        }
    }

    #[test]
    fn fixture_names_are_genuine() {
        let names = |a| {
            spec(a)
                .tensors
                .into_iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
        };
        let m = names(Arch::Mimo);
        assert!(m.contains(&"model.mtp_layers.0.input_proj.weight".to_string()));
        assert!(m.contains(&"model.mtp_layers.0.self_attn.q_proj.bias".to_string()));
        let x = names(Arch::Mixtral);
        assert!(x.contains(&"model.layers.1.block_sparse_moe.experts.3.w3.weight".to_string()));
        let d = names(Arch::DeepseekV3);
        assert!(d.contains(&"model.layers.0.mlp.gate_proj.weight".to_string()));
        assert!(d.contains(&"model.layers.1.mlp.gate.e_score_correction_bias".to_string()));
        assert!(d.contains(&"model.layers.1.mlp.shared_experts.up_proj.weight".to_string()));
        assert!(d.contains(&"model.layers.1.self_attn.kv_a_proj_with_mqa.weight".to_string()));
        let q = names(Arch::Qwen2Moe);
        assert!(q.contains(&"model.layers.0.mlp.shared_expert_gate.weight".to_string()));
    }

    #[test]
    fn values_are_deterministic_and_random() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        write_fixture(d1.path(), Arch::Llama, 3).unwrap();
        write_fixture(d2.path(), Arch::Llama, 3).unwrap();
        let a = std::fs::read(d1.path().join(SINGLE_FILE)).unwrap();
        assert_eq!(a, std::fs::read(d2.path().join(SINGLE_FILE)).unwrap());
        let ck = Checkpoint::open(d1.path()).unwrap();
        let w = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        let vals: Vec<f32> = w
            .data
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert!(vals.iter().all(|x| x.is_finite()));
        let distinct: std::collections::BTreeSet<u32> = vals.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > vals.len() / 8);
    }

    #[test]
    fn sharded_fixture_opens() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(Arch::Qwen2Moe);
        write_spec(
            d.path(),
            &s,
            WriteOptions {
                seed: 1,
                max_shard_bytes: Some(200_000),
            },
        )
        .unwrap();
        let ck = Checkpoint::open(d.path()).unwrap();
        assert!(ck.files().count() > 1);
        assert_eq!(ck.len(), s.tensors.len());
    }

    #[test]
    fn synthetic_size_is_close() {
        let s = SyntheticSpec::about_gb(2.0).spec();
        let gb = s.total_bytes() as f64 / 1e9;
        assert!((1.8..2.2).contains(&gb), "{gb}");
    }
}
