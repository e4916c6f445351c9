//! HTTP with the hub: repo info, file metadata, ranged GETs, retries with backoff, and the mapping
//! of statuses to [`HubError`].
//!
//! hf-hub 0.4's blocking client gives no typed status, retries only the body transfer and does not
//! check that a resumed transfer really is a 206; so requests go through `ureq` (the client hf-hub
//! itself uses) and hf-hub provides the repo naming (`Repo::api_url`, `folder_name`) and the
//! `RepoInfo` type. The protocol follows huggingface_hub `file_download.py`
//! (`get_hf_file_metadata`: HEAD without redirects, relative redirects followed, `X-Repo-Commit`,
//! `X-Linked-Etag` or `ETag`, `X-Linked-Size` or `Content-Length`, `Location` for LFS files) and
//! `utils/_http.py` (`hf_raise_for_status`: `X-Error-Code` = RepoNotFound, RevisionNotFound,
//! EntryNotFound, GatedRepo).

use std::time::Duration;

use super::error::HubError;
use super::options::HubOptions;

/// Longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Relative redirects followed when reading metadata (renamed repos).
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// Which kind of hub repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Model,
    Dataset,
}

/// A repo at a revision, as the hub and the cache name it.
#[derive(Debug, Clone)]
pub(crate) struct RepoRef {
    pub(crate) id: String,
    pub(crate) revision: String,
    pub(crate) hf: hf_hub::Repo,
}

impl RepoRef {
    pub(crate) fn new(id: &str, kind: Kind, revision: &str) -> Self {
        let t = match kind {
            Kind::Model => hf_hub::RepoType::Model,
            Kind::Dataset => hf_hub::RepoType::Dataset,
        };
        RepoRef {
            id: id.to_string(),
            revision: revision.to_string(),
            hf: hf_hub::Repo::with_revision(id.to_string(), t, revision.to_string()),
        }
    }
}

/// What the resolve endpoint says about one file (huggingface_hub's `HfFileMetadata`).
#[derive(Debug, Clone)]
pub(crate) struct FileMeta {
    /// Blob name: git sha1, or sha256 for LFS files.
    pub(crate) etag: String,
    /// Size of the real file (not of an LFS pointer).
    pub(crate) size: u64,
    /// Where the bytes are: the CDN for LFS files, else the resolve URL.
    pub(crate) location: String,
}

/// The outcome of one attempt: worth retrying or not.
pub(crate) enum Failure {
    Transient(HubError),
    Fatal(HubError),
}

/// What a request was about, to word its errors.
pub(crate) struct Ctx<'a> {
    pub(crate) repo: &'a RepoRef,
    pub(crate) file: Option<&'a str>,
    pub(crate) commit: Option<&'a str>,
}

/// A blocking hub client for one set of options.
pub(crate) struct Client {
    /// Never follows redirects (metadata, API).
    no_redirect: ureq::Agent,
    /// Follows redirects, dropping `Authorization` on a host change.
    follow: ureq::Agent,
    endpoint: String,
    token: Option<String>,
    max_retries: u32,
    base_delay: Duration,
    user_agent: String,
}

impl Client {
    pub(crate) fn new(opts: &HubOptions) -> Result<Client, HubError> {
        if !(opts.endpoint.starts_with("http://") || opts.endpoint.starts_with("https://")) {
            return Err(HubError::BadResponse {
                url: opts.endpoint.clone(),
                detail: "HF_ENDPOINT must start with http:// or https://".into(),
            });
        }
        let build = |redirects: u32| {
            ureq::AgentBuilder::new()
                .timeout_connect(opts.timeout)
                .timeout_read(opts.timeout)
                .redirects(redirects)
                // Keep the token across a redirect on the hub itself (a renamed private repo),
                // drop it when the host changes (as hf-hub does).
                .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
                .try_proxy_from_env(true)
                .build()
        };
        Ok(Client {
            no_redirect: build(0),
            follow: build(10),
            endpoint: opts.endpoint.clone(),
            token: opts.token.clone(),
            max_retries: opts.max_retries,
            base_delay: opts.retry_base_delay,
            user_agent: format!("mimo-quant/{}; hf_hub/0.4", env!("CARGO_PKG_VERSION")),
        })
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `{endpoint}/{[datasets/]ORG/NAME}/resolve/{commit}/{file}` with the file path URL-encoded.
    pub(crate) fn resolve_url(&self, repo: &RepoRef, commit: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            repo.hf.url(),
            commit,
            encode_path(file)
        )
    }

