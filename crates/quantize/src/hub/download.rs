//! Bringing a set of repo files into the cache: metadata, resumable ranged download of each
//! missing blob into `blobs/<etag>.incomplete`, rename, snapshot symlink, one progress bar.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use super::cache::{is_sha256_etag, RepoCache};
use super::error::{is_disk_full, HubError};
use super::http::{Client, Ctx, Failure, FileMeta, RepoRef};

/// The download bar: repo, current file, bytes done / total, rate, ETA.
const BAR_TEMPLATE: &str =
    "{prefix} {msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";

/// Read buffer of a transfer.
const CHUNK: usize = 1 << 20;

/// Makes every file of `files` present in `snapshots/<commit>/`; files already there cost no
/// request at all (as in huggingface_hub when the revision is a commit). Returns the bytes
/// transferred.
pub(crate) fn ensure_files(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    files: &[String],
    progress: bool,
) -> Result<u64, HubError> {
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| cache.cached_file(commit, f).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    // Metadata first, so the bar knows the total before the first byte.
    let mut plan: Vec<(&String, FileMeta)> = Vec::with_capacity(missing.len());
    for file in missing {
        plan.push((file, client.file_meta(repo, commit, file)?));
    }
    let mut todo = 0u64;
    for (_, meta) in &plan {
        if !blob_complete(cache, meta) {
            let have = std::fs::metadata(cache.incomplete_path(&meta.etag))
                .map(|m| m.len())
                .unwrap_or(0);
            todo += meta.size.saturating_sub(have);
        }
    }
    let bar = make_bar(todo, progress, &repo.id);
    let mut transferred = 0u64;
    for (file, meta) in &plan {
        if !blob_complete(cache, meta) {
            bar.set_message((*file).clone());
            transferred += download_blob(client, cache, repo, commit, file, meta, &bar)?;
        }
        cache.link(commit, file, &meta.etag)?;
    }
    bar.finish_and_clear();
    Ok(transferred)
}

fn blob_complete(cache: &RepoCache, meta: &FileMeta) -> bool {
    std::fs::metadata(cache.blob_path(&meta.etag))
        .is_ok_and(|m| m.is_file() && m.len() == meta.size)
}

fn make_bar(total: u64, progress: bool, repo: &str) -> ProgressBar {
    let target = if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    if let Ok(style) = ProgressStyle::with_template(BAR_TEMPLATE) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(repo.to_string());
    bar
}

/// sha256 state of the first `len` bytes of `path` (the partial file being resumed).
fn hash_prefix(path: &std::path::Path, len: u64) -> std::io::Result<Sha256> {
    let mut h = Sha256::new();
    let f = std::fs::File::open(path)?;
    let mut r = f.take(len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h)
}

/// Downloads one blob, resuming from `blobs/<etag>.incomplete` and retrying transient failures
/// (the count restarts whenever an attempt moved forward). An LFS blob (sha256 etag) is hashed
/// as it arrives, its resumed prefix included, and renamed into `blobs/` only when the hash
/// matches: a partial file that is not a prefix of the blob (a power loss can leave zeroed
/// blocks) is discarded and the blob fetched again from the start (issue 10, F10). Returns the
/// bytes transferred.
fn download_blob(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    file: &str,
    meta: &FileMeta,
    bar: &ProgressBar,
) -> Result<u64, HubError> {
    let part = cache.incomplete_path(&meta.etag);
    let (sent, mismatch) = fetch_blob(client, cache, repo, commit, file, meta, bar)?;
    let Some((resumed, got)) = mismatch else {
        return Ok(sent);
    };
    let discard = std::fs::remove_file(&part).map_err(|e| HubError::io(&part, e));
    if resumed {
        // The resumed prefix was bad: once more from the first byte.
        discard?;
        bar.inc_length(meta.size);
        let (again, mismatch) = fetch_blob(client, cache, repo, commit, file, meta, bar)?;
        if mismatch.is_none() {
            return Ok(sent + again);
        }
        let _ = std::fs::remove_file(&part);
    }
    Err(HubError::BadResponse {
        url: meta.location.clone(),
        detail: format!(
            "{file}: the downloaded bytes have sha256 {got}, the hub announced {}; nothing was kept",
            meta.etag
        ),
    })
}

/// Bytes transferred, and on a sha256 mismatch (whether a partial file was resumed, the hash).
type Fetched = (u64, Option<(bool, String)>);

