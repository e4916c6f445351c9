//! Hostile and broken inputs, interrupted runs and full disks, through the `mimo-quant` binary
//! (issue 10). The bad-input corpus and its expected errors live in tests/bad-inputs/
//! (cases.json, written by generate.py). Tests marked `#[ignore = "issue 10: ..."]` fail today;
//! each is a finding in docs/hostile-findings.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../../tests/bad-inputs/harness.rs"]
mod harness;

use harness::{corpus_root, run_corpus, run_limited};

mod common;
use common::{read_tree, write_dense_source};

/// Seed of the dense source (8 x 4 MiB BF16) that makes a conversion take long enough to kill.
const SLOW_SOURCE_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mimo-quant"))
}

fn quant(args: &[&dyn AsRef<std::ffi::OsStr>]) -> harness::Outcome {
    let mut c = bin();
    for a in args {
        c.arg(a);
    }
    run_limited(c, Duration::from_secs(120))
}

/// The command line for a corpus case; convert writes into a fresh temporary parent.
fn corpus_command(c: &harness::Case, scratch: &Path) -> (Command, Option<PathBuf>) {
    let mut cmd = bin();
    match c.command.as_str() {
        "convert" => {
            let parent = scratch.join(c.case.replace('/', "_"));
            std::fs::create_dir_all(&parent).unwrap();
            let out = parent.join("out");
            cmd.arg("convert")
                .arg(c.dir())
                .arg("-o")
                .arg(&out)
                .arg("-q");
            (cmd, Some(out))
        }
        "verify" => {
            cmd.arg("verify").arg(c.dir());
            (cmd, None)
        }
        other => panic!("unknown command '{other}' in cases.json"),
    }
}

#[test]
fn bad_input_corpus_is_rejected_with_the_expected_error() {
    let scratch = tempfile::tempdir().unwrap();
    run_corpus("mimo-quant", false, |c| corpus_command(c, scratch.path()));
}

