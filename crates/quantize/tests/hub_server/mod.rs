//! A stand-in for huggingface.co on 127.0.0.1, for the hub tests: the endpoints and headers the
//! real hub and huggingface_hub / hf-hub use, over fixture repos.
//!
//! - `GET /api/{models|datasets}/{repo}/revision/{rev}`: `{"sha", "siblings": [{"rfilename"}]}`;
//!   `.../tree/{rev}` lists files (`type`, `path`, `size`, `oid`, `lfs`) for Python's huggingface_hub
//! - `HEAD|GET /[datasets/]{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag`; small files
//!   served directly (with `Content-Length`, `Accept-Ranges`, `Range` -> 206); LFS files answered
//!   `302` to `/cdn/{sha256}` with `X-Linked-Etag` and `X-Linked-Size`.
//! - `GET /cdn/{sha256}` on a second port (another origin, like the real CDN): the bytes, with
//!   `Range` support.
//! - errors as the hub words them: `X-Error-Code` RepoNotFound (404), RevisionNotFound (404),
//!   EntryNotFound (404), GatedRepo (401 without the right token).
//!
//! Test hooks: renamed repos (relative 307 redirects), a log of every request, a one-shot "cut the connection mid-body" per path,
//! queued error statuses, and a slow link (bodies sent in paced pieces). The server stops when the value is dropped.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Files above this size are stored "in LFS": redirected to the CDN path.
pub const LFS_THRESHOLD: usize = 1024;

