//! `kill -9` during a hub download and during calibration (issue 10): the output folder is
//! absent, the Hugging Face cache holds nothing that a later run would take as complete (a
//! partial download only as `blobs/<etag>.incomplete`, which the next run resumes with a Range
//! request), and the next run succeeds.

mod hub_server;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hub_server::{lfs_oid, Commit, HubServer, Repo};
use sha2::{Digest, Sha256};

mod common;
use common::{read_tree, write_dense_source};

const COMMIT: &str = "3333333333333333333333333333333333333333";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mimo-quant"))
}

/// config.json and a model.safetensors of `count` BF16 [512, 1024] tensors (1 MiB each).
fn checkpoint_files(count: usize) -> BTreeMap<String, Vec<u8>> {
    let d = tempfile::tempdir().unwrap();
    write_dense_source(d.path(), count, 512, 1024, 0x9E37_79B9_7F4A_7C15);
    read_tree(d.path())
}

/// `mimo-quant ARGS` with the hub at `endpoint` and the cache in `cache`, nothing else from
/// the environment's Hugging Face settings.
fn hub_command(endpoint: &str, cache: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = bin();
    for a in args {
        c.arg(a);
    }
    c.env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null());
    c
}

fn finish(mut c: Command) -> (Option<i32>, String) {
    let o = c.output().unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ),
    )
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Names in `parent` left by a conversion (the output or its temporary folders).
fn conversion_leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect()
}

/// What a later run would take from the cache: every blob not named `.incomplete` must hold
/// exactly the bytes whose sha256 is its name (LFS blobs are named by their oid), and every
/// snapshot entry must resolve to such a blob with the fixture's content. Returns the partial
/// files (name, length).
fn check_cache(repo_dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Vec<(String, u64)> {
    let mut partial = Vec::new();
    let blobs = repo_dir.join("blobs");
    if let Ok(rd) = std::fs::read_dir(&blobs) {
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().unwrap().len();
            if let Some(oid) = name.strip_suffix(".incomplete") {
                let full = files.values().find(|b| lfs_oid(b) == oid);
                if let Some(full) = full {
                    assert!(
                        len < full.len() as u64,
                        "{name} is as long as the blob but still .incomplete"
                    );
                }
                partial.push((name, len));
            } else if name.len() == 64 {
                let bytes = std::fs::read(e.path()).unwrap();
                assert_eq!(
                    hex::encode(Sha256::digest(&bytes)),
                    name,
                    "blobs/{name} would be taken as complete but its content differs"
                );
            }
        }
    }
    let snap = repo_dir.join("snapshots").join(COMMIT);
    if let Ok(rd) = std::fs::read_dir(&snap) {
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let got = std::fs::read(e.path())
                .unwrap_or_else(|err| panic!("snapshot entry {name} is dangling: {err}"));
            assert!(
                files.get(&name) == Some(&got),
                "snapshot entry {name} does not hold the repo's file"
            );
        }
    }
    partial
}

