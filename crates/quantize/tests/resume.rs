//! `convert --resume` after `kill -9` (issue 10): finished shards of the killed run are reused
//! only after their hashes and the run's fingerprint are checked; the output is byte-identical
//! to an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../../tests/bad-inputs/harness.rs"]
mod harness;

use harness::run_limited;

mod common;
use common::{read_tree, write_dense_source};

const RECORDS: &str = ".mimo-quant-resume";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mimo-quant"))
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (read_tree(a), read_tree(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    for (name, bytes) in &ta {
        if bytes != &tb[name] && name.ends_with(".json") {
            let (x, y) = (
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&tb[name]),
            );
            for (l1, l2) in x.lines().zip(y.lines()) {
                if l1 != l2 {
                    eprintln!("{name}: {l1} != {l2}");
                }
            }
        }
        assert!(
            bytes == &tb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// Runs `convert SRC -o OUT --json -q ARGS` to the end; returns the JSON summary.
fn convert(src: &Path, out: &Path, args: &[&str]) -> serde_json::Value {
    let mut c = bin();
    c.arg("convert")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["--json", "-q"])
        .args(args);
    let o = run_limited(c, Duration::from_secs(300));
    assert_eq!(o.code, Some(0), "{}", o.text);
    let at = o.text.find('{').unwrap_or(0);
    serde_json::from_str(&o.text[at..]).unwrap_or_else(|e| panic!("{e}: {}", o.text))
}

/// Starts `convert SRC -o OUT ARGS`, waits until at least one shard is recorded as finished in
/// its temporary folder, then kills it with SIGKILL. Returns the killed run's temporary folder
/// and the number of finished shards in it at that moment. A run that ends before it can be
/// stopped (on a loaded machine this poll can be descheduled for the whole conversion) is
/// discarded and started again, up to five times.
fn kill_after_first_shard(src: &Path, out: &Path, args: &[&str]) -> (PathBuf, usize) {
    for attempt in 1..=5 {
        if let Some(killed) = try_kill_after_first_shard(src, out, args) {
            return killed;
        }
        eprintln!("attempt {attempt}: the conversion ended before it could be killed; again");
        if out.exists() {
            std::fs::remove_dir_all(out).unwrap();
        }
    }
    panic!("the conversion ended before a shard could be caught, five times");
}

/// One try of [`kill_after_first_shard`]: None where the run ended on its own first.
fn try_kill_after_first_shard(src: &Path, out: &Path, args: &[&str]) -> Option<(PathBuf, usize)> {
    let mut child = bin()
        .arg("convert")
        .arg(src)
        .arg("-o")
        .arg(out)
        .arg("-q")
        .args(args)
        .spawn()
        .unwrap();
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_string_lossy();
    let tmp = parent.join(format!(".{name}.mimo-quant-tmp-{}", child.id()));
    let records = tmp.join(RECORDS);
    let start = Instant::now();
    let count = |p: &Path| {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref().is_ok_and(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .ends_with(".safetensors.json")
                    })
                })
                .count()
            })
            .unwrap_or(0)
    };
    while count(&records) == 0 {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no shard recorded in 120 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    if out.exists() {
        // Finished between the poll and the kill.
        return None;
    }
    Some((tmp.clone(), count(&records)))
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

const ARGS: &[&str] = &["--max-shard-size", "2MB", "--threads", "1"];

#[test]
fn resume_after_kill_9_reuses_finished_shards_and_matches_a_clean_run() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_dense_source(&src, 10, 1024, 2048, 0x2545_F491_4F6C_DD1D);
    let clean = d.path().join("clean");
    let s = convert(&src, &clean, ARGS);
    assert_eq!(s["resumed_shards"], 0);
    assert!(
        read_tree(&clean).len() > 10,
        "expected one shard per tensor"
    );

    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let (tmp, finished) = kill_after_first_shard(&src, &out, ARGS);
    assert!(finished >= 1 && tmp.is_dir());
    let mut args = ARGS.to_vec();
    args.push("--resume");
    let s = convert(&src, &out, &args);
    let resumed = s["resumed_shards"].as_u64().unwrap();
    assert!(
        resumed as usize >= finished,
        "{finished} shard(s) were recorded as finished, {resumed} reused: {s}"
    );
    let notes = s["notes"].to_string();
    assert!(notes.contains("sha256 checked"), "{notes}");
    assert_same_tree(&out, &clean);
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
    let o = run_limited(
        {
            let mut c = bin();
            c.arg("verify").arg(&out).arg("--source").arg(&src);
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(o.code, Some(0), "{}", o.text);
}

#[test]
fn resume_redoes_a_tampered_shard_and_discards_everything_on_changed_options() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_dense_source(&src, 10, 1024, 2048, 0x2545_F491_4F6C_DD1D);
    let clean = d.path().join("clean");
    convert(&src, &clean, ARGS);
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let mut resume = ARGS.to_vec();
    resume.push("--resume");

    // Tampered: flip one byte in the data of the first finished shard.
    let (tmp, finished) = kill_after_first_shard(&src, &out, ARGS);
    let first = tmp.join("model-00001-of-00010.safetensors");
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    std::fs::write(&first, &bytes).unwrap();
    let s = convert(&src, &out, &resume);
    let notes = s["notes"].to_string();
    assert!(
        notes.contains("redoing model-00001-of-00010.safetensors") && notes.contains("sha256"),
        "{notes}"
    );
    assert_eq!(
        s["resumed_shards"].as_u64().unwrap() as usize,
        finished - 1,
        "{notes}"
    );
    assert_same_tree(&out, &clean);

    // Truncated: cut the first finished shard short.
    std::fs::remove_dir_all(&out).unwrap();
    let (tmp, _) = kill_after_first_shard(&src, &out, ARGS);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp.join("model-00001-of-00010.safetensors"))
        .unwrap();
    f.set_len(1000).unwrap();
    let s = convert(&src, &out, &resume);
    assert!(
        s["notes"].to_string().contains("truncated"),
        "{}",
        s["notes"]
    );
    assert_same_tree(&out, &clean);

    // Changed options (MXFP4 instead of NVFP4, same shard names): nothing is reused.
    std::fs::remove_dir_all(&out).unwrap();
    kill_after_first_shard(&src, &out, ARGS);
    let mut mx = resume.clone();
    mx.extend(["--format", "mxfp4"]);
    let s = convert(&src, &out, &mx);
    assert_eq!(s["resumed_shards"], 0, "{s}");
    assert!(
        s["notes"]
            .to_string()
            .contains("different source, with different options"),
        "{}",
        s["notes"]
    );
    let mx_clean = d.path().join("mx-clean");
    let mut mx_args = ARGS.to_vec();
    mx_args.extend(["--format", "mxfp4"]);
    convert(&src, &mx_clean, &mx_args);
    assert_same_tree(&out, &mx_clean);

    // Changed source (one tensor's bytes): nothing is reused.
    std::fs::remove_dir_all(&out).unwrap();
    kill_after_first_shard(&src, &out, ARGS);
    let model = src.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let at = bytes.len() - 2;
    bytes[at] ^= 0x01;
    std::fs::write(&model, &bytes).unwrap();
    let s = convert(&src, &out, &resume);
    assert_eq!(s["resumed_shards"], 0, "{s}");
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
}

/// Without --resume a killed run's folder is removed, not reused; --resume without one converts.
#[test]
fn without_resume_nothing_is_reused_and_resume_alone_just_converts() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_dense_source(&src, 4, 1024, 2048, 0x2545_F491_4F6C_DD1D);
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let (tmp, _) = kill_after_first_shard(&src, &out, ARGS);
    let s = convert(&src, &out, ARGS);
    assert_eq!(s["resumed_shards"], 0);
    assert!(!tmp.exists());
    assert!(
        s["warnings"]
            .to_string()
            .contains("left by an interrupted run"),
        "{s}"
    );

    let out2 = parent.join("out2");
    let mut resume = ARGS.to_vec();
    resume.push("--resume");
    let s = convert(&src, &out2, &resume);
    assert_eq!(s["resumed_shards"], 0);
    assert!(s["notes"].to_string().contains("no interrupted run"), "{s}");
    assert_same_tree(&out, &out2);
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
}
