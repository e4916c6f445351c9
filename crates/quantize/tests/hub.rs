//! `mimo_quant::hub` against a local stand-in of the Hugging Face Hub (tests/hub_server): download,
//! cache layout and reuse, resume after a cut connection, offline mode, 401/404, pinned commits,
//! retries, datasets, and the environment variables.

mod hub_server;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_server::{blob_etag, lfs_oid, Commit, HubServer, Repo, LFS_THRESHOLD};
use mimo_quant::hub::{fetch_dataset, fetch_model, looks_like_repo_id, HubError, HubOptions};
use rand::{RngCore, SeedableRng};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn files(list: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// `org/model`: main -> C2 (sharded, plus files that must never be downloaded); tag v1 -> C1.
fn model_repo(id: &str, gated_token: Option<&str>) -> Repo {
    let index = format!(
        r#"{{"metadata":{{"total_size":8000}},"weight_map":{{"a.weight":"{SHARD1}","b.weight":"{SHARD2}"}}}}"#
    );
    let c2 = files(&[
        ("config.json", br#"{"model_type":"llama","v":2}"#.to_vec()),
        ("generation_config.json", br#"{"do_sample":true}"#.to_vec()),
        ("tokenizer.json", br#"{"model":{"type":"BPE"}}"#.to_vec()),
        ("tokenizer_config.json", br#"{"bos_token":"<s>"}"#.to_vec()),
        (
            "special_tokens_map.json",
            br#"{"eos_token":"</s>"}"#.to_vec(),
        ),
        ("model.safetensors.index.json", index.into_bytes()),
        (SHARD1, random_bytes(1, 50_000)),
        (SHARD2, random_bytes(2, 30_001)),
        // Present in the repo, never wanted:
        ("consolidated.safetensors", random_bytes(3, 4000)),
        ("pytorch_model.bin", random_bytes(4, 2000)),
        ("original/consolidated.00.pth", random_bytes(5, 1500)),
        ("original/tokenizer.model", random_bytes(6, 1500)),
        ("model.gguf", random_bytes(7, 1500)),
        ("README.md", b"# model".to_vec()),
    ]);
    let c1 = files(&[
        ("config.json", br#"{"model_type":"llama","v":1}"#.to_vec()),
        ("model.safetensors", random_bytes(8, 20_000)),
        ("tokenizer.json", br#"{"model":{"type":"BPE"}}"#.to_vec()),
    ]);
    Repo {
        kind: "models",
        id: id.to_string(),
        commits: vec![
            Commit {
                sha: C1.into(),
                files: c1,
            },
            Commit {
                sha: C2.into(),
                files: c2,
            },
        ],
        refs: HashMap::from([("main".into(), C2.into()), ("v1".into(), C1.into())]),
        gated_token: gated_token.map(str::to_string),
    }
}

fn dataset_repo() -> Repo {
    let c = files(&[
        ("README.md", b"# calib".to_vec()),
        (
            "train.jsonl",
            b"{\"text\":\"a b c\"}\n{\"text\":\"d e\"}\n".to_vec(),
        ),
        ("test.jsonl", b"{\"text\":\"held out\"}\n".to_vec()),
        ("data/train-00000-of-00001.parquet", random_bytes(9, 3000)),
    ]);
    Repo {
        kind: "datasets",
        id: "org/calib".into(),
        commits: vec![Commit {
            sha: C1.into(),
            files: c,
        }],
        refs: HashMap::from([("main".into(), C1.into())]),
        gated_token: None,
    }
}

fn no_weights_repo() -> Repo {
    Repo {
        kind: "models",
        id: "org/binonly".into(),
        commits: vec![Commit {
            sha: C1.into(),
            files: files(&[
                ("config.json", b"{}".to_vec()),
                ("pytorch_model.bin", random_bytes(10, 2000)),
            ]),
        }],
        refs: HashMap::from([("main".into(), C1.into())]),
        gated_token: None,
    }
}

fn server() -> HubServer {
    HubServer::start(vec![
        model_repo("org/model", None),
        model_repo("org/gated", Some("hf_secret")),
        dataset_repo(),
        no_weights_repo(),
    ])
}

fn opts(endpoint: &str, cache: &Path) -> HubOptions {
    let mut o = HubOptions::from_lookup(&|_| None, None, None, false);
    o.endpoint = endpoint.to_string();
    o.cache_dir = cache.to_path_buf();
    o.progress = false;
    o.max_retries = 3;
    o.retry_base_delay = Duration::from_millis(5);
    o.timeout = Duration::from_secs(10);
    o
}

/// An endpoint where nothing listens.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn fixture_file(repo: &Repo, commit: &str, file: &str) -> Vec<u8> {
    repo.commits.iter().find(|c| c.sha == commit).unwrap().files[file].clone()
}

const MAIN_FILES: [&str; 8] = [
    "config.json",
    "generation_config.json",
    SHARD1,
    SHARD2,
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--org--model")
}

#[test]
fn downloads_only_conversion_files_in_hf_cache_layout_and_reuses_them() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&srv.url, tmp.path());
    let fixture = model_repo("org/model", None);

    let got = fetch_model("org/model", &o).unwrap();
    assert_eq!(got.commit, C2);
    assert_eq!(got.revision, "main");
    assert!(!got.from_cache_only);
    assert_eq!(got.files, MAIN_FILES);
    assert_eq!(
        got.snapshot_dir,
        repo_dir(tmp.path()).join("snapshots").join(C2)
    );
    let mut total = 0u64;
    for f in MAIN_FILES {
        let want = fixture_file(&fixture, C2, f);
        total += want.len() as u64;
        let p = got.snapshot_dir.join(f);
        assert_eq!(std::fs::read(&p).unwrap(), want, "{f}");
        // snapshots/<c>/<f> -> ../../blobs/<etag>, etag = sha256 for LFS files.
        let target = std::fs::read_link(&p).unwrap();
        let etag = blob_etag(&want);
        assert_eq!(target, Path::new("../../blobs").join(&etag), "{f}");
        if want.len() > LFS_THRESHOLD {
            assert_eq!(etag, lfs_oid(&want));
        }
    }
    assert_eq!(got.downloaded_bytes, total);
    assert_eq!(
        std::fs::read_to_string(repo_dir(tmp.path()).join("refs/main")).unwrap(),
        C2
    );
    let blobs: Vec<String> = std::fs::read_dir(repo_dir(tmp.path()).join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs.len(), MAIN_FILES.len(), "{blobs:?}");
    assert!(blobs.iter().all(|b| !b.ends_with(".incomplete")));

    let log = srv.log();
    for never in [
        "consolidated.safetensors",
        "pytorch_model.bin",
        "original/",
        ".gguf",
        "README.md",
    ] {
        assert!(
            !log.iter().any(|s| s.path.contains(never)),
            "{never} was requested"
        );
    }
    // Metadata by HEAD (as huggingface_hub), LFS bytes from the CDN path, no token sent.
    assert!(log
        .iter()
        .any(|s| s.method == "HEAD" && s.path.ends_with(SHARD1) && s.status == 302));
    let shard1_oid = lfs_oid(&fixture_file(&fixture, C2, SHARD1));
    assert!(log
        .iter()
        .any(|s| s.method == "GET" && s.path == format!("/cdn/{shard1_oid}")));
    assert!(log.iter().all(|s| s.auth.is_none()));

    // Second run: one API call, no file request.
    srv.clear_log();
    let again = fetch_model("org/model", &o).unwrap();
    assert_eq!(again.commit, C2);
    assert_eq!(again.files, got.files);
    assert_eq!(again.downloaded_bytes, 0);
    let log = srv.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert!(log[0]
        .path
        .starts_with("/api/models/org/model/revision/main"));
}

#[test]
fn cut_connection_is_resumed_with_a_range_request() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = model_repo("org/model", None);
    let shard = fixture_file(&fixture, C2, SHARD1);
    let cdn = format!("/cdn/{}", lfs_oid(&shard));
    srv.cut_once(&cdn);
    // A small (non-LFS) file served by the resolve URL itself, cut too.
    srv.cut_once(&format!("/org/model/resolve/{C2}/config.json"));

    let got = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap();
    assert_eq!(std::fs::read(got.snapshot_dir.join(SHARD1)).unwrap(), shard);
    assert_eq!(
        std::fs::read(got.snapshot_dir.join("config.json")).unwrap(),
        fixture_file(&fixture, C2, "config.json")
    );
    let gets: Vec<_> = srv
        .log()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path == cdn)
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    let half = (shard.len() / 2) as u64;
    assert_eq!((gets[0].range.clone(), gets[0].body_bytes), (None, half));
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(gets[1].status, 206);
    // The first half was not fetched twice.
    assert_eq!(gets[0].body_bytes + gets[1].body_bytes, shard.len() as u64);
}

#[test]
fn interrupted_download_resumes_in_the_next_run() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = model_repo("org/model", None);
    let shard = fixture_file(&fixture, C2, SHARD1);
    let oid = lfs_oid(&shard);
    srv.cut_once(&format!("/cdn/{oid}"));

    let mut no_retry = opts(&srv.url, tmp.path());
    no_retry.max_retries = 0;
    let err = fetch_model("org/model", &no_retry).unwrap_err();
    assert!(matches!(err, HubError::Network { .. }), "{err}");
    assert!(err.to_string().contains("cut after"), "{err}");
    let part = repo_dir(tmp.path()).join(format!("blobs/{oid}.incomplete"));
    let half = shard.len() / 2;
    assert_eq!(std::fs::metadata(&part).unwrap().len(), half as u64);
    assert!(!repo_dir(tmp.path())
        .join("snapshots")
        .join(C2)
        .join(SHARD1)
        .exists());

    srv.clear_log();
    let got = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap();
    assert_eq!(std::fs::read(got.snapshot_dir.join(SHARD1)).unwrap(), shard);
    assert!(!part.exists());
    let log = srv.log();
    let get = log
        .iter()
        .find(|s| s.method == "GET" && s.path == format!("/cdn/{oid}"))
        .unwrap();
    assert_eq!(
        get.range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(get.body_bytes, (shard.len() - half) as u64);
}

#[test]
fn offline_mode_uses_only_the_cache_and_names_what_is_missing() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let mut off = opts(&dead_endpoint(), tmp.path());
    off.offline = true;

    let err = fetch_model("org/model", &off).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::OfflineMiss { .. }), "{msg}");
    assert!(
        msg.contains("refs") && msg.contains("never downloaded") && msg.contains("org/model"),
        "{msg}"
    );

    let online = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap();
    let offline = fetch_model("org/model", &off).unwrap();
    assert!(offline.from_cache_only);
    assert_eq!(offline.commit, online.commit);
    assert_eq!(offline.files, online.files);
    assert_eq!(offline.snapshot_dir, online.snapshot_dir);

    // The hub unreachable without --offline: the cached revision is used, as huggingface_hub does.
    let fallback = fetch_model("org/model", &opts(&dead_endpoint(), tmp.path())).unwrap();
    assert!(fallback.from_cache_only);
    assert_eq!(fallback.commit, C2);

    // A revision never downloaded.
    let mut v1 = off.clone();
    v1.revision = Some("v1".into());
    assert!(matches!(
        fetch_model("org/model", &v1),
        Err(HubError::OfflineMiss { .. })
    ));

    // A shard gone from the snapshot is named.
    std::fs::remove_file(online.snapshot_dir.join(SHARD2)).unwrap();
    let msg = fetch_model("org/model", &off).unwrap_err().to_string();
    assert!(msg.contains(SHARD2) && !msg.contains(SHARD1), "{msg}");
}

