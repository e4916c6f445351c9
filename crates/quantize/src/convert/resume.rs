//! `convert --resume`: completion records of finished shards and their checks.
//!
//! Each shard is written as `.<name>.partial`, fsynced and renamed to `<name>`; only then is a
//! completion record `.mimo-quant-resume/<name>.json` written (itself through a temporary file,
//! fsync and rename). The record holds the shard's name, size and sha256, the per-tensor records
//! of the tensors it holds, and a fingerprint of everything that shapes the bytes: tool version
//! and build, source file hashes, options, method and calibration statistics. A resumed run
//! reuses a shard only when its record exists, carries the same fingerprint, names the same
//! tensors, and the file's recomputed size and sha256 match the record. Everything else in the
//! adopted folder is deleted and redone.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{sha256_file, FileHash, OptionsInfo, TensorRecord};
use crate::methods::QuantOptions;
use crate::writer::{io, write_synced, WriteError};

/// Folder of completion records inside the temporary output (removed before the commit).
pub const RESUME_DIR: &str = ".mimo-quant-resume";

/// Bumped whenever the record layout or the fingerprint's inputs change.
pub const RECORD_VERSION: u32 = 1;

/// A finished shard, as recorded after it was synced and renamed into place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Layout version of this record.
    pub version: u32,
    /// Fingerprint of the run that wrote the shard ([`fingerprint`]).
    pub fingerprint: String,
    /// The shard file: name, size, sha256.
    pub file: FileHash,
    /// The records of the source tensors stored in the shard.
    pub tensors: BTreeMap<String, StoredRecord>,
}

/// A [`TensorRecord`] with its floats also kept as raw bits: serde_json does not parse every
/// f64 back to the same bits, and the resumed manifest must be byte-identical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The record (its floats for reading only).
    pub record: TensorRecord,
    /// `global_scale` bits.
    pub global_scale_bits: Option<u32>,
    /// `sqnr_db` bits.
    pub sqnr_db_bits: Option<u64>,
    /// `max_abs_err` bits.
    pub max_abs_err_bits: Option<u32>,
}

impl StoredRecord {
    /// Stores `r` exactly.
    pub fn new(r: TensorRecord) -> StoredRecord {
        StoredRecord {
            global_scale_bits: r.global_scale.map(f32::to_bits),
            sqnr_db_bits: r.sqnr_db.map(f64::to_bits),
            max_abs_err_bits: r.max_abs_err.map(f32::to_bits),
            record: r,
        }
    }

    /// The record with its floats restored from the bits.
    pub fn exact(&self) -> TensorRecord {
        TensorRecord {
            global_scale: self.global_scale_bits.map(f32::from_bits),
            sqnr_db: self.sqnr_db_bits.map(f64::from_bits),
            max_abs_err: self.max_abs_err_bits.map(f32::from_bits),
            ..self.record.clone()
        }
    }
}

/// One planned shard: its file name and the source tensors it holds, in order.
pub struct PlannedShard<'a> {
    /// File name.
    pub name: &'a str,
    /// Source tensor names.
    pub tensors: Vec<&'a str>,
}

/// Identity of the running executable (size and modification time), so that a rebuilt tool
/// with the same version string does not reuse shards written by different code. Cheaper than
/// hashing the binary (hundreds of MB in a debug build). "unknown" when it cannot be read.
fn build_id() -> String {
    let meta = std::env::current_exe().and_then(std::fs::metadata);
    match meta {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{}:{}", m.len(), mtime)
        }
        Err(_) => "unknown".into(),
    }
}

