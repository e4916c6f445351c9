//! Calibration on the GPU (the CUDA runtime's layer-at-a-time walk) against the CPU walk: the
//! hidden states after every layer, the Linear inputs every site shows the observer (second
//! moments, routed token counts, all-token expert inputs), weight replacement (fused q/k/v and
//! gate/up rows, stacked experts, shared experts), and a whole GPTQ calibration on the GPU
//! (deterministic, complete coverage). Skipped with a message where there is no GPU;
//! `MIMO_REQUIRE_GPU=1` turns the skip into a failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mimo_quant::calib::data::Sample;
use mimo_quant::calib::run::{calibrate_and_quantize, CalibDevice, Progress};
use mimo_quant::calib::selfgen::{prompt_of, Continuer, GpuContinuer, SelfGenerate};
use mimo_quant::calib::stats::CollectOptions;
use mimo_quant::convert::convert;
use mimo_quant::methods::gptq::GptqOptions;
use mimo_quant::methods::Method;
use mimo_quant::plan::PlanOptions;
use mimo_runtime::arch::Names;
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::cuda::{Gpu, GpuModel};
use mimo_runtime::fixtures::{write_fixture, Arch};
use mimo_runtime::format::Layout;
use mimo_runtime::model::{LinearObserver, Model, ReplaceError, Site};
use mimo_runtime::walk::{LayerWalk, WalkError};
use mimo_runtime::weights::Loader;

mod common;
use common::{convert_config, embedded_model, random_tokens};

fn gpu() -> Option<Arc<Gpu>> {
    match mimo_runtime::cuda::gpu_for_tests() {
        Ok(g) => g,
        Err(e) => panic!("MIMO_REQUIRE_GPU=1 but no usable GPU: {e}"),
    }
}

/// Per site: rows seen and the per-feature sum of squares; per (layer, expert): routed rows.
#[derive(Default)]
struct Moments {
    sites: BTreeMap<Site, (usize, Vec<f64>)>,
    routed: BTreeMap<(usize, usize), usize>,
}

impl LinearObserver for Moments {
    fn observe(&mut self, site: Site, x: &[f32], m: usize) {
        let k = x.len() / m;
        let e = self.sites.entry(site).or_insert_with(|| (0, vec![0.0; k]));
        assert_eq!(e.1.len(), k, "{site:?}: width changed");
        e.0 += m;
        for row in x.chunks(k) {
            for (s, v) in e.1.iter_mut().zip(row) {
                *s += f64::from(*v) * f64::from(*v);
            }
        }
    }
    fn all_token_experts(&self) -> bool {
        true
    }
    fn routed(&mut self, layer: usize, expert: usize, tokens: &[usize], _: Option<&[f32]>) {
        *self.routed.entry((layer, expert)).or_default() += tokens.len();
    }
}

/// ||a - b|| / ||a||.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (f64::from(*x) - f64::from(*y)).powi(2);
        n += f64::from(*x).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

fn rel64(a: &[f64], b: &[f64]) -> f64 {
    let a32: Vec<f32> = a.iter().map(|v| *v as f32).collect();
    let b32: Vec<f32> = b.iter().map(|v| *v as f32).collect();
    rel(&a32, &b32)
}

/// Per site: rows, the full Gram matrix in f64 and the largest |x| (the host observer's view).
#[derive(Default)]
struct Grams {
    all_tokens: bool,
    sites: BTreeMap<Site, (u64, Vec<f64>, f32)>,
}

impl LinearObserver for Grams {
    fn observe(&mut self, site: Site, x: &[f32], m: usize) {
        let k = x.len() / m;
        let e = self
            .sites
            .entry(site)
            .or_insert_with(|| (0, vec![0.0; k * k], 0.0));
        e.0 += m as u64;
        for row in x.chunks(k) {
            for i in 0..k {
                e.2 = e.2.max(row[i].abs());
                for j in 0..k {
                    e.1[i * k + j] += f64::from(row[i]) * f64::from(row[j]);
                }
            }
        }
    }
    fn all_token_experts(&self) -> bool {
        self.all_tokens
    }
}