#[test]
fn gated_repo_needs_a_token_that_is_never_sent_to_the_cdn() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&srv.url, tmp.path());

    let err = fetch_model("org/gated", &o).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, HubError::AccessDenied { status: 401, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("accept its license")
            && msg.contains("HF_TOKEN")
            && msg.contains("--token")
            && msg.contains("no token was sent"),
        "{msg}"
    );

    let mut wrong = o.clone();
    wrong.token = Some("hf_wrong".into());
    let msg = fetch_model("org/gated", &wrong).unwrap_err().to_string();
    assert!(msg.contains("token sent does not grant access"), "{msg}");

    srv.clear_log();
    let mut good = o.clone();
    good.token = Some("hf_secret".into());
    let got = fetch_model("org/gated", &good).unwrap();
    assert_eq!(got.commit, C2);
    let log = srv.log();
    for s in &log {
        if s.path.starts_with("/cdn/") {
            assert_eq!(s.auth, None, "token leaked to {}", s.path);
        } else {
            assert_eq!(s.auth.as_deref(), Some("Bearer hf_secret"), "{}", s.path);
        }
    }
    assert!(log.iter().any(|s| s.path.starts_with("/cdn/")));
}

#[test]
fn unknown_repo_revision_and_bad_ids_are_clear_errors() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&srv.url, tmp.path());

    let err = fetch_model("org/nope", &o).unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
    assert!(err.to_string().contains("org/nope"), "{err}");

    let mut bad_rev = o.clone();
    bad_rev.revision = Some("no-such-branch".into());
    let err = fetch_model("org/model", &bad_rev).unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no-such-branch"), "{err}");

    let err = fetch_model("org/binonly", &o).unwrap_err();
    assert!(matches!(err, HubError::NoWeights { .. }), "{err}");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");

    assert!(matches!(
        fetch_model("bad--id/x", &o),
        Err(HubError::InvalidRepoId { .. })
    ));
    let mut escape = o.clone();
    escape.revision = Some("../../etc".into());
    assert!(matches!(
        fetch_model("org/model", &escape),
        Err(HubError::InvalidRevision(_))
    ));
    // Nothing was written for the failures.
    assert!(!tmp.path().join("models--org--nope").exists());
}

