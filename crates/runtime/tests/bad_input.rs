//! Bad input gets clear errors naming the file and the tensor, never a panic: a config that
//! disagrees with the tensors, a missing tokenizer, a prompt longer than the context.

use std::path::Path;

use mimo_runtime::fixtures::{self, Arch as FixArch};
use mimo_runtime::generate::{generate, GenerateError, SamplingParams};
use mimo_runtime::model::{ForwardError, Logits, Model};
use mimo_runtime::tokenizer::{TextTokenizer, TokenizerError};
use mimo_runtime::weights::LoadError;
use serde_json::{json, Value};

fn fixture_with(arch: FixArch, overrides: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fixtures::write_fixture(dir.path(), arch, 11).unwrap();
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in overrides.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> LoadError {
    Model::load(dir).expect_err("the load should fail")
}

#[test]
fn config_tensor_shape_mismatch_names_file_and_tensor() {
    let d = fixture_with(FixArch::Llama, json!({"intermediate_size": 96}));
    let e = load_err(d.path());
    let msg = e.to_string();
    assert!(matches!(e, LoadError::Shape { .. }), "{e:?}");
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight"), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("[128, 64]") && msg.contains("[96, 64]"),
        "{msg}"
    );

    // GQA heads that do not match k_proj.
    let d = fixture_with(FixArch::Qwen3, json!({"num_key_value_heads": 4}));
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("self_attn.k_proj.weight"), "{msg}");

    // Expert count larger than the checkpoint's.
    let d = fixture_with(FixArch::Qwen3Moe, json!({"num_experts": 6}));
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("model.layers.0.mlp"), "{msg}");
}

#[test]
fn missing_layer_tensor_names_the_tensor() {
    let d = fixture_with(FixArch::Mistral, json!({"num_hidden_layers": 3}));
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("model.layers.2."), "{msg}");
}

#[test]
fn bad_config_values_name_config_json_and_key() {
    let d = fixture_with(FixArch::Llama, json!({"hidden_size": "sixty-four"}));
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("'hidden_size'"),
        "{msg}"
    );
    let d = fixture_with(FixArch::Llama, json!({"model_type": "bert"}));
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("unsupported model_type 'bert'"), "{msg}");
}

#[test]
fn missing_tokenizer_is_reported() {
    let d = fixture_with(FixArch::Llama, json!({}));
    let e = TextTokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, TokenizerError::Missing { .. }));
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn prompt_longer_than_context_is_reported() {
    let d = fixture_with(FixArch::Llama, json!({"max_position_embeddings": 16}));
    let model = Model::load(d.path()).unwrap();
    let prompt: Vec<u32> = (0..20).collect();
    let e = generate(
        &model,
        &prompt,
        4,
        4096,
        SamplingParams::default(),
        &[],
        |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            GenerateError::PromptTooLong {
                prompt: 20,
                context: 16
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("20 tokens") && e.to_string().contains("16"),
        "{e}"
    );

    // The forward pass itself refuses to run past the cache.
    let mut cache = model.new_cache(8);
    model
        .forward(&prompt[..6], &mut cache, Logits::Last)
        .unwrap();
    let e = model
        .forward(&prompt[..3], &mut cache, Logits::Last)
        .unwrap_err();
    assert_eq!(
        e,
        ForwardError::ContextOverflow {
            cached: 6,
            new: 3,
            max: 8
        }
    );
    // A token outside the vocabulary.
    let mut cache = model.new_cache(8);
    let e = model
        .forward(&[1, 300], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ForwardError::TokenOutOfRange {
                token: 300,
                index: 1,
                ..
            }
        ),
        "{e:?}"
    );
}
