//! Hostile and broken checkpoints through the `mimo-run` binary (issue 10): truncated and
//! tampered FP4 checkpoints are rejected with the tensor named, configs with absurd values give
//! an error, never a panic or an abort. The corpus lives in tests/bad-inputs/ (cases.json).
//! Tests marked `#[ignore = "issue 10: ..."]` fail today (docs/hostile-findings.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::format::{detect, load_linear, quantized_modules, Detected};

#[path = "../../../tests/bad-inputs/harness.rs"]
mod harness;

use harness::{corpus_root, run_corpus, run_limited, Outcome};

fn bench(model: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mimo-run"));
    c.args([
        "bench",
        "--prompt-tokens",
        "4",
        "--decode-tokens",
        "2",
        "--runs",
        "1",
        "--threads",
        "1",
    ])
    .arg("-m")
    .arg(model);
    c
}

fn run_bench(model: &Path) -> Outcome {
    run_limited(bench(model), Duration::from_secs(60))
}

#[test]
fn bad_fp4_corpus_is_rejected_with_the_tensor_named() {
    run_corpus("mimo-run", false, |c| (bench(&c.dir()), None));
}

#[test]
fn good_corpus_models_run() {
    for m in ["good/dense", "good/fp4"] {
        let o = run_bench(&corpus_root().join(m));
        assert_eq!(o.code, Some(0), "{m}: {}", o.text);
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A copy of the corpus's good FP4 checkpoint: (its temporary folder, the checkpoint folder,
/// its shard).
fn fp4_copy() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let ck_dir = d.path().join("ck");
    copy_dir(&corpus_root().join("good/fp4"), &ck_dir);
    let shard = ck_dir.join("model.safetensors");
    (d, ck_dir, shard)
}

/// Every truncation of the FP4 shard (each 7th length, and the last 64) is refused by the
/// reader with the file named, and what it does accept never reads past the mapping.
#[test]
fn every_truncation_of_an_fp4_checkpoint_is_refused() {
    let (_d, ck_dir, shard) = fp4_copy();
    let full = std::fs::read(&shard).unwrap();
    let lens: Vec<usize> = (0..full.len())
        .step_by(7)
        .chain(full.len() - 64..full.len())
        .collect();
    for &len in &lens {
        std::fs::write(&shard, &full[..len]).unwrap();
        match Checkpoint::open(&ck_dir) {
            Ok(_) => panic!("a shard cut to {len} of {} bytes was accepted", full.len()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("model.safetensors"), "cut {len}: {msg}");
            }
        }
    }
    // The binary on a few cuts: exit 1 with the file named, no panic; one line of error, with
    // no backtrace even under RUST_BACKTRACE=1 (a report of bad input, not a crash).
    for len in [0, 7, 100, full.len() / 2, full.len() - 1] {
        std::fs::write(&shard, &full[..len]).unwrap();
        let mut cmd = bench(&ck_dir);
        cmd.env("RUST_BACKTRACE", "1");
        let o = run_limited(cmd, Duration::from_secs(60));
        assert_eq!(o.code, Some(1), "cut {len}: {}", o.text);
        assert!(
            o.text.contains("model.safetensors"),
            "cut {len}: {}",
            o.text
        );
        let errors: Vec<&str> = o
            .text
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "cut {len}: {}", o.text);
        assert!(
            !o.text.contains("backtrace") && !o.text.contains("Caused by"),
            "cut {len}: {}",
            o.text
        );
    }
    // Intact again: loads.
    std::fs::write(&shard, &full).unwrap();
    let ck = Checkpoint::open(&ck_dir).unwrap();
    let Detected::Fp4(layout) = detect(&ck) else {
        panic!("good/fp4 is not detected as FP4")
    };
    let modules = quantized_modules(&ck, layout);
    assert_eq!(modules.len(), 7);
    for m in &modules {
        load_linear(&ck, layout, m).unwrap();
    }
}