#[test]
fn revision_pinned_to_a_commit_and_tags() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = model_repo("org/model", None);
    let mut pinned = opts(&srv.url, tmp.path());
    pinned.revision = Some(C1.into());

    let got = fetch_model("org/model", &pinned).unwrap();
    assert_eq!(got.commit, C1);
    assert_eq!(got.revision, C1);
    assert_eq!(
        got.files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        std::fs::read(got.snapshot_dir.join("config.json")).unwrap(),
        fixture_file(&fixture, C1, "config.json")
    );
    assert!(srv
        .log()
        .iter()
        .filter(|s| s.path.contains("/resolve/"))
        .all(|s| s.path.contains(&format!("/resolve/{C1}/"))));
    // A commit revision records no ref (huggingface_hub neither), and main was not touched.
    let refs = repo_dir(tmp.path()).join("refs");
    assert!(!refs.join(C1).exists());
    assert!(!refs.join("main").exists());

    let mut tag = pinned.clone();
    tag.revision = Some("v1".into());
    srv.clear_log();
    let by_tag = fetch_model("org/model", &tag).unwrap();
    assert_eq!(by_tag.commit, C1);
    assert_eq!(by_tag.downloaded_bytes, 0);
    assert_eq!(srv.log().len(), 1);
    assert_eq!(std::fs::read_to_string(refs.join("v1")).unwrap(), C1);

    // Pinned and offline: the sha is its own ref.
    let mut off = pinned.clone();
    off.offline = true;
    off.endpoint = dead_endpoint();
    assert_eq!(fetch_model("org/model", &off).unwrap().commit, C1);
}

