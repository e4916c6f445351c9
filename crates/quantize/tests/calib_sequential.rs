//! Layer-at-a-time calibration: with BF16 propagation it gathers exactly the statistics of the
//! whole-model pass; with a quantizer, layer L+1 is calibrated on the outputs of the quantized
//! layers before it; conversions with sequential mse/gptq are byte-identical on 1 and 2 threads;
//! a precomputed weight with another global scale is refused; the runtime's weight replacement
//! checks names and shapes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mimo_kernels::fp4::{Fp4Format, Fp4Matrix};
use mimo_quant::calib::{
    collect, run_sequential, run_sequential_with, CalibData, CollectOptions, LinearStats,
    SequentialError, SequentialModes,
};
use mimo_quant::convert::{convert_with, ConvertConfig, ConvertError, DEFAULT_MAX_SHARD};
use mimo_quant::methods::apply::read_weight;
use mimo_quant::methods::gptq::{BlockScale, GptqOptions};
use mimo_quant::methods::mse::quantize_mse;
use mimo_quant::methods::sequential::quantize_sequential;
use mimo_quant::methods::{ApplyError, Method, QuantOptions};
use mimo_quant::plan::{Plan, PlanOptions};
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::fixtures::{write_fixture, Arch};
use mimo_runtime::format::Layout;
use mimo_runtime::linear::Weight;
use mimo_runtime::model::{Logits, Model, ReplaceError};

mod common;
use common::{calib_data, convert_config, read_tree};

type Recorded = BTreeMap<String, Arc<LinearStats>>;

/// A Qwen3-MoE fixture of `seed` (its folder with it) and 3 calibration sequences of 20 tokens.
fn moe_fixture(seed: u64) -> (tempfile::TempDir, Model, CalibData) {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, seed).unwrap();
    let model = Model::load(dir.path()).unwrap();
    let data = calib_data(&model, 3, 20, 300);
    (dir, model, data)
}

#[test]
fn bf16_layer_at_a_time_equals_the_whole_model_pass() {
    let (dir, mut model, data) = moe_fixture(11);
    let opts = CollectOptions {
        hessian: true,
        min_expert_tokens: 12,
        route_weighted: false,
    };
    let whole = collect(&model, &data, opts, &|_, _| {}).unwrap();
    // A quantizer that only records what it is shown (no replacement): BF16 propagation.
    let mut seen: Recorded = BTreeMap::new();
    let mut layers_seen = Vec::new();
    let mut rec = |l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
        layers_seen.push(l);
        for (k, v) in s {
            seen.insert(k.clone(), v.clone());
        }
        Ok(Vec::new())
    };
    let run = run_sequential(&mut model, &data, opts, Some(&mut rec), &|_, _| {}).unwrap();
    assert_eq!(
        layers_seen,
        (0..model.config.num_layers).collect::<Vec<_>>()
    );
    assert_eq!(seen.len(), whole.by_module.len());
    for (name, s) in &whole.by_module {
        assert_eq!(
            seen.get(name).map(|a| a.as_ref()),
            Some(s.as_ref()),
            "{name}"
        );
    }
    assert_eq!(run.coverage, whole.coverage);
    assert_eq!((run.tokens, run.sequences), (60, 3));
    // One layer's statistics at a time: a fraction of the whole model's.
    assert!(run.stats_bytes * model.config.num_layers <= whole.stats_bytes + 8);
    assert_eq!(run.activation_bytes, 60 * model.config.hidden_size * 4);
    // Without a quantizer: the same coverage, one pass per layer.
    let mut m2 = Model::load(dir.path()).unwrap();
    let run2 = run_sequential(&mut m2, &data, opts, None, &|_, _| {}).unwrap();
    assert_eq!(run2.coverage, whole.coverage);
}

/// MXFP4 of a module's source weight (MSE search with uniform weights: deterministic).
fn mxfp4_of(ck: &Checkpoint, module: &str) -> Fp4Matrix {
    let t = ck.tensor(&format!("{module}.weight")).unwrap();
    let w = read_weight(&t).unwrap();
    quantize_mse(&w, t.shape[0], t.shape[1], Fp4Format::Mxfp4, 1.0, None).unwrap()
}

