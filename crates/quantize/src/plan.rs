//! The per-tensor plan: quantize to which layout or keep dense and why, bytes before and after.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use mimo_runtime::checkpoint::{Checkpoint, DType, HeaderEntry};
use mimo_runtime::format::{detect, Detected, Layout};

use crate::arch::{
    classify, default_keep_reason, family, fused_group, is_routed_expert, Family, Verdict,
};

/// Options that change the plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Output layout.
    pub layout: Layout,
    /// Glob patterns (matched against tensor and module names) of tensors kept dense.
    pub ignore: Vec<String>,
    /// Quantize lm_head too.
    pub quantize_lm_head: bool,
    /// Quantize only the routed experts' Linear layers (and lm_head with `quantize_lm_head`);
    /// attention, dense MLPs and shared experts stay dense: the layout gpt-oss ships its MXFP4
    /// experts in.
    pub experts_only: bool,
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The input checkpoint is already quantized.
    #[error("{dir}: input is already quantized ({what}); convert from the BF16/FP16/F32 original")]
    AlreadyQuantized { dir: PathBuf, what: String },
    /// A Linear weight to quantize has a dtype we cannot read.
    #[error("{file}: tensor '{tensor}' has dtype {dtype}; only BF16, F16 and F32 weights can be quantized")]
    UnsupportedDType {
        file: PathBuf,
        tensor: String,
        dtype: DType,
    },
    /// An --ignore pattern is not a valid glob.
    #[error("--ignore '{pattern}': {reason}")]
    BadIgnore { pattern: String, reason: String },
    /// The checkpoint holds no tensor at all: there is nothing to convert.
    #[error("{dir}: the checkpoint holds no tensors")]
    NoTensors { dir: PathBuf },
    /// `--experts-only` on a checkpoint without routed experts (nothing would be quantized).
    #[error(
        "{dir}: --experts-only, but the checkpoint ({arch}) has no routed expert Linear layers"
    )]
    NoExperts { dir: PathBuf, arch: String },
}

/// What happens to one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Quantize the Linear `module` ([n, k]); `group` is its fused set (shared global scale).
    Quantize {
        module: String,
        n: usize,
        k: usize,
        group: Option<String>,
    },
    /// Copy unchanged.
    Keep { reason: String },
}

/// One source tensor's decision.
#[derive(Debug, Clone)]
pub struct PlanEntry {
    /// Source tensor name.
    pub name: String,
    /// Source dtype.
    pub dtype: DType,
    /// Source shape.
    pub shape: Vec<usize>,
    /// The decision.
    pub action: Action,
}

