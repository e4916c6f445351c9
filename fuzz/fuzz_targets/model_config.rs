//! ModelConfig::from_json on arbitrary JSON (seeded with real config.json files): a typed error
//! or a config, never a panic (overflow, division by zero, huge allocation).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mimo_runtime::config::ModelConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ModelConfig::from_json(&v, Path::new("config.json"));
    }
});
