//! Calibration: data loading and recipes, statistics through the runtime's observer hook (the
//! hook leaves the logits unchanged; sums agree with each other; expert coverage adds up), and
//! conversions with --method mse / gptq on MoE fixtures (deterministic, manifest records it).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mimo_quant::calib::data::{parse_jsonl, parse_recipe, select, Sample, EMBEDDED_SET};
use mimo_quant::calib::selfgen::{prompt_of, Continuer, CpuContinuer, SelfGenerate};
use mimo_quant::calib::{collect, CollectOptions, DataError, Recipe};
use mimo_quant::convert::{convert_with, ConvertConfig};
use mimo_quant::methods::{Method, QuantOptions};
use mimo_runtime::fixtures::{write_fixture, Arch};
use mimo_runtime::format::Layout;
use mimo_runtime::model::{LinearObserver, Logits, Model, Site};

mod common;
use common::{calib_data, convert_config, random_tokens};

#[test]
fn embedded_set_is_large_and_varied() {
    let s = parse_jsonl(EMBEDDED_SET, Path::new("embedded")).unwrap();
    assert!(s.len() >= 300, "{} samples", s.len());
    let sets: std::collections::BTreeSet<&str> = s.iter().map(|x| x.set.as_str()).collect();
    for want in [
        "prose",
        "dialogue",
        "code",
        "math",
        "structured",
        "multilingual",
    ] {
        assert!(sets.contains(want), "missing set {want}");
    }
    // Several human languages and programming languages.
    for tag in ["[fr]", "[de]", "[es]", "fn ", "def ", "SELECT", "#include"] {
        assert!(
            s.iter().any(|x| x.text.contains(tag)),
            "no sample contains {tag:?}"
        );
    }
}

#[test]
fn bad_data_errors_name_the_file_and_line() {
    let e = parse_jsonl(
        "{\"text\": \"ok\"}\n\n{\"txt\": 1}\n",
        Path::new("my.jsonl"),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::BadLine { line: 3, .. }), "{msg}");
    assert!(msg.contains("my.jsonl:3"), "{msg}");
    let e = parse_recipe(
        r#"{"data": "x.jsonl", "samples": 4, "seq_len": 0}"#,
        Path::new("r.json"),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("r.json") && e.to_string().contains("seq_len"),
        "{e}"
    );
    let e = parse_recipe(
        r#"{"data": "x.jsonl", "samples": 4, "seq_len": 64, "sed": 1}"#,
        Path::new("r.json"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("sed"), "{e}");
}

#[test]
fn heldout_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("heldout");
    std::fs::create_dir(&held).unwrap();
    let f = held.join("valid.txt");
    std::fs::write(&f, "some evaluation text").unwrap();
    let tok_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe");
    let tok = mimo_runtime::tokenizer::TextTokenizer::from_dir(&tok_dir).unwrap();
    let e = mimo_quant::calib::load_sequences(f.to_str().unwrap(), &tok, None).unwrap_err();
    assert!(matches!(e, DataError::HeldOut { .. }), "{e}");
    // A .txt elsewhere is accepted and cut into sequences.
    let ok = dir.path().join("mine.txt");
    std::fs::write(&ok, "hello world, this is calibration text. ".repeat(100)).unwrap();
    let d = mimo_quant::calib::load_sequences(ok.to_str().unwrap(), &tok, None).unwrap();
    assert!(d.tokens > 256 && d.sequences.iter().all(|s| s.len() <= 256));
    // The default recipe draws from every set.
    let d = mimo_quant::calib::load_sequences("default", &tok, None).unwrap();
    assert_eq!(d.samples_per_set.len(), 6);
    assert!(d.samples_per_set.values().sum::<usize>() >= 300);
}

#[test]
fn selection_is_seeded_and_round_robin() {
    let samples: Vec<Sample> = (0..30)
        .map(|i| Sample {
            set: ["a", "b", "c"][i % 3].to_string(),
            text: format!("t{i}"),
        })
        .collect();
    let r = Recipe {
        data: "x".into(),
        sets: vec!["a".into(), "c".into()],
        samples: 6,
        seq_len: 64,
        seed: 5,
        generate: None,
    };
    let s1 = select(samples.clone(), &r);
    assert_eq!(s1, select(samples.clone(), &r));
    assert_eq!(s1.len(), 6);
    assert_eq!(s1.iter().filter(|s| s.set == "a").count(), 3);
    assert!(s1.iter().all(|s| s.set != "b"));
    let other = select(samples, &Recipe { seed: 6, ..r });
    assert_ne!(s1, other, "the seed changes the draw");
}

