//! Offline Hadamard rotation of a checkpoint (`mimo-quant rotate`): the same model in a basis
//! where FP4 blocks see fewer outliers, with no new operation for an engine to run.
//!
//! With an orthogonal `Q` and `x' = Q x` for every residual-stream vector, RMSNorm commutes
//! (`rms(Q x) = rms(x)`) once its weight `w` is folded into the Linear layers that read its
//! output, so the whole rotation is absorbed into the weights (SpinQuant's R1, QuaRot's
//! residual rotation):
//! - embeddings and the rows of every Linear that reads the residual (q/k/v, gate/up, routers,
//!   lm_head): each row `r <- Q (w . r)`, where `w` is the RMSNorm weight before it (lm_head:
//!   the final norm), and that norm's weight becomes all ones;
//! - Linear layers that write the residual (o_proj, down): each column `c <- Q c` (bias too).
//!
//! With `heads`, each attention head's values are rotated too (R2): v_proj's rows of one head
//! `<- Q_h` (as columns), o_proj's input segment of each head `<- Q_h` (as rows), one `Q_h`
//! shared by all heads so that grouped-query heads stay consistent.
//!
//! `Q = blockdiag(H_b) diag(s) / sqrt(b)`: a random sign per coordinate (from the seed) and a
//! Walsh-Hadamard transform of size `b`, the largest power of two dividing the dimension (the
//! whole hidden size when it is a power of two). The output has the source's tensor names,
//! shapes, dtypes and shards (tied embeddings are untied: lm_head is written beside them and
//! `tie_word_embeddings` set to false): any engine loads it as the original architecture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mimo_kernels::dtype::{convert_to_vec, encode_vec, DTypeError, SrcDType};
use mimo_runtime::checkpoint::{
    Checkpoint, CheckpointError, DType, HeaderEntry, TensorView, INDEX_FILE,
};
use rayon::prelude::*;
use serde::Serialize;

use crate::arch::{family, Family};
use crate::quantizer::src_dtype;
use crate::writer::{
    copy_side_files, write_index, write_json, ShardWriter, TempOutput, WriteError,
};

/// Smallest Hadamard block: an FP4 block (16 or 32 elements) must lie inside one.
const MIN_BLOCK: usize = 16;

/// Why a checkpoint cannot be rotated.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The source checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The output could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The architecture has tensors whose rotation rule is not implemented.
    #[error("{dir}: rotation supports Llama, Mistral, Qwen2/3 and Qwen2/3-MoE and Mixtral checkpoints, not {arch}")]
    Unsupported { dir: PathBuf, arch: String },
    /// A config value the rotation needs is missing or not usable.
    #[error("{file}: {what}")]
    Config { file: PathBuf, what: String },
    /// A tensor no rule covers (rotating around it would change the model).
    #[error("{file}: tensor '{tensor}' has no rotation rule")]
    UnknownTensor { file: PathBuf, tensor: String },
    /// A tensor that is not BF16, F16 or F32 (already quantized, or not a weight).
    #[error("{file}: tensor '{tensor}' is {dtype}; rotation needs BF16, F16 or F32 weights (is the checkpoint already quantized?)")]
    Dtype {
        file: PathBuf,
        tensor: String,
        dtype: DType,
    },
    /// A tensor's bytes are not a whole number of its elements.
    #[error("{file}: tensor '{tensor}'")]
    Bytes {
        file: PathBuf,
        tensor: String,
        source: DTypeError,
    },
    /// A tensor whose shape does not match its role.
    #[error("{file}: tensor '{tensor}' has shape {shape:?}, expected {expected}")]
    Shape {
        file: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        expected: String,
    },
    /// The RMSNorm weight a Linear layer's rows are folded with is missing.
    #[error("{file}: tensor '{tensor}' reads the norm '{norm}', which the checkpoint lacks")]
    MissingNorm {
        file: PathBuf,
        tensor: String,
        norm: String,
    },
    /// A non-finite value in a tensor that is rotated (it would spread over a whole block).
    #[error("{file}: tensor '{tensor}' holds NaN or Inf")]
    NonFinite { file: PathBuf, tensor: String },
}