#[test]
fn each_layer_is_calibrated_on_the_quantized_layers_before_it() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 12).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut model = Model::load(dir.path()).unwrap();
    let data = calib_data(&model, 2, 24, 300);
    let opts = CollectOptions {
        hessian: true,
        min_expert_tokens: 4,
        route_weighted: false,
    };
    let mut seen: Vec<Recorded> = Vec::new();
    let mut layer0: Vec<(String, Fp4Matrix)> = Vec::new();
    let mut quant = |l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
        seen.push(s.clone());
        let mut out = Vec::new();
        for module in s.keys().filter(|m| m.ends_with("_proj")) {
            let m = mxfp4_of(&ck, module);
            if l == 0 {
                layer0.push((module.clone(), m.clone()));
            }
            out.push((module.clone(), Weight::Fp4(m)));
        }
        Ok(out)
    };
    run_sequential(&mut model, &data, opts, Some(&mut quant), &|_, _| {}).unwrap();
    assert!(!layer0.is_empty());

    // Reference: the whole-model pass over a model whose layer 0 alone is quantized gives the
    // inputs of layer 1 after a quantized layer 0.
    let mut q0 = Model::load(dir.path()).unwrap();
    for (module, m) in &layer0 {
        q0.replace_linear_weight(module, Weight::Fp4(m.clone()))
            .unwrap();
    }
    let after_q0 = collect(&q0, &data, opts, &|_, _| {}).unwrap();
    let bf16 = collect(&Model::load(dir.path()).unwrap(), &data, opts, &|_, _| {}).unwrap();
    let mut differs = 0;
    for (name, s) in &seen[1] {
        assert_eq!(
            s.as_ref(),
            after_q0.get(name).unwrap(),
            "{name}: layer 1 must see the quantized layer 0"
        );
        if bf16.get(name).unwrap() != s.as_ref() {
            differs += 1;
        }
    }
    assert!(
        differs > 0,
        "quantizing layer 0 changed none of layer 1's statistics"
    );
    // Layer 0 itself was calibrated on the BF16 embeddings.
    for (name, s) in &seen[0] {
        assert_eq!(s.as_ref(), bf16.get(name).unwrap(), "{name}");
    }
}

/// Sequential calibration with `method` and a conversion using its weights, in a pool of
/// `threads` threads.
#[allow(clippy::too_many_arguments)]
fn convert_sequential(
    src: &Path,
    out: &Path,
    layout: Layout,
    method: Method,
    gptq: GptqOptions,
    asymmetric: Option<f64>,
    within_layer: bool,
    threads: usize,
) -> (Result<(), ConvertError>, usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let ck = Checkpoint::open(src).unwrap();
        let popts = PlanOptions {
            layout,
            ignore: vec![],
            quantize_lm_head: false,
            experts_only: false,
        };
        let plan = Plan::build(&ck, &popts).unwrap();
        let mut model = Model::load(src).unwrap();
        let data = calib_data(&model, 2, 24, 300);
        let (run, weights) = quantize_sequential(
            &ck,
            &plan,
            &mut model,
            &data,
            method,
            &gptq,
            CollectOptions {
                min_expert_tokens: 8,
                ..CollectOptions::default()
            },
            asymmetric,
            within_layer,
            &|_, _| {},
        )
        .unwrap();
        let n = weights.weights.len();
        let quant = QuantOptions {
            method,
            precomputed: Some(Arc::new(weights.weights)),
            precomputed_scales: Some(Arc::new(weights.scales)),
            manifest_info: Some(serde_json::json!({"expert_coverage": run.coverage})),
            ..QuantOptions::default()
        };
        let cfg = ConvertConfig {
            source: src.to_path_buf(),
            source_repo: None,
            output: out.to_path_buf(),
            plan: popts,
            max_shard_size: DEFAULT_MAX_SHARD,
            force: true,
        };
        let r = convert_with(&cfg, &quant, &AtomicBool::new(false), &|_| {}).map(|_| ());
        (r, n)
    })
}