/// Architectures whose layers the GPU runs: dense, biases, routed experts, shared experts.
const ARCHS: [Arch; 5] = [
    Arch::Llama,
    Arch::Qwen2,
    Arch::Qwen3Moe,
    Arch::Qwen2Moe,
    Arch::Mixtral,
];

/// Walks every layer of `dir`'s model on both backends over `seqs`, comparing as it goes.
fn walk_both(g: &Arc<Gpu>, dir: &Path, seqs: &[Vec<u32>], what: &str) {
    let mut cpu = Model::load(dir).unwrap();
    let mut gpu = GpuModel::load(g.clone(), dir).unwrap();
    let layers = cpu.config.num_layers;
    let (mut mc, mut mg) = (Moments::default(), Moments::default());
    for (si, toks) in seqs.iter().enumerate() {
        let mut xc = LayerWalk::embed_tokens(&mut cpu, toks).unwrap();
        let mut xg = LayerWalk::embed_tokens(&mut gpu, toks).unwrap();
        let e = rel(&xc, &xg);
        assert!(e < 4e-3, "{what} seq {si}: embeddings differ by {e:.2e}");
        for l in 0..layers {
            LayerWalk::forward_layer_observed(&mut cpu, l, &mut xc, &mut mc).unwrap();
            LayerWalk::forward_layer_observed(&mut gpu, l, &mut xg, &mut mg).unwrap();
            let e = rel(&xc, &xg);
            assert!(
                e < 3e-2,
                "{what} seq {si} layer {l}: hidden states differ by {e:.2e}"
            );
        }
    }
    let routed = |m: &Moments| -> bool {
        m.sites
            .keys()
            .any(|s| matches!(s, Site::ExpertGateUp(..) | Site::ExpertDown(..)))
    };
    // Every site but the routed experts' (their token sets depend on near-ties) must match.
    for (site, (rows, sq)) in &mc.sites {
        if matches!(site, Site::ExpertGateUp(..) | Site::ExpertDown(..)) {
            continue;
        }
        let (grows, gsq) = mg
            .sites
            .get(site)
            .unwrap_or_else(|| panic!("{what}: the GPU never showed {site:?}"));
        assert_eq!(rows, grows, "{what} {site:?}: rows");
        let e = rel64(sq, gsq);
        assert!(
            e < 5e-2,
            "{what} {site:?}: second moments differ by {e:.2e}"
        );
    }
    let plain = |m: &Moments| {
        m.sites
            .keys()
            .filter(|s| !matches!(s, Site::ExpertGateUp(..) | Site::ExpertDown(..)))
            .count()
    };
    assert_eq!(plain(&mc), plain(&mg), "{what}: sites");
    assert_eq!(routed(&mc), routed(&mg), "{what}: routed sites");
    if routed(&mc) {
        // Same number of (token, expert) pairs per layer; per expert, nearly the same tokens.
        let total: usize = mc.routed.values().sum();
        assert_eq!(
            total,
            mg.routed.values().sum::<usize>(),
            "{what}: routed pairs"
        );
        let moved: usize = mc
            .routed
            .keys()
            .chain(mg.routed.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|k| {
                let (a, b) = (mc.routed.get(k), mg.routed.get(k));
                a.copied().unwrap_or(0).abs_diff(b.copied().unwrap_or(0))
            })
            .sum();
        assert!(
            moved * 10 <= total,
            "{what}: {moved} of {total} routed pairs went to other experts"
        );
        // The observed rows of each expert's gate/up match the routing it reported.
        for (&(l, e), &n) in &mg.routed {
            let rows = mg.sites.get(&Site::ExpertGateUp(l, e)).map(|s| s.0);
            assert_eq!(rows, Some(n), "{what}: expert {e} of layer {l}");
        }
    }
}

