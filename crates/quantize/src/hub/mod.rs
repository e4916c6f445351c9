//! Fetching checkpoints and calibration sets from the Hugging Face Hub into the cache layout of
//! Python's huggingface_hub (so either tool reuses the other's downloads).
//!
//! The converter calls four things:
//! - [`looks_like_repo_id`] to tell a hub id from a local folder (an existing path is a folder);
//! - [`HubOptions::from_env`] to resolve token, endpoint, cache and offline mode;
//! - [`fetch_model`] to get the snapshot folder (only what conversion needs) and the commit sha
//!   that goes into the manifest;
//! - [`fetch_dataset`] to get the jsonl/parquet files of a calibration dataset
//!   (`ORG/NAME[:split]`).
//!
//! Downloads resume from `blobs/<etag>.incomplete`, transient failures are retried with
//! exponential backoff, and a run whose files are all in the snapshot makes one API request and
//! no file request. Offline (`--offline`, `HF_HUB_OFFLINE=1`) uses only the cache and names what
//! is missing. See docs/hub.md.

mod cache;
mod download;
mod error;
mod http;
mod options;
mod select;

use std::path::PathBuf;

pub use cache::lfs_blob_sha256;
pub use error::HubError;
pub use options::{HubOptions, DEFAULT_ENDPOINT, DEFAULT_REVISION};

use cache::{is_commit_hash, RepoCache};
use http::{Client, Kind, RepoRef};

/// A model repo resolved to one commit, with its conversion inputs in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRepo {
    /// The repo id, `ORG/NAME`.
    pub repo_id: String,
    /// The revision asked for (branch, tag or commit).
    pub revision: String,
    /// The full commit sha actually used (record it in the manifest).
    pub commit: String,
    /// `<cache>/models--ORG--NAME/snapshots/<commit>`: open it as a local checkpoint folder.
    pub snapshot_dir: PathBuf,
    /// The repo files present in `snapshot_dir` that conversion uses, sorted.
    pub files: Vec<String>,
    /// Bytes transferred by this call (0 when everything was cached).
    pub downloaded_bytes: u64,
    /// True when resolved from the cache alone (offline mode, or the hub unreachable and the
    /// revision already cached, as huggingface_hub's `snapshot_download` falls back).
    pub from_cache_only: bool,
}

/// Whether `s` should be resolved on the hub: it is not an existing path and has the shape of a
/// repo id (`NAME` or `ORG/NAME`; letters, digits, `-`, `_`, `.`; no `--` or `..`; at most 96
/// characters; huggingface_hub's `validate_repo_id`).
pub fn looks_like_repo_id(s: &str) -> bool {
    !std::path::Path::new(s).exists() && validate_repo_id(s).is_ok()
}

/// Downloads (or finds in the cache) the files conversion needs from model repo `repo_id` at
/// `opts.revision`: config.json, generation_config.json, tokenizer*.json, tokenizer.model,
/// special_tokens_map.json (and the other tokenizer files), the top-level `*.safetensors` and
/// model.safetensors.index.json; with an index, only the shards it names. Never `.bin`, `.pth`,
/// `.gguf` or subfolders such as `original/`.
pub fn fetch_model(repo_id: &str, opts: &HubOptions) -> Result<FetchedRepo, HubError> {
    validate_repo_id(repo_id)?;
    let revision = validate_revision(opts.revision())?;
    let repo = RepoRef::new(repo_id, Kind::Model, &revision);
    let cache = RepoCache::new(&opts.cache_dir, &repo.hf);
    if opts.offline {
        return model_from_cache(&repo, &cache, opts);
    }
    let client = Client::new(opts)?;
    let info = match client.repo_info(&repo) {
        Ok(info) => info,
        // No network: use the cache if it has this revision, as huggingface_hub does.
        Err(e @ HubError::Network { .. }) => {
            return model_from_cache(&repo, &cache, opts).map_err(|_| e);
        }
        Err(e) => return Err(e),
    };
    let commit = checked_commit(&client, &repo, &info.sha)?;
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut wanted: Vec<String> = listed
        .iter()
        .filter(|f| select::is_model_file(f))
        .cloned()
        .collect();
    wanted.sort();

    let mut downloaded = 0u64;
    if wanted.iter().any(|f| f == select::INDEX_FILE) {
        // The index decides which shards are needed, so it comes first.
        let index = [select::INDEX_FILE.to_string()];
        downloaded +=
            download::ensure_files(&client, &cache, &repo, &commit, &index, opts.progress)?;
        let shards = read_index_shards(&cache, &commit)?;
        let (kept, missing) = select::narrow_to_index(&wanted, Some(&shards));
        if !missing.is_empty() {
            return Err(HubError::BadResponse {
                url: format!("{}/{}", client.endpoint(), repo.hf.url()),
                detail: format!(
                    "{} names shards the repo does not list: {}",
                    select::INDEX_FILE,
                    missing.join(", ")
                ),
            });
        }
        wanted = kept;
    }
    if !wanted.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(HubError::NoWeights {
            repo: repo_id.to_string(),
            commit,
            found: listed.into_iter().take(12).collect(),
        });
    }
    downloaded += download::ensure_files(&client, &cache, &repo, &commit, &wanted, opts.progress)?;
    cache.write_ref(&revision, &commit)?;
    Ok(FetchedRepo {
        repo_id: repo_id.to_string(),
        revision,
        snapshot_dir: cache.snapshot_dir(&commit),
        commit,
        files: wanted,
        downloaded_bytes: downloaded,
        from_cache_only: false,
    })
}