#[test]
fn sequential_conversions_are_identical_on_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 13).unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let plain = GptqOptions {
        damp: 0.01,
        ..GptqOptions::default()
    };
    let ordered = GptqOptions {
        damp: 0.01,
        act_order: true,
        block_scale: BlockScale::Loss,
        refine: 0,
        mse_scale_search: false,
    };
    let searched = GptqOptions {
        mse_scale_search: true,
        ..plain
    };
    let refined = GptqOptions {
        refine: 3,
        act_order: true,
        ..plain
    };
    for (layout, method, gptq, asym, within) in [
        (Layout::CtNvfp4, Method::Gptq, plain, None, false),
        (Layout::CtNvfp4, Method::Mse, plain, None, false),
        (Layout::CtNvfp4, Method::Mse, searched, None, false),
        (Layout::ModelOptNvfp4, Method::Mse, searched, None, false),
        (Layout::CtNvfp4, Method::Gptq, searched, None, false),
        (Layout::CtMxfp4, Method::Gptq, plain, None, false),
        (Layout::ModelOptNvfp4, Method::Gptq, plain, None, false),
        (Layout::CtNvfp4, Method::Gptq, ordered, None, false),
        (Layout::CtMxfp4, Method::Gptq, ordered, None, false),
        (Layout::CtNvfp4, Method::Gptq, ordered, Some(0.25), false),
        (Layout::CtMxfp4, Method::Mse, plain, Some(1.0), false),
        (Layout::CtNvfp4, Method::Gptq, ordered, None, true),
        (Layout::CtNvfp4, Method::Gptq, plain, Some(0.25), true),
        (Layout::CtNvfp4, Method::Gptq, refined, Some(0.25), false),
        (Layout::CtMxfp4, Method::Gptq, refined, None, false),
    ] {
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let (ra, n) = convert_sequential(&src, &a, layout, method, gptq, asym, within, 1);
        ra.unwrap();
        let (rb, _) = convert_sequential(&src, &b, layout, method, gptq, asym, within, 2);
        rb.unwrap();
        // Every quantized Linear of the decoder layers came from the sequential pass.
        let plan = Plan::build(
            &ck,
            &PlanOptions {
                layout,
                ignore: vec![],
                quantize_lm_head: false,
                experts_only: false,
            },
        )
        .unwrap();
        assert_eq!(n, plan.totals().quantized, "{layout:?} {method:?}");
        let (ta, tb) = (read_tree(&a), read_tree(&b));
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
        for (name, bytes) in &ta {
            assert!(tb[name] == *bytes, "{layout:?} {method:?}: {name} differs");
        }
        // It loads and runs.
        let q = Model::load(&a).unwrap();
        let mut c = q.new_cache(8);
        let logits = q.forward(&[1, 2, 3], &mut c, Logits::Last).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn a_precomputed_weight_with_another_global_scale_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write_fixture(&src, Arch::Llama, 14).unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let module = "model.layers.0.self_attn.o_proj";
    let t = ck.tensor(&format!("{module}.weight")).unwrap();
    let w = read_weight(&t).unwrap();
    let m = quantize_mse(&w, t.shape[0], t.shape[1], Fp4Format::Nvfp4, 1234.5, None).unwrap();
    let mut pre = BTreeMap::new();
    pre.insert(module.to_string(), m);
    let quant = QuantOptions {
        method: Method::Mse,
        precomputed: Some(Arc::new(pre)),
        ..QuantOptions::default()
    };
    let cfg = ConvertConfig {
        force: true,
        ..convert_config(&src, &dir.path().join("out"), Layout::CtNvfp4)
    };
    let e = convert_with(&cfg, &quant, &AtomicBool::new(false), &|_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ConvertError::Method(ApplyError::ScaleMismatch { .. })),
        "{msg}"
    );
    assert!(
        msg.contains("model.layers.0.self_attn.o_proj.weight") && msg.contains("1234.5"),
        "{msg}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn weight_replacement_checks_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 15).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut model = Model::load(dir.path()).unwrap();
    let q = mxfp4_of(&ck, "model.layers.0.self_attn.q_proj");
    let e = model
        .replace_linear_weight("model.layers.0.self_attn.nope", Weight::Fp4(q.clone()))
        .unwrap_err();
    assert!(matches!(e, ReplaceError::Unknown(_)), "{e}");
    let e = model
        .replace_linear_weight("lm_head", Weight::Fp4(q.clone()))
        .unwrap_err();
    assert!(matches!(e, ReplaceError::Unknown(_)), "{e}");
    let odd: Vec<f32> = (0..3 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    let odd = quantize_mse(&odd, 3, 32, Fp4Format::Mxfp4, 1.0, None).unwrap();
    let e = model
        .replace_linear_weight("model.layers.1.mlp.experts.0.down_proj", Weight::Fp4(odd))
        .unwrap_err();
    assert!(matches!(e, ReplaceError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("experts.0.down_proj"), "{e}");
    // The right shape is taken, and changes the output.
    let mut c = model.new_cache(8);
    let before = model.forward(&[1, 2, 3], &mut c, Logits::Last).unwrap();
    model
        .replace_linear_weight("model.layers.0.self_attn.q_proj", Weight::Fp4(q))
        .unwrap();
    let mut c = model.new_cache(8);
    let after = model.forward(&[1, 2, 3], &mut c, Logits::Last).unwrap();
    assert_ne!(before, after);
    // A layer-at-a-time call on a bad buffer is an error, not a panic.
    let mut x = vec![0f32; 7];
    assert!(model.forward_layer_observed(0, &mut x, &mut NoObs).is_err());
    let mut x = vec![0f32; model.config.hidden_size];
    assert!(model
        .forward_layer_observed(99, &mut x, &mut NoObs)
        .is_err());
}

struct NoObs;
impl mimo_runtime::model::LinearObserver for NoObs {
    fn observe(&mut self, _: mimo_runtime::model::Site, _: &[f32], _: usize) {}
}

#[test]
fn asymmetric_calibration_pairs_the_streams_and_keeps_the_plain_statistics() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 16).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let opts = CollectOptions {
        hessian: true,
        min_expert_tokens: 4,
        route_weighted: false,
    };
    let run = |asymmetric: bool| -> Vec<Recorded> {
        let mut model = Model::load(dir.path()).unwrap();
        let data = calib_data(&model, 2, 24, 300);
        let mut seen: Vec<Recorded> = Vec::new();
        let mut quant =
            |_l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
                seen.push(s.clone());
                Ok(s.keys()
                    .filter(|m| m.ends_with("_proj"))
                    .map(|m| (m.clone(), Weight::Fp4(mxfp4_of(&ck, m))))
                    .collect())
            };
        run_sequential_with(
            &mut model,
            &data,
            opts,
            SequentialModes {
                asymmetric,
                within_layer: false,
                head: false,
            },
            Some(&mut quant),
            &|_, _| {},
        )
        .unwrap();
        seen
    };
    let plain = run(false);
    let asym = run(true);
    assert_eq!(plain.len(), asym.len());
    for (l, (p, a)) in plain.iter().zip(&asym).enumerate() {
        assert_eq!(p.keys().collect::<Vec<_>>(), a.keys().collect::<Vec<_>>());
        for (name, sp) in p {
            let sa = &a[name];
            // The quantized stream's statistics are those of the plain run.
            assert_eq!(sp.hessian, sa.hessian, "{name}");
            assert_eq!(sp.second_moment, sa.second_moment, "{name}");
            assert_eq!((sp.tokens, sp.amax), (sa.tokens, sa.amax), "{name}");
            assert!(sp.cross.is_none());
            let c = sa
                .cross
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no cross term"));
            let nonzero = c.iter().filter(|v| **v != 0.0).count();
            if l == 0 {
                // Nothing is quantized before layer 0: both streams are the same.
                assert_eq!(nonzero, 0, "{name}");
            } else if !name.contains(".experts.") || sa.tokens > 0 {
                assert!(nonzero > 0, "layer {l} {name}: the streams should differ");
            }
        }
    }
}