#[test]
fn gpu_layer_walk_matches_the_cpu_walk() {
    let Some(g) = gpu() else { return };
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), arch, 40 + i as u64).unwrap();
        let vocab = Model::load(dir.path()).unwrap().config.vocab_size;
        // Two lengths: the workspace and the cache are re-used, then grown.
        let seqs = vec![
            random_tokens(vocab, 37, 7),
            random_tokens(vocab, 37, 8),
            random_tokens(vocab, 90, 9),
        ];
        walk_both(&g, dir.path(), &seqs, &format!("{arch:?}"));
    }
}

#[test]
fn gpu_layer_walk_matches_the_cpu_walk_on_the_embedded_model() {
    let Some(g) = gpu() else { return };
    let dir = embedded_model();
    let tok = mimo_runtime::tokenizer::TextTokenizer::from_dir(&dir).unwrap();
    let data = mimo_quant::calib::load_sequences("default", &tok, None).unwrap();
    walk_both(&g, &dir, &data.sequences[..6], "mimo-tiny-moe");
}

#[test]
fn device_sums_equal_the_host_observer_sums() {
    let Some(g) = gpu() else { return };
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let what = format!("{arch:?}");
        let dir = tempfile::tempdir().unwrap();
        write_fixture(dir.path(), arch, 80 + i as u64).unwrap();
        let mut gpu = GpuModel::load(g.clone(), dir.path()).unwrap();
        let vocab = gpu.config.vocab_size;
        let layers = gpu.config.num_layers;
        let seqs = [random_tokens(vocab, 37, 1), random_tokens(vocab, 90, 2)];
        let mut host = Grams {
            all_tokens: true,
            sites: BTreeMap::new(),
        };
        let walk = |gpu: &mut GpuModel, obs: &mut dyn LinearObserver| {
            for toks in &seqs {
                let mut x = LayerWalk::embed_tokens(gpu, toks).unwrap();
                for l in 0..layers {
                    LayerWalk::forward_layer_observed(gpu, l, &mut x, obs).unwrap();
                }
            }
        };
        walk(&mut gpu, &mut host);
        assert!(LayerWalk::begin_device_sums(&mut gpu, true, true).unwrap());
        let mut silent = Grams::default();
        walk(&mut gpu, &mut silent);
        assert!(silent.sites.is_empty(), "{what}: the observer saw rows");
        let sums = LayerWalk::take_device_sums(&mut gpu).unwrap();
        assert_eq!(
            sums.iter().map(|s| s.site).collect::<Vec<_>>(),
            host.sites.keys().copied().collect::<Vec<_>>(),
            "{what}: sites"
        );
        for s in &sums {
            let (rows, gram, amax) = &host.sites[&s.site];
            assert_eq!(s.rows, *rows, "{what} {:?}: rows", s.site);
            assert_eq!(s.amax, *amax, "{what} {:?}: amax", s.site);
            let sg = s.gram.as_ref().expect("Gram matrix asked for");
            let diag: Vec<f64> = (0..s.k).map(|i| sg[i * s.k + i]).collect();
            assert_eq!(s.sum_sq, diag, "{what} {:?}: sums of squares", s.site);
            let e = rel64(gram, sg);
            assert!(
                e < 1e-4,
                "{what} {:?}: Gram matrices differ by {e:.2e}",
                s.site
            );
        }
        // Nothing is left summing.
        assert!(LayerWalk::take_device_sums(&mut gpu).unwrap().is_empty());
        // Without Hessians only the diagonals come back, the same ones.
        assert!(LayerWalk::begin_device_sums(&mut gpu, true, false).unwrap());
        walk(&mut gpu, &mut silent);
        let diags = LayerWalk::take_device_sums(&mut gpu).unwrap();
        assert_eq!(diags.len(), sums.len(), "{what}: sites without Hessians");
        for (d, s) in diags.iter().zip(&sums) {
            assert!(
                d.gram.is_none(),
                "{what} {:?}: a Gram matrix came back",
                d.site
            );
            assert_eq!((d.site, d.rows), (s.site, s.rows), "{what}");
            assert_eq!(d.sum_sq, s.sum_sq, "{what} {:?}: sums of squares", d.site);
        }
    }
}