/// A NaN in a norm weight of an FP4 checkpoint is refused at load (exit 1, file and tensor
/// named), not turned into NaN logits.
#[test]
fn nan_norm_weight_is_refused() {
    // The manifest's hash would name the shard as altered; mimo-run does not read it.
    let (_d, ck_dir, shard) = fp4_copy();
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "model.layers.0.input_layernorm.weight";
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 2 * 3;
    bytes[at..at + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let o = run_bench(&ck_dir);
    assert_eq!(o.code, Some(1), "{}", o.text);
    assert!(
        o.text.contains(name) && o.text.contains("non-finite") && o.text.contains("element 3"),
        "{}",
        o.text
    );
}

/// Every single-byte change in the header of the FP4 shard either fails with a typed error or
/// yields a checkpoint whose tensors all lie inside the file; the loader never panics.
#[test]
fn header_byte_flips_never_panic() {
    let (_d, ck_dir, shard) = fp4_copy();
    let full = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let mut accepted = 0;
    for i in (0..8 + n).step_by(3) {
        for x in [0x01u8, 0x20, 0x80] {
            let mut b = full.clone();
            b[i] ^= x;
            std::fs::write(&shard, &b).unwrap();
            if let Ok(ck) = Checkpoint::open(&ck_dir) {
                accepted += 1;
                let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
                for t in &names {
                    let v = ck.tensor(t).unwrap();
                    assert!(v.data.len() <= b.len());
                }
                if let Detected::Fp4(layout) = detect(&ck) {
                    for m in quantized_modules(&ck, layout) {
                        let _ = load_linear(&ck, layout, &m);
                    }
                }
            }
        }
    }
    // Flips inside names or string values keep the header valid: some are accepted.
    assert!(accepted > 0);
}

fn with_config(key: &str, value: serde_json::Value) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&corpus_root().join("good/fp4"), d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&p, c.to_string()).unwrap();
    d
}

/// Config fields of the wrong type or out of range: exit 1 with config.json and the key named.
#[test]
fn config_fields_of_the_wrong_type_are_named() {
    use serde_json::json;
    for (key, value) in [
        ("hidden_size", json!("32")),
        ("num_attention_heads", json!(0)),
        ("num_key_value_heads", json!(3)),
        ("rms_norm_eps", json!([1e-6])),
        ("tie_word_embeddings", json!("no")),
        ("rope_theta", json!(-5.0)),
        ("rope_scaling", json!(7)),
        ("vocab_size", json!(1.5)),
    ] {
        let d = with_config(key, value.clone());
        let o = run_bench(d.path());
        assert_eq!(o.code, Some(1), "{key} = {value}: {}", o.text);
        assert!(
            o.text.contains("config.json") && o.text.contains(key),
            "{key} = {value}: {}",
            o.text
        );
    }
}

#[test]
fn config_head_count_overflow_is_an_error_not_a_panic() {
    use serde_json::json;
    for (key, value) in [
        ("num_attention_heads", json!(4611686018427387904u64)),
        ("head_dim", json!(4611686018427387904u64)),
    ] {
        let d = with_config(key, value.clone());
        let o = run_bench(d.path());
        assert_eq!(o.code, Some(1), "{key} = {value}: {}", o.text);
        assert!(
            !o.text.contains("[0, "),
            "{key} = {value}: wrapped product: {}",
            o.text
        );
        assert!(o.text.contains(key), "{key} = {value}: {}", o.text);
    }
}

#[test]
fn config_huge_layer_count_is_an_error_not_an_abort() {
    let d = with_config("num_hidden_layers", serde_json::json!(100_000_000_000u64));
    let o = run_bench(d.path());
    assert_eq!(o.code, Some(1), "{}", o.text);
    assert!(o.text.contains("model.layers.1."), "{}", o.text);
}

#[path = "../../../fuzz/fuzz_targets/common.rs"]
mod fuzz_common;

/// Files under fuzz/regressions/<target>/ (inputs a fuzz target once crashed on).
fn regressions(target: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The fuzz targets' checks, in-process, on every corpus safetensors file and on every fuzz
/// regression input: no panic, accepted ranges inside the buffer with the right length.
#[test]
fn fuzz_regressions_and_corpus_files_never_panic() {
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for group in ["good", "source", "fp4"] {
        for case in std::fs::read_dir(corpus_root().join(group)).unwrap() {
            for f in std::fs::read_dir(case.unwrap().path()).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "safetensors") {
                    files.push(p);
                }
            }
        }
    }
    assert!(files.len() > 40, "{} corpus shards", files.len());
    files.extend(regressions("safetensors_header"));
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Ok((tensors, _)) = mimo_runtime::checkpoint::parse_header(f, &data) {
            for e in tensors.values() {
                assert!(e.start <= e.end && e.end <= data.len(), "{}", f.display());
            }
        }
    }
    for f in regressions("model_config") {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&f).unwrap()) {
            let _ = mimo_runtime::config::ModelConfig::from_json(&v, Path::new("config.json"));
        }
    }
    let ct_nvfp4 = r#"{"model_type":"llama","quantization_config":{"quant_method":"compressed-tensors","format":"nvfp4-pack-quantized"}}"#;
    for (target, prefix) in [
        ("checkpoint_folder", None),
        ("fp4_checkpoint", Some(ct_nvfp4)),
    ] {
        for f in regressions(target) {
            let dir = fuzz_common::write_folder(&std::fs::read(&f).unwrap(), prefix);
            if let Ok(ck) = Checkpoint::open(&dir) {
                if let Detected::Fp4(layout) = detect(&ck) {
                    for m in quantized_modules(&ck, layout) {
                        let _ = load_linear(&ck, layout, &m);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