#[test]
fn transient_failures_are_retried_then_reported() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    srv.fail_once("/api/", 503);
    srv.fail_once(&format!("/org/model/resolve/{C2}/tokenizer.json"), 500);
    srv.fail_once("/cdn/", 429);
    let got = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap();
    assert_eq!(got.files, MAIN_FILES);
    let log = srv.log();
    assert_eq!(
        log.iter().filter(|s| s.path.starts_with("/api/")).count(),
        2
    );
    assert_eq!(log.iter().filter(|s| s.status >= 500).count(), 2);
    assert_eq!(log.iter().filter(|s| s.status == 429).count(), 1);

    let tmp2 = tempfile::tempdir().unwrap();
    let mut no_retry = opts(&srv.url, tmp2.path());
    no_retry.max_retries = 0;
    srv.fail_once("/api/", 503);
    let err = fetch_model("org/model", &no_retry).unwrap_err();
    assert!(matches!(err, HubError::Http { status: 503, .. }), "{err}");
}

#[test]
fn no_network_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch_model("org/model", &opts(&dead_endpoint(), tmp.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Network { .. }), "{msg}");
    assert!(
        msg.contains("cannot reach") && msg.contains("--offline"),
        "{msg}"
    );
}

#[test]
fn datasets_by_split_in_the_same_cache() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&srv.url, tmp.path());
    let fixture = dataset_repo();
    let snap = tmp.path().join("datasets--org--calib/snapshots").join(C1);

    let test = fetch_dataset("hub:org/calib:test", &o).unwrap();
    assert_eq!(test, vec![snap.join("test.jsonl")]);
    assert_eq!(
        std::fs::read(&test[0]).unwrap(),
        fixture_file(&fixture, C1, "test.jsonl")
    );
    assert!(srv
        .log()
        .iter()
        .all(|s| !s.path.contains("train") && !s.path.contains("README")));

    let train = fetch_dataset("org/calib", &o).unwrap();
    assert_eq!(
        train,
        vec![
            snap.join("data/train-00000-of-00001.parquet"),
            snap.join("train.jsonl")
        ]
    );
    for p in &train {
        let rel = p.strip_prefix(&snap).unwrap().to_str().unwrap();
        assert_eq!(std::fs::read(p).unwrap(), fixture_file(&fixture, C1, rel));
    }
    assert!(srv
        .log()
        .iter()
        .any(|s| s.path.starts_with("/datasets/org/calib/resolve/")));

    let err = fetch_dataset("org/calib:nope", &o).unwrap_err();
    assert!(matches!(err, HubError::NoDataFiles { .. }), "{err}");

    let mut off = o.clone();
    off.offline = true;
    off.endpoint = dead_endpoint();
    assert_eq!(fetch_dataset("org/calib:test", &off).unwrap(), test);
    assert!(matches!(
        fetch_dataset("org/calib:validation", &off),
        Err(HubError::OfflineMiss { .. })
    ));
}

