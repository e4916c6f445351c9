//! A checkpoint folder: config.json and single or sharded safetensors, memory-mapped.
//!
//! [`Checkpoint::open`] reads config.json, then either `model.safetensors.index.json` (every shard
//! it names must be a plain file inside the folder and must hold the tensors mapped to it), or
//! `model.safetensors`, or else every `*.safetensors` file of the folder. Files are memory-mapped,
//! never read whole; every header is validated before any byte is handed out.

mod dtype;
mod error;
mod safetensors_file;
mod write;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

pub use dtype::DType;
pub use error::CheckpointError;
pub use safetensors_file::{
    parse_header, ParsedHeader, SafetensorsFile, TensorEntry, MAX_HEADER_LEN,
};
pub use write::{header_bytes, write_safetensors, HeaderEntry};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// An opened checkpoint folder.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    config: serde_json::Value,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> (file index, entry).
    tensors: BTreeMap<String, (usize, TensorEntry)>,
    index_metadata: Option<serde_json::Value>,
}

/// A borrowed view of one tensor's bytes in the memory map.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// The safetensors file holding it.
    pub file: &'a Path,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Checkpoint {
    /// Opens `dir`: parses config.json and maps and validates every weight file.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(CheckpointError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let config = read_json(&config_path, |file, reason| CheckpointError::ConfigJson {
            file,
            reason,
        })?;
        if !config.is_object() {
            return Err(CheckpointError::ConfigJson {
                file: config_path,
                reason: "not a JSON object".into(),
            });
        }
        let index_path = dir.join(INDEX_FILE);
        let mut ck = Checkpoint {
            root: dir.to_path_buf(),
            config,
            files: Vec::new(),
            tensors: BTreeMap::new(),
            index_metadata: None,
        };
        if index_path.is_file() {
            ck.open_index(&index_path)?;
        } else if dir.join(SINGLE_FILE).is_file() {
            ck.add_file(SafetensorsFile::open(&dir.join(SINGLE_FILE))?)?;
        } else {
            let mut names = Vec::new();
            let rd = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            for ent in rd {
                let ent = ent.map_err(|source| CheckpointError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                let p = ent.path();
                if p.is_file() && p.extension().is_some_and(|e| e == "safetensors") {
                    names.push(p);
                }
            }
            if names.is_empty() {
                return Err(CheckpointError::NoWeights {
                    dir: dir.to_path_buf(),
                });
            }
            names.sort();
            for p in names {
                ck.add_file(SafetensorsFile::open(&p)?)?;
            }
        }
        Ok(ck)
    }

    fn open_index(&mut self, index_path: &Path) -> Result<(), CheckpointError> {
        let bad = |reason: &str| CheckpointError::IndexJson {
            file: index_path.to_path_buf(),
            reason: reason.into(),
        };
        let index = read_json(index_path, |file, reason| CheckpointError::IndexJson {
            file,
            reason,
        })?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no 'weight_map' object"))?;
        self.index_metadata = index.get("metadata").cloned();
        // shard name -> tensors the index places there, in a fixed order.
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(&format!("weight_map['{tensor}'] is not a string")))?;
            shards.entry(shard).or_default().push(tensor);
        }
        for (shard, names) in shards {
            let first = names.first().copied().unwrap_or_default().to_string();
            if !is_plain_relative(shard) {
                return Err(CheckpointError::UnsafeShardPath {
                    index: index_path.to_path_buf(),
                    shard: shard.into(),
                    tensor: first,
                });
            }
            let path = self.root.join(shard);
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: shard.into(),
                    tensor: first,
                });
            }
            let file = SafetensorsFile::open(&path)?;
            for t in &names {
                if !file.tensors.contains_key(*t) {
                    return Err(CheckpointError::IndexMismatch {
                        index: index_path.to_path_buf(),
                        shard: shard.into(),
                        tensor: (*t).into(),
                    });
                }
            }
            self.add_file(file)?;
        }
        Ok(())
    }

    fn add_file(&mut self, file: SafetensorsFile) -> Result<(), CheckpointError> {
        let fi = self.files.len();
        for (name, entry) in &file.tensors {
            if let Some((other, _)) = self.tensors.get(name) {
                return Err(CheckpointError::DuplicateTensor {
                    tensor: name.clone(),
                    first: self.files[*other].path.clone(),
                    second: file.path.clone(),
                });
            }
            self.tensors.insert(name.clone(), (fi, entry.clone()));
        }
        self.files.push(file);
        Ok(())
    }

    /// The checkpoint folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed config.json.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// The `metadata` object of the shard index, if the checkpoint is sharded and has one.
    pub fn index_metadata(&self) -> Option<&serde_json::Value> {
        self.index_metadata.as_ref()
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True if the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// True if a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The weight files, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Drops the resident pages of tensor `name` from this process (MADV_DONTNEED on the
    /// read-only mapping), so streaming a checkpoint larger than memory keeps resident memory
    /// bounded; the bytes are read from the file again if the tensor is used later. Unknown
    /// names and advice failures are ignored: this only affects memory use.
    pub fn release(&self, name: &str) {
        if let Some((fi, e)) = self.tensors.get(name) {
            let mmap = &self.files[*fi].mmap;
            // SAFETY: the mapping is private and read-only, so no page holds data that is not in
            // the file; dropping pages only forces a re-read on the next access.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    e.start,
                    e.end - e.start,
                )
            };
        }
    }

    /// One tensor's view into the memory map.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, CheckpointError> {
        let (key, (fi, e)) =
            self.tensors
                .get_key_value(name)
                .ok_or_else(|| CheckpointError::TensorNotFound {
                    dir: self.root.clone(),
                    tensor: name.to_string(),
                })?;
        let file = &self.files[*fi];
        Ok(TensorView {
            name: key,
            file: &file.path,
            dtype: e.dtype,
            shape: &e.shape,
            data: file.bytes(e),
        })
    }
}

/// True for a relative path without `..`, root or prefix components: the rule for any file
/// name read from a checkpoint's own metadata (shard index, mimo-quant.json), so that such a
/// name can only point inside the checkpoint folder.
pub fn is_plain_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn read_json(
    path: &Path,
    err: impl Fn(PathBuf, String) -> CheckpointError,
) -> Result<serde_json::Value, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| err(path.to_path_buf(), e.to_string()))
}

#[cfg(test)]
mod tests;
