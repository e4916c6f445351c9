//! Cache interoperability with Python's huggingface_hub, both ways, against the local hub
//! stand-in: what `mimo_quant::hub` downloaded is found by huggingface_hub offline, and what
//! huggingface_hub downloaded is found by `mimo_quant::hub` offline. Needs `python3` with
//! `huggingface_hub`; without it the test says so and passes (set MIMO_REQUIRE_PYTHON_HUB=1 to
//! make that a failure).

mod hub_server;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use hub_server::{Commit, HubServer, Repo};
use mimo_quant::hub::{fetch_model, HubOptions};

const SHA: &str = "3333333333333333333333333333333333333333";

fn repo() -> Repo {
    let shard: Vec<u8> = (0..40_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let files: BTreeMap<String, Vec<u8>> = [
        ("config.json", br#"{"model_type":"llama"}"#.to_vec()),
        ("tokenizer.json", br#"{"model":{}}"#.to_vec()),
        ("model.safetensors", shard),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Repo {
        kind: "models",
        id: "org/interop".into(),
        commits: vec![Commit {
            sha: SHA.into(),
            files,
        }],
        refs: HashMap::from([("main".into(), SHA.into())]),
        gated_token: None,
    }
}

fn python_hub_available() -> bool {
    Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn opts(endpoint: &str, cache: &std::path::Path) -> HubOptions {
    let mut o = HubOptions::from_lookup(&|_| None, None, None, false);
    o.endpoint = endpoint.to_string();
    o.cache_dir = cache.to_path_buf();
    o.progress = false;
    o.retry_base_delay = Duration::from_millis(5);
    o
}

#[test]
fn cache_is_shared_with_python_huggingface_hub() {
    if !python_hub_available() {
        let msg = "skipped: python3 with huggingface_hub not found";
        assert!(
            std::env::var("MIMO_REQUIRE_PYTHON_HUB").is_err(),
            "{msg} (MIMO_REQUIRE_PYTHON_HUB is set)"
        );
        eprintln!("{msg}");
        return;
    }
    let srv = HubServer::start(vec![repo()]);

    // 1. Rust downloads; Python finds it offline at the same paths.
    let ours = tempfile::tempdir().unwrap();
    let got = fetch_model("org/interop", &opts(&srv.url, ours.path())).unwrap();
    let script = r#"
import sys
from huggingface_hub import hf_hub_download, snapshot_download
cache = sys.argv[1]
print(snapshot_download("org/interop", cache_dir=cache, local_files_only=True))
print(hf_hub_download("org/interop", "model.safetensors", cache_dir=cache, local_files_only=True))
"#;
    let out = Command::new("python3")
        .args(["-c", script, ours.path().to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(std::path::Path::new(lines[0]), got.snapshot_dir);
    assert_eq!(
        std::path::Path::new(lines[1]),
        got.snapshot_dir.join("model.safetensors")
    );

    // 2. Python downloads from the stand-in; Rust finds it offline.
    let theirs = tempfile::tempdir().unwrap();
    let script = r#"
import sys
from huggingface_hub import snapshot_download
print(snapshot_download("org/interop", cache_dir=sys.argv[1]))
"#;
    let out = Command::new("python3")
        .args(["-c", script, theirs.path().to_str().unwrap()])
        .env("HF_ENDPOINT", &srv.url)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python download from the stand-in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut off = opts("http://127.0.0.1:9", theirs.path());
    off.offline = true;
    let found = fetch_model("org/interop", &off).unwrap();
    assert_eq!(found.commit, SHA);
    assert_eq!(
        found.files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    for f in &found.files {
        assert_eq!(
            std::fs::read(found.snapshot_dir.join(f)).unwrap(),
            std::fs::read(got.snapshot_dir.join(f)).unwrap(),
            "{f}"
        );
    }
}
