//! One pass over the source files: the sha256 of every file (for the manifest) and, on the same
//! bytes while they are in cache, the amax and NaN/Inf check of every tensor to quantize, each
//! published on an [`AmaxBoard`] once the scan has passed the tensor's last byte. The quantizer
//! never waits for the scan: a tensor (or fused-set member) not on the board yet is measured by
//! the quantizer itself from the memory map, just before it quantizes it (its pages are read
//! once for both), and published. The scan goes in file order, the output in plan order, so
//! which of the two measures a tensor varies; the value does not (same bytes, same
//! arithmetic). There is no separate amax pass over the whole source any more.
//!
//! The scan reads with `pread` into its own buffer rather than through the memory map, so the
//! pages it reads ahead of the quantizer are not counted in this process's resident memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mimo_runtime::checkpoint::{parse_header, Checkpoint, TensorEntry};
use sha2::{Digest, Sha256};

use super::ConvertError;
use crate::manifest::FileHash;
use crate::plan::{Action, Plan};
use crate::quantizer::AmaxAcc;

/// Read size of the scan (a multiple of every element size, so pieces hold whole elements);
/// small enough that the copy, the hash and the amax of a piece stay in the L2 cache (1 MiB
/// pieces: `_copy_to_iter` 6.4-7.0 % of the cycles of a 2 GB conversion, 256 KiB: 6.0-6.3 %).
const PIECE: usize = 256 << 10;

/// One tensor's scan result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slot {
    /// Not scanned yet.
    Pending,
    /// Largest |x|.
    Ready(f32),
    /// The first NaN/Inf: (element index, value).
    NonFinite(usize, f32),
    /// Not a BF16/F16/F32 tensor (the quantizer reports it).
    Unsupported,
}

/// Amax results by plan entry index, from the scan or the quantizer, whichever came first.
pub struct AmaxBoard {
    slots: Mutex<Vec<Slot>>,
}

impl AmaxBoard {
    /// A board for `n` plan entries, all pending.
    pub fn new(n: usize) -> AmaxBoard {
        AmaxBoard {
            slots: Mutex::new(vec![Slot::Pending; n]),
        }
    }

    /// Records entry `i`'s result.
    pub fn publish(&self, i: usize, s: Slot) {
        let mut g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = g.get_mut(i) {
            *slot = s;
        }
    }

    /// Entry `i`'s result, if measured already.
    pub fn get(&self, i: usize) -> Option<Slot> {
        let g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        g.get(i).copied().filter(|s| *s != Slot::Pending)
    }
}

/// A byte range of a file whose amax is wanted: (start, end, plan index, accumulator).
struct Wanted {
    start: usize,
    end: usize,
    index: usize,
    acc: Option<AmaxAcc>,
}

/// The tensors of safetensors file `path` that the plan quantizes, by file offset.
fn wanted_in(
    path: &Path,
    file: &File,
    by_name: &HashMap<&str, usize>,
    board: &AmaxBoard,
) -> Result<Vec<Wanted>, std::io::Error> {
    // SAFETY: read-only mapping, used only to parse the (already validated) header; only its
    // first pages are touched.
    let map = unsafe { memmap2::Mmap::map(file)? };
    let (tensors, _) = parse_header(path, &map)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut wanted: Vec<Wanted> = Vec::new();
    for (name, e) in &tensors {
        let Some(&index) = by_name.get(name.as_str()) else {
            continue;
        };
        let acc = dtype_of(e).map(AmaxAcc::new);
        if acc.is_none() {
            board.publish(index, Slot::Unsupported);
            continue;
        }
        wanted.push(Wanted {
            start: e.start,
            end: e.end,
            index,
            acc,
        });
    }
    wanted.sort_by_key(|w| w.start);
    Ok(wanted)
}

/// The board slot of a finished accumulator.
pub fn slot_of(acc: &AmaxAcc) -> Slot {
    match acc.finish() {
        Ok(a) => Slot::Ready(a),
        Err((i, v)) => Slot::NonFinite(i, v),
    }
}

