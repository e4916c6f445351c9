//! The conversion pipeline: open, plan, measure (amax pass), share fused global scales,
//! quantize in parallel and write shard by shard in a fixed order, then config, side files,
//! manifest, and the atomic rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use mimo_runtime::checkpoint::{Checkpoint, CheckpointError, HeaderEntry, CONFIG_FILE, INDEX_FILE};
use mimo_runtime::format::{hf_quant_config, quantization_config, HF_QUANT_CONFIG_FILE};
use rayon::prelude::*;

use crate::manifest::{
    sha256_file, sha256_file_until, FileHash, Manifest, OptionsInfo, SourceInfo, TensorRecord,
    ToolInfo, MANIFEST_FILE,
};
use crate::plan::{Action, Plan, PlanError, PlanOptions, PlanTotals};
use crate::quantizer::{amax, own_scale, shared_scale, src_dtype, QuantError, Quantized};
use crate::writer::{
    copy_side_files, plan_shards, shard_name, write_index, write_json, ShardWriter, TempOutput,
    WriteError,
};

/// The tool version written into configs and manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default --max-shard-size: 5 GB.
pub const DEFAULT_MAX_SHARD: u64 = 5_000_000_000;

/// A validated conversion request.
#[derive(Debug, Clone)]
pub struct ConvertConfig {
    /// Source checkpoint folder.
    pub source: PathBuf,
    /// Hub repository and revision the source came from, if any (for the manifest).
    pub source_repo: Option<(String, String)>,
    /// Output folder (must not exist unless `force`).
    pub output: PathBuf,
    /// Plan options.
    pub plan: PlanOptions,
    /// Shard size limit in bytes.
    pub max_shard_size: u64,
    /// Replace an existing output.
    pub force: bool,
}

/// Why a conversion failed. Nothing is left in the output location in every case.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the source failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Planning failed.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A tensor could not be quantized.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The MSE or GPTQ quantizer failed on a tensor.
    #[error(transparent)]
    Method(#[from] crate::methods::ApplyError),
    /// Hashing a source file failed.
    #[error("{path}: hashing failed")]
    Hash {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Interrupted (Ctrl-C); the partial output was removed.
    #[error("interrupted; the partial output was removed")]
    Interrupted,
}

/// Progress reports.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Work is starting: tensor count and source bytes.
    Start { tensors: usize, bytes: u64 },
    /// A phase name (measuring, writing, hashing).
    Phase(&'a str),
    /// One source tensor is done.
    Tensor { name: &'a str, bytes: u64 },
}

/// Result of a conversion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertSummary {
    /// Output folder.
    pub output: PathBuf,
    /// Layout name.
    pub layout: String,
    /// Architecture.
    pub architecture: String,
    /// Plan totals.
    pub totals: PlanTotals,
    /// Output files.
    pub files: Vec<FileHash>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Lowest SQNR over quantized tensors (dB).
    pub min_sqnr_db: Option<f64>,
    /// Mean SQNR over quantized tensors (dB).
    pub mean_sqnr_db: Option<f64>,
}

/// Source files to hash: config, index and weights, sorted by name.
fn source_files(ck: &Checkpoint) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ck.files().map(Path::to_path_buf).collect();
    v.push(ck.root().join(CONFIG_FILE));
    let idx = ck.root().join(INDEX_FILE);
    if idx.is_file() {
        v.push(idx);
    }
    v.sort();
    v
}