impl PlanEntry {
    /// Bytes in the source.
    pub fn bytes_in(&self) -> u64 {
        let numel: u64 = self.shape.iter().map(|&d| d as u64).product();
        self.dtype.byte_len(numel).unwrap_or(0)
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Architecture name from config.json.
    pub arch: String,
    /// Rule family used.
    pub family: Family,
    /// Output layout.
    pub layout: Layout,
    /// One entry per source tensor, in sorted name order.
    pub entries: Vec<PlanEntry>,
    /// Warnings to show the user.
    pub warnings: Vec<String>,
    /// Share of the routed experts one token uses (`top_k / experts` from config.json), for
    /// MoE models.
    pub routed_share: Option<f64>,
    /// Whether the lm_head is the embedding (`tie_word_embeddings`): then a token reads all of it.
    pub tied_embeddings: bool,
}

/// The warning for fused sets (q/k/v, gate/up, an expert's w1/w3) whose members the plan splits
/// between FP4 and dense (an `--ignore` that names some of them), or None. vLLM and SGLang run
/// each set as one fused layer and refuse to load one whose members differ in precision
/// (vLLM's compressed-tensors `should_ignore_layer`: "Detected some but not all shards of ...
/// are quantized"); transformers and mimo-run load such a checkpoint.
fn partly_quantized_fused_sets(entries: &[PlanEntry]) -> Option<String> {
    let mut sets: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for e in entries {
        let (module, quantized) = match &e.action {
            Action::Quantize { module, .. } => (module.clone(), true),
            _ => match e.name.strip_suffix(".weight") {
                Some(m) => (m.to_string(), false),
                None => continue,
            },
        };
        let (Some(set), Some((_, leaf))) = (fused_group(&module), module.rsplit_once('.')) else {
            continue;
        };
        let (q, kept) = sets.entry(set).or_default();
        if quantized { q } else { kept }.push(leaf.to_string());
    }
    let split: Vec<_> = sets
        .iter()
        .filter(|(_, (q, kept))| !q.is_empty() && !kept.is_empty())
        .collect();
    let (set, (q, kept)) = split.first()?;
    Some(format!(
        "{} fused set(s) are partly quantized (e.g. {set}: {} FP4, {} kept dense): vLLM and \
         SGLang run each set as one layer and refuse to load a set whose members differ in \
         precision (\"Detected some but not all shards ... are quantized\"); transformers and \
         mimo-run load it. For those engines quantize or keep whole sets (e.g. --ignore \
         '*self_attn*', or --experts-only)",
        split.len(),
        q.join("/"),
        kept.join("/")
    ))
}

impl Plan {
    /// Decides every tensor of `ck`.
    pub fn build(ck: &Checkpoint, opts: &PlanOptions) -> Result<Plan, PlanError> {
        if ck.tensor_names().next().is_none() {
            return Err(PlanError::NoTensors {
                dir: ck.root().into(),
            });
        }
        match detect(ck) {
            Detected::Dense => {}
            Detected::Fp4(l) => {
                return Err(PlanError::AlreadyQuantized {
                    dir: ck.root().into(),
                    what: l.name().into(),
                })
            }
            Detected::GptOssMxfp4 => {
                return Err(PlanError::AlreadyQuantized {
                    dir: ck.root().into(),
                    what: "gpt-oss mxfp4".into(),
                })
            }
            Detected::Other(w) => {
                return Err(PlanError::AlreadyQuantized {
                    dir: ck.root().into(),
                    what: w,
                })
            }
        }
        let patterns = opts
            .ignore
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| PlanError::BadIgnore {
                    pattern: p.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (fam, arch) = family(ck.config());
        let mut warnings = Vec::new();
        if fam == Family::Unknown {
            warnings.push(format!(
                "unknown architecture '{arch}': generic rule (every 2-D Linear weight except embeddings, lm_head, norms and routers is quantized); check the plan"
            ));
        }
        let block = opts.layout.format().block_size();
        let mut entries = Vec::new();
        for name in ck.tensor_names() {
            let Ok(t) = ck.tensor(name) else { continue };
            let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
            let keep = |reason: String| Action::Keep { reason };
            let action = if let Some(p) = patterns
                .iter()
                .find(|p| p.matches(name) || p.matches(&module))
            {
                keep(format!("--ignore {}", p.as_str()))
            } else if t.shape.len() != 2 || !name.ends_with(".weight") {
                keep(if t.shape.len() == 1 {
                    "1-D".into()
                } else {
                    "not a 2-D .weight".into()
                })
            } else if let Some(r) =
                default_keep_reason(name).filter(|r| !(opts.quantize_lm_head && *r == "lm_head"))
            {
                keep(r.into())
            } else {
                let lm_head = default_keep_reason(name) == Some("lm_head");
                match if lm_head {
                    Verdict::Linear
                } else {
                    classify(fam, name)
                } {
                    Verdict::Keep(r) => {
                        if fam != Family::Unknown && !r.starts_with("MTP") {
                            warnings.push(format!(
                                "{name}: unrecognised 2-D weight for {arch}, kept {}",
                                t.dtype
                            ));
                        }
                        keep(r)
                    }
                    // Kept dense like an --ignore match: before the dtype check, which only
                    // the tensors to quantize need.
                    Verdict::Linear
                        if opts.experts_only && !lm_head && !is_routed_expert(&module) =>
                    {
                        keep("--experts-only".into())
                    }
                    Verdict::Linear => {
                        if !t.dtype.is_dense_float() {
                            return Err(PlanError::UnsupportedDType {
                                file: t.file.to_path_buf(),
                                tensor: name.into(),
                                dtype: t.dtype,
                            });
                        }
                        let (n, k) = (t.shape[0], t.shape[1]);
                        if k % block != 0 || n == 0 {
                            warnings.push(format!(
                                "{name}: in-features {k} not divisible by the {} block size {block}, kept {}",
                                opts.layout.format(),
                                t.dtype
                            ));
                            keep(format!("k={k} not divisible by {block}"))
                        } else {
                            Action::Quantize {
                                module: module.clone(),
                                n,
                                k,
                                group: fused_group(&module),
                            }
                        }
                    }
                }
            };
            entries.push(PlanEntry {
                name: name.into(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                action,
            });
        }
        if opts.experts_only
            && !entries.iter().any(|e| {
                matches!(&e.action, Action::Quantize { module, .. } if is_routed_expert(module))
            })
        {
            return Err(PlanError::NoExperts {
                dir: ck.root().into(),
                arch,
            });
        }
        // A fused set only matters when two or more members are quantized.
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for e in &entries {
            if let Action::Quantize { group: Some(g), .. } = &e.action {
                *count.entry(g.clone()).or_default() += 1;
            }
        }
        for e in &mut entries {
            if let Action::Quantize { group, .. } = &mut e.action {
                if group
                    .as_ref()
                    .is_some_and(|g| count.get(g).copied().unwrap_or(0) < 2)
                {
                    *group = None;
                }
            }
        }
        if let Some(w) = partly_quantized_fused_sets(&entries) {
            warnings.push(w);
        }
        let cfg = ck.config();
        let count = |keys: &[&str]| keys.iter().find_map(|k| cfg.get(*k)?.as_u64());
        let experts = count(&["num_experts", "num_local_experts", "n_routed_experts"]);
        let top_k = count(&["num_experts_per_tok"]);
        Ok(Plan {
            arch,
            family: fam,
            layout: opts.layout,
            entries,
            warnings,
            routed_share: match (top_k, experts) {
                (Some(k), Some(e)) if e > 0 && k <= e => Some(k as f64 / e as f64),
                _ => None,
            },
            tied_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        })
    }

    /// Output header entries of source entry `i`.
    pub fn outputs(&self, i: usize) -> Vec<HeaderEntry> {
        let e = &self.entries[i];
        match &e.action {
            Action::Quantize { module, n, k, .. } => self.layout.tensor_entries(module, *n, *k),
            Action::Keep { .. } => vec![HeaderEntry {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            }],
        }
    }

    /// Output bytes of source entry `i`.
    pub fn bytes_out(&self, i: usize) -> u64 {
        self.outputs(i).iter().map(|h| h.byte_len()).sum()
    }

    /// Modules kept dense that are 2-D `.weight`s (the config's `ignore` list), sorted.
    pub fn ignored_modules(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| {
                matches!(e.action, Action::Keep { .. })
                    && e.shape.len() == 2
                    && e.name.ends_with(".weight")
            })
            .filter(|e| !e.name.contains("embed_tokens") && !e.name.contains("word_embeddings"))
            .map(|e| e.name.trim_end_matches(".weight").to_string())
            .collect()
    }

    /// Totals: (tensors quantized, tensors kept, bytes in, bytes out, quantized elements).
    pub fn totals(&self) -> PlanTotals {
        let mut t = PlanTotals::default();
        let (mut dec_in, mut dec_out) = (0.0f64, 0.0f64);
        for (i, e) in self.entries.iter().enumerate() {
            t.bytes_in += e.bytes_in();
            t.bytes_out += self.bytes_out(i);
            t.params += e.numel();
            let read = self.decode_share(e);
            dec_in += read * e.bytes_in() as f64;
            dec_out += read * self.bytes_out(i) as f64;
            match e.action {
                Action::Quantize { .. } => {
                    t.quantized += 1;
                    t.quantized_params += e.numel();
                }
                Action::Keep { .. } => t.kept += 1,
            }
        }
        t.decode_bytes_in = dec_in.round() as u64;
        t.decode_bytes_out = dec_out.round() as u64;
        t
    }

    /// The share of a tensor one batch-1 decode token reads: `top_k / experts` of a routed
    /// expert, one row of an untied embedding, none of MiMo's MTP layers (decoding does not run
    /// them), all of anything else.
    fn decode_share(&self, e: &PlanEntry) -> f64 {
        let module = e.name.strip_suffix(".weight").unwrap_or(&e.name);
        if e.name.contains(".mtp_layers.") {
            0.0
        } else if is_routed_expert(module) {
            self.routed_share.unwrap_or(1.0)
        } else if e.name == "model.embed_tokens.weight"
            && !self.tied_embeddings
            && e.shape.len() == 2
        {
            1.0 / e.shape[0].max(1) as f64
        } else {
            1.0
        }
    }

    /// A human-readable table of the plan.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "architecture: {} ({:?} rules), output: {}",
            self.arch, self.family, self.layout
        );
        for (i, e) in self.entries.iter().enumerate() {
            let what = match &e.action {
                Action::Quantize { group: Some(g), .. } => {
                    format!("{} (shares global scale: {g})", self.layout.format())
                }
                Action::Quantize { .. } => self.layout.format().to_string(),
                Action::Keep { reason } => format!("keep {} ({reason})", e.dtype),
            };
            let _ = writeln!(
                s,
                "  {:<64} {:>14} -> {:>12}  {}",
                e.name,
                fmt_shape(&e.shape),
                self.bytes_out(i),
                what
            );
        }
        let t = self.totals();
        let _ = writeln!(
            s,
            "{} quantized, {} kept; {} -> {} bytes ({:.2}x); {:.3} bits per weight overall",
            t.quantized,
            t.kept,
            t.bytes_in,
            t.bytes_out,
            t.bytes_in as f64 / t.bytes_out.max(1) as f64,
            t.bits_per_weight()
        );
        let _ = writeln!(
            s,
            "a batch-1 decode token reads {} -> {} bytes of weights ({:.2}x fewer{})",
            t.decode_bytes_in,
            t.decode_bytes_out,
            t.decode_bytes_in as f64 / t.decode_bytes_out.max(1) as f64,
            match self.routed_share {
                Some(r) => format!("; routed experts counted at {r:.4} of their bytes"),
                None => String::new(),
            }
        );
        s
    }
}

fn fmt_shape(s: &[usize]) -> String {
    format!("{s:?}")
}

/// Plan totals.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PlanTotals {
    /// Tensors quantized.
    pub quantized: usize,
    /// Tensors kept.
    pub kept: usize,
    /// Source bytes.
    pub bytes_in: u64,
    /// Output bytes.
    pub bytes_out: u64,
    /// All elements.
    pub params: u64,
    /// Elements quantized.
    pub quantized_params: u64,
    /// Source bytes of weights one batch-1 decode token reads (routed experts at `top_k /
    /// experts`, one embedding row, no MTP layers): what bounds decode speed by bandwidth.
    pub decode_bytes_in: u64,
    /// The same for the output.
    pub decode_bytes_out: u64,
}

impl PlanTotals {
    /// Output bits per source element.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes_out as f64 * 8.0 / self.params.max(1) as f64
    }
}