/// One download of a blob into its partial file and, when its sha256 checks (or it has no
/// sha256 etag), the rename into `blobs/`. Returns the bytes transferred and, on a hash
/// mismatch, (whether a partial file was resumed, the sha256 found); the partial file is then
/// left for the caller.
fn fetch_blob(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    file: &str,
    meta: &FileMeta,
    bar: &ProgressBar,
) -> Result<Fetched, HubError> {
    let part = cache.incomplete_path(&meta.etag);
    if let Some(dir) = part.parent() {
        std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&part)
        .map_err(|e| HubError::io(&part, e))?;
    let mut have = out.metadata().map_err(|e| HubError::io(&part, e))?.len();
    if have > meta.size {
        // Not a prefix of this blob: start over.
        out.set_len(0).map_err(|e| HubError::io(&part, e))?;
        have = 0;
    }
    let check = is_sha256_etag(&meta.etag);
    let mut hasher = if check && have > 0 {
        hash_prefix(&part, have).map_err(|e| HubError::io(&part, e))?
    } else {
        Sha256::new()
    };
    let ctx = Ctx {
        repo,
        file: Some(file),
        commit: Some(commit),
    };
    let start_have = have;
    let write_err = |e: std::io::Error, have: u64| {
        if is_disk_full(&e) {
            HubError::DiskFull {
                path: part.clone(),
                needed: format!(
                    "{} still to download for {file}; the partial file is kept and resumes",
                    human_bytes(meta.size.saturating_sub(have))
                ),
            }
        } else {
            HubError::Io {
                path: part.clone(),
                source: e,
            }
        }
    };

    client.retry(|made_progress| {
        if have == meta.size {
            return Ok(());
        }
        let resp = match client.get_from(&meta.location, have, &ctx) {
            Ok(r) => r,
            // 416: the server has fewer bytes than our partial file; start over.
            Err(Failure::Fatal(HubError::Http { status: 416, .. })) => {
                out.set_len(0)
                    .map_err(|e| Failure::Fatal(write_err(e, 0)))?;
                bar.inc_length(have);
                have = 0;
                hasher = Sha256::new();
                return Err(Failure::Transient(HubError::BadResponse {
                    url: meta.location.clone(),
                    detail: "range not satisfiable; restarting the file".into(),
                }));
            }
            Err(e) => return Err(e),
        };
        if have > 0 && resp.status() != 206 {
            // The server ignored the Range: keep nothing and take the whole body.
            out.set_len(0)
                .map_err(|e| Failure::Fatal(write_err(e, 0)))?;
            bar.inc_length(have);
            have = 0;
            hasher = Sha256::new();
        }
        out.seek(SeekFrom::Start(have))
            .map_err(|e| Failure::Fatal(write_err(e, have)))?;
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A cut connection: keep what arrived, resume from there.
                Err(e) => {
                    return Err(Failure::Transient(HubError::Network {
                        url: meta.location.clone(),
                        detail: format!(
                            "transfer of {file} cut after {} of {}: {e}",
                            human_bytes(have),
                            human_bytes(meta.size)
                        ),
                    }))
                }
            };
            if have + n as u64 > meta.size {
                let _ = out.set_len(0);
                return Err(Failure::Fatal(HubError::BadResponse {
                    url: meta.location.clone(),
                    detail: format!("{file} is longer than the {} announced", meta.size),
                }));
            }
            out.write_all(&buf[..n])
                .map_err(|e| Failure::Fatal(write_err(e, have)))?;
            if check {
                hasher.update(&buf[..n]);
            }
            have += n as u64;
            *made_progress = true;
            bar.inc(n as u64);
        }
        if have < meta.size {
            return Err(Failure::Transient(HubError::Network {
                url: meta.location.clone(),
                detail: format!(
                    "transfer of {file} ended after {} of {}",
                    human_bytes(have),
                    human_bytes(meta.size)
                ),
            }));
        }
        Ok(())
    })?;

    out.sync_all().map_err(|e| write_err(e, have))?;
    drop(out);
    let sent = meta.size - start_have;
    if check {
        let got = hex::encode(hasher.finalize());
        if got != meta.etag {
            return Ok((sent, Some((start_have > 0, got))));
        }
    }
    let blob: PathBuf = cache.blob_path(&meta.etag);
    std::fs::rename(&part, &blob).map_err(|e| HubError::io(&blob, e))?;
    Ok((sent, None))
}

/// `1.5 GiB`-style sizes for messages.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bar_template_is_valid() {
        assert!(indicatif::ProgressStyle::with_template(super::BAR_TEMPLATE).is_ok());
    }

    #[test]
    fn human_bytes() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.0 GiB");
    }
}