/// plan, inspect and verify on every bad source: an error or a report, never a panic or a hang.
#[test]
fn other_subcommands_never_panic_on_the_source_corpus() {
    let mut failures = Vec::new();
    for c in harness::cases("mimo-quant")
        .iter()
        .filter(|c| c.case.starts_with("source/"))
    {
        for sub in ["plan", "inspect", "verify"] {
            let mut cmd = bin();
            cmd.arg(sub).arg(c.dir());
            let o = run_limited(cmd, Duration::from_secs(30));
            if o.timed_out || o.code.is_none() || o.code == Some(101) || o.text.contains("panicked")
            {
                failures.push(format!("{sub} {}: {:?} {}", c.case, o.code, o.text));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The corpus' controls: the good dense model converts and verifies, the committed FP4 model
/// verifies (so every bad case differs from a good one only by its defect).
#[test]
fn good_corpus_inputs_are_accepted() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let dense = corpus_root().join("good/dense");
    let o = quant(&[&"convert", &dense, &"-o", &out, &"-q"]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    let o = quant(&[&"verify", &out, &"--source", &dense]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    let o = quant(&[&"verify", &corpus_root().join("good/fp4")]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    assert!(o.text.starts_with("OK"), "{}", o.text);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn temp_leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("mimo-quant-tmp") || n.ends_with(".old"))
        .collect()
}

#[test]
fn symlinked_side_files_outside_the_source_are_not_copied() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    copy_dir(&corpus_root().join("good/dense"), &src);
    let secret = d.path().join("secret.txt");
    std::fs::write(&secret, "SECRET-TOKEN-not-for-the-hub\n").unwrap();
    std::os::unix::fs::symlink(&secret, src.join("README.md")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", src.join("tokenizer_config.json")).unwrap();
    let out = d.path().join("out");
    let o = quant(&[&"convert", &src, &"-o", &out, &"-q"]);
    // Either refused with a message naming the link, or converted without the outside content.
    if o.code == Some(0) {
        for (name, bytes) in read_tree(&out) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains("SECRET-TOKEN"),
                "{name} in the output holds the content of {} (outside the source folder)",
                secret.display()
            );
        }
    } else {
        assert!(
            o.text.contains("README.md") || o.text.contains("tokenizer_config.json"),
            "{}",
            o.text
        );
    }
}

/// A symlinked shard inside the folder is fine (the hub cache is made of them); the index may
/// not name one through `..`. The folder's own symlink to an outside weight file is followed:
/// reading is allowed, only writing is confined (SECURITY.md).
#[test]
fn index_shard_names_cannot_leave_the_folder() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    copy_dir(&corpus_root().join("source/index-dotdot"), &src);
    let out = d.path().join("out");
    let o = quant(&[&"convert", &src, &"-o", &out, &"-q"]);
    assert_eq!(o.code, Some(2), "{}", o.text);
    assert!(
        o.text
            .contains("is not a plain file name inside the checkpoint folder"),
        "{}",
        o.text
    );
    assert!(!out.exists());
    // A shard name that is a symlink into the folder's parent, named plainly, is read.
    let blobs = d.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let dense = corpus_root().join("good/dense");
    std::fs::copy(dense.join("model.safetensors"), blobs.join("abc123")).unwrap();
    let snap = d.path().join("snapshot");
    std::fs::create_dir(&snap).unwrap();
    std::fs::copy(dense.join("config.json"), snap.join("config.json")).unwrap();
    std::os::unix::fs::symlink("../blobs/abc123", snap.join("model.safetensors")).unwrap();
    let out2 = d.path().join("out2");
    let o = quant(&[&"convert", &snap, &"-o", &out2, &"-q"]);
    assert_eq!(o.code, Some(0), "{}", o.text);
}

/// kill -9 at several points of a sharded conversion: each time the output is absent or
/// complete (verify passes), and the next run succeeds.
#[test]
fn kill_9_during_convert_leaves_no_partial_output_and_the_next_run_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_dense_source(&src, 8, 1024, 2048, SLOW_SOURCE_SEED);
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let mut killed_mid_run = 0;
    for delay_ms in [0u64, 20, 60, 150, 400] {
        let mut child = bin()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .args(["-q", "--force", "--max-shard-size", "6MB", "--threads", "1"])
            .spawn()
            .unwrap();
        // Wait for this run's temporary folder, then a little more, then SIGKILL.
        let tmp = parent.join(format!(".out.mimo-quant-tmp-{}", child.id()));
        let start = Instant::now();
        while !tmp.exists() && start.elapsed() < Duration::from_secs(30) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap_or(());
        child.wait().unwrap();
        if !finished {
            killed_mid_run += 1;
        }
        if out.exists() {
            let o = quant(&[&"verify", &out]);
            assert_eq!(
                o.code,
                Some(0),
                "killed after {delay_ms} ms: the output is not complete: {}",
                o.text
            );
        }
    }
    assert!(
        killed_mid_run > 0,
        "every run finished before the kill: the source is too small"
    );
    let out2 = parent.join("out2");
    let o = quant(&[
        &"convert",
        &src,
        &"-o",
        &out2,
        &"-q",
        &"--max-shard-size",
        &"6MB",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    let o = quant(&[&"verify", &out2, &"--source", &src]);
    assert_eq!(o.code, Some(0), "{}", o.text);
}

#[test]
fn kill_9_leftover_temp_folder_is_removed_by_the_next_run() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_dense_source(&src, 8, 1024, 2048, SLOW_SOURCE_SEED);
    let parent = d.path().join("outputs");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("out");
    let mut child = bin()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .args(["-q", "--threads", "1"])
        .spawn()
        .unwrap();
    let tmp = parent.join(format!(".out.mimo-quant-tmp-{}", child.id()));
    let start = Instant::now();
    while !tmp.exists() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().unwrap();
    assert!(!out.exists(), "killed run left an output");
    let o = quant(&[&"convert", &src, &"-o", &out, &"-q"]);
    assert_eq!(o.code, Some(0), "{}", o.text);
    let left = temp_leftovers(&parent);
    assert!(
        left.is_empty(),
        "stale temporary folders after a successful run: {left:?}"
    );
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted on drop; None when mounting is not
/// permitted here.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if st.status.success() {
            Some(Tmpfs(dir.to_path_buf()))
        } else {
            eprintln!(
                "SKIP: cannot mount a tmpfs ({}); run as root to test a full disk",
                String::from_utf8_lossy(&st.stderr).trim()
            );
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_gives_a_clear_error_and_removes_the_temporary_folder() {
    let d = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&d.path().join("small"), "8k") else {
        return;
    };
    let out = fs.0.join("out");
    let o = quant(&[
        &"convert",
        &corpus_root().join("good/dense"),
        &"-o",
        &out,
        &"-q",
    ]);
    assert_eq!(o.code, Some(2), "{}", o.text);
    assert!(o.text.contains("No space left on device"), "{}", o.text);
    assert!(
        o.text.contains(&fs.0.display().to_string()),
        "the error should name the output path: {}",
        o.text
    );
    let left: Vec<_> = std::fs::read_dir(&fs.0).unwrap().collect();
    assert!(left.is_empty(), "left on the full disk: {left:?}");
}

#[test]
fn disk_full_while_copying_side_files_names_the_destination() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    copy_dir(&corpus_root().join("good/dense"), &src);
    // The shard, config and manifest fit in 64 KiB; a 200 KiB README does not.
    std::fs::write(src.join("README.md"), vec![b'x'; 200 * 1024]).unwrap();
    let Some(fs) = Tmpfs::mount(&d.path().join("small"), "64k") else {
        return;
    };
    let out = fs.0.join("out");
    let o = quant(&[&"convert", &src, &"-o", &out, &"-q"]);
    assert_eq!(o.code, Some(2), "{}", o.text);
    assert!(o.text.contains("No space left on device"), "{}", o.text);
    assert!(
        o.text.contains(&fs.0.display().to_string()),
        "the error names {} instead of the output it could not write: {}",
        src.join("README.md").display(),
        o.text
    );
    assert!(std::fs::read_dir(&fs.0).unwrap().next().is_none());
}

/// Byte-identical output on 1 and 2 threads and across two runs, for every layout, on a MoE
/// fixture (fused expert sets) and a dense one with a sharded output.
#[test]
fn output_is_byte_identical_across_threads_and_runs() {
    let d = tempfile::tempdir().unwrap();
    for arch in ["qwen3_moe", "llama"] {
        let src = d.path().join(arch);
        let o = quant(&[&"fixture", &src, &"--arch", &arch]);
        assert_eq!(o.code, Some(0), "{}", o.text);
        for layout in [
            ["--format", "nvfp4", "--layout", "compressed-tensors"],
            ["--format", "mxfp4", "--layout", "compressed-tensors"],
            ["--format", "nvfp4", "--layout", "modelopt"],
        ] {
            let mut trees = Vec::new();
            for (run, threads) in [(0, "1"), (1, "2"), (2, "2")] {
                let out = d
                    .path()
                    .join(format!("{arch}-{}-{}-{run}", layout[1], layout[3]));
                let o = quant(&[
                    &"convert",
                    &src,
                    &"-o",
                    &out,
                    &"-q",
                    &"--threads",
                    &threads,
                    &"--max-shard-size",
                    &"100KB",
                    &layout[0],
                    &layout[1],
                    &layout[2],
                    &layout[3],
                ]);
                assert_eq!(o.code, Some(0), "{}", o.text);
                trees.push(read_tree(&out));
            }
            assert!(
                trees[0].len() > 3,
                "expected several files: {:?}",
                trees[0].keys()
            );
            for t in &trees[1..] {
                assert_eq!(
                    t.keys().collect::<Vec<_>>(),
                    trees[0].keys().collect::<Vec<_>>()
                );
                for (name, bytes) in t {
                    assert!(
                        bytes == &trees[0][name],
                        "{arch} {layout:?}: {name} differs between runs/thread counts"
                    );
                }
            }
        }
    }
}

/// Calibrated methods (mse, gptq) on the embedded tiny MoE with a small calibration text: the
/// whole output folder, mimo-quant.json included, is byte-identical on 1 and 2 threads.
#[test]
fn calibrated_output_is_byte_identical_across_threads() {
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe");
    let calib = d.path().join("calib.txt");
    std::fs::write(
        &calib,
        "The quick brown fox jumps over the lazy dog. fn main() { println!(\"hi\"); }\n\
         Quantization keeps four bits per weight and one scale per block of sixteen.\n",
    )
    .unwrap();
    let mut failures = Vec::new();
    for method in ["mse", "gptq"] {
        let mut trees = Vec::new();
        for threads in ["1", "2"] {
            let out = d.path().join(format!("{method}-{threads}"));
            let o = quant(&[
                &"convert",
                &src,
                &"-o",
                &out,
                &"-q",
                &"--threads",
                &threads,
                &"--method",
                &method,
                &"--calib",
                &calib,
            ]);
            assert_eq!(o.code, Some(0), "{method}: {}", o.text);
            trees.push(read_tree(&out));
        }
        for (name, bytes) in &trees[1] {
            if trees[0].get(name) != Some(bytes) {
                failures.push(format!("{method}: {name} differs between 1 and 2 threads"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