/// Downloads (or finds in the cache) the data files of dataset `spec` = `ORG/NAME[:split]`
/// (a leading `hub:` is accepted): the `.jsonl` and `.parquet` files of the split, by default
/// `train` when the repo has one, else all of them. Returns their snapshot paths, sorted by repo
/// path. Reading parquet is left to the caller.
pub fn fetch_dataset(spec: &str, opts: &HubOptions) -> Result<Vec<PathBuf>, HubError> {
    let spec = spec.strip_prefix("hub:").unwrap_or(spec);
    let (repo_id, split) = match spec.split_once(':') {
        Some((r, s)) if !s.is_empty() => (r, Some(s.to_string())),
        Some((r, _)) => (r, None),
        None => (spec, None),
    };
    validate_repo_id(repo_id)?;
    let revision = validate_revision(opts.revision())?;
    let repo = RepoRef::new(repo_id, Kind::Dataset, &revision);
    let cache = RepoCache::new(&opts.cache_dir, &repo.hf);
    if opts.offline {
        return dataset_from_cache(&repo, &cache, split.as_deref(), opts);
    }
    let client = Client::new(opts)?;
    let info = match client.repo_info(&repo) {
        Ok(info) => info,
        Err(e @ HubError::Network { .. }) => {
            return dataset_from_cache(&repo, &cache, split.as_deref(), opts).map_err(|_| e);
        }
        Err(e) => return Err(e),
    };
    let commit = checked_commit(&client, &repo, &info.sha)?;
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let files = select::select_dataset_files(&listed, split.as_deref());
    if files.is_empty() {
        return Err(HubError::NoDataFiles {
            repo: repo_id.to_string(),
            split,
            commit,
        });
    }
    download::ensure_files(&client, &cache, &repo, &commit, &files, opts.progress)?;
    cache.write_ref(&revision, &commit)?;
    Ok(files
        .iter()
        .map(|f| cache.pointer_path(&commit, f))
        .collect())
}

fn checked_commit(client: &Client, repo: &RepoRef, sha: &str) -> Result<String, HubError> {
    if is_commit_hash(sha) {
        Ok(sha.to_string())
    } else {
        Err(HubError::BadResponse {
            url: format!("{}/api/{}", client.endpoint(), repo.hf.api_url()),
            detail: format!("`sha` is not a 40-hex commit: `{sha}`"),
        })
    }
}

fn read_index_shards(cache: &RepoCache, commit: &str) -> Result<Vec<String>, HubError> {
    let path = cache.pointer_path(commit, select::INDEX_FILE);
    let bytes = std::fs::read(&path).map_err(|e| HubError::io(&path, e))?;
    select::index_shards(&bytes).map_err(|detail| HubError::BadResponse {
        url: path.display().to_string(),
        detail,
    })
}

fn offline_miss(repo: &RepoRef, opts: &HubOptions, missing: Vec<String>) -> HubError {
    HubError::OfflineMiss {
        repo: repo.id.clone(),
        revision: repo.revision.clone(),
        cache: opts.cache_dir.clone(),
        missing,
    }
}