/// Least squares: `W'` from [`asymmetric_target`] (no damping) zeroes the gradient of
/// `||W Xf - W' X||^2` and beats `W` itself on it.
#[test]
fn asymmetric_target_is_the_least_squares_weight() {
    use mimo_quant::methods::gptq::asymmetric_target;
    let (n, k, m) = (6, 16, 200);
    let mut s = 7u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f64 / (1u64 << 24) as f64) - 0.5
    };
    let xf: Vec<f64> = (0..m * k).map(|_| rnd()).collect();
    let x: Vec<f64> = xf.iter().map(|v| v + 0.2 * rnd()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rnd() as f32).collect();
    let mut h = vec![0f64; k * k];
    let mut c = vec![0f64; k * k];
    for t in 0..m {
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] += x[t * k + i] * x[t * k + j];
                c[i * k + j] += (xf[t * k + i] - x[t * k + i]) * x[t * k + j];
            }
        }
    }
    let wp = asymmetric_target(&w, n, k, &h, &c, 0.0, 1.0).unwrap();
    let loss = |v: &[f32]| -> f64 {
        let mut e = 0.0;
        for t in 0..m {
            for r in 0..n {
                let mut d = 0.0;
                for j in 0..k {
                    d += w[r * k + j] as f64 * xf[t * k + j] - v[r * k + j] as f64 * x[t * k + j];
                }
                e += d * d;
            }
        }
        e
    };
    assert!(loss(&wp) < 0.9 * loss(&w), "{} vs {}", loss(&wp), loss(&w));
    // Gradient (W' X - W Xf) X^T = 0, relative to its size at W.
    let grad = |v: &[f32]| -> f64 {
        let mut g = 0.0;
        for r in 0..n {
            for j in 0..k {
                let mut s = 0.0;
                for t in 0..m {
                    let mut d = 0.0;
                    for p in 0..k {
                        d += v[r * k + p] as f64 * x[t * k + p]
                            - w[r * k + p] as f64 * xf[t * k + p];
                    }
                    s += d * x[t * k + j];
                }
                g += s * s;
            }
        }
        g.sqrt()
    };
    assert!(grad(&wp) < 1e-3 * grad(&w), "{} vs {}", grad(&wp), grad(&w));
    // A zero cross term leaves the weight unchanged.
    let same = asymmetric_target(&w, n, k, &h, &vec![0.0; k * k], 0.01, 1.0).unwrap();
    assert_eq!(same, w);
    // alpha scales the correction: half of it lies half-way.
    let half = asymmetric_target(&w, n, k, &h, &c, 0.0, 0.5).unwrap();
    for ((h, p), w) in half.iter().zip(&wp).zip(&w) {
        assert!((h - (w + 0.5 * (p - w))).abs() < 1e-5, "{h} {p} {w}");
    }
}

