//! The conversion pipeline: open, plan, one scan of the source (sha256 of every file and the
//! amax of every tensor to quantize, see [`scan`]) overlapped with quantizing in parallel and
//! writing shard by shard in a fixed order (each tensor waits for its own and its fused set's
//! amax), then config, side files, manifest, and the atomic rename. With `--resume`, the finished shards of a killed run are
//! checked and reused (see [`resume`]).

pub mod resume;
pub mod scan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use mimo_runtime::checkpoint::{Checkpoint, CheckpointError, HeaderEntry, CONFIG_FILE, INDEX_FILE};
use mimo_runtime::format::{hf_quant_config, quantization_config, HF_QUANT_CONFIG_FILE};
use rayon::prelude::*;

use self::resume::{PlannedShard, ShardRecord};
use self::scan::AmaxBoard;
use crate::manifest::{
    sha256_file, FileHash, Manifest, OptionsInfo, SourceInfo, TensorRecord, ToolInfo, MANIFEST_FILE,
};
use crate::plan::{Action, Plan, PlanError, PlanOptions, PlanTotals};
use crate::quantizer::{own_scale, shared_scale, src_dtype, AmaxAcc, QuantError, Quantized};
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
    /// Shards taken over from a killed run (`--resume`) after checking their hashes.
    pub resumed_shards: usize,
    /// What `--resume` found: each shard reused or redone, and why.
    pub notes: Vec<String>,
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
    convert_resumable(cfg, quant, false, cancel, progress)
}

/// The output tensors of every plan entry and the shards (ranges of entries) they go into.
struct ShardPlan {
    outputs: Vec<Vec<HeaderEntry>>,
    shards: Vec<std::ops::Range<usize>>,
}

impl ShardPlan {
    fn new(plan: &Plan, max_shard_size: u64) -> ShardPlan {
        let outputs: Vec<Vec<HeaderEntry>> =
            (0..plan.entries.len()).map(|i| plan.outputs(i)).collect();
        let sizes: Vec<u64> = outputs
            .iter()
            .map(|o| o.iter().map(|h| h.byte_len()).sum())
            .collect();
        let shards = plan_shards(&sizes, max_shard_size);
        ShardPlan { outputs, shards }
    }

    fn name(&self, si: usize) -> String {
        shard_name(si, self.shards.len())
    }
}