/// One commit of a fixture repo: path -> bytes.
#[derive(Clone, Debug)]
pub struct Commit {
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// A fixture repo.
#[derive(Clone, Debug)]
pub struct Repo {
    /// `models` or `datasets`.
    pub kind: &'static str,
    pub id: String,
    pub commits: Vec<Commit>,
    /// branch or tag -> commit sha.
    pub refs: HashMap<String, String>,
    /// When set, requests need `Authorization: Bearer <token>`.
    pub gated_token: Option<String>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
    pub status: u16,
    /// Body bytes actually written.
    pub body_bytes: u64,
}

#[derive(Default)]
struct State {
    repos: Vec<Repo>,
    log: Vec<Seen>,
    /// Paths whose next GET body is cut after half of it.
    cut_once: Vec<String>,
    /// (path prefix, status) answered once, in order.
    fail_once: Vec<(String, u16)>,
    /// Renamed repos: (old id, new id); old paths get a relative 307 to the new ones.
    renamed: Vec<(String, String)>,
    /// Paths whose next GET body has one byte flipped.
    corrupt_once: Vec<String>,
    /// Bodies are sent in pieces of this many bytes with this pause after each (a slow link).
    slow: Option<(usize, Duration)>,
}

/// The running server.
pub struct HubServer {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    addrs: Vec<std::net::SocketAddr>,
    threads: Vec<JoinHandle<()>>,
}

/// Fake git sha for an etag of a non-LFS file (opaque to clients; the real one is git sha1).
pub fn git_etag(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex::encode(h.finalize())[..40].to_string()
}

/// The LFS oid (sha256) of a file.
pub fn lfs_oid(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The etag the hub reports for a file (X-Linked-Etag for LFS, ETag otherwise).
pub fn blob_etag(bytes: &[u8]) -> String {
    if bytes.len() > LFS_THRESHOLD {
        lfs_oid(bytes)
    } else {
        git_etag(bytes)
    }
}

impl HubServer {
    pub fn start(repos: Vec<Repo>) -> HubServer {
        // Two listeners: the hub, and the "CDN" that LFS files redirect to. A different port is a
        // different origin, as the real CDN is a different host (the token must not reach it).
        let hub = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let cdn = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addrs = vec![
            hub.local_addr().expect("local addr"),
            cdn.local_addr().expect("local addr"),
        ];
        let url = format!("http://{}", addrs[0]);
        let cdn_url = format!("http://{}", addrs[1]);
        let state = Arc::new(Mutex::new(State {
            repos,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [hub, cdn]
            .into_iter()
            .map(|listener| {
                let (st, sp, cdn_url) = (state.clone(), stop.clone(), cdn_url.clone());
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        if sp.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let (st, cdn_url) = (st.clone(), cdn_url.clone());
                        std::thread::spawn(move || {
                            let _ = handle(conn, &st, &cdn_url);
                        });
                    }
                })
            })
            .collect();
        HubServer {
            url,
            state,
            stop,
            addrs,
            threads,
        }
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// The next GET of `path` sends half of its body then closes the connection.
    pub fn cut_once(&self, path: &str) {
        self.state.lock().unwrap().cut_once.push(path.to_string());
    }

    /// Requests for repo `old` are redirected (307, relative `Location`) to repo `new`, as the hub
    /// does for a renamed repo.
    pub fn rename(&self, old: &str, new: &str) {
        self.state
            .lock()
            .unwrap()
            .renamed
            .push((old.to_string(), new.to_string()));
    }

    /// The next GET of `path` sends its body with one byte flipped (same length and headers).
    pub fn corrupt_once(&self, path: &str) {
        self.state
            .lock()
            .unwrap()
            .corrupt_once
            .push(path.to_string());
    }

    /// Send bodies `chunk` bytes at a time with `pause` after each (None: at full speed), so a
    /// test can kill a client mid-download.
    pub fn slow(&self, pace: Option<(usize, Duration)>) {
        self.state.lock().unwrap().slow = pace;
    }

    /// The next request whose path starts with `prefix` gets `status`.
    pub fn fail_once(&self, prefix: &str, status: u16) {
        self.state
            .lock()
            .unwrap()
            .fail_once
            .push((prefix.to_string(), status));
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loops so they see the flag.
        for addr in &self.addrs {
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Some(Request {
        method,
        path,
        headers,
    })
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut_at: Option<usize>,
}

impl Reply {
    fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
        }
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    fn error(status: u16, code: &str, message: &str) -> Reply {
        let body = format!("{{\"error\":\"{message}\"}}").into_bytes();
        let mut r = Reply::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", message)
            .header("Content-Type", "application/json");
        r.body = body;
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

fn handle(mut conn: TcpStream, state: &Mutex<State>, cdn_url: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let Some(req) = read_request(&conn) else {
        return Ok(());
    };
    let reply = route(&req, state, cdn_url);
    let is_head = req.method == "HEAD";
    let body_len = reply.body.len();
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    let mut has_len = false;
    for (k, v) in &reply.headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let n = if is_head {
        0
    } else {
        reply.cut_at.unwrap_or(body_len).min(body_len)
    };
    // Logged before answering, so a test that reads the log after the client returns sees it.
    state.lock().unwrap().log.push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        range: req.headers.get("range").cloned(),
        auth: req.headers.get("authorization").cloned(),
        status: reply.status,
        body_bytes: n as u64,
    });
    conn.write_all(head.as_bytes())?;
    let slow = state.lock().unwrap().slow;
    match slow {
        Some((chunk, pause)) => {
            for piece in reply.body[..n].chunks(chunk.max(1)) {
                conn.write_all(piece)?;
                conn.flush()?;
                std::thread::sleep(pause);
            }
        }
        None => conn.write_all(&reply.body[..n])?,
    }
    conn.flush()?;
    // Drain nothing more: closing (also after a cut) ends the exchange.
    let _ = conn.shutdown(Shutdown::Both);
    let mut sink = [0u8; 64];
    let _ = conn.read(&mut sink);
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn authorised(repo: &Repo, req: &Request) -> bool {
    match &repo.gated_token {
        None => true,
        Some(t) => req.headers.get("authorization") == Some(&format!("Bearer {t}")),
    }
}

fn resolve_rev<'a>(repo: &'a Repo, rev: &str) -> Option<&'a Commit> {
    let sha = repo.refs.get(rev).map(String::as_str).unwrap_or(rev);
    repo.commits.iter().find(|c| c.sha == sha)
}

/// Serves `bytes` honouring a `Range: bytes=N-` header.
fn serve_bytes(req: &Request, bytes: &[u8], mut reply: Reply) -> Reply {
    let total = bytes.len();
    let start = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    reply = reply.header("Accept-Ranges", "bytes");
    match start {
        Some(s) if s >= total && total > 0 => {
            let mut r = Reply::new(416).header("Content-Range", format!("bytes */{total}"));
            r.body = Vec::new();
            r
        }
        Some(s) => {
            reply.status = 206;
            reply = reply.header(
                "Content-Range",
                format!("bytes {s}-{}/{total}", total.saturating_sub(1)),
            );
            reply.body = bytes[s..].to_vec();
            reply
        }
        None => {
            reply.body = bytes.to_vec();
            reply
        }
    }
}

fn route(req: &Request, state: &Mutex<State>, cdn_url: &str) -> Reply {
    let mut st = state.lock().unwrap();
    if let Some(i) = st
        .fail_once
        .iter()
        .position(|(p, _)| req.path.starts_with(p.as_str()))
    {
        let (_, status) = st.fail_once.remove(i);
        return Reply::error(status, "Injected", "injected failure");
    }
    let path = req.path.split('?').next().unwrap_or_default().to_string();
    for (old, new) in &st.renamed {
        for prefix in ["/api/models/", "/api/datasets/", "/datasets/", "/"] {
            let from = format!("{prefix}{old}/");
            if let Some(rest) = path.strip_prefix(&from) {
                return Reply::new(307).header("Location", format!("{prefix}{new}/{rest}"));
            }
        }
    }

    if let Some(oid) = path.strip_prefix("/cdn/") {
        let bytes = st
            .repos
            .iter()
            .flat_map(|r| r.commits.iter())
            .flat_map(|c| c.files.values())
            .find(|b| lfs_oid(b) == oid)
            .cloned();
        let Some(bytes) = bytes else {
            return Reply::error(404, "NotFound", "no such object");
        };
        let mut reply = serve_bytes(
            req,
            &bytes,
            Reply::new(200).header("ETag", format!("\"{oid}\"")),
        );
        if req.method == "GET" {
            if let Some(i) = st.cut_once.iter().position(|p| *p == path) {
                st.cut_once.remove(i);
                reply.cut_at = Some(reply.body.len() / 2);
            }
            if let Some(i) = st.corrupt_once.iter().position(|p| *p == path) {
                st.corrupt_once.remove(i);
                let mid = reply.body.len() / 2;
                if let Some(b) = reply.body.get_mut(mid) {
                    *b ^= 0x5A;
                }
            }
        }
        return reply;
    }

    if let Some(rest) = path.strip_prefix("/api/") {
        // {models|datasets}/{org}/{name}/revision/{rev}
        // (newer huggingface_hub lists files with {...}/tree/{rev}?recursive=true instead)
        let parts: Vec<&str> = rest.splitn(5, '/').collect();
        if parts.len() != 5 || !(parts[3] == "revision" || parts[3] == "tree") {
            return Reply::error(404, "NotFound", "unknown API route");
        }
        let tree = parts[3] == "tree";
        let (kind, id, rev) = (
            parts[0],
            format!("{}/{}", parts[1], parts[2]),
            percent_decode(parts[4]),
        );
        let Some(repo) = st.repos.iter().find(|r| r.kind == kind && r.id == id) else {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        };
        if !authorised(repo, req) {
            return Reply::error(
                401,
                "GatedRepo",
                "Access to this model is restricted. You must be authenticated to access it.",
            );
        }
        let Some(commit) = resolve_rev(repo, &rev) else {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        };
        if tree {
            let entries: Vec<serde_json::Value> = commit
                .files
                .iter()
                .map(|(path, bytes)| {
                    let mut e = serde_json::json!({
                        "type": "file",
                        "oid": git_etag(bytes),
                        "size": bytes.len(),
                        "path": path,
                    });
                    if bytes.len() > LFS_THRESHOLD {
                        e["lfs"] = serde_json::json!({
                            "oid": lfs_oid(bytes),
                            "size": bytes.len(),
                            "pointerSize": 134,
                        });
                    }
                    e
                })
                .collect();
            let mut r = Reply::new(200).header("Content-Type", "application/json");
            r.body = serde_json::Value::Array(entries).to_string().into_bytes();
            return r;
        }
        let siblings: Vec<serde_json::Value> = commit
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({
            "_id": "fixture",
            "id": repo.id,
            "sha": commit.sha,
            "private": false,
            "gated": repo.gated_token.is_some(),
            "siblings": siblings,
        });
        let mut r = Reply::new(200).header("Content-Type", "application/json");
        r.body = body.to_string().into_bytes();
        return r;
    }

    // /[datasets/]{org}/{name}/resolve/{rev}/{file...}
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", path.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return Reply::error(404, "NotFound", "unknown route");
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    let rev = percent_decode(parts[3]);
    let file = percent_decode(parts[4]);
    let Some(repo) = st.repos.iter().find(|r| r.kind == kind && r.id == id) else {
        return Reply::error(404, "RepoNotFound", "Repository not found");
    };
    if !authorised(repo, req) {
        return Reply::error(401, "GatedRepo", "Access to this model is restricted.");
    }
    let Some(commit) = resolve_rev(repo, &rev) else {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let Some(bytes) = commit.files.get(&file) else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    let reply = Reply::new(200).header("X-Repo-Commit", commit.sha.clone());
    if bytes.len() > LFS_THRESHOLD {
        let oid = lfs_oid(bytes);
        // Like the hub: the ETag of the LFS pointer, the real one in X-Linked-Etag.
        let mut r = reply;
        r.status = 302;
        return r
            .header("Location", format!("{cdn_url}/cdn/{oid}"))
            .header("ETag", format!("\"{}\"", git_etag(oid.as_bytes())))
            .header("X-Linked-Etag", format!("\"{oid}\""))
            .header("X-Linked-Size", bytes.len().to_string());
    }
    let mut r = serve_bytes(
        req,
        bytes,
        reply.header("ETag", format!("\"{}\"", git_etag(bytes))),
    );
    if req.method == "GET" {
        if let Some(i) = st.cut_once.iter().position(|p| *p == path) {
            st.cut_once.remove(i);
            r.cut_at = Some(r.body.len() / 2);
        }
    }
    r
}