struct Logged(Vec<(Site, usize)>);
impl LinearObserver for Logged {
    fn observe(&mut self, site: Site, _x: &[f32], m: usize) {
        self.0.push((site, m));
    }
    fn all_token_experts(&self) -> bool {
        true
    }
}

/// The embedded model (real weights and tokenizer).
fn tiny_moe() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe")
}

#[test]
fn self_generated_text_is_seeded_and_independent_of_threads() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = |seed: u64| {
        let p = dir.path().join(format!("self{seed}.json"));
        let r = serde_json::json!({"data": "mimo-calib.jsonl", "samples": 6, "seq_len": 64,
            "seed": seed, "generate": {"prompt_words": 4, "new_tokens": 12}});
        std::fs::write(&p, r.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    let tok = mimo_runtime::tokenizer::TextTokenizer::from_dir(&tiny_moe()).unwrap();
    let model = Model::load(&tiny_moe()).unwrap();
    let spec = recipe(3);
    // Without a model the recipe cannot be served.
    let e = mimo_quant::calib::load_sequences(&spec, &tok, None).unwrap_err();
    assert!(matches!(e, DataError::NeedsModel { .. }), "{e}");
    assert!(e.to_string().contains("self3.json"), "{e}");
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let count = |_: usize, _: usize| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let mut gen = CpuContinuer {
        model: &model,
        progress: &count,
    };
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let one = pool(1).install(|| mimo_quant::calib::load_sequences(&spec, &tok, Some(&mut gen)));
    let two = pool(2).install(|| mimo_quant::calib::load_sequences(&spec, &tok, Some(&mut gen)));
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 12);
    assert_eq!(
        one.sequences, two.sequences,
        "the thread count changed the text"
    );
    assert_eq!(one.samples_per_set.values().sum::<usize>(), 6);
    assert_eq!(one.recipe.generate.map(|g| g.new_tokens), Some(12));
    // The recipe (with its generate object) is what the manifest records.
    let json = serde_json::to_value(&one.recipe).unwrap();
    assert_eq!(json["generate"]["prompt_words"], 4);
    // Another seed samples other text from the same prompts.
    let other = mimo_quant::calib::load_sequences(&recipe(4), &tok, Some(&mut gen)).unwrap();
    assert_ne!(one.sequences, other.sequences);
    // The embedded `self` recipe generates too: the default recipe's draw with a generate object.
    let e = mimo_quant::calib::load_sequences("self", &tok, None).unwrap_err();
    assert!(matches!(e, DataError::NeedsModel { .. }), "{e}");
    let embedded =
        parse_recipe(mimo_quant::calib::data::SELF_RECIPE, Path::new("self.json")).unwrap();
    let default = parse_recipe(
        mimo_quant::calib::data::DEFAULT_RECIPE,
        Path::new("default.json"),
    )
    .unwrap();
    assert_eq!(embedded.generate, Some(SelfGenerate::default()));
    assert_eq!(
        Recipe {
            generate: None,
            ..embedded
        },
        default
    );
    // Plain recipes do not record a generate object at all (their manifests are unchanged).
    let plain = mimo_quant::calib::load_sequences("default", &tok, None).unwrap();
    assert!(serde_json::to_value(&plain.recipe)
        .unwrap()
        .get("generate")
        .is_none());
}