#[test]
fn options_follow_the_huggingface_hub_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_from_file\n").unwrap();
    let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let with = |vars: &HashMap<String, String>, tok: Option<&str>, rev: Option<&str>, off: bool| {
        HubOptions::from_lookup(&|k| vars.get(k).cloned(), tok, rev, off)
    };

    let bare = env(&[("HOME", home.to_str().unwrap())]);
    let o = with(&bare, None, None, false);
    assert_eq!(o.cache_dir, home.join(".cache/huggingface/hub"));
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert_eq!(
        (o.token.clone(), o.offline, o.revision()),
        (None, false, "main")
    );

    let hf = hf_home.to_str().unwrap();
    let vars = env(&[
        ("HOME", home.to_str().unwrap()),
        ("HF_HOME", hf),
        ("HF_ENDPOINT", "http://mirror.local:8080/"),
        ("HF_HUB_OFFLINE", "1"),
    ]);
    let o = with(&vars, None, Some("v1"), false);
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.token.as_deref(), Some("hf_from_file"));
    assert_eq!(o.endpoint, "http://mirror.local:8080");
    assert!(o.offline);
    assert_eq!(o.revision(), "v1");
    assert!(!format!("{o:?}").contains("hf_from_file"), "token in Debug");

    let mut vars2 = vars.clone();
    vars2.insert("HF_TOKEN".into(), "hf_env".into());
    vars2.insert("HF_HUB_CACHE".into(), "/data/hub".into());
    vars2.insert("HF_HUB_OFFLINE".into(), "0".into());
    let o = with(&vars2, None, None, false);
    assert_eq!(o.token.as_deref(), Some("hf_env"));
    assert_eq!(o.cache_dir, PathBuf::from("/data/hub"));
    assert!(!o.offline);
    let o = with(&vars2, Some("hf_cli"), None, true);
    assert_eq!(o.token.as_deref(), Some("hf_cli"));
    assert!(o.offline);

    let xdg = env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(
        with(&xdg, None, None, false).cache_dir,
        PathBuf::from("/xdg/huggingface/hub")
    );
}

#[test]
fn repo_ids_versus_local_folders() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(looks_like_repo_id("Qwen/Qwen3-30B-A3B"));
    assert!(looks_like_repo_id("gpt2"));
    assert!(!looks_like_repo_id("./models/x"));
    assert!(!looks_like_repo_id("a/b/c"));
    assert!(!looks_like_repo_id(tmp.path().to_str().unwrap()));
    // A relative path that exists wins over the repo-id reading.
    let cwd_rel = "tests";
    assert!(Path::new(cwd_rel).exists());
    assert!(!looks_like_repo_id(cwd_rel));
}

/// A full disk while writing a blob is reported as such, naming the file and what is left.
#[cfg(target_os = "linux")]
#[test]
fn full_disk_is_reported() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = model_repo("org/model", None);
    let oid = lfs_oid(&fixture_file(&fixture, C2, SHARD1));
    let blobs = repo_dir(tmp.path()).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    // The partial file of one blob points at /dev/full, where every write fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{oid}.incomplete"))).unwrap();
    let err = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::DiskFull { .. }), "{msg}");
    assert!(
        msg.contains("disk full") && msg.contains(&oid) && msg.contains(SHARD1),
        "{msg}"
    );
}

