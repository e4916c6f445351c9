//! Architecture rules: the tensor names each supported architecture uses in its checkpoints.
//!
//! Linear names are returned without the `.weight` suffix (the FP4 layouts attach their own
//! suffixes to the same base name).

use crate::config::Arch;

/// Tensor naming of one architecture.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    arch: Arch,
}

impl Names {
    /// Names for `arch`.
    pub fn new(arch: Arch) -> Names {
        Names { arch }
    }

    /// Token embedding (Linear base name; the weight is `[vocab, hidden]`).
    pub fn embed(&self) -> String {
        "model.embed_tokens".into()
    }

    /// Output projection (Linear base name).
    pub fn lm_head(&self) -> String {
        "lm_head".into()
    }

    /// Final RMSNorm weight.
    pub fn final_norm(&self) -> String {
        "model.norm.weight".into()
    }

    /// Pre-attention RMSNorm weight of layer `l`.
    pub fn input_norm(&self, l: usize) -> String {
        format!("model.layers.{l}.input_layernorm.weight")
    }

    /// Pre-MLP RMSNorm weight of layer `l`.
    pub fn post_attention_norm(&self, l: usize) -> String {
        format!("model.layers.{l}.post_attention_layernorm.weight")
    }

    /// Attention module `part` (q_proj, k_proj, v_proj, o_proj, q_norm, k_norm) of layer `l`.
    pub fn attn(&self, l: usize, part: &str) -> String {
        format!("model.layers.{l}.self_attn.{part}")
    }

    /// Dense MLP [gate, up, down] of layer `l`.
    pub fn mlp(&self, l: usize) -> [String; 3] {
        let p = format!("model.layers.{l}.mlp");
        [
            format!("{p}.gate_proj"),
            format!("{p}.up_proj"),
            format!("{p}.down_proj"),
        ]
    }

    /// Router of MoE layer `l`.
    pub fn router(&self, l: usize) -> String {
        match self.arch {
            Arch::Mixtral => format!("model.layers.{l}.block_sparse_moe.gate"),
            _ => format!("model.layers.{l}.mlp.gate"),
        }
    }

    /// Expert `e` [gate, up, down] of MoE layer `l` (Mixtral: w1, w3, w2).
    pub fn expert(&self, l: usize, e: usize) -> [String; 3] {
        match self.arch {
            Arch::Mixtral => {
                let p = format!("model.layers.{l}.block_sparse_moe.experts.{e}");
                [format!("{p}.w1"), format!("{p}.w3"), format!("{p}.w2")]
            }
            _ => {
                let p = format!("model.layers.{l}.mlp.experts.{e}");
                [
                    format!("{p}.gate_proj"),
                    format!("{p}.up_proj"),
                    format!("{p}.down_proj"),
                ]
            }
        }
    }

    /// Shared expert [gate, up, down] of MoE layer `l` (Qwen2-MoE).
    pub fn shared_expert(&self, l: usize) -> [String; 3] {
        let p = format!("model.layers.{l}.mlp.shared_expert");
        [
            format!("{p}.gate_proj"),
            format!("{p}.up_proj"),
            format!("{p}.down_proj"),
        ]
    }

    /// Sigmoid gate of the shared expert of layer `l` (Linear `[1, hidden]`).
    pub fn shared_expert_gate(&self, l: usize) -> String {
        format!("model.layers.{l}.mlp.shared_expert_gate")
    }

    /// True for tensors the runtime never reads for generation (MiMo's multi-token-prediction
    /// layers).
    pub fn is_ignored(&self, name: &str) -> bool {
        self.arch == Arch::MiMo && name.starts_with("model.mtp_layers.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_expert_order_is_gate_up_down() {
        let n = Names::new(Arch::Mixtral);
        let [g, u, d] = n.expert(1, 3);
        assert_eq!(g, "model.layers.1.block_sparse_moe.experts.3.w1");
        assert_eq!(u, "model.layers.1.block_sparse_moe.experts.3.w3");
        assert_eq!(d, "model.layers.1.block_sparse_moe.experts.3.w2");
        assert_eq!(n.router(0), "model.layers.0.block_sparse_moe.gate");
        let q = Names::new(Arch::Qwen3Moe);
        assert_eq!(q.router(2), "model.layers.2.mlp.gate");
        assert!(Names::new(Arch::MiMo).is_ignored("model.mtp_layers.0.input_layernorm.weight"));
    }
}