/// The decoder-layer Linears of layer `l` with their shapes, by checkpoint module name.
fn layer_linears(model: &Model, l: usize) -> Vec<(String, usize, usize)> {
    let c = &model.config;
    let names = Names::new(c.arch);
    let (hd, d) = (c.hidden_size, c.head_dim);
    let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
    let mut v = vec![
        (names.attn(l, "q_proj"), qn, hd),
        (names.attn(l, "k_proj"), kvn, hd),
        (names.attn(l, "v_proj"), kvn, hd),
        (names.attn(l, "o_proj"), hd, qn),
    ];
    match (&c.moe, c.moe_layers[l]) {
        (Some(mc), true) => {
            let i = mc.expert_intermediate_size;
            for e in 0..mc.num_experts {
                let [g, u, dn] = names.expert(l, e);
                v.extend([(g, i, hd), (u, i, hd), (dn, hd, i)]);
            }
            if let Some(si) = mc.shared_expert_intermediate_size {
                let [g, u, dn] = names.shared_expert(l);
                v.extend([(g, si, hd), (u, si, hd), (dn, hd, si)]);
            }
        }
        _ => {
            let i = c.intermediate_size;
            let [g, u, dn] = names.mlp(l);
            v.extend([(g, i, hd), (u, i, hd), (dn, hd, i)]);
        }
    }
    v
}

#[test]
fn gpu_weight_replacement_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    for (i, arch) in ARCHS.into_iter().enumerate() {
        let what = format!("{arch:?}");
        let src = tempfile::tempdir().unwrap();
        write_fixture(src.path(), arch, 60 + i as u64).unwrap();
        let out = tempfile::tempdir().unwrap();
        let fp4 = out.path().join("fp4");
        let cfg = convert_config(src.path(), &fp4, Layout::CtNvfp4);
        convert(&cfg, &AtomicBool::new(false), &|_| {}).unwrap();
        let mut cpu = Model::load(src.path()).unwrap();
        let mut gpu = GpuModel::load(g.clone(), src.path()).unwrap();
        let toks = random_tokens(cpu.config.vocab_size, 45, 3);
        let x0 = LayerWalk::embed_tokens(&mut cpu, &toks).unwrap();
        let mut before = x0.clone();
        LayerWalk::forward_layer_observed(&mut cpu, 0, &mut before, &mut Moments::default())
            .unwrap();
        let ck = Checkpoint::open(&fp4).unwrap();
        let ld = Loader::new(&ck).unwrap();
        let linears = layer_linears(&cpu, 0);
        for (name, n, k) in &linears {
            let w = ld.linear(name, *n, *k, false).unwrap().weight;
            LayerWalk::replace_linear_weight(&mut cpu, name, w.clone()).unwrap();
            LayerWalk::replace_linear_weight(&mut gpu, name, w).unwrap();
        }
        let (mut xc, mut xg) = (x0.clone(), x0.clone());
        LayerWalk::forward_layer_observed(&mut cpu, 0, &mut xc, &mut Moments::default()).unwrap();
        LayerWalk::forward_layer_observed(&mut gpu, 0, &mut xg, &mut Moments::default()).unwrap();
        let moved = rel(&before, &xc);
        let e = rel(&xc, &xg);
        assert!(
            e < 3e-2 && e * 3.0 < moved,
            "{what}: GPU vs CPU after replacement {e:.2e}, replacement moved the CPU output {moved:.2e}"
        );
        // Refusals: unknown name, wrong shape.
        let (name, n, k) = &linears[0];
        let w = ld.linear(name, *n, *k, false).unwrap().weight;
        let r = LayerWalk::replace_linear_weight(&mut gpu, "model.layers.0.self_attn.x_proj", w);
        assert!(
            matches!(r, Err(WalkError::Replace(ReplaceError::Unknown(_)))),
            "{what}: {r:?}"
        );
        let other = ld.linear(&linears[3].0, linears[3].1, linears[3].2, false);
        if linears[3].1 != *n || linears[3].2 != *k {
            let r = LayerWalk::replace_linear_weight(&mut gpu, name, other.unwrap().weight);
            assert!(
                matches!(r, Err(WalkError::Replace(ReplaceError::Shape { .. }))),
                "{what}: {r:?}"
            );
        }
    }
}