/// kill -9 while `convert ORG/NAME` downloads a shard over a slow link: no output, no
/// temporary folder, only a `.incomplete` partial blob; the next run resumes it with a Range
/// request, converts, and the result verifies against the downloaded snapshot.
#[test]
fn kill_9_during_download_then_the_next_run_resumes_and_converts() {
    let files = checkpoint_files(6);
    let weights = files["model.safetensors"].clone();
    let srv = HubServer::start(vec![Repo {
        kind: "models",
        id: "org/slow".into(),
        commits: vec![Commit {
            sha: COMMIT.into(),
            files: files.clone(),
        }],
        refs: HashMap::from([("main".into(), COMMIT.into())]),
        gated_token: None,
    }]);
    // About 6 MiB at 64 KiB per 20 ms: about 2 s.
    srv.slow(Some((64 << 10, Duration::from_millis(20))));
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("hub");
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let repo_dir = cache.join("models--org--slow");
    let part = repo_dir.join(format!("blobs/{}.incomplete", lfs_oid(&weights)));

    let child = hub_command(
        &srv.url,
        &cache,
        &[&"convert", &"org/slow", &"-o", &out, &"-q"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0) < 256 << 10 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the download did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(child);

    assert!(
        conversion_leftovers(&parent).is_empty(),
        "{:?}",
        conversion_leftovers(&parent)
    );
    let partial = check_cache(&repo_dir, &files);
    let have = std::fs::metadata(&part).unwrap().len();
    assert!(
        partial.len() == 1 && have < weights.len() as u64,
        "killed mid-download, expected one partial blob: {partial:?}"
    );
    // Offline, the cache is not taken as complete: the missing file is named.
    let (code, text) = finish({
        let mut c = hub_command(
            &srv.url,
            &cache,
            &[&"convert", &"org/slow", &"-o", &out, &"-q", &"--offline"],
        );
        c.env("HF_HUB_OFFLINE", "1");
        c
    });
    assert_ne!(
        code,
        Some(0),
        "offline run accepted a partial cache: {text}"
    );
    assert!(!out.exists());

    // The next run resumes the blob where it stopped.
    srv.slow(None);
    srv.clear_log();
    let (code, text) = finish(hub_command(
        &srv.url,
        &cache,
        &[&"convert", &"org/slow", &"-o", &out, &"-q"],
    ));
    assert_eq!(code, Some(0), "{text}");
    let cdn = format!("/cdn/{}", lfs_oid(&weights));
    let gets: Vec<_> = srv
        .log()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path == cdn)
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    let range = gets[0].range.clone().unwrap_or_default();
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(
        from >= have && from > 0,
        "the partial {have} bytes were not resumed: {range:?}"
    );
    assert!(check_cache(&repo_dir, &files).is_empty());
    let snap = repo_dir.join("snapshots").join(COMMIT);
    let (code, text) = finish({
        let mut c = bin();
        c.arg("verify").arg(&out).arg("--source").arg(&snap);
        c
    });
    assert_eq!(code, Some(0), "{text}");
}

/// A calibration text long enough for many sequences.
fn calib_text(path: &Path) {
    let mut s = String::new();
    for i in 0..80 {
        s.push_str(&format!(
            "Line {i}: the quick brown fox jumps over the lazy dog; fn f{i}(x: u32) -> u32 {{ x * {i} }}\n"
        ));
    }
    std::fs::write(path, s).unwrap();
}

/// Calibration progress lines that show it is under way (per layer or per sequence).
const CALIBRATING: &[&str] = &["calibrating: layer 2/", "calibrating: sequence 2/"];

/// Starts `cmd` with stderr piped, returns once one of `needles` appeared in it (the child
/// still runs).
fn spawn_until(mut cmd: Command, needles: &[&str]) -> Child {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
        }
    });
    let start = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(text) if needles.iter().any(|n| text.contains(n)) => return child,
            Ok(_) => {}
            Err(e) => panic!("none of {needles:?} seen on stderr: {e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(120));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before any of {needles:?}"
        );
    }
}

/// kill -9 during the calibration of `convert --method gptq` and of `calibrate`: no output, no
/// temporary folder; the next runs succeed.
#[test]
fn kill_9_during_calibration_leaves_nothing_and_the_next_run_succeeds() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe");
    let d = tempfile::tempdir().unwrap();
    let calib = d.path().join("calib.txt");
    calib_text(&calib);
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");

    let mut cmd = bin();
    cmd.arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .args(["--method", "gptq", "--calib"])
        .arg(&calib)
        .stdout(Stdio::null());
    let child = spawn_until(cmd, CALIBRATING);
    kill(child);
    assert!(
        conversion_leftovers(&parent).is_empty(),
        "{:?}",
        conversion_leftovers(&parent)
    );

    let mut cmd = bin();
    cmd.arg("calibrate")
        .arg(&src)
        .arg("--calib")
        .arg(&calib)
        .arg("--hessian")
        .stdout(Stdio::null())
        .current_dir(&parent);
    kill(spawn_until(cmd, CALIBRATING));
    assert!(std::fs::read_dir(&parent).unwrap().next().is_none());

    let (code, text) = finish({
        let mut c = bin();
        c.arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .args(["-q", "--method", "gptq", "--calib"])
            .arg(&calib);
        c
    });
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = finish({
        let mut c = bin();
        c.arg("verify").arg(&out).arg("--source").arg(&src);
        c
    });
    assert_eq!(code, Some(0), "{text}");
}
