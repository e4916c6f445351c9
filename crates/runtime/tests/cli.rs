//! The `mimo-run` binary end to end on a fixture checkpoint with a small word-level tokenizer:
//! generate (greedy and seeded sampling, thread-count independence), --chat, ppl, compare, bench,
//! the CUDA device choice (fallback to the CPU without a GPU) and its error messages.

use std::path::Path;
use std::process::{Command, Output};

use mimo_runtime::fixtures::{self, Arch as FixArch};
use serde_json::{json, Value};

/// A word-level tokenizer over the fixtures' 256 ids: "<unk>" 0, "<eos>" 2, "wN" for the others,
/// chat markers 200 and 201.
fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<eos>".into(), json!(2));
    vocab.insert("<unk>".into(), json!(0));
    for i in 3..200 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    // Every id of the fixtures' 256-token vocabulary decodes to something.
    for i in 202..256 {
        vocab.insert(format!("w{i}"), json!(i));
    }
    vocab.insert("<|user|>".into(), json!(200));
    vocab.insert("<|assistant|>".into(), json!(201));
    let tj = json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 2, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 200, "content": "<|user|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 201, "content": "<|assistant|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let cfg = json!({
        "eos_token": "<eos>",
        "chat_template": "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

fn model_dir(arch: FixArch) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fixtures::write_fixture(d.path(), arch, 21).unwrap();
    write_tokenizer(d.path());
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mimo-run"))
        .args(args)
        .output()
        .unwrap()
}

fn run_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

const PROMPT: &str = "w5 w17 w42 w99 w7";

#[test]
fn generate_is_deterministic_across_threads_and_seeded() {
    let d = model_dir(FixArch::Qwen3Moe);
    let m = d.path().to_str().unwrap();
    let g1 = run(&[
        "--threads",
        "1",
        "--json",
        "generate",
        "-m",
        m,
        PROMPT,
        "--max-tokens",
        "12",
    ]);
    let g2 = run(&[
        "--threads",
        "2",
        "--json",
        "generate",
        "-m",
        m,
        PROMPT,
        "--max-tokens",
        "12",
    ]);
    assert!(
        g1.status.success(),
        "{}",
        String::from_utf8_lossy(&g1.stderr)
    );
    let (v1, v2): (Value, Value) = (
        serde_json::from_slice(&g1.stdout).unwrap(),
        serde_json::from_slice(&g2.stdout).unwrap(),
    );
    assert_eq!(
        v1["tokens"], v2["tokens"],
        "greedy output depends on the thread count"
    );
    assert_eq!(v1["prompt_tokens"], json!(5));
    let n = v1["tokens"].as_array().unwrap().len();
    assert!(n == 12 || v1["stats"]["stopped_at_eos"] == json!(true));

    let s = |seed: &str| {
        run_json(&[
            "--json",
            "generate",
            "-m",
            m,
            PROMPT,
            "--max-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ])["tokens"]
            .clone()
    };
    assert_eq!(s("7"), s("7"), "same seed, different samples");
    assert_ne!(
        s("7"),
        s("8"),
        "different seeds gave identical 16-token samples"
    );
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let d = model_dir(FixArch::Llama);
    let m = d.path().to_str().unwrap();
    let out = run(&[
        "generate",
        "-m",
        m,
        PROMPT,
        "--max-tokens",
        "6",
        "--device",
        "cuda",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tok/s decode"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // --chat renders the template: prompt = <|user|> + 5 words + <|assistant|>.
    let v = run_json(&[
        "--json",
        "generate",
        "-m",
        m,
        PROMPT,
        "--max-tokens",
        "2",
        "--chat",
    ]);
    assert_eq!(v["prompt_tokens"], json!(7));
}

#[test]
fn ppl_and_compare() {
    let d = model_dir(FixArch::Mixtral);
    let m = d.path().to_str().unwrap();
    let text: String = (0..120)
        .map(|i| format!("w{} ", 3 + (i * 37) % 190))
        .collect();
    let file = d.path().join("text.txt");
    std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();
    let p = run_json(&["--json", "ppl", "-m", m, f, "--ctx", "32", "--stride", "16"]);
    let ppl = p["result"]["ppl"].as_f64().unwrap();
    assert_eq!(p["result"]["tokens"], json!(119));
    // Random tiny weights: close to uniform over the 256-token vocabulary.
    assert!(ppl > 100.0 && ppl < 600.0, "ppl {ppl}");

    // A model compared with itself: zero KL, full agreement, same perplexity.
    let c = run_json(&[
        "--json",
        "compare",
        "--reference",
        m,
        "--candidate",
        m,
        f,
        "--ctx",
        "32",
        "--stride",
        "16",
    ]);
    let r = &c["result"];
    assert!(r["mean_kl"].as_f64().unwrap().abs() < 1e-9);
    assert_eq!(r["top1_agreement"], json!(1.0));
    // Equal entropies, near ln 256 for these near-uniform random weights.
    let (er, ec) = (
        r["reference_entropy"].as_f64().unwrap(),
        r["candidate_entropy"].as_f64().unwrap(),
    );
    assert_eq!(er, ec);
    assert!(er > 4.0 && er <= 256f64.ln() + 1e-6, "entropy {er}");
    assert!((r["reference"]["ppl"].as_f64().unwrap() - ppl).abs() < 1e-9);

    // A different model (other seed): positive KL, worst positions listed largest first.
    let d2 = tempfile::tempdir().unwrap();
    fixtures::write_fixture(d2.path(), FixArch::Mixtral, 22).unwrap();
    let c = run_json(&[
        "--json",
        "compare",
        "--reference",
        m,
        "--candidate",
        d2.path().to_str().unwrap(),
        f,
        "--ctx",
        "32",
        "--stride",
        "16",
        "--worst",
        "3",
    ]);
    let r = &c["result"];
    assert!(r["mean_kl"].as_f64().unwrap() > 1e-4);
    assert_ne!(r["reference_entropy"], r["candidate_entropy"]);
    // The margin bins partition the scored positions and their agreements.
    let bins = r["top1_by_margin"].as_array().unwrap();
    let sum = |k: &str| bins.iter().map(|b| b[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("positions"), r["reference"]["tokens"].as_u64().unwrap());
    let agree = r["top1_agreement"].as_f64().unwrap() * sum("positions") as f64;
    assert!((sum("agree") as f64 - agree).abs() < 1e-6);
    let worst = r["worst"].as_array().unwrap();
    assert_eq!(worst.len(), 3);
    assert!(worst[0]["kl"].as_f64() >= worst[2]["kl"].as_f64());
}

#[test]
fn bench_reports_prefill_and_decode() {
    let d = model_dir(FixArch::Qwen2);
    let v = run_json(&[
        "--json",
        "bench",
        "-m",
        d.path().to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "8",
        "--runs",
        "1",
    ]);
    assert!(
        v["prefill_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0
    );
    assert_eq!(v["architecture"], json!("qwen2"));
}

#[test]
fn cli_errors_are_clear() {
    // No tokenizer.json.
    let d = tempfile::tempdir().unwrap();
    fixtures::write_fixture(d.path(), FixArch::Llama, 1).unwrap();
    let out = run(&["generate", "-m", d.path().to_str().unwrap(), "hello"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && !err.contains("panicked"),
        "{err}"
    );

    // Prompt longer than the context.
    let d = model_dir(FixArch::Llama);
    let long: String = (0..40).map(|i| format!("w{} ", 3 + i)).collect();
    let out = run(&[
        "generate",
        "-m",
        d.path().to_str().unwrap(),
        &long,
        "--ctx",
        "16",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("40 tokens") && err.contains("context is 16") && !err.contains("panicked"),
        "{err}"
    );

    // Not a checkpoint.
    let empty = tempfile::tempdir().unwrap();
    write_tokenizer(empty.path());
    let out = run(&["bench", "-m", empty.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && !err.contains("panicked"),
        "{err}"
    );
}

/// Whether this machine has a usable GPU (the tests below check the no-GPU behaviour there).
fn has_gpu() -> bool {
    mimo_runtime::cuda::Gpu::new(0).is_ok()
}

#[test]
fn device_cuda_generate_falls_back_to_the_cpu_without_a_gpu() {
    let d = model_dir(FixArch::Qwen3Moe);
    let m = d.path().to_str().unwrap();
    let args = |dev: &'static str| {
        vec![
            "--device",
            dev,
            "--json",
            "generate",
            "-m",
            m,
            PROMPT,
            "--max-tokens",
            "12",
        ]
    };
    let cpu = run(&args("cpu"));
    assert!(
        cpu.status.success(),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    let cpu_stderr = String::from_utf8_lossy(&cpu.stderr);
    assert!(!cpu_stderr.contains("falling back"), "{cpu_stderr}");
    let cuda = run(&args("cuda"));
    assert!(
        cuda.status.success(),
        "{}",
        String::from_utf8_lossy(&cuda.stderr)
    );
    let cv: Value = serde_json::from_slice(&cpu.stdout).unwrap();
    let gv: Value = serde_json::from_slice(&cuda.stdout).unwrap();
    assert_eq!(cv["tokens"].as_array().unwrap().len(), 12);
    // Greedy: the GPU gives the CPU's tokens too (where there is one).
    assert_eq!(gv["tokens"], cv["tokens"]);
    assert_eq!(gv["text"], cv["text"]);
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    if has_gpu() {
        eprintln!("a GPU is present: the fallback message is not checked");
    } else {
        assert!(
            stderr.contains("falling back to the CPU") && stderr.contains("CUDA"),
            "{stderr}"
        );
        // The default device is the CPU here, silently.
        let def = run(&args("cpu")[2..]);
        assert!(def.status.success());
        let dv: Value = serde_json::from_slice(&def.stdout).unwrap();
        assert_eq!(dv["tokens"], cv["tokens"]);
        assert!(!String::from_utf8_lossy(&def.stderr).contains("falling back"));
    }
}

#[test]
fn bench_random_weights_needs_a_gpu_and_a_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("tiny.json");
    std::fs::write(
        &cfg,
        json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5
        })
        .to_string(),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    // --device cpu is refused whatever the machine.
    let out = run(&[
        "--device",
        "cpu",
        "bench",
        "--config",
        c,
        "--random-weights",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--random-weights")
            && err.contains("no CPU mode")
            && !err.contains("panicked"),
        "{err}"
    );
    // --config without --random-weights, and --random-weights without --config: usage errors.
    let out = run(&["bench", "--config", c]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--random-weights"));
    let out = run(&["bench", "--random-weights"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    if has_gpu() {
        eprintln!("a GPU is present: the no-GPU error is not checked");
        return;
    }
    let out = run(&[
        "bench",
        "--config",
        c,
        "--random-weights",
        "--layers",
        "1",
        "--steps",
        "4",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no CPU mode")
            && err.contains("no usable CUDA GPU")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn commands_not_on_cuda_yet_run_on_the_cpu_by_default() {
    // ppl and checkpoint bench default to the CPU even where a GPU is present.
    let d = model_dir(FixArch::Llama);
    let v = run_json(&[
        "--json",
        "bench",
        "-m",
        d.path().to_str().unwrap(),
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--runs",
        "1",
    ]);
    assert!(v["decode_tok_s"].as_f64().unwrap() > 0.0);
    let out = run(&[
        "--device",
        "cuda",
        "bench",
        "-m",
        d.path().to_str().unwrap(),
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--runs",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if has_gpu() {
        assert!(!out.status.success());
        assert!(err.contains("not yet on the CUDA backend"), "{err}");
    } else {
        assert!(out.status.success(), "{err}");
        assert!(err.contains("falling back to the CPU"), "{err}");
    }
}