#[test]
fn within_layer_each_stage_sees_the_quantized_stages_before_it() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), Arch::Qwen3Moe, 17).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let opts = CollectOptions {
        hessian: true,
        min_expert_tokens: 4,
        route_weighted: false,
    };
    let mut model = Model::load(dir.path()).unwrap();
    let data = calib_data(&model, 2, 24, 300);
    let mut calls: Vec<(usize, Recorded)> = Vec::new();
    let mut quant = |l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
        calls.push((l, s.clone()));
        Ok(s.keys()
            .filter(|m| m.ends_with("_proj"))
            .map(|m| (m.clone(), Weight::Fp4(mxfp4_of(&ck, m))))
            .collect())
    };
    let modes = SequentialModes {
        asymmetric: false,
        within_layer: true,
        head: false,
    };
    let run =
        run_sequential_with(&mut model, &data, opts, modes, Some(&mut quant), &|_, _| {}).unwrap();
    let layers = model.config.num_layers;
    assert_eq!(calls.len(), 4 * layers, "four stages per layer");
    for (i, (l, s)) in calls.iter().enumerate() {
        assert_eq!(*l, i / 4);
        assert!(s.values().all(|v| v.stage as usize == i % 4), "call {i}");
    }
    // Coverage is recorded once per layer.
    let moe = model.config.moe.clone().unwrap();
    assert_eq!(run.coverage.experts.len(), layers * moe.num_experts);
    // Layer 0, stage 1 (o_proj): calibrated with layer 0's q/k/v quantized and nothing else.
    let mut reference = Model::load(dir.path()).unwrap();
    for module in calls[0].1.keys().filter(|m| m.ends_with("_proj")) {
        reference
            .replace_linear_weight(module, Weight::Fp4(mxfp4_of(&ck, module)))
            .unwrap();
    }
    let whole = collect(&reference, &data, opts, &|_, _| {}).unwrap();
    let bf16 = collect(&Model::load(dir.path()).unwrap(), &data, opts, &|_, _| {}).unwrap();
    let o = "model.layers.0.self_attn.o_proj";
    assert_eq!(calls[1].1[o].as_ref(), whole.get(o).unwrap());
    assert_ne!(calls[1].1[o].as_ref(), bf16.get(o).unwrap());
}