fn dtype_of(e: &TensorEntry) -> Option<mimo_kernels::dtype::SrcDType> {
    use mimo_kernels::dtype::SrcDType;
    use mimo_runtime::checkpoint::DType;
    match e.dtype {
        DType::BF16 => Some(SrcDType::BF16),
        DType::F16 => Some(SrcDType::F16),
        DType::F32 => Some(SrcDType::F32),
        _ => None,
    }
}

/// Hashes every source file (config, index, weights, sorted by path) and publishes the amax of
/// every tensor the plan quantizes on `board` (those not measured yet). A weights file whose
/// sha256 is in `known` (an LFS blob of a hub snapshot, hashed when it was downloaded) is not
/// read at all: it gets that hash, and the quantizer measures its tensors itself. Gives up (an
/// `Interrupted` hash error) once `stop()` returns true.
pub fn scan_sources(
    ck: &Checkpoint,
    plan: &Plan,
    board: &AmaxBoard,
    known: &BTreeMap<PathBuf, String>,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Vec<FileHash>, ConvertError> {
    let by_name: HashMap<&str, usize> = plan
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.action, Action::Quantize { .. }))
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let weights: Vec<PathBuf> = ck.files().map(Path::to_path_buf).collect();
    super::source_files(ck)
        .iter()
        .map(|p| {
            let is_weights = weights.contains(p);
            let r = match known.get(p).filter(|_| is_weights) {
                Some(sha256) => std::fs::metadata(p).map(|m| FileHash {
                    name: file_name(p),
                    bytes: m.len(),
                    sha256: sha256.clone(),
                }),
                None => scan_file(p, is_weights, &by_name, board, stop),
            };
            r.map_err(|source| ConvertError::Hash {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// sha256 of one file; for a weights file also the amax of its wanted tensors.
fn scan_file(
    path: &Path,
    is_weights: bool,
    by_name: &HashMap<&str, usize>,
    board: &AmaxBoard,
    stop: &(dyn Fn() -> bool + Sync),
) -> std::io::Result<FileHash> {
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    let mut wanted = if is_weights {
        wanted_in(path, &file, by_name, board)?
    } else {
        Vec::new()
    };
    // Piece boundaries: every wanted tensor's start and end, so a piece lies inside one tensor
    // or outside all, and starts at a whole element.
    let mut cuts: Vec<usize> = wanted.iter().flat_map(|w| [w.start, w.end]).collect();
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; PIECE];
    let (mut pos, mut cut, mut wi) = (0usize, 0usize, 0usize);
    while pos < len {
        if stop() {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        while cuts[cut] <= pos {
            cut += 1;
        }
        let end = cuts[cut].min(pos + PIECE);
        let piece = &mut buf[..end - pos];
        file.read_exact_at(piece, pos as u64)?;
        h.update(&*piece);
        // The wanted tensor this piece belongs to, if any (wanted is sorted by start and the
        // tensors do not overlap).
        while wi < wanted.len() && wanted[wi].end <= pos {
            wi += 1;
        }
        if let Some(w) = wanted.get_mut(wi) {
            if w.start == pos && board.get(w.index).is_some() {
                // The quantizer got there first.
                w.acc = None;
            }
            if w.start <= pos && end <= w.end {
                if let Some(acc) = &mut w.acc {
                    acc.update(piece);
                }
                if end == w.end {
                    if let Some(a) = w.acc.take() {
                        board.publish(w.index, slot_of(&a));
                    }
                }
            }
        }
        pos = end;
    }
    // Empty tensors (no piece reached them).
    for w in wanted.iter_mut().filter(|w| w.acc.is_some()) {
        if let Some(acc) = w.acc.take() {
            board.publish(w.index, slot_of(&acc));
        }
    }
    Ok(FileHash {
        name: file_name(path),
        bytes: pos as u64,
        sha256: hex::encode(h.finalize()),
    })
}
