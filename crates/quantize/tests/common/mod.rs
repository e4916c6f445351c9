//! Helpers shared by the quantize integration tests (`mod common;` in each test file that
//! uses them; each test binary uses only some of them).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mimo_quant::calib::{CalibData, Recipe};
use mimo_quant::convert::{ConvertConfig, DEFAULT_MAX_SHARD};
use mimo_quant::plan::PlanOptions;
use mimo_runtime::checkpoint::{write_safetensors, DType, HeaderEntry};
use mimo_runtime::format::Layout;
use mimo_runtime::model::Model;

/// The dense source of the bad-input corpus (tests/bad-inputs/good/dense).
pub fn corpus_dense() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/bad-inputs/good/dense")
}

/// A dense source in `dir`: the corpus's config.json and a model.safetensors of `count` BF16
/// `[n, k]` down_proj tensors of values in [-0.1, 0.1) from an LCG seeded with `seed`.
pub fn write_dense_source(dir: &Path, count: usize, n: usize, k: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(corpus_dense().join("config.json"), dir.join("config.json")).unwrap();
    let mut state = seed;
    let tensors: Vec<(HeaderEntry, Vec<u8>)> = (0..count)
        .map(|i| {
            let mut data = Vec::with_capacity(n * k * 2);
            for _ in 0..n * k {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
                data.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
            (
                HeaderEntry {
                    name: format!("model.layers.{i}.mlp.down_proj.weight"),
                    dtype: DType::BF16,
                    shape: vec![n, k],
                },
                data,
            )
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
}

/// Every file of a folder, by name.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// `n` token ids below `vocab` from an LCG seeded with `seed`.
pub fn random_tokens(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// `seqs` random sequences of `len` tokens (sequence i seeded with `seed + i`) as calibration
/// data for `model`.
pub fn calib_data(model: &Model, seqs: usize, len: usize, seed: u64) -> CalibData {
    let sequences: Vec<Vec<u32>> = (0..seqs)
        .map(|i| random_tokens(model.config.vocab_size, len, seed + i as u64))
        .collect();
    CalibData {
        source: "test".into(),
        recipe: Recipe {
            data: "random".into(),
            sets: vec![],
            samples: seqs,
            seq_len: len,
            seed: 0,
            generate: None,
        },
        samples_per_set: Default::default(),
        tokens: seqs * len,
        sequences,
        samples: vec![],
    }
}

/// A conversion of `src` into `out` in `layout` with the default plan and shard size, refusing
/// an existing output (`force: false`; set it with struct update syntax).
pub fn convert_config(src: &Path, out: &Path, layout: Layout) -> ConvertConfig {
    ConvertConfig {
        source: src.to_path_buf(),
        source_repo: None,
        output: out.to_path_buf(),
        plan: PlanOptions {
            layout,
            ignore: vec![],
            quantize_lm_head: false,
            experts_only: false,
        },
        max_shard_size: DEFAULT_MAX_SHARD,
        force: false,
    }
}

/// models/mimo-tiny-moe, found from the working directory first (a test binary run on another
/// machine, e.g. the GPU one, from the repository root), else from this crate's folder.
pub fn embedded_model() -> PathBuf {
    let here = Path::new("models/mimo-tiny-moe");
    if here.join("config.json").is_file() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe")
}
