//! Architecture rules: which tensors of a checkpoint are quantizable Linear weights, which stay
//! dense and why, and which Linear layers an engine fuses (and so must share a global scale).

use serde_json::Value;

/// Known architectures, from config.json `model_type` / `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama, Mistral, Qwen2, Qwen3 (dense decoder with q/k/v/o and gate/up/down).
    Dense,
    /// MiMo: the Qwen2 body plus MTP layers (`model.mtp_layers.N.*`).
    Mimo,
    /// Mixtral: `block_sparse_moe.experts.E.{w1,w2,w3}`.
    Mixtral,
    /// Qwen2-MoE / Qwen3-MoE: `mlp.experts.E.*`, optional shared expert.
    QwenMoe,
    /// DeepSeek-V2/V3: MLA attention, routed and shared experts.
    Deepseek,
    /// Anything else: the generic rule.
    Unknown,
}

/// Identifies the family and a display name from config.json.
pub fn family(config: &Value) -> (Family, String) {
    let mt = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let arch = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let fam = match (mt, arch) {
        ("llama" | "mistral" | "qwen2" | "qwen3", _) => Family::Dense,
        (
            _,
            "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM",
        ) => Family::Dense,
        ("mimo", _) | (_, "MiMoForCausalLM") => Family::Mimo,
        ("mixtral", _) | (_, "MixtralForCausalLM") => Family::Mixtral,
        ("qwen2_moe" | "qwen3_moe", _) | (_, "Qwen2MoeForCausalLM" | "Qwen3MoeForCausalLM") => {
            Family::QwenMoe
        }
        ("deepseek_v2" | "deepseek_v3", _)
        | (_, "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM") => Family::Deepseek,
        _ => Family::Unknown,
    };
    let name = if arch.is_empty() {
        mt.to_string()
    } else {
        arch.to_string()
    };
    (
        fam,
        if name.is_empty() {
            "unknown".into()
        } else {
            name
        },
    )
}

/// Why a tensor stays dense by default.
pub fn default_keep_reason(name: &str) -> Option<&'static str> {
    let leaf_module = name.strip_suffix(".weight").unwrap_or(name);
    if name.contains("embed_tokens")
        || name.contains("word_embeddings")
        || name.ends_with("wte.weight")
    {
        return Some("embedding");
    }
    if leaf_module == "lm_head" || leaf_module.ends_with(".lm_head") {
        return Some("lm_head");
    }
    if name.contains("norm") {
        return Some("norm");
    }
    if name.ends_with(".bias") || name.ends_with("e_score_correction_bias") {
        return Some("bias");
    }
    let leaf = leaf_module.rsplit('.').next().unwrap_or("");
    if matches!(leaf, "gate" | "router" | "shared_expert_gate") {
        return Some("router/gate");
    }
    None
}