/// Hashes the weights already quantized by sequential calibration (module name, shape, format,
/// packed codes, scales, global scale).
fn hash_precomputed(h: &mut Sha256, q: &QuantOptions) {
    let Some(pre) = &q.precomputed else {
        h.update(b"no-precomputed");
        return;
    };
    h.update((pre.len() as u64).to_le_bytes());
    for (name, m) in pre.iter() {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}", m.format).as_bytes());
        h.update((m.n as u64).to_le_bytes());
        h.update((m.k as u64).to_le_bytes());
        h.update(m.global_scale.to_bits().to_le_bytes());
        h.update((m.packed.len() as u64).to_le_bytes());
        h.update(&m.packed);
        h.update((m.scales.len() as u64).to_le_bytes());
        h.update(&m.scales);
    }
    match &q.precomputed_scales {
        None => h.update(b"no-precomputed-scales"),
        Some(sc) => {
            h.update((sc.len() as u64).to_le_bytes());
            for (name, v) in sc.iter() {
                h.update((name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
                h.update(v.to_bits().to_le_bytes());
            }
        }
    }
}

/// Hashes the calibration statistics (every module's site, token count, second moments, amax
/// and Hessian), so that a changed calibration text invalidates the shards of a calibrated run.
fn hash_stats(h: &mut Sha256, q: &QuantOptions) {
    let Some(stats) = &q.stats else {
        h.update(b"no-stats");
        return;
    };
    h.update((stats.by_module.len() as u64).to_le_bytes());
    for (name, s) in &stats.by_module {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((s.site.len() as u64).to_le_bytes());
        h.update(s.site.as_bytes());
        h.update(s.tokens.to_le_bytes());
        h.update(s.amax.to_bits().to_le_bytes());
        h.update((s.second_moment.len() as u64).to_le_bytes());
        for v in &s.second_moment {
            h.update(v.to_bits().to_le_bytes());
        }
        match &s.hessian {
            Some(m) => {
                h.update((m.len() as u64).to_le_bytes());
                for v in m {
                    h.update(v.to_bits().to_le_bytes());
                }
            }
            None => h.update(b"no-hessian"),
        }
    }
}

/// The fingerprint of a run: tool version and build, source file hashes, options, method (with
/// damping, activation order, block-scale rule) and its calibration (statistics and the weights
/// sequential calibration already quantized). Two runs with equal fingerprints write byte-identical shards.
pub fn fingerprint(
    version: &str,
    sources: &[FileHash],
    options: &OptionsInfo,
    quant: &QuantOptions,
) -> String {
    let mut h = Sha256::new();
    let head = serde_json::json!({
        "record_version": RECORD_VERSION,
        "tool_version": version,
        "build": build_id(),
        "sources": sources,
        "options": options,
        "damp": quant.damp,
        "act_order": quant.act_order,
        "block_scale": format!("{:?}", quant.block_scale),
        "refine": quant.refine,
        "calibration": quant.manifest_info,
    });
    h.update(head.to_string().as_bytes());
    hash_stats(&mut h, quant);
    hash_precomputed(&mut h, quant);
    hex::encode(h.finalize())
}

/// Syncs a folder, so that the renames inside it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes the completion record of a shard that is already synced and renamed into `dir`.
pub fn write_record(dir: &Path, rec: &ShardRecord) -> Result<(), WriteError> {
    let rdir = dir.join(RESUME_DIR);
    std::fs::create_dir_all(&rdir).map_err(io(&rdir))?;
    let path = rdir.join(format!("{}.json", rec.file.name));
    let text = serde_json::to_vec_pretty(rec).unwrap_or_default();
    write_synced(&path, &text)?;
    sync_dir(&rdir)
}

/// Why a finished-looking shard is not reused (None: reuse it).
fn rejection(dir: &Path, shard: &PlannedShard<'_>, fp: &str) -> Result<ShardRecord, String> {
    let path = dir.join(RESUME_DIR).join(format!("{}.json", shard.name));
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.join(shard.name).exists() {
                "no completion record (the run was killed before the shard was recorded)".into()
            } else {
                "not written yet".into()
            })
        }
        Err(e) => return Err(format!("completion record unreadable: {e}")),
    };
    let rec: ShardRecord = serde_json::from_slice(&text)
        .map_err(|e| format!("completion record {} is invalid: {e}", path.display()))?;
    if rec.version != RECORD_VERSION || rec.fingerprint != fp {
        return Err(
            "written from a different source, with different options or by another build of the tool"
                .into(),
        );
    }
    if rec.file.name != shard.name {
        return Err(format!("completion record names '{}'", rec.file.name));
    }
    let recorded: Vec<&str> = rec.tensors.keys().map(String::as_str).collect();
    let mut planned = shard.tensors.clone();
    planned.sort_unstable();
    if recorded != planned {
        return Err("completion record lists other tensors than planned".into());
    }
    let file = dir.join(shard.name);
    let meta = std::fs::symlink_metadata(&file).map_err(|e| format!("missing: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() != rec.file.bytes {
        return Err(format!(
            "{} bytes, its completion record says {} (truncated or changed)",
            meta.len(),
            rec.file.bytes
        ));
    }
    let actual = sha256_file(&file).map_err(|e| format!("cannot be read: {e}"))?;
    if actual.sha256 != rec.file.sha256 {
        return Err(format!(
            "sha256 {} differs from its completion record's {} (changed after it was written)",
            actual.sha256, rec.file.sha256
        ));
    }
    Ok(rec)
}

