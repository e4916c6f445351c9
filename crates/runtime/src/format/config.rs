//! The JSON that declares a layout: config.json `quantization_config` and ModelOpt's
//! hf_quant_config.json.
//!
//! compressed-tensors keys follow llm-compressor's NVFP4 exports (config_groups.group_0 with
//! targets ["Linear"], weights {num_bits 4, type "float", strategy "tensor_group", group_size 16,
//! symmetric, dynamic false}, format, ignore, quant_method "compressed-tensors",
//! quantization_status "compressed"), and the compressed-tensors presets in
//! quantization/quant_scheme.py: NVFP4A16 (weights only, what we write: input_activations null),
//! MXFP4A16 (strategy "group", group_size 32, scale_dtype uint8). ModelOpt keys follow vLLM's
//! modelopt.py `ModelOptQuantConfigBase.from_config`: hf_quant_config.json needs
//! `quantization.{quant_algo, kv_cache_quant_algo, group_size, exclude_modules}`; config.json's
//! form is `{quant_method: "modelopt", quant_algo, group_size, ignore}`. We write
//! `W4A16_NVFP4` (weights only; vLLM's `ModelOptNvFp4W4A16LinearMethod`) because we have no
//! calibrated activation `input_scale`, which the W4A4 `NVFP4` method requires.

use serde_json::{json, Value};

use super::Layout;

/// File name of ModelOpt's quantization config.
pub const HF_QUANT_CONFIG_FILE: &str = "hf_quant_config.json";

/// ModelOpt quant_algo we write (weight-only NVFP4).
pub const MODELOPT_QUANT_ALGO: &str = "W4A16_NVFP4";

/// The `quantization_config` object for config.json. `ignore` lists the Linear modules (names
/// without `.weight`) left dense; `version` is the producing tool's version.
pub fn quantization_config(layout: Layout, ignore: &[String], version: &str) -> Value {
    match layout {
        Layout::CtNvfp4 | Layout::CtMxfp4 => {
            let (strategy, group, scale_dtype) = match layout {
                Layout::CtNvfp4 => ("tensor_group", 16, "float8_e4m3fn"),
                _ => ("group", 32, "uint8"),
            };
            json!({
                "config_groups": {
                    "group_0": {
                        "format": layout.name(),
                        "input_activations": null,
                        "output_activations": null,
                        "targets": ["Linear"],
                        "weights": {
                            "actorder": null,
                            "block_structure": null,
                            "dynamic": false,
                            "group_size": group,
                            "num_bits": 4,
                            "observer": "minmax",
                            "observer_kwargs": {},
                            "scale_dtype": scale_dtype,
                            "strategy": strategy,
                            "symmetric": true,
                            "type": "float"
                        }
                    }
                },
                "format": layout.name(),
                "global_compression_ratio": null,
                "ignore": ignore,
                "kv_cache_scheme": null,
                "quant_method": "compressed-tensors",
                "quantization_status": "compressed",
                "producer": {"name": "mimo-quant", "version": version}
            })
        }
        Layout::ModelOptNvfp4 => json!({
            "quant_method": "modelopt",
            "quant_algo": MODELOPT_QUANT_ALGO,
            "group_size": 16,
            "kv_cache_scheme": null,
            "ignore": ignore,
            "producer": {"name": "mimo-quant", "version": version}
        }),
    }
}

/// hf_quant_config.json content, for the ModelOpt layout only.
pub fn hf_quant_config(layout: Layout, exclude: &[String], version: &str) -> Option<Value> {
    (layout == Layout::ModelOptNvfp4).then(|| {
        json!({
            "producer": {"name": "mimo-quant", "version": version},
            "quantization": {
                "quant_algo": MODELOPT_QUANT_ALGO,
                "kv_cache_quant_algo": null,
                "group_size": 16,
                "exclude_modules": exclude
            }
        })
    })
}