/// Runs the conversion in the current rayon pool. `cancel` is polled between batches of
/// tensors; when set the temporary output is removed and [`ConvertError::Interrupted`] returned.
pub fn convert(
    cfg: &ConvertConfig,
    cancel: &AtomicBool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<ConvertSummary, ConvertError> {
    convert_with(
        cfg,
        &crate::methods::QuantOptions::default(),
        cancel,
        progress,
    )
}

/// [`convert`] with a quantization method (RTN, MSE, GPTQ) and its calibration statistics.
pub fn convert_with(
    cfg: &ConvertConfig,
    quant: &crate::methods::QuantOptions,
    cancel: &AtomicBool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<ConvertSummary, ConvertError> {
    let ck = Checkpoint::open(&cfg.source)?;
    let plan = Plan::build(&ck, &cfg.plan)?;
    let tmp = TempOutput::create(&cfg.output, cfg.force)?;
    let layout = plan.layout;
    let check_cancel = || {
        if cancel.load(Ordering::Relaxed) {
            Err(ConvertError::Interrupted)
        } else {
            Ok(())
        }
    };

    // Stops the input hashing early when the conversion fails or is interrupted.
    let failed = AtomicBool::new(false);
    let stop_hashing = || failed.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    let (result, input_hashes) = std::thread::scope(|s| {
        // Input hashes on their own thread, reading through the page cache.
        let files = source_files(&ck);
        let stop_hashing = &stop_hashing;
        let hasher = s.spawn(move || {
            files
                .iter()
                .map(|p| {
                    sha256_file_until(p, stop_hashing).map_err(|source| ConvertError::Hash {
                        path: p.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<FileHash>, ConvertError>>()
        });
        let r = write_all(&ck, &plan, cfg, quant, tmp.path(), cancel, progress);
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        (r, hasher.join())
    });
    let (records, shard_hashes) = result?;
    check_cancel()?;
    let input_hashes = match input_hashes {
        Ok(h) => h?,
        Err(_) => return Err(ConvertError::Interrupted),
    };

    // config.json with the quantization config; ModelOpt's hf_quant_config.json; side files.
    let ignore = plan.ignored_modules();
    let mut config = ck.config().clone();
    if let Some(o) = config.as_object_mut() {
        o.insert(
            "quantization_config".into(),
            quantization_config(layout, &ignore, VERSION),
        );
    }
    write_json(&tmp.path().join(CONFIG_FILE), &config)?;
    if let Some(h) = hf_quant_config(layout, &ignore, VERSION) {
        write_json(&tmp.path().join(HF_QUANT_CONFIG_FILE), &h)?;
    }
    let (_, side_warnings) = copy_side_files(&cfg.source, tmp.path())?;
    crate::report::write_svg(tmp.path(), cfg, layout, quant.method, &plan.arch, &records)?;

    // Hash every output file (shards from the writer, the rest now).
    let mut files = shard_hashes;
    let shard_names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    let mut rest: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .map_err(|source| WriteError::Io {
            path: tmp.path().into(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !shard_names
                .iter()
                .any(|n| p.file_name().is_some_and(|f| f == n.as_str()))
        })
        .collect();
    rest.sort();
    for p in rest {
        files.push(sha256_file(&p).map_err(|source| ConvertError::Hash {
            path: p.clone(),
            source,
        })?);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));

    let stats: Vec<f64> = records
        .values()
        .filter_map(|r| r.sqnr_db)
        .filter(|s| s.is_finite())
        .collect();
    let manifest = Manifest {
        tool: ToolInfo {
            name: "mimo-quant".into(),
            version: VERSION.into(),
        },
        source: SourceInfo {
            path: cfg.source.display().to_string(),
            repo: cfg.source_repo.as_ref().map(|r| r.0.clone()),
            revision: cfg.source_repo.as_ref().map(|r| r.1.clone()),
            files: input_hashes,
        },
        options: OptionsInfo {
            format: layout.format().to_string(),
            layout: layout.name().into(),
            method: quant.method.name().into(),
            ignore: cfg.plan.ignore.clone(),
            quantize_lm_head: cfg.plan.quantize_lm_head,
            max_shard_size: cfg.max_shard_size,
        },
        architecture: plan.arch.clone(),
        tensors: records,
        files: files.clone(),
    };
    let mut mv = serde_json::to_value(&manifest).unwrap_or_default();
    if let (Some(o), Some(info)) = (mv.as_object_mut(), &quant.manifest_info) {
        o.insert("calibration".into(), info.clone());
    }
    write_json(&tmp.path().join(MANIFEST_FILE), &mv)?;
    check_cancel()?;
    let removed_leftovers = tmp.removed_leftovers().to_vec();
    tmp.commit()?;
    Ok(ConvertSummary {
        output: cfg.output.clone(),
        layout: layout.name().into(),
        architecture: plan.arch.clone(),
        totals: plan.totals(),
        files,
        warnings: plan
            .warnings
            .iter()
            .chain(&removed_leftovers)
            .chain(&side_warnings)
            .cloned()
            .collect(),
        min_sqnr_db: stats.iter().copied().reduce(f64::min),
        mean_sqnr_db: (!stats.is_empty()).then(|| stats.iter().sum::<f64>() / stats.len() as f64),
    })
}

type Records = BTreeMap<String, TensorRecord>;

/// Measures, quantizes and writes every shard into `dir`.
fn write_all(
    ck: &Checkpoint,
    plan: &Plan,
    cfg: &ConvertConfig,
    quant: &crate::methods::QuantOptions,
    dir: &Path,
    cancel: &AtomicBool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<(Records, Vec<FileHash>), ConvertError> {
    let layout = plan.layout;
    let n = plan.entries.len();
    progress(Progress::Start {
        tensors: n,
        bytes: plan.entries.iter().map(|e| e.bytes_in()).sum(),
    });

    // Pass 1: amax (and the NaN/Inf check) of every tensor to quantize.
    progress(Progress::Phase("measuring"));
    let quant_idx: Vec<usize> = (0..n)
        .filter(|&i| matches!(plan.entries[i].action, Action::Quantize { .. }))
        .collect();
    let amaxes: Vec<(usize, f32)> = quant_idx
        .par_iter()
        .map(|&i| {
            let t = ck.tensor(&plan.entries[i].name)?;
            let a = amax(&t)?;
            ck.release(t.name);
            Ok((i, a))
        })
        .collect::<Result<_, ConvertError>>()?;
    let mut scale: Vec<Option<f32>> = vec![None; n];
    for &(i, a) in &amaxes {
        let t = ck.tensor(&plan.entries[i].name)?;
        scale[i] = own_scale(layout, a, src_dtype(&t)?);
    }
    // Fused sets share one per-tensor scale.
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for &i in &quant_idx {
        if let Action::Quantize { group: Some(g), .. } = &plan.entries[i].action {
            groups.entry(g.as_str()).or_default().push(i);
        }
    }
    for members in groups.values() {
        let shared = shared_scale(layout, members.iter().filter_map(|&i| scale[i]));
        for &i in members {
            scale[i] = shared;
        }
    }

    // Pass 2: shards in order; within a shard, batches quantized in parallel, written in order.
    progress(Progress::Phase("writing"));
    let outputs: Vec<Vec<HeaderEntry>> = (0..n).map(|i| plan.outputs(i)).collect();
    let sizes: Vec<u64> = outputs
        .iter()
        .map(|o| o.iter().map(|h| h.byte_len()).sum())
        .collect();
    let shards = plan_shards(&sizes, cfg.max_shard_size);
    let batch = (rayon::current_num_threads() * 2).max(2);
    let mut records = Records::new();
    let mut hashes = Vec::new();
    let mut index_shards = Vec::new();
    for (si, range) in shards.iter().enumerate() {
        let name = shard_name(si, shards.len());
        let entries: Vec<HeaderEntry> = range.clone().flat_map(|i| outputs[i].clone()).collect();
        let mut w = ShardWriter::create(&dir.join(&name), entries.clone())?;
        let idx: Vec<usize> = range.clone().collect();
        for chunk in idx.chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                return Err(ConvertError::Interrupted);
            }
            let results: Vec<Option<Quantized>> = chunk
                .par_iter()
                .map(|&i| {
                    let e = &plan.entries[i];
                    match &e.action {
                        Action::Quantize { module, .. } => {
                            let t = ck.tensor(&e.name)?;
                            let q = crate::methods::quantize_tensor(
                                &t, module, layout, scale[i], quant,
                            )?;
                            ck.release(t.name);
                            Ok(Some(q))
                        }
                        Action::Keep { .. } => Ok(None),
                    }
                })
                .collect::<Result<_, ConvertError>>()?;
            for (&i, res) in chunk.iter().zip(results) {
                let e = &plan.entries[i];
                let mut rec = TensorRecord {
                    action: "kept".into(),
                    reason: None,
                    dtype: e.dtype.to_string(),
                    shape: e.shape.clone(),
                    fused_group: None,
                    global_scale: None,
                    sqnr_db: None,
                    max_abs_err: None,
                };
                match (&e.action, res) {
                    (Action::Quantize { group, .. }, Some(Quantized { tensors, stats })) => {
                        for (h, data) in &tensors {
                            w.write_tensor(&h.name, data)?;
                        }
                        rec.action = "quantized".into();
                        rec.fused_group = group.clone();
                        rec.global_scale = scale[i];
                        rec.sqnr_db = stats.sqnr_db.is_finite().then_some(stats.sqnr_db);
                        rec.max_abs_err = Some(stats.max_abs_err);
                    }
                    _ => {
                        let t = ck.tensor(&e.name)?;
                        w.write_tensor(&e.name, t.data)?;
                        ck.release(&e.name);
                        rec.reason = reason_of(&e.action);
                    }
                }
                records.insert(e.name.clone(), rec);
                progress(Progress::Tensor {
                    name: &e.name,
                    bytes: e.bytes_in(),
                });
            }
        }
        hashes.push(w.finish()?);
        index_shards.push((name, entries));
    }
    if shards.len() > 1 {
        write_index(dir, &index_shards)?;
    }
    Ok((records, hashes))
}

fn reason_of(a: &Action) -> Option<String> {
    match a {
        Action::Keep { reason } => Some(reason.clone()),
        Action::Quantize { .. } => None,
    }
}