/// A renamed repo: the hub answers the old id with relative 307 redirects, which are followed
/// (huggingface_hub follows relative redirects only); the cache keeps the id asked for.
#[test]
fn renamed_repo_redirects_are_followed() {
    let srv = server();
    srv.rename("org/old-name", "org/model");
    let tmp = tempfile::tempdir().unwrap();
    let got = fetch_model("org/old-name", &opts(&srv.url, tmp.path())).unwrap();
    assert_eq!(got.commit, C2);
    assert_eq!(got.files, MAIN_FILES);
    assert_eq!(
        got.snapshot_dir,
        tmp.path().join("models--org--old-name/snapshots").join(C2)
    );
    let log = srv.log();
    assert!(log
        .iter()
        .any(|s| s.method == "HEAD" && s.status == 307 && s.path.contains("/org/old-name/")));
    assert!(log
        .iter()
        .any(|s| s.method == "HEAD" && s.status == 302 && s.path.contains("/org/model/")));

    // A renamed gated repo: the token follows the redirect on the hub's own host.
    srv.rename("org/old-gated", "org/gated");
    let mut o = opts(&srv.url, tmp.path());
    o.token = Some("hf_secret".into());
    assert_eq!(fetch_model("org/old-gated", &o).unwrap().commit, C2);
}

/// A partial download whose bytes are not a prefix of the blob (a power loss can leave zeroed
/// blocks in it; a kill -9 cannot, but the cache has no way to tell): the finished blob's
/// sha256 is checked against the LFS oid, so the wrong bytes are never linked into the snapshot
/// as complete; the blob is fetched again from the start (issue 10, F10).
#[test]
fn corrupt_partial_download_is_detected_and_fetched_again() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let fixture = model_repo("org/model", None);
    let shard = fixture_file(&fixture, C2, SHARD1);
    let oid = lfs_oid(&shard);
    let blobs = repo_dir(tmp.path()).join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut prefix = shard[..shard.len() / 3].to_vec();
    prefix[100] ^= 0xFF;
    std::fs::write(blobs.join(format!("{oid}.incomplete")), &prefix).unwrap();

    let got = fetch_model("org/model", &opts(&srv.url, tmp.path())).unwrap();
    assert!(
        std::fs::read(got.snapshot_dir.join(SHARD1)).unwrap() == shard,
        "the snapshot links a blob with the wrong content"
    );
    let gets: Vec<_> = srv
        .log()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path == format!("/cdn/{oid}"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets[0].range.is_some() && gets[1].range.is_none(),
        "{gets:?}"
    );

    // A wrong partial one byte short of the blob: only that byte is fetched, the check catches it.
    let tmp2 = tempfile::tempdir().unwrap();
    let blobs2 = repo_dir(tmp2.path()).join("blobs");
    std::fs::create_dir_all(&blobs2).unwrap();
    let mut wrong = shard.clone();
    wrong[7] ^= 1;
    std::fs::write(
        blobs2.join(format!("{oid}.incomplete")),
        &wrong[..wrong.len() - 1],
    )
    .unwrap();
    let got = fetch_model("org/model", &opts(&srv.url, tmp2.path())).unwrap();
    assert!(std::fs::read(got.snapshot_dir.join(SHARD1)).unwrap() == shard);

    // The server sends a wrong byte in a fresh download: an error naming the file and both
    // hashes; neither a blob nor a partial file nor a snapshot link is kept; the next run works.
    let tmp3 = tempfile::tempdir().unwrap();
    srv.corrupt_once(&format!("/cdn/{oid}"));
    let err = fetch_model("org/model", &opts(&srv.url, tmp3.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::BadResponse { .. }), "{msg}");
    assert!(msg.contains(SHARD1) && msg.contains(&oid), "{msg}");
    let blobs3 = repo_dir(tmp3.path()).join("blobs");
    let left: Vec<String> = std::fs::read_dir(&blobs3)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&oid))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!repo_dir(tmp3.path())
        .join("snapshots")
        .join(C2)
        .join(SHARD1)
        .exists());
    let got = fetch_model("org/model", &opts(&srv.url, tmp3.path())).unwrap();
    assert!(std::fs::read(got.snapshot_dir.join(SHARD1)).unwrap() == shard);
}