/// Route-weighted statistics: on a MoE fixture the routed experts' Hessians change and stay
/// symmetric positive on the diagonal, every other site's are identical to the unweighted
/// run's, and token counts and amax do not change.
#[test]
fn route_weighting_changes_only_routed_expert_statistics() {
    let (_dir, mut model, data) = moe_fixture(17);
    let mut runs = Vec::new();
    for route_weighted in [false, true] {
        let opts = CollectOptions {
            hessian: true,
            min_expert_tokens: 0,
            route_weighted,
        };
        let mut seen: Recorded = BTreeMap::new();
        let mut rec = |_l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
            seen.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
            Ok(Vec::new())
        };
        run_sequential(&mut model, &data, opts, Some(&mut rec), &|_, _| {}).unwrap();
        runs.push(seen);
    }
    let (plain, weighted) = (&runs[0], &runs[1]);
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        weighted.keys().collect::<Vec<_>>()
    );
    let mut experts = 0;
    for (name, p) in plain {
        let w = &weighted[name];
        assert_eq!(p.tokens, w.tokens, "{name}");
        assert_eq!(p.amax, w.amax, "{name}");
        if name.contains(".experts.") {
            experts += 1;
            assert_ne!(p.hessian, w.hessian, "{name}");
            let (hp, hw) = (p.hessian.as_ref().unwrap(), w.hessian.as_ref().unwrap());
            let k = p.second_moment.len();
            for i in 0..k {
                // Routing weights are at most 1: each diagonal term can only shrink.
                assert!(hw[i * k + i] <= hp[i * k + i] + 1e-9, "{name} ({i}, {i})");
                assert!(hw[i * k + i] >= 0.0);
                for j in 0..i {
                    assert_eq!(hw[i * k + j], hw[j * k + i]);
                }
            }
        } else {
            assert_eq!(p.as_ref(), w.as_ref(), "{name}");
        }
    }
    assert!(experts > 0, "the fixture has routed experts");
}

/// Hidden states leaving the last layer of the BF16 model, through the final norm: the
/// lm_head's inputs, sequence by sequence.
fn head_inputs(model: &mut Model, data: &CalibData) -> Vec<Vec<f32>> {
    use mimo_runtime::walk::LayerWalk;
    struct Quiet;
    impl mimo_runtime::model::LinearObserver for Quiet {
        fn observe(&mut self, _: mimo_runtime::model::Site, _: &[f32], _: usize) {}
    }
    data.sequences
        .iter()
        .map(|seq| {
            let mut x = LayerWalk::embed_tokens(model, seq).unwrap();
            for l in 0..model.config.num_layers {
                model.forward_layer_observed(l, &mut x, &mut Quiet).unwrap();
            }
            model.final_norm_rows(&mut x).unwrap();
            x
        })
        .collect()
}

