//! `mimo-quant.json`: what produced a checkpoint, from what, with which options, how well each
//! tensor was quantized, and the sha256 of every file. Deterministic: no timestamps, no thread
//! counts, sorted maps.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the manifest in the output folder.
pub const MANIFEST_FILE: &str = "mimo-quant.json";

/// One file and its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// File name relative to its folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// Where the input came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The source folder as given.
    pub path: String,
    /// Hub repository and revision, when the source was downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Revision of `repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// config.json, index and weight files with their hashes.
    pub files: Vec<FileHash>,
}

/// Options that shaped the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptionsInfo {
    /// nvfp4 / mxfp4.
    pub format: String,
    /// On-disk layout name.
    pub layout: String,
    /// Quantization method.
    pub method: String,
    /// --ignore patterns.
    pub ignore: Vec<String>,
    /// --quantize-lm-head.
    pub quantize_lm_head: bool,
    /// --experts-only (written only when set, so other manifests read as before).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub experts_only: bool,
    /// --max-shard-size in bytes.
    pub max_shard_size: u64,
}

/// One source tensor's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// "quantized" or "kept".
    pub action: String,
    /// Why kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Source dtype.
    pub dtype: String,
    /// Source shape.
    pub shape: Vec<usize>,
    /// Fused set sharing the global scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_group: Option<String>,
    /// Stored per-tensor scale (global_scale or weight_scale_2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_scale: Option<f32>,
    /// Signal-to-quantization-noise ratio in dB (null when exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqnr_db: Option<f64>,
    /// Largest absolute error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_err: Option<f32>,
}

/// Tool identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// "mimo-quant".
    pub name: String,
    /// Crate version.
    pub version: String,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Producer.
    pub tool: ToolInfo,
    /// Input.
    pub source: SourceInfo,
    /// Options.
    pub options: OptionsInfo,
    /// Architecture name.
    pub architecture: String,
    /// Per source tensor.
    pub tensors: BTreeMap<String, TensorRecord>,
    /// Every output file except the manifest, sorted by name.
    pub files: Vec<FileHash>,
}

impl Manifest {
    /// Reads a manifest from an output folder.
    pub fn read(dir: &Path) -> std::io::Result<Manifest> {
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE))?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// sha256 of a file, read in 1 MiB chunks (page cache, not our resident memory).
pub fn sha256_file(path: &Path) -> std::io::Result<FileHash> {
    sha256_file_until(path, &|| false)
}

/// [`sha256_file`] that gives up with `ErrorKind::Interrupted` once `stop()` returns true.
pub fn sha256_file_until(path: &Path, stop: &dyn Fn() -> bool) -> std::io::Result<FileHash> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        if stop() {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileHash {
        name,
        bytes,
        sha256: hex::encode(h.finalize()),
    })
}