/// Leaf names of quantizable Linear layers per family (the module name's last component).
fn linear_leaves(fam: Family) -> &'static [&'static str] {
    match fam {
        Family::Dense | Family::Mimo | Family::QwenMoe => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        Family::Mixtral => &["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
        Family::Deepseek => &[
            "q_proj",
            "q_a_proj",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_b_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        Family::Unknown => &[],
    }
}

/// The rule's verdict for one 2-D `.weight` tensor that no default keeps dense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A Linear weight to quantize.
    Linear,
    /// Stays dense: the reason.
    Keep(String),
}

/// Classifies a 2-D `.weight` of a known family (generic rule for unknown ones).
pub fn classify(fam: Family, name: &str) -> Verdict {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let leaf = module.rsplit('.').next().unwrap_or("");
    if fam == Family::Mimo && module.contains(".mtp_layers.") && leaf == "input_proj" {
        // vLLM's MiMo MTP (mimo_mtp.py) builds input_proj as a plain nn.Linear, which cannot
        // load quantized weights.
        return Verdict::Keep("MTP input_proj (plain nn.Linear in engines)".into());
    }
    if fam == Family::Unknown || linear_leaves(fam).contains(&leaf) {
        Verdict::Linear
    } else {
        Verdict::Keep(format!("not a Linear projection of {fam:?}"))
    }
}

/// Whether a Linear module belongs to a routed expert (`...experts.N.gate_proj`, Mixtral's
/// `block_sparse_moe.experts.N.w1`): a path component `experts`, which shared experts
/// (`shared_expert`, `shared_experts`) do not have.
pub fn is_routed_expert(module: &str) -> bool {
    module.split('.').any(|c| c == "experts")
}

/// The fused set a Linear belongs to (engines run them as one GEMM with one global scale):
/// q/k/v of an attention block, gate/up of an MLP (dense, each expert, shared experts),
/// Mixtral's w1/w3 per expert, and DeepSeek MLA's q_a_proj + kv_a_proj_with_mqa (vLLM's
/// fused_qkv_a_proj). Returns a key shared by the members.
pub fn fused_group(module: &str) -> Option<String> {
    let (parent, leaf) = module.rsplit_once('.')?;
    let tag = match leaf {
        "q_proj" | "k_proj" | "v_proj" => "qkv",
        "gate_proj" | "up_proj" => "gate_up",
        "w1" | "w3" if parent.contains("experts") => "w13",
        "q_a_proj" | "kv_a_proj_with_mqa" => "qkv_a",
        _ => return None,
    };
    Some(format!("{parent}.{tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routed_experts() {
        for m in [
            "model.layers.3.mlp.experts.17.gate_proj",
            "model.layers.0.block_sparse_moe.experts.2.w1",
            "experts.0.down_proj",
        ] {
            assert!(is_routed_expert(m), "{m}");
        }
        for m in [
            "model.layers.3.mlp.shared_expert.gate_proj",
            "model.layers.3.mlp.shared_experts.down_proj",
            "model.layers.3.self_attn.q_proj",
            "model.layers.3.mlp.gate_proj",
            "model.layers.3.mlp.gate",
            "lm_head",
            "model.layers.1.mlp.experts_bias",
        ] {
            assert!(!is_routed_expert(m), "{m}");
        }
    }

    #[test]
    fn families() {
        assert_eq!(family(&json!({"model_type": "qwen3"})).0, Family::Dense);
        assert_eq!(
            family(&json!({"architectures": ["MiMoForCausalLM"], "model_type": "mimo"})).0,
            Family::Mimo
        );
        assert_eq!(
            family(&json!({"model_type": "deepseek_v3"})).0,
            Family::Deepseek
        );
        assert_eq!(family(&json!({"model_type": "gpt2"})).0, Family::Unknown);
    }

    #[test]
    fn keep_defaults() {
        assert_eq!(
            default_keep_reason("model.embed_tokens.weight"),
            Some("embedding")
        );
        assert_eq!(default_keep_reason("lm_head.weight"), Some("lm_head"));
        assert_eq!(
            default_keep_reason("model.layers.0.input_layernorm.weight"),
            Some("norm")
        );
        assert_eq!(
            default_keep_reason("model.layers.1.mlp.gate.weight"),
            Some("router/gate")
        );
        assert_eq!(
            default_keep_reason("model.layers.1.block_sparse_moe.gate.weight"),
            Some("router/gate")
        );
        assert_eq!(
            default_keep_reason("model.layers.1.mlp.shared_expert_gate.weight"),
            Some("router/gate")
        );
        assert_eq!(
            default_keep_reason("model.layers.1.mlp.gate.e_score_correction_bias"),
            Some("bias")
        );
        assert_eq!(
            default_keep_reason("model.layers.1.mlp.gate_proj.weight"),
            None
        );
    }

    #[test]
    fn groups() {
        assert_eq!(
            fused_group("model.layers.0.self_attn.k_proj").as_deref(),
            Some("model.layers.0.self_attn.qkv")
        );
        assert_eq!(
            fused_group("model.layers.0.mlp.experts.3.up_proj").as_deref(),
            Some("model.layers.0.mlp.experts.3.gate_up")
        );
        assert_eq!(
            fused_group("model.layers.0.block_sparse_moe.experts.1.w3").as_deref(),
            Some("model.layers.0.block_sparse_moe.experts.1.w13")
        );
        assert_eq!(
            fused_group("model.layers.0.block_sparse_moe.experts.1.w2"),
            None
        );
        assert_eq!(fused_group("model.layers.0.self_attn.o_proj"), None);
        assert_eq!(
            fused_group("model.layers.0.self_attn.kv_a_proj_with_mqa").as_deref(),
            Some("model.layers.0.self_attn.qkv_a")
        );
    }

    #[test]
    fn mimo_mtp_input_proj_is_kept() {
        assert!(matches!(
            classify(Family::Mimo, "model.mtp_layers.0.input_proj.weight"),
            Verdict::Keep(_)
        ));
        assert_eq!(
            classify(Family::Mimo, "model.mtp_layers.0.self_attn.q_proj.weight"),
            Verdict::Linear
        );
        assert_eq!(
            classify(
                Family::Mixtral,
                "model.layers.0.block_sparse_moe.experts.0.w2.weight"
            ),
            Verdict::Linear
        );
        assert!(matches!(
            classify(Family::Dense, "model.layers.0.mlp.w1.weight"),
            Verdict::Keep(_)
        ));
    }
}