/// The lm_head's statistics (`SequentialModes::head`): handed to the quantizer once, after the
/// last layer, as layer `num_layers` under "lm_head": the second moment and `sum x x^T` of the
/// final norm's output, as summed here directly from the BF16 model's rows.
#[test]
fn the_lm_head_gets_the_final_norm_outputs_statistics() {
    let (_dir, mut model, data) = moe_fixture(13);
    let want_x = head_inputs(&mut model, &data);
    let layers = model.config.num_layers;
    let k = model.config.hidden_size;
    let mut calls = Vec::new();
    let mut rec = |l: usize, s: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
        if l == layers {
            calls.push(s.clone());
        }
        Ok(Vec::new())
    };
    let opts = CollectOptions {
        hessian: true,
        ..CollectOptions::default()
    };
    let modes = SequentialModes {
        head: true,
        ..SequentialModes::default()
    };
    run_sequential_with(&mut model, &data, opts, modes, Some(&mut rec), &|_, _| {}).unwrap();
    assert_eq!(calls.len(), 1, "one head call after the last layer");
    let s = calls[0].get("lm_head").expect("statistics under lm_head");
    assert_eq!(calls[0].len(), 1);
    let rows: Vec<&[f32]> = want_x.iter().flat_map(|x| x.chunks_exact(k)).collect();
    assert_eq!(s.tokens, rows.len() as u64);
    let h = s.hessian.as_ref().expect("a Hessian");
    let mut worst = 0f64;
    for i in 0..k {
        let mut m2 = 0f64;
        for r in &rows {
            m2 += (r[i] as f64).powi(2);
        }
        let m2 = m2 / rows.len() as f64;
        worst = worst.max((s.second_moment[i] - m2).abs() / m2);
        for j in [0, i / 2, k - 1] {
            let want: f64 = rows.iter().map(|r| r[i] as f64 * r[j] as f64).sum();
            let scale = (h[i * k + i] * h[j * k + j]).sqrt();
            assert!(
                (h[i * k + j] - want).abs() <= 1e-9 * scale,
                "H[{i}, {j}] = {}, want {want}",
                h[i * k + j]
            );
        }
    }
    assert!(worst < 1e-9, "second moment off by {worst:e}");
    // Without `head` the quantizer is never asked about layer `num_layers`.
    calls.clear();
    let mut rec = |l: usize, _: &Recorded| -> Result<Vec<(String, Weight)>, SequentialError> {
        assert!(l < layers);
        Ok(Vec::new())
    };
    run_sequential(&mut model, &data, opts, Some(&mut rec), &|_, _| {}).unwrap();
}

/// GPTQ with `--quantize-lm-head`: the sequential run quantizes the lm_head too (before, the
/// conversion failed after the whole calibration for want of the head's Hessian), and its output
/// error on the calibration rows is below RTN's.
#[test]
fn gptq_quantizes_the_lm_head_from_its_statistics() {
    let (dir, mut model, data) = moe_fixture(17);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let plan = Plan::build(
        &ck,
        &PlanOptions {
            layout: Layout::CtNvfp4,
            ignore: vec![],
            quantize_lm_head: true,
            experts_only: false,
        },
    )
    .unwrap();
    let x = head_inputs(&mut model, &data);
    let (_, weights) = quantize_sequential(
        &ck,
        &plan,
        &mut model,
        &data,
        Method::Gptq,
        &GptqOptions::default(),
        CollectOptions::default(),
        None,
        false,
        &|_, _| {},
    )
    .unwrap();
    let q = weights.weights.get("lm_head").expect("lm_head quantized");
    let t = ck.tensor("lm_head.weight").unwrap();
    let w = read_weight(&t).unwrap();
    let (n, k) = (t.shape[0], t.shape[1]);
    let rtn = mimo_kernels::fp4::quantize_nvfp4(&w, n, k, q.global_scale).unwrap();
    let err = |m: &Fp4Matrix| -> f64 {
        let d = mimo_kernels::fp4::dequantize(m).unwrap();
        let mut e = 0f64;
        for row in x.iter().flat_map(|s| s.chunks_exact(k)) {
            for r in 0..n {
                let s: f64 = (0..k)
                    .map(|j| row[j] as f64 * (w[r * k + j] - d[r * k + j]) as f64)
                    .sum();
                e += s * s;
            }
        }
        e
    };
    let (eg, er) = (err(q), err(&rtn));
    eprintln!("lm_head output error: gptq {eg:.4e}, rtn {er:.4e}");
    assert!(eg < 0.9 * er, "gptq {eg} not below rtn {er}");
}
