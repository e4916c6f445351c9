//! Parity of the BF16 CPU path with Hugging Face transformers on the fixture model of every
//! architecture. The golden logits under tests/golden/ were computed by
//! scripts/golden_logits.py (transformers, float32) on the fixtures this file writes; see that
//! script for how to regenerate them.

use std::path::{Path, PathBuf};

use mimo_runtime::fixtures::{self, Arch as FixArch};
use mimo_runtime::model::{Logits, Model};
use serde_json::{json, Value};

/// Seed of every golden fixture.
const SEED: u64 = 1234;

/// One parity case: a fixture architecture and config.json keys replaced before loading.
struct Case {
    name: &'static str,
    arch: FixArch,
    overrides: Value,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "llama",
            arch: FixArch::Llama,
            overrides: json!({}),
        },
        Case {
            name: "llama-rope-llama3",
            arch: FixArch::Llama,
            overrides: json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        },
        Case {
            name: "mistral",
            arch: FixArch::Mistral,
            overrides: json!({}),
        },
        Case {
            name: "mistral-sliding-window",
            arch: FixArch::Mistral,
            overrides: json!({"sliding_window": 4}),
        },
        Case {
            name: "qwen2",
            arch: FixArch::Qwen2,
            overrides: json!({}),
        },
        Case {
            name: "qwen3",
            arch: FixArch::Qwen3,
            overrides: json!({}),
        },
        Case {
            name: "qwen3-rope-yarn",
            arch: FixArch::Qwen3,
            overrides: json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 32}}),
        },
        Case {
            name: "mimo",
            arch: FixArch::Mimo,
            overrides: json!({}),
        },
        Case {
            name: "mixtral",
            arch: FixArch::Mixtral,
            overrides: json!({}),
        },
        Case {
            name: "qwen2-moe",
            arch: FixArch::Qwen2Moe,
            overrides: json!({}),
        },
        Case {
            name: "qwen3-moe",
            arch: FixArch::Qwen3Moe,
            overrides: json!({}),
        },
    ]
}

/// Writes the fixture of `case` into `dir` and applies its config overrides.
fn write_case(case: &Case, dir: &Path) {
    fixtures::write_fixture(dir, case.arch, SEED).expect("write fixture");
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in case.overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

struct Golden {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn read_golden(name: &str) -> Golden {
    let path = golden_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Golden { tokens, logits }
}

/// Largest |ours - golden| over a row set, and the largest |golden|.
fn max_diff(ours: &[f32], golden: &[Vec<f32>]) -> (f32, f32) {
    let flat: Vec<f32> = golden.iter().flatten().copied().collect();
    assert_eq!(ours.len(), flat.len(), "logit count");
    let d = ours
        .iter()
        .zip(&flat)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let m = flat.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    (d, m)
}

/// Absolute tolerance on logits: f32 math in both, different summation orders (measured
/// differences are below 1e-6). The fixtures' logits are O(1); the RoPE-scaling and sliding-window
/// variants move them by 8e-3 to 1.1 (see `variants_change_the_logits`).
const TOL: f32 = 2e-5;

/// Regenerates the fixture folders for scripts/golden_logits.py:
/// `MIMO_GOLDEN_FIXTURES=/tmp/golden-fixtures cargo test -p mimo-runtime --test golden -- --ignored`.
#[test]
#[ignore]
fn write_golden_fixtures() {
    let root =
        PathBuf::from(std::env::var("MIMO_GOLDEN_FIXTURES").expect("set MIMO_GOLDEN_FIXTURES"));
    for case in cases() {
        write_case(&case, &root.join(case.name));
    }
}

#[test]
fn bf16_logits_match_transformers() {
    let mut failures = Vec::new();
    for case in cases() {
        let dir = tempfile::tempdir().unwrap();
        write_case(&case, dir.path());
        let model = Model::load(dir.path()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let g = read_golden(case.name);

        // Whole prompt at once.
        let mut cache = model.new_cache(64);
        let all = model.forward(&g.tokens, &mut cache, Logits::All).unwrap();
        let (d, m) = max_diff(&all, &g.logits);
        println!(
            "{:24} prefill  max|diff| {d:.2e} (max|logit| {m:.3})",
            case.name
        );
        if d > TOL {
            failures.push(format!("{} prefill: {d:e}", case.name));
        }

        // Prefill of 3 tokens, then one token at a time through the KV cache.
        let mut cache = model.new_cache(64);
        let mut inc = model
            .forward(&g.tokens[..3], &mut cache, Logits::All)
            .unwrap();
        for &t in &g.tokens[3..] {
            inc.extend(model.forward(&[t], &mut cache, Logits::Last).unwrap());
        }
        let (d, _) = max_diff(&inc, &g.logits);
        println!("{:24} decode   max|diff| {d:.2e}", case.name);
        if d > TOL {
            failures.push(format!("{} decode: {d:e}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "logits differ from transformers: {failures:?}"
    );
}

/// The check must be able to fail: perturbing one weight value visibly moves the logits.
#[test]
fn parity_check_detects_a_perturbed_weight() {
    let case = &cases()[0];
    let dir = tempfile::tempdir().unwrap();
    write_case(case, dir.path());
    // Scale the final norm by 1.01: every logit moves by 1%.
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["rms_norm_eps"] = json!(0.5);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let g = read_golden(case.name);
    let mut cache = model.new_cache(64);
    let all = model.forward(&g.tokens, &mut cache, Logits::All).unwrap();
    let (d, _) = max_diff(&all, &g.logits);
    assert!(
        d > 10.0 * TOL,
        "a changed rms_norm_eps went unnoticed ({d:e})"
    );
}

/// Each variant case exercises its feature: its golden logits differ from its base case's.
#[test]
fn variants_change_the_logits() {
    for (base, variant) in [
        ("llama", "llama-rope-llama3"),
        ("qwen3", "qwen3-rope-yarn"),
        ("mistral", "mistral-sliding-window"),
    ] {
        let a: Vec<f32> = read_golden(variant).logits.into_iter().flatten().collect();
        let (d, _) = max_diff(&a, &read_golden(base).logits);
        assert!(
            d > 100.0 * TOL,
            "{variant} is indistinguishable from {base} ({d:e})"
        );
    }
}
