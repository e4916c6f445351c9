//! Which layout a checkpoint is in, from its config and tensor names.

use crate::checkpoint::{Checkpoint, DType};

use super::{Layout, HF_QUANT_CONFIG_FILE};

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// No quantization: dense BF16/F16/F32 weights.
    Dense,
    /// One of the FP4 layouts we read and write.
    Fp4(Layout),
    /// gpt-oss style MXFP4 (`quant_method: mxfp4`, `_blocks`/`_scales` tensors): recognised, not loaded.
    GptOssMxfp4,
    /// Some other quantization (FP8, GPTQ, AWQ, ...): the method name or the tell-tale tensor.
    Other(String),
}

impl Detected {
    /// True unless dense.
    pub fn is_quantized(&self) -> bool {
        !matches!(self, Detected::Dense)
    }
}

/// Detects the layout of `ck`: first from `quantization_config` / hf_quant_config.json, then
/// (for checkpoints without a config entry) from tensor names and dtypes.
pub fn detect(ck: &Checkpoint) -> Detected {
    let qc = ck.config().get("quantization_config");
    if let Some(qc) = qc {
        let method = qc
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if method == "compressed-tensors" {
            let mut formats: Vec<&str> = qc
                .get("format")
                .and_then(|f| f.as_str())
                .into_iter()
                .collect();
            if let Some(groups) = qc.get("config_groups").and_then(|g| g.as_object()) {
                formats.extend(
                    groups
                        .values()
                        .filter_map(|g| g.get("format").and_then(|f| f.as_str())),
                );
            }
            if formats.contains(&"nvfp4-pack-quantized") {
                return Detected::Fp4(Layout::CtNvfp4);
            }
            if formats.contains(&"mxfp4-pack-quantized") {
                return Detected::Fp4(Layout::CtMxfp4);
            }
            return Detected::Other(format!(
                "compressed-tensors {}",
                formats.first().unwrap_or(&"?")
            ));
        }
        if method.starts_with("modelopt") {
            let algo = qc
                .get("quant_algo")
                .and_then(|a| a.as_str())
                .unwrap_or("")
                .to_ascii_uppercase();
            if algo.contains("NVFP4") || algo.contains("FP4") {
                return Detected::Fp4(Layout::ModelOptNvfp4);
            }
            return Detected::Other(format!("modelopt {algo}"));
        }
        if method == "mxfp4" {
            return Detected::GptOssMxfp4;
        }
        if !method.is_empty() {
            return Detected::Other(method);
        }
    }
    let hf = ck.root().join(HF_QUANT_CONFIG_FILE);
    if let Ok(text) = std::fs::read_to_string(&hf) {
        let algo = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/quantization/quant_algo")
                    .and_then(|a| a.as_str())
                    .map(str::to_ascii_uppercase)
            })
            .unwrap_or_default();
        if algo.contains("NVFP4") {
            return Detected::Fp4(Layout::ModelOptNvfp4);
        }
        return Detected::Other(format!("modelopt {algo}"));
    }
    from_tensors(ck)
}

fn from_tensors(ck: &Checkpoint) -> Detected {
    for name in ck.tensor_names() {
        if let Some(module) = name.strip_suffix(".weight_packed") {
            let scale = ck
                .tensor(&format!("{module}.weight_scale"))
                .ok()
                .map(|t| t.dtype);
            return match scale {
                Some(DType::F8_E4M3) => Detected::Fp4(Layout::CtNvfp4),
                Some(DType::U8) | Some(DType::F8_E8M0) => Detected::Fp4(Layout::CtMxfp4),
                _ => Detected::Other(format!("tensor {name}")),
            };
        }
        if name.ends_with(".weight_scale_2") {
            return Detected::Fp4(Layout::ModelOptNvfp4);
        }
        if name.ends_with("_blocks") && ck.contains(&name.replace("_blocks", "_scales")) {
            return Detected::GptOssMxfp4;
        }
    }
    // No FP4 tell: look for other quantizations' tensors.
    for name in ck.tensor_names() {
        let quant_suffix = [
            ".qweight",
            ".qzeros",
            ".weight_scale",
            ".weight_scale_inv",
            ".scales",
            ".absmax",
        ];
        if quant_suffix.iter().any(|s| name.ends_with(s)) {
            return Detected::Other(format!("tensor {name}"));
        }
        if let Ok(t) = ck.tensor(name) {
            if matches!(t.dtype, DType::F8_E4M3 | DType::F8_E5M2 | DType::F4)
                && name.ends_with(".weight")
            {
                return Detected::Other(format!("{} weight {name}", t.dtype));
            }
        }
    }
    Detected::Dense
}

/// Modules (weight names without `.weight`) stored quantized in `layout`, sorted.
pub fn quantized_modules(ck: &Checkpoint, layout: Layout) -> Vec<String> {
    let suffix = match layout {
        Layout::CtNvfp4 | Layout::CtMxfp4 => ".weight_packed",
        Layout::ModelOptNvfp4 => ".weight_scale_2",
    };
    ck.tensor_names()
        .filter_map(|n| n.strip_suffix(suffix))
        .map(str::to_string)
        .collect()
}