    /// A request with the user agent, and the token when `url` is on the hub itself (never sent to
    /// a CDN: presigned URLs need none).
    fn request(&self, agent: &ureq::Agent, method: &str, url: &str) -> ureq::Request {
        let mut r = agent
            .request(method, url)
            .set("User-Agent", &self.user_agent);
        if let Some(t) = &self.token {
            if origin(url) == origin(&self.endpoint) {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
        }
        r
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent; waits
    /// `base * 2^n` (capped at 8 s) between tries. `made_progress` lets a caller that advanced
    /// (a resumed download) reset the count.
    pub(crate) fn retry<T>(
        &self,
        mut attempt: impl FnMut(&mut bool) -> Result<T, Failure>,
    ) -> Result<T, HubError> {
        let mut failures = 0u32;
        loop {
            let mut made_progress = false;
            match attempt(&mut made_progress) {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) => {
                    if made_progress {
                        failures = 0;
                    }
                    if failures >= self.max_retries {
                        return Err(e);
                    }
                    std::thread::sleep(self.backoff(failures));
                    failures += 1;
                }
            }
        }
    }

    fn backoff(&self, n: u32) -> Duration {
        self.base_delay
            .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
            .min(MAX_BACKOFF)
    }

    /// `GET /api/{models|datasets}/{repo}/revision/{rev}`: the commit sha and the file list.
    pub(crate) fn repo_info(&self, repo: &RepoRef) -> Result<hf_hub::api::RepoInfo, HubError> {
        let url = format!("{}/api/{}", self.endpoint, repo.hf.api_url());
        let ctx = Ctx {
            repo,
            file: None,
            commit: None,
        };
        self.retry(|_| {
            let resp = self
                .request(&self.follow, "GET", &url)
                .call()
                .map_err(|e| self.classify(e, &url, &ctx))?;
            let body = resp.into_string().map_err(|e| {
                Failure::Transient(HubError::Network {
                    url: url.clone(),
                    detail: format!("reading the answer: {e}"),
                })
            })?;
            serde_json::from_str::<hf_hub::api::RepoInfo>(&body).map_err(|e| {
                Failure::Fatal(HubError::BadResponse {
                    url: url.clone(),
                    detail: format!("repo info is not the hub's JSON (sha, siblings): {e}"),
                })
            })
        })
    }

    /// HEAD on the resolve URL, following only relative redirects, like huggingface_hub.
    pub(crate) fn file_meta(
        &self,
        repo: &RepoRef,
        commit: &str,
        file: &str,
    ) -> Result<FileMeta, HubError> {
        let ctx = Ctx {
            repo,
            file: Some(file),
            commit: Some(commit),
        };
        let start = self.resolve_url(repo, commit, file);
        self.retry(|_| {
            let mut url = start.clone();
            let mut hops = 0;
            let resp = loop {
                let resp = self
                    .request(&self.no_redirect, "HEAD", &url)
                    // The real size, not that of a compressed body.
                    .set("Accept-Encoding", "identity")
                    .call()
                    .map_err(|e| self.classify(e, &url, &ctx))?;
                let relative = (300..400).contains(&resp.status())
                    && resp.header("Location").is_some_and(|l| l.starts_with('/'));
                if !relative || hops >= MAX_RELATIVE_REDIRECTS {
                    break resp;
                }
                let loc = resp.header("Location").unwrap_or_default();
                url = format!("{}{}", origin(&url), loc);
                hops += 1;
            };
            let bad = |detail: String| {
                Failure::Fatal(HubError::BadResponse {
                    url: url.clone(),
                    detail,
                })
            };
            if resp.header("X-Repo-Commit").is_none() {
                return Err(bad(
                    "no X-Repo-Commit header: is HF_ENDPOINT a Hugging Face hub?".into(),
                ));
            }
            let etag = resp
                .header("X-Linked-Etag")
                .or_else(|| resp.header("ETag"))
                .map(normalize_etag)
                .ok_or_else(|| bad("no ETag header".into()))?;
            if !is_safe_blob_name(&etag) {
                return Err(bad(format!("ETag `{etag}` is not a usable blob name")));
            }
            let redirected = (300..400).contains(&resp.status());
            // On a redirect, Content-Length is the redirect's own body (huggingface_hub ignores it).
            let size = resp
                .header("X-Linked-Size")
                .or_else(|| {
                    if redirected {
                        None
                    } else {
                        resp.header("Content-Length")
                    }
                })
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| bad("no X-Linked-Size or Content-Length header".into()))?;
            let location = if redirected {
                match resp.header("Location") {
                    Some(l) => l.to_string(),
                    None => return Err(bad(format!("HTTP {} without Location", resp.status()))),
                }
            } else {
                url.clone()
            };
            Ok(FileMeta {
                etag,
                size,
                location,
            })
        })
    }