/// NVFP4 GPTQ of the model in `dir` calibrated on `device` with the default recipe.
fn gptq_run(
    dir: &Path,
    device: CalibDevice,
    quantize_lm_head: bool,
) -> (
    mimo_quant::calib::CalibRun,
    mimo_quant::methods::sequential::Precomputed,
) {
    calibrate_and_quantize(
        dir,
        "default",
        &PlanOptions {
            layout: Layout::CtNvfp4,
            ignore: vec![],
            quantize_lm_head,
            experts_only: false,
        },
        Method::Gptq,
        &GptqOptions::default(),
        CollectOptions::default(),
        None,
        false,
        device,
        &Progress::NONE,
    )
    .unwrap()
}

fn gptq_on(dir: &Path, device: CalibDevice) -> mimo_quant::calib::CalibRun {
    let run = || gptq_run(dir, device, false);
    let (first, weights) = run();
    assert!(!weights.weights.is_empty());
    let again = run().1;
    assert!(
        weights.weights == again.weights && weights.scales == again.scales,
        "{device:?}: two runs gave different weights"
    );
    first
}

#[test]
fn gptq_calibration_on_the_gpu_is_deterministic_and_covers_every_expert() {
    if gpu().is_none() {
        return;
    }
    let dir = embedded_model();
    let run = gptq_on(&dir, CalibDevice::Cuda);
    assert_eq!(run.backend, "cuda");
    assert!(run.gpu_memory_bytes.is_some_and(|b| b > 0));
    let cov = &run.stats.coverage;
    let top_k = 2;
    assert_eq!(cov.tokens_per_layer, run.stats.tokens as u64);
    for l in 0..8 {
        let pairs: u64 = cov
            .experts
            .iter()
            .filter(|e| e.layer == l)
            .map(|e| e.tokens)
            .sum();
        assert_eq!(pairs, (run.stats.tokens * top_k) as u64, "layer {l}");
    }
}

/// The lm_head's calibration input: the GPU walk's final norm (host formula, the device's norm
/// weight) equals the CPU's bit for bit on the same rows; a buffer that is not `[m, hidden]` is
/// refused by both; a GPTQ conversion calibrated on the GPU quantizes the lm_head.
#[test]
fn final_norm_of_the_gpu_walk_equals_the_cpus() {
    let Some(g) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 5).unwrap();
    let mut cpu = Model::load(dir.path()).unwrap();
    let mut gpu = GpuModel::load(g.clone(), dir.path()).unwrap();
    let hd = cpu.config.hidden_size;
    let x: Vec<f32> = (0..3 * hd)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    let (mut a, mut b) = (x.clone(), x.clone());
    LayerWalk::final_norm(&mut cpu, &mut a).unwrap();
    LayerWalk::final_norm(&mut gpu, &mut b).unwrap();
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    assert_ne!(a, x);
    let mut bad = vec![1.0f32; hd + 1];
    assert!(LayerWalk::final_norm(&mut cpu, &mut bad).is_err());
    assert!(LayerWalk::final_norm(&mut gpu, &mut bad).is_err());
    // GPTQ calibrated on the GPU with --quantize-lm-head quantizes the head from those rows.
    let (run, weights) = gptq_run(&embedded_model(), CalibDevice::Cuda, true);
    assert_eq!(run.backend, "cuda");
    assert!(weights.weights.contains_key("lm_head"));
}