/// Checks the shards of an adopted temporary folder against the plan and the fingerprint.
/// Returns the reusable shards by plan index, and a note per shard saying what happened. Every
/// other file or folder in `dir` is deleted (a redone shard is written afresh; config, index,
/// side files and manifest are always rewritten).
pub fn check_finished(
    dir: &Path,
    shards: &[PlannedShard<'_>],
    fp: &str,
) -> Result<(BTreeMap<usize, ShardRecord>, Vec<String>), WriteError> {
    let mut reuse = BTreeMap::new();
    let mut notes = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        match rejection(dir, s, fp) {
            Ok(rec) => {
                notes.push(format!(
                    "resume: reusing {} ({} bytes, sha256 checked)",
                    s.name, rec.file.bytes
                ));
                reuse.insert(i, rec);
            }
            Err(why) if why == "not written yet" => {}
            Err(why) => notes.push(format!("resume: redoing {}: {why}", s.name)),
        }
    }
    // Keep only the reused shards and their records.
    let keep: Vec<&str> = reuse.keys().map(|&i| shards[i].name).collect();
    clean(dir, &keep, true)?;
    let rdir = dir.join(RESUME_DIR);
    if rdir.is_dir() {
        let recs: Vec<String> = keep.iter().map(|n| format!("{n}.json")).collect();
        let recs: Vec<&str> = recs.iter().map(String::as_str).collect();
        clean(&rdir, &recs, false)?;
    }
    Ok((reuse, notes))
}

