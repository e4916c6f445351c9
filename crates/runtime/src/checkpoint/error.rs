//! Typed errors of checkpoint reading; each names the file and, where there is one, the tensor.

use std::path::PathBuf;

/// Why a checkpoint folder or one of its files cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The folder has no config.json.
    #[error("{dir}: no config.json in the checkpoint folder")]
    MissingConfig { dir: PathBuf },
    /// A file could not be opened, read or memory-mapped.
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// config.json is not a JSON object.
    #[error("{file}: invalid config JSON: {reason}")]
    ConfigJson { file: PathBuf, reason: String },
    /// The folder has neither model.safetensors nor model.safetensors.index.json nor any *.safetensors.
    #[error("{dir}: no model.safetensors, model.safetensors.index.json or *.safetensors file")]
    NoWeights { dir: PathBuf },
    /// model.safetensors.index.json is not valid (bad JSON or no weight_map of strings).
    #[error("{file}: invalid index: {reason}")]
    IndexJson { file: PathBuf, reason: String },
    /// The index names a shard outside the folder (absolute path or `..`).
    #[error("{index}: shard '{shard}' (tensor '{tensor}') is not a plain file name inside the checkpoint folder")]
    UnsafeShardPath {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// The index names a shard file that does not exist.
    #[error("{index}: shard '{shard}' (named for tensor '{tensor}') does not exist")]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// The index places a tensor in a shard that does not hold it.
    #[error("{index}: tensor '{tensor}' is mapped to '{shard}', which does not contain it")]
    IndexMismatch {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    /// The file is too short to hold its 8-byte header length and the header.
    #[error("{file}: truncated safetensors file: {len} bytes, header needs {needed}")]
    TruncatedHeader {
        file: PathBuf,
        len: u64,
        needed: u64,
    },
    /// The data section ends before a tensor's bytes do.
    #[error("{file}: truncated safetensors file: tensor '{tensor}' ends at data byte {end}, the data section has {data_len}")]
    Truncated {
        file: PathBuf,
        tensor: String,
        end: u64,
        data_len: u64,
    },
    /// The header length field exceeds the limit.
    #[error("{file}: safetensors header of {len} bytes exceeds the {limit}-byte limit")]
    HeaderTooLarge { file: PathBuf, len: u64, limit: u64 },
    /// The header is not valid UTF-8 JSON of the expected shape.
    #[error("{file}: invalid safetensors header JSON: {reason}")]
    HeaderJson { file: PathBuf, reason: String },
    /// A header entry lacks a field or has one of the wrong type.
    #[error("{file}: tensor '{tensor}': invalid header entry: {reason}")]
    InvalidEntry {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A header names a dtype safetensors does not define.
    #[error("{file}: tensor '{tensor}': unknown dtype '{dtype}'")]
    UnknownDType {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A tensor's offsets are reversed or reach past the data section. `data_len` is 0 for
    /// reversed offsets (refused while the header is parsed, before the data section's size is
    /// looked at); the message says which case it is.
    #[error("{file}: tensor '{tensor}': data offsets [{begin}, {end}] out of range ({})", range_note(*begin, *end, *data_len))]
    OffsetsOutOfRange {
        file: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    /// A tensor's byte length differs from dtype size times shape product.
    #[error(
        "{file}: tensor '{tensor}': {actual} bytes in the file, dtype and shape need {expected}"
    )]
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        expected: u64,
        actual: u64,
    },
    /// Two tensors' byte ranges overlap.
    #[error("{file}: tensors '{tensor}' and '{other}' overlap in the data section")]
    Overlap {
        file: PathBuf,
        tensor: String,
        other: String,
    },
    /// The same tensor name appears twice (in one header or across shards).
    #[error("tensor '{tensor}' appears twice: in {first} and in {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A tensor was asked for that the checkpoint does not hold.
    #[error("{dir}: no tensor named '{tensor}'")]
    TensorNotFound { dir: PathBuf, tensor: String },
}

/// The parenthesis of [`CheckpointError::OffsetsOutOfRange`]'s message.
fn range_note(begin: u64, end: u64, data_len: u64) -> String {
    if begin > end {
        "the first offset is after the second".to_string()
    } else {
        format!("data section is {data_len} bytes")
    }
}
