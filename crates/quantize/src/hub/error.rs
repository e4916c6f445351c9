//! Typed errors of the hub client, worded for the person running the converter.

use std::path::PathBuf;

/// Everything that can go wrong while resolving or downloading a hub repo.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The string is not a valid `ORG/NAME` hub repo id.
    #[error("`{id}` is not a valid Hugging Face repo id ({reason}); a local folder must exist")]
    InvalidRepoId {
        /// The rejected id.
        id: String,
        /// What rule it broke.
        reason: &'static str,
    },
    /// The revision cannot be a branch, tag or commit (it would escape the cache folder).
    #[error("`{0}` is not a usable revision (a branch, tag or commit sha)")]
    InvalidRevision(String),
    /// HTTP 401/403: the repo is gated or private and the request was not authorised.
    #[error(
        "access to {repo} was refused (HTTP {status}{code}): the repo is gated or private{hint}. \
         If it is gated, accept its license at {url} while logged in, then pass a token with \
         --token or HF_TOKEN (or the token file under HF_HOME)"
    )]
    AccessDenied {
        /// The repo id.
        repo: String,
        /// 401 or 403.
        status: u16,
        /// `, X-Error-Code: ...` when the server sent one.
        code: String,
        /// Web page of the repo, where the license is accepted.
        url: String,
        /// Whether a token was sent, worded for the message.
        hint: &'static str,
    },
    /// HTTP 404 on the repo: no such repo (or a private one hidden from this token).
    #[error("repo {repo} was not found on {endpoint} (HTTP 404): check the id; a private repo also needs a token")]
    RepoNotFound {
        /// The repo id.
        repo: String,
        /// The hub endpoint asked.
        endpoint: String,
    },
    /// HTTP 404 with `RevisionNotFound`: the branch, tag or commit does not exist.
    #[error(
        "revision `{revision}` was not found in {repo} (HTTP 404): check the branch, tag or commit"
    )]
    RevisionNotFound {
        /// The repo id.
        repo: String,
        /// The requested revision.
        revision: String,
    },
    /// HTTP 404 on a file listed by the repo (`EntryNotFound`).
    #[error("file {file} was not found in {repo} at commit {commit} (HTTP 404)")]
    EntryNotFound {
        /// The repo id.
        repo: String,
        /// The file path inside the repo.
        file: String,
        /// The commit asked for.
        commit: String,
    },
    /// Any other HTTP error status (after retries for 429 and 5xx).
    #[error("{url}: HTTP {status}{message}")]
    Http {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
        /// `: X-Error-Message` or body excerpt, when there is one.
        message: String,
    },
    /// The hub could not be reached (DNS, refused or dropped connection), after retries.
    #[error(
        "cannot reach {url}: {detail}. No network? Check the connection or HF_ENDPOINT, or run with \
         --offline / HF_HUB_OFFLINE=1 to use only files already in the cache"
    )]
    Network {
        /// The URL requested.
        url: String,
        /// The transport error.
        detail: String,
    },
    /// The server answered, but not like the hub (missing headers, bad JSON, wrong sizes).
    #[error("unexpected answer from {url}: {detail}")]
    BadResponse {
        /// The URL requested.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The disk holding the cache is full.
    #[error(
        "disk full while writing {path}: free space or point HF_HUB_CACHE / HF_HOME at a bigger disk \
         ({needed})"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// How much the download needs, worded.
        needed: String,
    },
    /// Another I/O error on a cache file.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Offline mode (or no network) and the cache lacks what is needed.
    #[error(
        "offline mode: {repo} at revision `{revision}` is not complete in the cache {cache}: missing {}. \
         Download it once with network access (without --offline / HF_HUB_OFFLINE)",
        missing.join(", ")
    )]
    OfflineMiss {
        /// The repo id.
        repo: String,
        /// The requested revision.
        revision: String,
        /// The hub cache folder searched.
        cache: PathBuf,
        /// What is missing (a ref, a snapshot or files).
        missing: Vec<String>,
    },
    /// The repo has no safetensors weights at the top level.
    #[error(
        "{repo} at commit {commit} has no *.safetensors weights at the top level (found: {}); \
         only safetensors checkpoints can be converted",
        if found.is_empty() { "no files".to_string() } else { found.join(", ") }
    )]
    NoWeights {
        /// The repo id.
        repo: String,
        /// The commit listed.
        commit: String,
        /// The files the repo does have (first few).
        found: Vec<String>,
    },
    /// A dataset repo (or split) has no jsonl or parquet files.
    #[error("dataset {repo}{} at commit {commit} has no .jsonl or .parquet files", split.as_ref().map(|s| format!(" split `{s}`")).unwrap_or_default())]
    NoDataFiles {
        /// The dataset repo id.
        repo: String,
        /// The split asked for.
        split: Option<String>,
        /// The commit listed.
        commit: String,
    },
}

impl HubError {
    /// Wraps an I/O error on `path`, recognising a full disk.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            HubError::DiskFull {
                path,
                needed: "download size unknown".into(),
            }
        } else {
            HubError::Io { path, source }
        }
    }
}

/// ENOSPC (or the Windows equivalents), however the platform reports it.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    // 28 = ENOSPC on Linux and macOS; 112 = ERROR_DISK_FULL, 39 = ERROR_HANDLE_DISK_FULL on Windows.
    #[cfg(unix)]
    let codes: &[i32] = &[28];
    #[cfg(windows)]
    let codes: &[i32] = &[39, 112];
    #[cfg(not(any(unix, windows)))]
    let codes: &[i32] = &[];
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn enospc_is_disk_full() {
        use std::io::Write;
        // /dev/full fails every write with ENOSPC.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let e = f
            .write_all(&[0u8; 4096])
            .and_then(|_| f.flush())
            .unwrap_err();
        assert!(is_disk_full(&e));
        assert!(matches!(HubError::io("/x", e), HubError::DiskFull { .. }));
        let other = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "no");
        assert!(matches!(HubError::io("/x", other), HubError::Io { .. }));
    }
}