/// The model from the cache alone: the snapshot of the revision must hold config.json and the
/// weights (every shard of the index when there is one).
fn model_from_cache(
    repo: &RepoRef,
    cache: &RepoCache,
    opts: &HubOptions,
) -> Result<FetchedRepo, HubError> {
    let commit = cache
        .resolve_offline(&repo.revision)
        .map_err(|what| offline_miss(repo, opts, vec![what]))?;
    let present: Vec<String> = cache
        .list_snapshot(&commit)
        .into_iter()
        .filter(|f| select::is_model_file(f) && cache.cached_file(&commit, f).is_some())
        .collect();
    let mut missing = Vec::new();
    if !present.iter().any(|f| f == "config.json") {
        missing.push("config.json".to_string());
    }
    let files = if present.iter().any(|f| f == select::INDEX_FILE) {
        let shards = read_index_shards(cache, &commit)?;
        let (kept, lacking) = select::narrow_to_index(&present, Some(&shards));
        missing.extend(lacking);
        kept
    } else {
        if !present.iter().any(|f| f.ends_with(".safetensors")) {
            missing.push("*.safetensors weights".to_string());
        }
        present
    };
    if !missing.is_empty() {
        return Err(offline_miss(repo, opts, missing));
    }
    Ok(FetchedRepo {
        repo_id: repo.id.clone(),
        revision: repo.revision.clone(),
        snapshot_dir: cache.snapshot_dir(&commit),
        commit,
        files,
        downloaded_bytes: 0,
        from_cache_only: true,
    })
}

fn dataset_from_cache(
    repo: &RepoRef,
    cache: &RepoCache,
    split: Option<&str>,
    opts: &HubOptions,
) -> Result<Vec<PathBuf>, HubError> {
    let commit = cache
        .resolve_offline(&repo.revision)
        .map_err(|what| offline_miss(repo, opts, vec![what]))?;
    let present: Vec<String> = cache
        .list_snapshot(&commit)
        .into_iter()
        .filter(|f| cache.cached_file(&commit, f).is_some())
        .collect();
    let files = select::select_dataset_files(&present, split);
    if files.is_empty() {
        let what = match split {
            Some(s) => format!(".jsonl/.parquet files of split `{s}`"),
            None => ".jsonl/.parquet files".to_string(),
        };
        return Err(offline_miss(repo, opts, vec![what]));
    }
    Ok(files
        .iter()
        .map(|f| cache.pointer_path(&commit, f))
        .collect())
}

/// huggingface_hub's `validate_repo_id` rules.
fn validate_repo_id(id: &str) -> Result<(), HubError> {
    let fail = |reason| {
        Err(HubError::InvalidRepoId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() || id.len() > 96 {
        return fail("it must have 1 to 96 characters");
    }
    if id.matches('/').count() > 1 {
        return fail("it must be NAME or ORG/NAME");
    }
    if id.contains("--") || id.contains("..") {
        return fail("`--` and `..` are forbidden");
    }
    for part in id.split('/') {
        if part.is_empty() {
            return fail("ORG and NAME must not be empty");
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return fail("only letters, digits, `-`, `_` and `.` are allowed");
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return fail("a part must not start or end with `-` or `.`");
        }
    }
    Ok(())
}

/// A revision becomes a path under `refs/` and a URL segment: refuse what could escape them.
fn validate_revision(rev: &str) -> Result<String, HubError> {
    let ok = !rev.is_empty()
        && rev.len() <= 256
        && !rev.starts_with('/')
        && !rev.ends_with('/')
        && rev
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && !rev
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, '\\' | '?' | '#' | '%'));
    if ok {
        Ok(rev.to_string())
    } else {
        Err(HubError::InvalidRevision(rev.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_rules() {
        for ok in ["Qwen/Qwen3-30B-A3B", "gpt2", "org_1/model.v2", "a/b"] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b/c",
            "a--b/c",
            "a/../b",
            "/abs",
            "org/",
            "-x/y",
            "x/y.",
            "with space/x",
            "./local",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_repo_id(&"a".repeat(97)).is_err());
        assert!(looks_like_repo_id("Qwen/Qwen3-30B-A3B"));
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("org");
        std::fs::create_dir_all(local.join("name")).unwrap();
        let rel = local.join("name");
        assert!(!looks_like_repo_id(rel.to_str().unwrap()), "existing path");
    }

    #[test]
    fn revision_rules() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_revision(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/../b", "/main", "a b", "x%2F", "main/"] {
            assert!(validate_revision(bad).is_err(), "{bad}");
        }
    }
}