/// [`convert_with`]; with `resume`, the newest temporary folder of a killed run of the same
/// output is taken over and its finished shards are reused when their completion records match
/// this run (same tool build, source hashes, options, calibration) and their recomputed sha256
/// matches the record. The output is byte-identical to an uninterrupted run either way.
pub fn convert_resumable(
    cfg: &ConvertConfig,
    quant: &crate::methods::QuantOptions,
    resume: bool,
    cancel: &AtomicBool,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<ConvertSummary, ConvertError> {
    let ck = Checkpoint::open(&cfg.source)?;
    let plan = Plan::build(&ck, &cfg.plan)?;
    let tmp = TempOutput::create_or_adopt(&cfg.output, cfg.force, resume)?;
    let layout = plan.layout;
    let check_cancel = || {
        if cancel.load(Ordering::Relaxed) {
            Err(ConvertError::Interrupted)
        } else {
            Ok(())
        }
    };
    let options = OptionsInfo {
        format: layout.format().to_string(),
        layout: layout.name().into(),
        method: quant.method.name().into(),
        ignore: cfg.plan.ignore.clone(),
        quantize_lm_head: cfg.plan.quantize_lm_head,
        experts_only: cfg.plan.experts_only,
        max_shard_size: cfg.max_shard_size,
    };
    let shard_plan = ShardPlan::new(&plan, cfg.max_shard_size);
    // A hub download's weights are LFS blobs named by their sha256, checked on arrival: the
    // manifest takes those hashes instead of reading 2 GB per 2 GB again. A local folder is
    // always hashed.
    let known_blobs: BTreeMap<PathBuf, String> = match cfg.source_repo {
        Some(_) => ck
            .files()
            .filter_map(|p| {
                crate::hub::lfs_blob_sha256(&cfg.source, p).map(|h| (p.to_path_buf(), h))
            })
            .collect(),
        None => BTreeMap::new(),
    };

    // The run's fingerprint, known once the source is hashed; completion records of finished
    // shards are written only from then on.
    let fingerprint: OnceLock<String> = OnceLock::new();
    let mut notes = Vec::new();
    let mut known_hashes = None;
    let mut reuse = BTreeMap::new();
    let board = AmaxBoard::new(plan.entries.len());
    if resume {
        match tmp.adopted() {
            Some(from) => {
                // The fingerprint needs the source hashes before any shard can be judged, so
                // the scan runs to its end first here.
                let stop = || cancel.load(Ordering::Relaxed);
                let hashes = scan::scan_sources(&ck, &plan, &board, &known_blobs, &stop)?;
                let fp = resume::fingerprint(VERSION, &hashes, &options, quant);
                let names: Vec<String> = (0..shard_plan.shards.len())
                    .map(|si| shard_plan.name(si))
                    .collect();
                let planned: Vec<PlannedShard<'_>> = shard_plan
                    .shards
                    .iter()
                    .zip(&names)
                    .map(|(r, name)| PlannedShard {
                        name,
                        tensors: r.clone().map(|i| plan.entries[i].name.as_str()).collect(),
                    })
                    .collect();
                notes.push(format!(
                    "resume: taking over {} (left by a killed run)",
                    from.display()
                ));
                let (r, n) = resume::check_finished(tmp.path(), &planned, &fp)?;
                reuse = r;
                notes.extend(n);
                let _ = fingerprint.set(fp);
                known_hashes = Some(hashes);
            }
            None => notes.push(format!(
                "resume: no interrupted run of {} found; converting from the start",
                cfg.output.display()
            )),
        }
    }

    // Stops the source scan early when the conversion fails or is interrupted.
    let failed = AtomicBool::new(false);
    let stop_hashing = || failed.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    let (result, input_hashes) = std::thread::scope(|s| {
        // The source scan on its own thread, reading through the page cache; the quantizer
        // waits on the board for the amaxes it needs.
        let hasher = known_hashes.is_none().then(|| {
            let (stop_hashing, fingerprint, options) = (&stop_hashing, &fingerprint, &options);
            let (ck, plan, board, known) = (&ck, &plan, &board, &known_blobs);
            s.spawn(move || {
                let h = scan::scan_sources(ck, plan, board, known, stop_hashing)?;
                let _ = fingerprint.set(resume::fingerprint(VERSION, &h, options, quant));
                Ok::<_, ConvertError>(h)
            })
        });
        let r = write_all(
            &ck,
            &plan,
            &shard_plan,
            &reuse,
            &board,
            &fingerprint,
            quant,
            tmp.path(),
            cancel,
            progress,
        );
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        (r, hasher.map(|h| h.join()))
    });
    let (records, shard_hashes) = result?;
    check_cancel()?;
    let input_hashes = match (input_hashes, known_hashes) {
        (Some(Ok(h)), _) => h?,
        (Some(Err(_)), _) | (None, None) => return Err(ConvertError::Interrupted),
        (None, Some(h)) => h,
    };
    // The records are for an interrupted run only; the output never holds them.
    let rdir = tmp.path().join(resume::RESUME_DIR);
    if rdir.exists() {
        std::fs::remove_dir_all(&rdir).map_err(|source| WriteError::Io { path: rdir, source })?;
    }

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
        options,
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
        resumed_shards: reuse.len(),
        notes,
    })
}

type Records = BTreeMap<String, TensorRecord>;

/// A quantized batch: plan index, and for a quantized tensor its output and per-tensor scale.
type Batch = Vec<(usize, Option<(Quantized, Option<f32>)>)>;

