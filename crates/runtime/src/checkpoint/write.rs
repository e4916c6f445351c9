//! Building safetensors files: the header for a known list of tensors, and a whole-file writer.
//!
//! The converter streams tensor data after a header computed up front (all output dtypes and
//! shapes are known from the plan), so the header builder is separate from the data.

use std::io::Write;
use std::path::Path;

use super::{CheckpointError, DType};

/// One tensor's header description; data follows in list order, packed back to back.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl HeaderEntry {
    /// Bytes of this tensor's data.
    pub fn byte_len(&self) -> u64 {
        let numel: u64 = self.shape.iter().map(|&d| d as u64).product();
        self.dtype.byte_len(numel).unwrap_or(0)
    }
}

/// The 8-byte length prefix plus the JSON header (space-padded to a multiple of 8, as the
/// safetensors crate does) for `entries` stored back to back in the given order. Names must be
/// unique; `metadata` becomes `__metadata__` when non-empty.
pub fn header_bytes(entries: &[HeaderEntry], metadata: &[(String, String)]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        map.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0u64;
    for e in entries {
        let len = e.byte_len();
        map.insert(
            e.name.clone(),
            serde_json::json!({
                "dtype": e.dtype.as_str(),
                "shape": e.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut json = serde_json::Value::Object(map).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Writes a whole safetensors file from in-memory tensors (fixtures, tests, small outputs).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(HeaderEntry, Vec<u8>)],
    metadata: &[(String, String)],
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let entries: Vec<HeaderEntry> = tensors.iter().map(|(e, _)| e.clone()).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&header_bytes(&entries, metadata)).map_err(io)?;
    for (e, data) in tensors {
        if data.len() as u64 != e.byte_len() {
            return Err(CheckpointError::SizeMismatch {
                file: path.to_path_buf(),
                tensor: e.name.clone(),
                expected: e.byte_len(),
                actual: data.len() as u64,
            });
        }
        f.write_all(data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(())
}