/// Deletes every entry of `dir` not named in `keep` (and not the record folder when
/// `keep_records`). Symlinks are removed, never followed.
fn clean(dir: &Path, keep: &[&str], keep_records: bool) -> Result<(), WriteError> {
    let mut doomed: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if keep.contains(&n.as_str()) || (keep_records && n == RESUME_DIR) {
            continue;
        }
        doomed.push(e.path());
    }
    for p in doomed {
        let is_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_dir())
            .unwrap_or(false);
        let r = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(io(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> OptionsInfo {
        OptionsInfo {
            format: "nvfp4".into(),
            layout: "nvfp4-pack-quantized".into(),
            method: "rtn".into(),
            ignore: vec![],
            quantize_lm_head: false,
            experts_only: false,
            max_shard_size: 1000,
        }
    }

    fn src() -> Vec<FileHash> {
        vec![FileHash {
            name: "model.safetensors".into(),
            bytes: 10,
            sha256: "ab".repeat(32),
        }]
    }

    #[test]
    fn fingerprint_changes_with_every_input() {
        let q = QuantOptions::default();
        let base = fingerprint("0.1.0", &src(), &opts(), &q);
        assert_eq!(base, fingerprint("0.1.0", &src(), &opts(), &q));
        assert_ne!(base, fingerprint("0.1.1", &src(), &opts(), &q));
        let mut s = src();
        s[0].sha256 = "cd".repeat(32);
        assert_ne!(base, fingerprint("0.1.0", &s, &opts(), &q));
        let mut o = opts();
        o.max_shard_size = 999;
        assert_ne!(base, fingerprint("0.1.0", &src(), &o, &q));
        let mut o = opts();
        o.ignore.push("*.q_proj".into());
        assert_ne!(base, fingerprint("0.1.0", &src(), &o, &q));
        let q2 = QuantOptions {
            damp: 0.5,
            ..QuantOptions::default()
        };
        assert_ne!(base, fingerprint("0.1.0", &src(), &opts(), &q2));
        let q3 = QuantOptions {
            act_order: true,
            ..QuantOptions::default()
        };
        assert_ne!(base, fingerprint("0.1.0", &src(), &opts(), &q3));
        let m = mimo_kernels::fp4::Fp4Matrix {
            format: mimo_kernels::fp4::Fp4Format::Nvfp4,
            n: 1,
            k: 16,
            packed: vec![0x21; 8],
            scales: vec![0x38],
            global_scale: 1.0,
        };
        let pre = |m: &mimo_kernels::fp4::Fp4Matrix| QuantOptions {
            precomputed: Some(std::sync::Arc::new(
                [("model.layers.0.mlp.down_proj".to_string(), m.clone())]
                    .into_iter()
                    .collect(),
            )),
            ..QuantOptions::default()
        };
        let with_m = fingerprint("0.1.0", &src(), &opts(), &pre(&m));
        assert_ne!(base, with_m);
        let mut m2 = m.clone();
        m2.packed[3] = 0x12;
        assert_ne!(with_m, fingerprint("0.1.0", &src(), &opts(), &pre(&m2)));
    }

    /// A recorded shard is reused; a tampered, truncated, unrecorded or foreign one is not, and
    /// everything not reused is deleted.
    #[test]
    fn only_recorded_unchanged_shards_are_reused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let names = [
            "a.safetensors",
            "b.safetensors",
            "c.safetensors",
            "d.safetensors",
        ];
        let mut records = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let bytes: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(i as u8 + 3)).collect();
            std::fs::write(dir.join(n), &bytes).unwrap();
            let rec = ShardRecord {
                version: RECORD_VERSION,
                fingerprint: if i == 3 { "other".into() } else { "fp".into() },
                file: sha256_file(&dir.join(n)).unwrap(),
                tensors: [(format!("t{i}"), StoredRecord::new(record()))]
                    .into_iter()
                    .collect(),
            };
            records.push(rec.clone());
            // c has no record (killed between rename and record).
            if i != 2 {
                write_record(dir, &rec).unwrap();
            }
        }
        // b is tampered after its record was written (one byte).
        let mut b = std::fs::read(dir.join(names[1])).unwrap();
        b[50] ^= 1;
        std::fs::write(dir.join(names[1]), &b).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let planned: Vec<PlannedShard<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| PlannedShard {
                name: n,
                tensors: vec![["t0", "t1", "t2", "t3"][i]],
            })
            .chain(std::iter::once(PlannedShard {
                name: "e.safetensors",
                tensors: vec!["t4"],
            }))
            .collect();
        let (reuse, notes) = check_finished(dir, &planned, "fp").unwrap();
        assert_eq!(
            reuse.keys().copied().collect::<Vec<_>>(),
            vec![0],
            "{notes:?}"
        );
        assert_eq!(reuse[&0], records[0]);
        assert!(
            notes[1].contains("b.safetensors") && notes[1].contains("sha256"),
            "{notes:?}"
        );
        assert!(notes[2].contains("no completion record"), "{notes:?}");
        assert!(notes[3].contains("different source"), "{notes:?}");
        assert_eq!(notes.len(), 4, "{notes:?}");
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![RESUME_DIR.to_string(), names[0].to_string()]);
        let recs: Vec<_> = std::fs::read_dir(dir.join(RESUME_DIR)).unwrap().collect();
        assert_eq!(recs.len(), 1);

        // Truncation is caught by the size check.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(names[0]))
            .unwrap();
        f.set_len(60).unwrap();
        let (reuse, notes) = check_finished(dir, &planned, "fp").unwrap();
        assert!(reuse.is_empty());
        assert!(notes[0].contains("truncated"), "{notes:?}");
    }

    /// Floats that serde_json does not parse back exactly survive through the bits.
    #[test]
    fn stored_records_keep_floats_bit_exact() {
        let mut r = record();
        for (g, q, m) in [
            (f32::MIN_POSITIVE, 19.859020084236086, 1e-38f32),
            (448.0 * 6.0 / 1e-7, 19.859424910331146, 0.1),
            (0.1, 1.0 / 3.0, f32::MAX),
        ] {
            r.global_scale = Some(g);
            r.sqnr_db = Some(q);
            r.max_abs_err = Some(m);
            let text = serde_json::to_string(&StoredRecord::new(r.clone())).unwrap();
            let back: StoredRecord = serde_json::from_str(&text).unwrap();
            let e = back.exact();
            assert_eq!(e.sqnr_db.unwrap().to_bits(), q.to_bits());
            assert_eq!(e.global_scale.unwrap().to_bits(), g.to_bits());
            assert_eq!(e.max_abs_err.unwrap().to_bits(), m.to_bits());
        }
    }

    fn record() -> TensorRecord {
        TensorRecord {
            action: "quantized".into(),
            reason: None,
            dtype: "BF16".into(),
            shape: vec![4, 16],
            fused_group: None,
            global_scale: Some(1234.5),
            sqnr_db: Some(20.25),
            max_abs_err: Some(0.01),
        }
    }
}