    /// `GET location` from byte `start` (a `Range` request when `start > 0`), following redirects.
    pub(crate) fn get_from(
        &self,
        location: &str,
        start: u64,
        ctx: &Ctx<'_>,
    ) -> Result<ureq::Response, Failure> {
        let mut req = self
            .request(&self.follow, "GET", location)
            .set("Accept-Encoding", "identity");
        if start > 0 {
            req = req.set("Range", &format!("bytes={start}-"));
        }
        req.call().map_err(|e| self.classify(e, location, ctx))
    }

    /// Maps a ureq error to a typed, retry-aware failure.
    pub(crate) fn classify(&self, err: ureq::Error, url: &str, ctx: &Ctx<'_>) -> Failure {
        match err {
            ureq::Error::Status(status, resp) => {
                let code = resp.header("X-Error-Code").map(str::to_string);
                let message = resp.header("X-Error-Message").map(str::to_string);
                let repo = ctx.repo.id.clone();
                match (status, code.as_deref()) {
                    (_, Some("RevisionNotFound")) => Failure::Fatal(HubError::RevisionNotFound {
                        repo,
                        revision: ctx.repo.revision.clone(),
                    }),
                    (_, Some("EntryNotFound")) | (404, None) if ctx.file.is_some() => {
                        Failure::Fatal(HubError::EntryNotFound {
                            repo,
                            file: ctx.file.unwrap_or_default().to_string(),
                            commit: ctx.commit.unwrap_or(&ctx.repo.revision).to_string(),
                        })
                    }
                    (401 | 403, _) | (_, Some("GatedRepo")) => {
                        Failure::Fatal(HubError::AccessDenied {
                            repo: repo.clone(),
                            status,
                            code: code.map(|c| format!(", {c}")).unwrap_or_default(),
                            url: format!("{}/{}", self.endpoint, ctx.repo.hf.url()),
                            hint: if self.token.is_some() {
                                ", and the token sent does not grant access"
                            } else {
                                " (or does not exist), and no token was sent"
                            },
                        })
                    }
                    (404, _) | (_, Some("RepoNotFound")) => {
                        Failure::Fatal(HubError::RepoNotFound {
                            repo,
                            endpoint: self.endpoint.clone(),
                        })
                    }
                    _ => {
                        let err = HubError::Http {
                            url: url.to_string(),
                            status,
                            message: message.map(|m| format!(": {m}")).unwrap_or_default(),
                        };
                        // Rate limits and server hiccups pass; other statuses will not.
                        if matches!(status, 408 | 429 | 500 | 502 | 503 | 504) {
                            Failure::Transient(err)
                        } else {
                            Failure::Fatal(err)
                        }
                    }
                }
            }
            ureq::Error::Transport(t) => {
                let detail = t.to_string();
                let err = HubError::Network {
                    url: url.to_string(),
                    detail,
                };
                match t.kind() {
                    ureq::ErrorKind::Dns
                    | ureq::ErrorKind::ConnectionFailed
                    | ureq::ErrorKind::Io
                    | ureq::ErrorKind::ProxyConnect => Failure::Transient(err),
                    _ => Failure::Fatal(err),
                }
            }
        }
    }
}

/// `scheme://host[:port]` of a URL.
pub(crate) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// huggingface_hub's `_normalize_etag`: drop a weak `W/` prefix and the quotes.
pub(crate) fn normalize_etag(raw: &str) -> String {
    let s = raw.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"').to_string()
}

/// An etag becomes a file name under `blobs/`: refuse anything that could escape it.
fn is_safe_blob_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Percent-encodes a repo file path for a URL, keeping `/` (huggingface_hub's `quote(filename)`).
pub(crate) fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(origin("http://127.0.0.1:80/a/b"), "http://127.0.0.1:80");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert!(!is_safe_blob_name("../x"));
        assert!(!is_safe_blob_name("a/b"));
        assert!(is_safe_blob_name("0a1b"));
        assert_eq!(encode_path("data/a b+c.jsonl"), "data/a%20b%2Bc.jsonl");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let opts = HubOptions::from_lookup(&|_| None, None, None, false);
        let c = Client::new(&opts).unwrap();
        assert_eq!(c.backoff(0), Duration::from_millis(500));
        assert_eq!(c.backoff(1), Duration::from_millis(1000));
        assert_eq!(c.backoff(3), Duration::from_millis(4000));
        assert_eq!(c.backoff(10), MAX_BACKOFF);
        assert_eq!(c.backoff(40), MAX_BACKOFF);
    }
}