#[test]
fn self_generated_samples_continue_their_prompts() {
    let tok = mimo_runtime::tokenizer::TextTokenizer::from_dir(&tiny_moe()).unwrap();
    let model = Model::load(&tiny_moe()).unwrap();
    let samples = vec![
        Sample {
            set: "prose".into(),
            text: "The old library kept its maps in a cold room upstairs".into(),
        },
        Sample {
            set: "code".into(),
            text: "def parse(line):\n    return line.split()".into(),
        },
    ];
    let g = SelfGenerate {
        prompt_words: 3,
        new_tokens: 16,
        ..SelfGenerate::default()
    };
    let mut gen = CpuContinuer {
        model: &model,
        progress: &|_, _| {},
    };
    let out = gen.continue_samples(&tok, &samples, &g, 9).unwrap();
    assert_eq!(out.len(), 2);
    for (o, s) in out.iter().zip(&samples) {
        assert_eq!(o.set, s.set);
        let prompt = prompt_of(&s.text, 3);
        assert!(
            o.text.starts_with(prompt),
            "{:?} does not start with {prompt:?}",
            o.text
        );
        assert!(
            o.text.len() > prompt.len(),
            "nothing generated after {prompt:?}"
        );
        assert_ne!(o.text, s.text);
    }
    // The same seed gives the same text, another seed other text.
    assert_eq!(out, gen.continue_samples(&tok, &samples, &g, 9).unwrap());
    assert_ne!(out, gen.continue_samples(&tok, &samples, &g, 10).unwrap());
    // An empty sample has nothing to continue and stays empty.
    let empty = vec![Sample {
        set: "user".into(),
        text: "   ".into(),
    }];
    assert_eq!(gen.continue_samples(&tok, &empty, &g, 9).unwrap(), empty);
    // A prompt longer than the model's positions is refused, naming the sample.
    let long = vec![Sample {
        set: "prose".into(),
        text: "word ".repeat(3000),
    }];
    let g_long = SelfGenerate {
        prompt_words: 3000,
        ..g
    };
    let e = gen.continue_samples(&tok, &long, &g_long, 9).unwrap_err();
    assert!(e.to_string().contains("calibration sample 0"), "{e}");
}

#[test]
fn samples_written_as_jsonl_read_back_unchanged() {
    let samples = vec![
        Sample {
            set: "code".into(),
            text: "print(\"a\")\n\tx = {'k': [1, 2]}\\n".into(),
        },
        Sample {
            set: "multilingual".into(),
            text: "größe — 测试 ✓ \u{1F600}".into(),
        },
        Sample {
            set: "user".into(),
            text: String::new(),
        },
    ];
    let text = mimo_quant::calib::data::samples_jsonl(&samples);
    assert_eq!(text.lines().count(), 3);
    assert_eq!(parse_jsonl(&text, Path::new("x.jsonl")).unwrap(), samples);
}

#[test]
fn bad_generate_settings_are_refused_with_the_recipe_named() {
    for (g, want) in [
        (serde_json::json!({"temperature": 0.0}), "temperature"),
        (serde_json::json!({"new_tokens": 0}), "new_tokens"),
        (serde_json::json!({"top_p": 2.0}), "top_p"),
        (serde_json::json!({"prompt_words": 0}), "prompt_words"),
        (serde_json::json!({"tokens": 5}), "unknown field"),
    ] {
        let r = serde_json::json!({"data": "x.jsonl", "samples": 3, "seq_len": 64, "generate": g});
        let e = parse_recipe(&r.to_string(), Path::new("r.json")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("r.json") && msg.contains(want), "{msg}");
    }
}

#[test]
fn observer_sees_every_linear_and_leaves_logits_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen2Moe, 1).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let toks = random_tokens(model.config.vocab_size, 12, 3);
    let mut c1 = model.new_cache(64);
    let plain = model.forward(&toks, &mut c1, Logits::All).unwrap();
    let mut c2 = model.new_cache(64);
    let mut log = Logged(Vec::new());
    let seen = model
        .forward_observed(&toks, &mut c2, Logits::All, &mut log)
        .unwrap();
    assert_eq!(plain, seen);
    let l0: Vec<Site> = log
        .0
        .iter()
        .map(|x| x.0)
        .filter(|s| {
            matches!(
                s,
                Site::Qkv(0)
                    | Site::O(0)
                    | Site::MoeInput(0)
                    | Site::SharedGateUp(0)
                    | Site::SharedDown(0)
            )
        })
        .collect();
    assert_eq!(
        l0,
        vec![
            Site::Qkv(0),
            Site::O(0),
            Site::MoeInput(0),
            Site::SharedGateUp(0),
            Site::SharedDown(0)
        ]
    );
    let routed: usize = log
        .0
        .iter()
        .filter(|(s, _)| matches!(s, Site::ExpertGateUp(0, _)))
        .map(|x| x.1)
        .sum();
    let moe = model.config.moe.clone().unwrap();
    assert_eq!(routed, moe.top_k * toks.len());
    let all: Vec<usize> = log
        .0
        .iter()
        .filter(|(s, _)| matches!(s, Site::ExpertDownAllTokens(0, _)))
        .map(|x| x.1)
        .collect();
    assert_eq!(all, vec![toks.len(); moe.num_experts]);
}

