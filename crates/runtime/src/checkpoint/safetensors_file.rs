//! Strict parsing of one safetensors file's header and memory-mapping of its data.
//!
//! Layout (huggingface/safetensors): 8-byte little-endian header length `n`, `n` bytes of UTF-8
//! JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
//! the data section; offsets are relative to the data section. We check everything a reader relies
//! on before handing out a byte slice: header length against the file size and a size limit,
//! well-formed entries, known dtypes, offsets inside the data section, byte length equal to dtype
//! size times element count, no overlaps and no duplicate names.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use super::{CheckpointError, DType};

/// Largest header accepted (the safetensors crate uses the same 100 MB bound).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor's header entry, validated.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included).
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// A memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    /// Path of the file.
    pub path: PathBuf,
    /// The mapping of the whole file.
    pub mmap: Mmap,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A JSON object read as ordered pairs, so duplicate keys can be reported.
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl SafetensorsFile {
    /// Opens, maps and validates `path`.
    pub fn open(path: &Path) -> Result<SafetensorsFile, CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; like every safetensors reader we assume the file is not
        // truncated by another process while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (tensors, metadata) = parse_header(path, &mmap)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    /// The bytes of tensor `e` (an entry of this file).
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.mmap[e.start..e.end]
    }
}

/// Tensors by name and the `__metadata__` map of a validated header.
pub type ParsedHeader = (BTreeMap<String, TensorEntry>, BTreeMap<String, String>);

/// Parses and validates the header of a safetensors file held in `buf`.
pub fn parse_header(path: &Path, buf: &[u8]) -> Result<ParsedHeader, CheckpointError> {
    let file = || path.to_path_buf();
    let len = buf.len() as u64;
    if len < 8 {
        return Err(CheckpointError::TruncatedHeader {
            file: file(),
            len,
            needed: 8,
        });
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&buf[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_LEN {
        return Err(CheckpointError::HeaderTooLarge {
            file: file(),
            len: n,
            limit: MAX_HEADER_LEN,
        });
    }
    if 8 + n > len {
        return Err(CheckpointError::TruncatedHeader {
            file: file(),
            len,
            needed: 8 + n,
        });
    }
    let header = &buf[8..8 + n as usize];
    let data_start = 8 + n;
    let data_len = len - data_start;
    let hjson = |reason: String| CheckpointError::HeaderJson {
        file: file(),
        reason,
    };
    let text = std::str::from_utf8(header).map_err(|e| hjson(format!("not UTF-8: {e}")))?;
    let pairs: Pairs = serde_json::from_str(text).map_err(|e| hjson(e.to_string()))?;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut seen_meta = false;
    for (name, value) in pairs.0 {
        if name == "__metadata__" {
            if seen_meta {
                return Err(hjson("'__metadata__' appears twice".into()));
            }
            seen_meta = true;
            let obj = value
                .as_object()
                .ok_or_else(|| hjson("'__metadata__' is not an object".into()))?;
            for (k, v) in obj {
                let s = v
                    .as_str()
                    .ok_or_else(|| hjson(format!("'__metadata__.{k}' is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let entry = parse_entry(path, &name, &value, data_start)?;
        if tensors.contains_key(&name) {
            return Err(CheckpointError::DuplicateTensor {
                tensor: name,
                first: file(),
                second: file(),
            });
        }
        tensors.insert(name, entry);
    }
    check_ranges(path, &tensors, data_start, data_len)?;
    Ok((tensors, metadata))
}

fn parse_entry(
    path: &Path,
    name: &str,
    value: &serde_json::Value,
    data_start: u64,
) -> Result<TensorEntry, CheckpointError> {
    let bad = |reason: &str| CheckpointError::InvalidEntry {
        file: path.to_path_buf(),
        tensor: name.to_string(),
        reason: reason.to_string(),
    };
    let obj = value.as_object().ok_or_else(|| bad("not an object"))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no string 'dtype'"))?;
    let dtype = DType::parse(dtype_s).ok_or_else(|| CheckpointError::UnknownDType {
        file: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype_s.to_string(),
    })?;
    let shape_v = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("no array 'shape'"))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    let mut numel: u64 = 1;
    for d in shape_v {
        let d = d
            .as_u64()
            .ok_or_else(|| bad("'shape' holds a non-integer"))?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| bad("shape product overflows"))?;
        shape.push(usize::try_from(d).map_err(|_| bad("dimension too large"))?);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("no array 'data_offsets'"))?;
    if offs.len() != 2 {
        return Err(bad("'data_offsets' must hold two integers"));
    }
    let begin = offs[0]
        .as_u64()
        .ok_or_else(|| bad("'data_offsets' holds a non-integer"))?;
    let end = offs[1]
        .as_u64()
        .ok_or_else(|| bad("'data_offsets' holds a non-integer"))?;
    if begin > end {
        return Err(CheckpointError::OffsetsOutOfRange {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            begin,
            end,
            data_len: 0,
        });
    }
    let expected = dtype
        .byte_len(numel)
        .ok_or_else(|| bad("byte length overflows or odd F4 count"))?;
    if end - begin != expected {
        return Err(CheckpointError::SizeMismatch {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            expected,
            actual: end - begin,
        });
    }
    let to_usize = |x: u64| usize::try_from(x).map_err(|_| bad("offset too large"));
    Ok(TensorEntry {
        dtype,
        shape,
        start: to_usize(data_start.saturating_add(begin))?,
        end: to_usize(data_start.saturating_add(end))?,
    })
}

/// Offsets inside the data section and no overlap. A file whose tensors are packed back to back
/// but whose data section is short is reported as truncated; a single tensor pointing past the end
/// of an otherwise complete layout as out of range.
fn check_ranges(
    path: &Path,
    tensors: &BTreeMap<String, TensorEntry>,
    data_start: u64,
    data_len: u64,
) -> Result<(), CheckpointError> {
    let mut ranges: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(n, e)| {
            (
                e.start as u64 - data_start,
                e.end as u64 - data_start,
                n.as_str(),
            )
        })
        .collect();
    ranges.sort();
    let total: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    let max_end = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let packed = max_end == total;
    // Sorted by start: a range overlaps an earlier one iff it starts before the furthest end so far.
    let mut furthest: Option<(u64, &str)> = None;
    for &(begin, end, name) in ranges.iter().filter(|r| r.1 > r.0) {
        if let Some((f_end, f_name)) = furthest {
            if begin < f_end {
                return Err(CheckpointError::Overlap {
                    file: path.to_path_buf(),
                    tensor: f_name.to_string(),
                    other: name.to_string(),
                });
            }
        }
        if furthest.is_none_or(|(f_end, _)| end > f_end) {
            furthest = Some((end, name));
        }
    }
    for &(begin, end, name) in &ranges {
        if end > data_len {
            return Err(if packed {
                CheckpointError::Truncated {
                    file: path.to_path_buf(),
                    tensor: name.to_string(),
                    end,
                    data_len,
                }
            } else {
                CheckpointError::OffsetsOutOfRange {
                    file: path.to_path_buf(),
                    tensor: name.to_string(),
                    begin,
                    end,
                    data_len,
                }
            });
        }
    }
    Ok(())
}