/// Options of [`rotate`].
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Seed of the random signs.
    pub seed: u64,
    /// Also rotate each attention head's values (v_proj rows, o_proj input segments).
    pub heads: bool,
    /// Replace an existing output folder.
    pub force: bool,
}

/// What [`rotate`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RotateSummary {
    /// The source folder.
    pub source: PathBuf,
    /// The output folder.
    pub output: PathBuf,
    /// Hidden size and its Hadamard block.
    pub hidden: usize,
    /// Hadamard block of the residual rotation.
    pub block: usize,
    /// Head size and its Hadamard block, when heads were rotated.
    pub head_block: Option<(usize, usize)>,
    /// Seed of the signs.
    pub seed: u64,
    /// Tensors changed (rotated, or norms set to ones).
    pub rotated: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
}

/// One orthogonal transform `v <- blockdiag(H_b) (s . v) / sqrt(b)` of vectors of `s.len()`.
#[derive(Debug, Clone)]
pub struct Rotation {
    signs: Vec<f32>,
    block: usize,
}

impl Rotation {
    /// The rotation of `dim`-vectors for `seed`, or `None` when `dim` has no power-of-two
    /// divisor of at least 16.
    pub fn new(dim: usize, seed: u64) -> Option<Rotation> {
        let block = 1usize << dim.trailing_zeros().min(usize::BITS - 1);
        if dim == 0 || block < MIN_BLOCK {
            return None;
        }
        let mut state = seed;
        let signs = (0..dim)
            .map(|_| {
                if splitmix64(&mut state) >> 63 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        Some(Rotation { signs, block })
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.signs.len()
    }

    /// Hadamard block size.
    pub fn block(&self) -> usize {
        self.block
    }

    /// `v <- Q v` (`v.len() == dim`).
    pub fn apply(&self, v: &mut [f32]) {
        for (x, s) in v.iter_mut().zip(&self.signs) {
            *x *= s;
        }
        let scale = 1.0 / (self.block as f32).sqrt();
        for blk in v.chunks_exact_mut(self.block) {
            let mut h = 1;
            while h < self.block {
                for i in (0..self.block).step_by(2 * h) {
                    for j in i..i + h {
                        let (a, b) = (blk[j], blk[j + h]);
                        blk[j] = a + b;
                        blk[j + h] = a - b;
                    }
                }
                h *= 2;
            }
            for x in blk.iter_mut() {
                *x *= scale;
            }
        }
    }

    /// `Q M` for a row-major `[dim, cols]` matrix: every column rotated, the butterflies taken
    /// over whole rows.
    pub fn apply_columns(&self, m: &mut [f32], cols: usize) {
        let n = self.dim();
        debug_assert_eq!(m.len(), n * cols);
        m.par_chunks_mut(cols)
            .zip(self.signs.par_iter())
            .for_each(|(row, s)| row.iter_mut().for_each(|x| *x *= s));
        let scale = 1.0 / (self.block as f32).sqrt();
        for blk in m.chunks_exact_mut(self.block * cols) {
            let mut h = 1;
            while h < self.block {
                for i in (0..self.block).step_by(2 * h) {
                    for j in i..i + h {
                        let (lo, hi) = blk.split_at_mut((j + h) * cols);
                        let a = &mut lo[j * cols..(j + 1) * cols];
                        let b = &mut hi[..cols];
                        for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                            let (p, q) = (*x, *y);
                            *x = p + q;
                            *y = p - q;
                        }
                    }
                }
                h *= 2;
            }
            blk.par_iter_mut().for_each(|x| *x *= scale);
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How one tensor changes.
#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// Unchanged (q/k norms, q/k biases, rotary tables).
    Keep,
    /// An RMSNorm weight folded into its readers: all ones.
    Ones,
    /// Rows read the residual: `r <- Q (w . r)` with `norm`'s weight `w` (none: embeddings).
    /// `heads`: v_proj, whose rows are then rotated per head as columns.
    ReadRows { norm: Option<String>, heads: bool },
    /// Columns write the residual: `c <- Q c`. `heads`: o_proj, whose rows are also rotated per
    /// head segment.
    WriteColumns { heads: bool },
    /// A bias added to the residual: `b <- Q b`.
    WriteBias,
    /// v_proj's bias with head rotation: each head segment `<- Q_h`.
    HeadBias,
}

/// The rule for `name` (Llama-style names; Qwen-MoE and Mixtral experts).
fn role(name: &str, heads: bool) -> Option<Role> {
    match name {
        "model.embed_tokens.weight" => {
            return Some(Role::ReadRows {
                norm: None,
                heads: false,
            })
        }
        "lm_head.weight" => {
            return Some(Role::ReadRows {
                norm: Some("model.norm.weight".into()),
                heads: false,
            })
        }
        "model.norm.weight" => return Some(Role::Ones),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let norm = |n: &str| Some(format!("model.layers.{layer}.{n}.weight"));
    let attn_in = || Role::ReadRows {
        norm: norm("input_layernorm"),
        heads: false,
    };
    let mlp_in = || Role::ReadRows {
        norm: norm("post_attention_layernorm"),
        heads: false,
    };
    Some(match suffix {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => Role::Ones,
        "self_attn.q_proj.weight" | "self_attn.k_proj.weight" => attn_in(),
        "self_attn.v_proj.weight" => Role::ReadRows {
            norm: norm("input_layernorm"),
            heads,
        },
        "self_attn.q_proj.bias"
        | "self_attn.k_proj.bias"
        | "self_attn.q_norm.weight"
        | "self_attn.k_norm.weight"
        | "self_attn.rotary_emb.inv_freq" => Role::Keep,
        "self_attn.v_proj.bias" if heads => Role::HeadBias,
        "self_attn.v_proj.bias" => Role::Keep,
        "self_attn.o_proj.weight" => Role::WriteColumns { heads },
        "self_attn.o_proj.bias" | "mlp.down_proj.bias" => Role::WriteBias,
        "mlp.gate_proj.weight"
        | "mlp.up_proj.weight"
        | "mlp.gate.weight"
        | "mlp.shared_expert.gate_proj.weight"
        | "mlp.shared_expert.up_proj.weight"
        | "mlp.shared_expert_gate.weight"
        | "block_sparse_moe.gate.weight" => mlp_in(),
        "mlp.down_proj.weight" | "mlp.shared_expert.down_proj.weight" => {
            Role::WriteColumns { heads: false }
        }
        _ => {
            let (group, expert) = if let Some(e) = suffix.strip_prefix("mlp.experts.") {
                ("mlp", e)
            } else if let Some(e) = suffix.strip_prefix("block_sparse_moe.experts.") {
                ("moe", e)
            } else {
                return None;
            };
            let (idx, proj) = expert.split_once('.')?;
            idx.parse::<usize>().ok()?;
            match (group, proj) {
                ("mlp", "gate_proj.weight" | "up_proj.weight")
                | ("moe", "w1.weight" | "w3.weight") => mlp_in(),
                ("mlp", "down_proj.weight") | ("moe", "w2.weight") => {
                    Role::WriteColumns { heads: false }
                }
                _ => return None,
            }
        }
    })
}

/// The values of a tensor that is rotated (BF16, F16 or F32) and its kernels dtype.
fn values(t: &TensorView<'_>) -> Result<(SrcDType, Vec<f32>), RotateError> {
    let dtype = src_dtype(t).map_err(|_| RotateError::Dtype {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        dtype: t.dtype,
    })?;
    let v = convert_to_vec(dtype, t.data).map_err(|source| RotateError::Bytes {
        file: t.file.to_path_buf(),
        tensor: t.name.to_string(),
        source,
    })?;
    Ok((dtype, v))
}

fn config_usize(config: &serde_json::Value, key: &str) -> Option<usize> {
    config.get(key)?.as_u64().map(|v| v as usize)
}

/// Writes the rotated copy of the checkpoint `src` into `dst` (atomically: a temporary sibling
/// folder renamed at the end; an existing `dst` only with `force`).
pub fn rotate(src: &Path, dst: &Path, opts: &RotateOptions) -> Result<RotateSummary, RotateError> {
    let ck = Checkpoint::open(src)?;
    let cfg = ck.config();
    let config_file = src.join("config.json");
    let (fam, arch) = family(cfg);
    if !matches!(fam, Family::Dense | Family::QwenMoe | Family::Mixtral) {
        return Err(RotateError::Unsupported {
            dir: src.to_path_buf(),
            arch,
        });
    }
    // Tied embeddings are untied: lm_head gets the final norm folded in, the embeddings not.
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let cfg_err = |what: String| RotateError::Config {
        file: config_file.clone(),
        what,
    };
    let hidden =
        config_usize(cfg, "hidden_size").ok_or_else(|| cfg_err("hidden_size is missing".into()))?;
    let residual = Rotation::new(hidden, opts.seed).ok_or_else(|| {
        cfg_err(format!(
            "hidden_size {hidden} has no power-of-two factor of at least {MIN_BLOCK}"
        ))
    })?;
    let head = if opts.heads {
        let heads = config_usize(cfg, "num_attention_heads")
            .ok_or_else(|| cfg_err("num_attention_heads is missing".into()))?;
        let hd = config_usize(cfg, "head_dim").unwrap_or(hidden / heads.max(1));
        Some(Rotation::new(hd, opts.seed ^ 0x005E_ED0F_4EAD).ok_or_else(|| {
            cfg_err(format!(
                "head_dim {hd} has no power-of-two factor of at least {MIN_BLOCK} (rotate without heads)"
            ))
        })?)
    } else {
        None
    };

    // Every tensor's rule first: nothing is written for a checkpoint with an unknown tensor.
    // Output tensors by file: (name, source tensor, rule).
    let mut by_file: BTreeMap<PathBuf, Vec<(String, String, Role)>> = BTreeMap::new();
    let mut names: Vec<(String, String)> = ck
        .tensor_names()
        .map(|n| (n.to_string(), n.to_string()))
        .collect();
    if tied && !ck.contains("lm_head.weight") {
        names.push(("lm_head.weight".into(), "model.embed_tokens.weight".into()));
        names.sort();
    }
    for (name, source) in &names {
        let name = name.as_str();
        let t = ck.tensor(source)?;
        let r = role(name, opts.heads).ok_or_else(|| RotateError::UnknownTensor {
            file: t.file.to_path_buf(),
            tensor: name.to_string(),
        })?;
        if r != Role::Keep && !t.dtype.is_dense_float() {
            return Err(RotateError::Dtype {
                file: t.file.to_path_buf(),
                tensor: name.to_string(),
                dtype: t.dtype,
            });
        }
        if let Role::ReadRows {
            norm: Some(norm), ..
        } = &r
        {
            if !ck.contains(norm) {
                return Err(RotateError::MissingNorm {
                    file: t.file.to_path_buf(),
                    tensor: name.to_string(),
                    norm: norm.clone(),
                });
            }
        }
        by_file.entry(t.file.to_path_buf()).or_default().push((
            name.to_string(),
            source.clone(),
            r,
        ));
    }

    let out = TempOutput::create(dst, opts.force)?;
    let mut shards = Vec::new();
    let (mut rotated, mut copied) = (0, 0);
    for (file, tensors) in &by_file {
        let entries: Vec<HeaderEntry> = tensors
            .iter()
            .map(|(n, src, _)| {
                let t = ck.tensor(src)?;
                Ok(HeaderEntry {
                    name: n.clone(),
                    dtype: t.dtype,
                    shape: t.shape.to_vec(),
                })
            })
            .collect::<Result<_, CheckpointError>>()?;
        let fname = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut w = ShardWriter::create(&out.path().join(&fname), entries.clone())?;
        for (name, src_name, r) in tensors {
            let t = ck.tensor(src_name)?;
            if *r == Role::Keep {
                w.write_tensor(name, t.data)?;
                copied += 1;
                continue;
            }
            let shape_err = |expected: String| RotateError::Shape {
                file: file.clone(),
                tensor: name.clone(),
                shape: t.shape.to_vec(),
                expected,
            };
            let (dtype, mut v) = values(&t)?;
            if r != &Role::Ones && !v.iter().all(|x| x.is_finite()) {
                return Err(RotateError::NonFinite {
                    file: file.clone(),
                    tensor: name.clone(),
                });
            }
            match r {
                Role::Keep => {}
                Role::Ones => {
                    if t.shape != [hidden] {
                        return Err(shape_err(format!("[{hidden}]")));
                    }
                    v.iter_mut().for_each(|x| *x = 1.0);
                }
                Role::ReadRows { norm, heads } => {
                    if t.shape.len() != 2 || t.shape[1] != hidden {
                        return Err(shape_err(format!("[rows, {hidden}]")));
                    }
                    let w_norm = match norm {
                        Some(n) => {
                            let nt = ck.tensor(n)?;
                            if nt.shape != [hidden] || !nt.dtype.is_dense_float() {
                                return Err(RotateError::Shape {
                                    file: nt.file.to_path_buf(),
                                    tensor: n.clone(),
                                    shape: nt.shape.to_vec(),
                                    expected: format!("[{hidden}] of BF16, F16 or F32"),
                                });
                            }
                            Some(values(&nt)?.1)
                        }
                        None => None,
                    };
                    v.par_chunks_mut(hidden).for_each(|row| {
                        if let Some(wn) = &w_norm {
                            row.iter_mut().zip(wn).for_each(|(x, w)| *x *= w);
                        }
                        residual.apply(row);
                    });
                    if let (true, Some(h)) = (*heads, &head) {
                        let rows = t.shape[0];
                        if rows % h.dim() != 0 {
                            return Err(shape_err(format!("rows a multiple of {}", h.dim())));
                        }
                        for seg in v.chunks_mut(h.dim() * hidden) {
                            h.apply_columns(seg, hidden);
                        }
                    }
                }
                Role::WriteColumns { heads } => {
                    if t.shape.len() != 2 || t.shape[0] != hidden {
                        return Err(shape_err(format!("[{hidden}, cols]")));
                    }
                    let cols = t.shape[1];
                    if let (true, Some(h)) = (*heads, &head) {
                        if cols % h.dim() != 0 {
                            return Err(shape_err(format!("columns a multiple of {}", h.dim())));
                        }
                        v.par_chunks_mut(cols).for_each(|row| {
                            row.chunks_mut(h.dim()).for_each(|seg| h.apply(seg));
                        });
                    }
                    residual.apply_columns(&mut v, cols);
                }
                Role::WriteBias => {
                    if t.shape != [hidden] {
                        return Err(shape_err(format!("[{hidden}]")));
                    }
                    residual.apply(&mut v);
                }
                Role::HeadBias => {
                    if let Some(h) = &head {
                        if t.shape.len() != 1 || t.shape[0] % h.dim() != 0 {
                            return Err(shape_err(format!("[a multiple of {}]", h.dim())));
                        }
                        v.chunks_mut(h.dim()).for_each(|seg| h.apply(seg));
                    }
                }
            }
            w.write_tensor(name, &encode_vec(dtype, &v))?;
            ck.release(src_name);
            rotated += 1;
        }
        w.finish()?;
        shards.push((fname, entries));
    }
    if ck.index_metadata().is_some() || src.join(INDEX_FILE).is_file() {
        write_index(out.path(), &shards)?;
    }
    let mut config = cfg.clone();
    if tied {
        config["tie_word_embeddings"] = serde_json::Value::Bool(false);
    }
    write_json(&out.path().join("config.json"), &config)?;
    copy_side_files(src, out.path())?;
    let summary = RotateSummary {
        source: src.to_path_buf(),
        output: dst.to_path_buf(),
        hidden,
        block: residual.block(),
        head_block: head.as_ref().map(|h| (h.dim(), h.block())),
        seed: opts.seed,
        rotated,
        copied,
    };
    write_json(
        &out.path().join("mimo-rotate.json"),
        &serde_json::to_value(&summary).unwrap_or_default(),
    )?;
    out.commit()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The explicit matrix of `r`: column j is `Q e_j`.
    fn matrix(r: &Rotation) -> Vec<Vec<f64>> {
        let n = r.dim();
        (0..n)
            .map(|j| {
                let mut e = vec![0.0f32; n];
                e[j] = 1.0;
                r.apply(&mut e);
                e.iter().map(|&x| x as f64).collect()
            })
            .collect()
    }

    #[test]
    fn rotation_is_orthogonal_with_random_signs() {
        for (dim, block) in [(16, 16), (256, 256), (96, 32), (5120, 1024)] {
            let r = Rotation::new(dim, 7).unwrap();
            assert_eq!(r.block(), block);
            let plus = r.signs.iter().filter(|&&s| s > 0.0).count();
            assert!(
                plus > dim / 4 && plus < 3 * dim / 4,
                "signs not random: {plus} of {dim}"
            );
            if dim > 256 {
                continue;
            }
            let cols = matrix(&r);
            for i in 0..dim {
                for j in 0..dim {
                    let dot: f64 = (0..dim).map(|k| cols[i][k] * cols[j][k]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-6, "dim {dim}: <q{i}, q{j}> = {dot}");
                }
            }
            // Entries are +-1/sqrt(block) inside a block, 0 outside.
            for (j, c) in cols.iter().enumerate() {
                for (i, &x) in c.iter().enumerate() {
                    if i / block == j / block {
                        assert!((x.abs() - 1.0 / (block as f64).sqrt()).abs() < 1e-6);
                    } else {
                        assert_eq!(x, 0.0);
                    }
                }
            }
        }
        assert!(Rotation::new(24, 0).is_none());
        assert!(Rotation::new(0, 0).is_none());
    }

    #[test]
    fn columns_match_vector_form() {
        let r = Rotation::new(64, 3).unwrap();
        let cols = 5;
        let mut state = 11u64;
        let m: Vec<f32> = (0..64 * cols)
            .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let mut a = m.clone();
        r.apply_columns(&mut a, cols);
        for c in 0..cols {
            let mut col: Vec<f32> = (0..64).map(|i| m[i * cols + c]).collect();
            r.apply(&mut col);
            for i in 0..64 {
                assert!((a[i * cols + c] - col[i]).abs() < 1e-6);
            }
        }
        // Q^T Q = I: applying the transpose (signs after the transform) undoes it.
        let mut v: Vec<f32> = m[..64].to_vec();
        r.apply(&mut v);
        let norm0: f32 = m[..64].iter().map(|x| x * x).sum();
        let norm1: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm0 - norm1).abs() < 1e-4 * norm0);
    }

    #[test]
    fn every_fixture_tensor_has_a_rule() {
        for name in [
            "model.layers.3.mlp.experts.17.down_proj.weight",
            "model.layers.0.block_sparse_moe.experts.2.w3.weight",
            "model.layers.1.mlp.shared_expert_gate.weight",
            "model.layers.1.self_attn.q_norm.weight",
        ] {
            assert!(role(name, true).is_some(), "{name}");
        }
        assert_eq!(role("model.layers.x.mlp.gate.weight", true), None);
        assert_eq!(role("model.mtp_layers.0.proj.weight", true), None);
        assert_eq!(
            role("model.layers.2.self_attn.v_proj.bias", false),
            Some(Role::Keep)
        );
    }
}