#[test]
fn statistics_are_consistent_and_coverage_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 2).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let data = calib_data(&model, 3, 20, 100);
    let opts = CollectOptions {
        hessian: true,
        min_expert_tokens: 12,
        route_weighted: false,
    };
    let st = collect(&model, &data, opts, &|_, _| {}).unwrap();
    assert_eq!(st.tokens, 60);
    let q = st.get("model.layers.0.self_attn.q_proj").unwrap();
    let k = st.get("model.layers.0.self_attn.k_proj").unwrap();
    assert!(std::ptr::eq(q, k), "q/k/v share one input");
    assert_eq!(q.tokens, 60);
    let h = q.hessian.as_ref().unwrap();
    let n = q.second_moment.len();
    for j in 0..n {
        let want = h[j * n + j] / 60.0;
        assert!(
            (q.second_moment[j] - want).abs() <= 1e-9 * want.max(1e-30),
            "channel {j}"
        );
        for i in 0..j {
            assert_eq!(h[i * n + j], h[j * n + i]);
        }
    }
    assert!(q.amax > 0.0);
    let moe = model.config.moe.clone().unwrap();
    let cov = &st.coverage;
    assert_eq!(cov.experts.len(), model.config.num_layers * moe.num_experts);
    assert_eq!(cov.tokens_per_layer, 60);
    for l in 0..model.config.num_layers {
        let sum: u64 = cov
            .experts
            .iter()
            .filter(|e| e.layer == l)
            .map(|e| e.tokens)
            .sum();
        assert_eq!(sum, (moe.top_k * 60) as u64, "layer {l}");
    }
    // Every expert's Linears have statistics; fallbacks are measured on all tokens.
    for e in &cov.experts {
        let p = format!("model.layers.{}.mlp.experts.{}", e.layer, e.expert);
        let g = st.get(&format!("{p}.gate_proj")).unwrap();
        let d = st.get(&format!("{p}.down_proj")).unwrap();
        if e.all_token_fallback {
            assert!(e.tokens < 12);
            assert_eq!((g.tokens, d.tokens), (60, 60));
            assert!(g.site.contains("fallback"));
        } else {
            assert_eq!((g.tokens, d.tokens), (e.tokens, e.tokens));
        }
    }
    let table = cov.render();
    assert!(table.contains("threshold 12"), "{table}");
}

fn convert_method(
    src: &Path,
    out: &Path,
    layout: Layout,
    method: Method,
    threads: usize,
) -> serde_json::Value {
    let model = Model::load(src).unwrap();
    let data = calib_data(&model, 2, 24, 100);
    let st = collect(
        &model,
        &data,
        CollectOptions {
            hessian: method == Method::Gptq,
            min_expert_tokens: 8,
            route_weighted: false,
        },
        &|_, _| {},
    )
    .unwrap();
    let quant = QuantOptions {
        method,
        stats: Some(Arc::new(st.clone())),
        manifest_info: Some(serde_json::json!({"expert_coverage": st.coverage})),
        ..QuantOptions::default()
    };
    let cfg = ConvertConfig {
        force: true,
        ..convert_config(src, out, layout)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| convert_with(&cfg, &quant, &AtomicBool::new(false), &|_| {}))
        .unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("mimo-quant.json")).unwrap()).unwrap();
    m
}

#[test]
fn mse_and_gptq_conversions_load_and_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 4).unwrap();
    for (layout, method) in [
        (Layout::CtNvfp4, Method::Gptq),
        (Layout::CtMxfp4, Method::Mse),
        (Layout::ModelOptNvfp4, Method::Gptq),
    ] {
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let ma = convert_method(&src, &a, layout, method, 1);
        let mb = convert_method(&src, &b, layout, method, 3);
        assert_eq!(ma["options"]["method"], method.name());
        assert!(!ma["calibration"]["expert_coverage"]["experts"]
            .as_array()
            .unwrap()
            .is_empty());
        let files = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        };
        for (fa, fb) in files(&a).iter().zip(files(&b)) {
            assert_eq!(
                std::fs::read(fa).unwrap(),
                std::fs::read(&fb).unwrap(),
                "{layout:?} {method:?}"
            );
        }
        // The output runs through the runtime.
        let q = Model::load(&a).unwrap();
        let mut c = q.new_cache(8);
        let logits = q.forward(&[1, 2, 3], &mut c, Logits::Last).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        let _ = (ma, mb);
    }
}