/// Measures, quantizes and writes every shard into `dir`, except those in `reuse` (finished by
/// a killed run and checked), whose records are taken from their completion records. Once the
/// `fingerprint` is known, each finished shard gets its completion record.
#[allow(clippy::too_many_arguments)]
fn write_all(
    ck: &Checkpoint,
    plan: &Plan,
    sp: &ShardPlan,
    reuse: &BTreeMap<usize, ShardRecord>,
    board: &AmaxBoard,
    fingerprint: &OnceLock<String>,
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
    // Fused sets share one per-tensor scale.
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in plan.entries.iter().enumerate() {
        if let Action::Quantize { group: Some(g), .. } = &e.action {
            groups.entry(g.as_str()).or_default().push(i);
        }
    }
    // The amax of entry `m` as the tensor's own scale: from the source scan when it got there
    // first, else measured here from the memory map (and published for the fused set).
    let own = |m: usize| -> Result<Option<f32>, ConvertError> {
        let t = ck.tensor(&plan.entries[m].name)?;
        let dt = src_dtype(&t)?;
        let slot = match board.get(m) {
            Some(s) => s,
            None => {
                let mut acc = AmaxAcc::new(dt);
                acc.update(t.data);
                let s = scan::slot_of(&acc);
                board.publish(m, s);
                s
            }
        };
        match slot {
            scan::Slot::Ready(a) => Ok(own_scale(layout, a, dt)),
            scan::Slot::NonFinite(index, value) => Err(QuantError::NonFinite {
                file: t.file.to_path_buf(),
                tensor: t.name.to_string(),
                index,
                value,
            }
            .into()),
            // Unsupported dtypes were refused by src_dtype above.
            scan::Slot::Unsupported | scan::Slot::Pending => Err(QuantError::UnsupportedDType {
                file: t.file.to_path_buf(),
                tensor: t.name.to_string(),
                dtype: t.dtype,
            }
            .into()),
        }
    };
    // The per-tensor scale of entry `i`: its own, or the shared one of its fused set.
    let scale_of = |i: usize| -> Result<Option<f32>, ConvertError> {
        match &plan.entries[i].action {
            Action::Quantize { group: Some(g), .. } => {
                let members = groups.get(g.as_str()).map(Vec::as_slice).unwrap_or(&[]);
                let scales = members
                    .iter()
                    .map(|&m| own(m))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(shared_scale(layout, scales.into_iter().flatten()))
            }
            _ => own(i),
        }
    };

    // Pass 2: shards in order; within a shard, batches quantized in parallel, written in order.
    progress(Progress::Phase("writing"));
    let outputs = &sp.outputs;
    let batch = (rayon::current_num_threads() * 2).max(2);
    let mut records = Records::new();
    let mut hashes = Vec::new();
    let mut index_shards = Vec::new();
    // Finished shards waiting for the fingerprint before their completion records are written.
    let mut pending: Vec<ShardRecord> = Vec::new();
    for (si, range) in sp.shards.iter().enumerate() {
        let name = sp.name(si);
        let entries: Vec<HeaderEntry> = range.clone().flat_map(|i| outputs[i].clone()).collect();
        if let Some(done) = reuse.get(&si) {
            records.extend(done.tensors.iter().map(|(k, v)| (k.clone(), v.exact())));
            hashes.push(done.file.clone());
            index_shards.push((name, entries));
            for i in range.clone() {
                let e = &plan.entries[i];
                progress(Progress::Tensor {
                    name: &e.name,
                    bytes: e.bytes_in(),
                });
            }
            continue;
        }
        let mut w = ShardWriter::create(&dir.join(&name), entries.clone())?;
        let idx: Vec<usize> = range.clone().collect();
        let mut shard_records = Records::new();
        // Quantizes one batch, tensors in parallel.
        let quantize_batch = |chunk: &[usize]| -> Result<Batch, ConvertError> {
            chunk
                .par_iter()
                .map(|&i| {
                    let e = &plan.entries[i];
                    match &e.action {
                        Action::Quantize { module, .. } => {
                            let scale = quant.scale_for(module, scale_of(i)?);
                            let t = ck.tensor(&e.name)?;
                            let q =
                                crate::methods::quantize_tensor(&t, module, layout, scale, quant)?;
                            ck.release(t.name);
                            Ok((i, Some((q, scale))))
                        }
                        Action::Keep { .. } => Ok((i, None)),
                    }
                })
                .collect()
        };
        // Writes one quantized batch in plan order and records each tensor.
        let write_batch = |w: &mut ShardWriter,
                           shard_records: &mut Records,
                           batch: Batch|
         -> Result<(), ConvertError> {
            for (i, res) in batch {
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
                    (
                        Action::Quantize { group, .. },
                        Some((Quantized { tensors, stats }, scale)),
                    ) => {
                        for (h, data) in tensors {
                            w.write_tensor(&h.name, &data)?;
                            crate::quantizer::recycle(data);
                        }
                        rec.action = "quantized".into();
                        rec.fused_group = group.clone();
                        rec.global_scale = scale;
                        rec.sqnr_db = stats.sqnr_db.is_finite().then_some(stats.sqnr_db);
                        rec.max_abs_err = Some(stats.max_abs_err);
                    }
                    _ => {
                        let t = ck.tensor(&e.name)?;
                        // Kept tensors are copied byte for byte: a NaN or an infinity in a float
                        // one (a norm weight, the embeddings) is refused as in the weights that
                        // are quantized. Checked here, on the pages the copy reads next, so they
                        // are not held resident for longer than the copy holds them.
                        crate::quantizer::check_finite(&t)?;
                        w.write_tensor(&e.name, t.data)?;
                        ck.release(&e.name);
                        rec.reason = reason_of(&e.action);
                    }
                }
                shard_records.insert(e.name.clone(), rec);
                progress(Progress::Tensor {
                    name: &e.name,
                    bytes: e.bytes_in(),
                });
            }
            Ok(())
        };
        // A two-stage pipeline: batch k is written (and its bytes hashed) on one thread while
        // batch k + 1 is quantized on the others. The write order is unchanged.
        let mut ready: Option<Batch> = None;
        for chunk in idx.chunks(batch) {
            if cancel.load(Ordering::Relaxed) {
                return Err(ConvertError::Interrupted);
            }
            let to_write = ready.take();
            let (quantized, written) = rayon::join(
                || quantize_batch(chunk),
                || match to_write {
                    Some(b) => write_batch(&mut w, &mut shard_records, b),
                    None => Ok(()),
                },
            );
            written?;
            ready = Some(quantized?);
        }
        if let Some(b) = ready.take() {
            write_batch(&mut w, &mut shard_records, b)?;
        }
        let file = w.finish()?;
        resume::sync_dir(dir)?;
        pending.push(ShardRecord {
            version: 0,
            fingerprint: String::new(),
            file: file.clone(),
            tensors: shard_records
                .iter()
                .map(|(k, v)| (k.clone(), resume::StoredRecord::new(v.clone())))
                .collect(),
        });
        if let Some(fp) = fingerprint.get() {
            for mut rec in pending.drain(..) {
                rec.version = resume::RECORD_VERSION;
                rec.fingerprint.clone_from(fp);
                resume::write_record(dir, &rec)?;
            }
        }
        records.extend(shard_records);
        hashes.push(file);
        index_shards.push((name, entries));
    }
    if sp.shards.len() > 1 {
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use mimo_runtime::fixtures::{write_fixture, Arch};

    fn manifest_source(dir: &Path) -> SourceInfo {
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(v["source"].clone()).unwrap()
    }

    fn run(source: &Path, repo: Option<(String, String)>, output: PathBuf) -> ConvertSummary {
        let cfg = ConvertConfig {
            source: source.to_path_buf(),
            source_repo: repo,
            output,
            plan: PlanOptions {
                layout: mimo_runtime::format::Layout::CtNvfp4,
                ignore: Vec::new(),
                quantize_lm_head: false,
                experts_only: false,
            },
            max_shard_size: DEFAULT_MAX_SHARD,
            force: false,
        };
        convert(&cfg, &AtomicBool::new(false), &|_| {}).unwrap()
    }

    /// A hub snapshot's LFS weights take their blob's name as sha256 without being read again
    /// (the blob here is deliberately named by a hash that is not its content's, so that a
    /// re-hash would show); a git blob (config.json) and the same folder converted as a local
    /// path are hashed from their bytes. The quantized output is the same either way (the
    /// quantizer measures the amaxes the scan did not).
    #[test]
    fn hub_lfs_blobs_keep_their_hash_local_folders_are_hashed() {
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        write_fixture(&plain, Arch::Llama, 5).unwrap();
        let repo = d.path().join("hub/models--o--n");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        let fake = "ab".repeat(32);
        let mut names: Vec<String> = std::fs::read_dir(&plain)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut true_hash = String::new();
        for (i, name) in names.iter().enumerate() {
            let etag = if name.ends_with(".safetensors") {
                true_hash = crate::manifest::sha256_file(&plain.join(name))
                    .unwrap()
                    .sha256;
                fake.clone()
            } else {
                format!("{i:040x}")
            };
            std::fs::copy(plain.join(name), repo.join("blobs").join(&etag)).unwrap();
            std::os::unix::fs::symlink(Path::new("../../blobs").join(&etag), snap.join(name))
                .unwrap();
        }
        assert!(names.iter().any(|n| n == "model.safetensors"));
        assert_ne!(true_hash, fake);

        let hub_out = d.path().join("hub-out");
        run(&snap, Some(("o/n".into(), commit.into())), hub_out.clone());
        let local_out = d.path().join("local-out");
        run(&snap, None, local_out.clone());

        let hub = manifest_source(&hub_out);
        let local = manifest_source(&local_out);
        let weights = |s: &SourceInfo| {
            s.files
                .iter()
                .find(|f| f.name == "model.safetensors")
                .cloned()
                .unwrap()
        };
        assert_eq!(weights(&hub).sha256, fake);
        assert_eq!(weights(&local).sha256, true_hash);
        assert_eq!(weights(&hub).bytes, weights(&local).bytes);
        // Non-LFS files are hashed in both.
        let config = |s: &SourceInfo| s.files.iter().find(|f| f.name == CONFIG_FILE).cloned();
        assert_eq!(config(&hub), config(&local));
        assert!(config(&hub).is_some());
        assert_eq!(
            std::fs::read(hub_out.join("model.safetensors")).unwrap(),
            std::fs::read(local_out.join("model.safetensors")).unwrap()
        );
    }
}
