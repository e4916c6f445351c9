//! Shared by the folder-level targets: lay fuzz input out as a checkpoint folder.

use std::path::PathBuf;

/// Splits `data` on `\n--\n` into at most three parts: config.json, shard index (empty = none),
/// and model.safetensors (or the index's single shard); writes them into a per-process folder.
pub fn write_folder(data: &[u8], config_prefix: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mimo-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < 2 {
        match rest.windows(4).position(|w| w == b"\n--\n") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 4..];
            }
            None => break,
        }
    }
    parts.push(rest);
    let (config, index, shard): (Vec<u8>, &[u8], &[u8]) = match parts.len() {
        1 => (b"{}".to_vec(), &[], parts[0]),
        2 => (parts[0].to_vec(), &[], parts[1]),
        _ => (parts[0].to_vec(), parts[1], parts[2]),
    };
    let config = match config_prefix {
        // A fixed quantization_config so the FP4 paths are reached; the fuzz input's config
        // object (when it is one) is merged over it.
        Some(prefix) => {
            let mut base: serde_json::Value = serde_json::from_str(prefix).expect("prefix");
            if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(&config) {
                for (k, v) in m {
                    base[k] = v;
                }
            }
            base.to_string().into_bytes()
        }
        None => config,
    };
    std::fs::write(dir.join("config.json"), config).expect("write");
    if index.is_empty() {
        std::fs::write(dir.join("model.safetensors"), shard).expect("write");
    } else {
        std::fs::write(dir.join("model.safetensors.index.json"), index).expect("write");
        std::fs::write(dir.join("model-00001-of-00001.safetensors"), shard).expect("write");
    }
    dir
}