/// Self-generated calibration text on the GPU: the device's continuations start with their
/// prompts, repeat for a seed and differ for another; a whole calibration run with a generating
/// recipe (text written by the walk's own model on the device, then the walk) covers every
/// expert and repeats.
#[test]
fn self_generated_calibration_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let dir = embedded_model();
    let tok = mimo_runtime::tokenizer::TextTokenizer::from_dir(&dir).unwrap();
    let mut model = GpuModel::load(g, &dir).unwrap();
    let samples: Vec<Sample> = ["The old library kept its maps", "def parse(line): return x"]
        .iter()
        .map(|t| Sample {
            set: "user".into(),
            text: t.to_string(),
        })
        .collect();
    let gen = SelfGenerate {
        prompt_words: 3,
        new_tokens: 24,
        ..SelfGenerate::default()
    };
    let mut c = GpuContinuer {
        model: &mut model,
        progress: &|_, _| {},
    };
    let a = c.continue_samples(&tok, &samples, &gen, 5).unwrap();
    let b = c.continue_samples(&tok, &samples, &gen, 5).unwrap();
    let other = c.continue_samples(&tok, &samples, &gen, 6).unwrap();
    assert_eq!(a, b, "the same seed gave other text on the GPU");
    assert_ne!(a, other, "another seed gave the same text");
    for (o, s) in a.iter().zip(&samples) {
        let p = prompt_of(&s.text, 3);
        assert!(
            o.text.starts_with(p) && o.text.len() > p.len(),
            "{:?}",
            o.text
        );
    }
    // More new tokens than the model has positions (1,024): the decode stops where the cache
    // ends, as on the CPU; a prompt that fills the context is refused, naming its sample.
    let long = SelfGenerate {
        new_tokens: 1500,
        ..gen
    };
    let l = c.continue_samples(&tok, &samples, &long, 5).unwrap();
    for (o, s) in l.iter().zip(&samples) {
        assert!(o.text.starts_with(prompt_of(&s.text, 3)), "{:?}", o.text);
    }
    let huge = vec![Sample {
        set: "user".into(),
        text: "word ".repeat(3000),
    }];
    let all_words = SelfGenerate {
        prompt_words: 3000,
        ..gen
    };
    let e = c.continue_samples(&tok, &huge, &all_words, 5).unwrap_err();
    assert!(e.to_string().contains("calibration sample 0"), "{e}");
    drop(model);
    let recipe = tempfile::tempdir().unwrap();
    let spec = recipe.path().join("self.json");
    let r = serde_json::json!({"data": "mimo-calib.jsonl", "samples": 12, "seq_len": 64,
        "seed": 2, "generate": {"new_tokens": 32}});
    std::fs::write(&spec, r.to_string()).unwrap();
    let run = |device| {
        mimo_quant::calib::calibrate(
            &dir,
            spec.to_str().unwrap(),
            CollectOptions::default(),
            device,
            &Progress::NONE,
        )
        .unwrap()
    };
    let first = run(CalibDevice::Cuda);
    assert_eq!(first.backend, "cuda");
    assert!(first.stats.tokens > 12 * 8, "{} tokens", first.stats.tokens);
    assert_eq!(first.data.recipe.generate.map(|g| g.new_tokens), Some(32));
    let cov = &first.stats.coverage;
    assert_eq!(cov.tokens_per_layer, first.stats.tokens as u64);
    let again = run(CalibDevice::Cuda);
    assert_eq!(
        first.data.sequences, again.data.sequences,
        "GPU text changed"
    );
}
