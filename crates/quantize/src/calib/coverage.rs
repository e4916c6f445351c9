//! Expert coverage: how many calibration tokens each routed expert received, and which experts
//! fell under the threshold and were measured on every token of their layer's MoE input instead
//! (measurement only: the forward pass keeps the model's real routing).

use std::fmt::Write as _;

/// One expert's calibration tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpertCoverage {
    /// Decoder layer.
    pub layer: usize,
    /// Expert index within the layer.
    pub expert: usize,
    /// Tokens the router sent to it.
    pub tokens: u64,
    /// True if its statistics come from all tokens of the layer's MoE input (tokens < threshold).
    pub all_token_fallback: bool,
}

/// Coverage of every routed expert of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    /// Experts with fewer routed tokens than this use the all-token statistics.
    pub min_tokens: u64,
    /// Tokens that reached each MoE layer (all calibration tokens).
    pub tokens_per_layer: u64,
    /// Experts per layer.
    pub experts_per_layer: usize,
    /// Every expert, by layer then expert.
    pub experts: Vec<ExpertCoverage>,
}

impl Coverage {
    /// Experts that received no token at all.
    pub fn unrouted(&self) -> usize {
        self.experts.iter().filter(|e| e.tokens == 0).count()
    }

    /// Experts measured on all tokens because they received fewer than `min_tokens`.
    pub fn fallbacks(&self) -> usize {
        self.experts.iter().filter(|e| e.all_token_fallback).count()
    }

    /// A table: one line per MoE layer, one column per expert (tokens; `*` marks an all-token
    /// fallback), then a summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.experts.is_empty() {
            s.push_str("no routed experts (dense model)\n");
            return s;
        }
        let _ = write!(s, "{:>6}", "layer");
        for e in 0..self.experts_per_layer {
            let _ = write!(s, " {:>8}", format!("e{e}"));
        }
        s.push_str("      min      max\n");
        for row in self.experts.chunks(self.experts_per_layer.max(1)) {
            let _ = write!(s, "{:>6}", row[0].layer);
            for e in row {
                let mark = if e.all_token_fallback { "*" } else { "" };
                let _ = write!(s, " {:>8}", format!("{}{mark}", e.tokens));
            }
            let min = row.iter().map(|e| e.tokens).min().unwrap_or(0);
            let max = row.iter().map(|e| e.tokens).max().unwrap_or(0);
            let _ = writeln!(s, " {min:>8} {max:>8}");
        }
        let _ = writeln!(
            s,
            "{} experts, {} tokens per MoE layer, threshold {}: {} under it (marked *, statistics from all {} tokens of the layer's MoE input, measurement only; routing unchanged), {} got no token",
            self.experts.len(),
            self.tokens_per_layer,
            self.min_tokens,
            self.fallbacks(),
            self.tokens_per_layer,
            self.unrouted()
        );
        s
    }
}
