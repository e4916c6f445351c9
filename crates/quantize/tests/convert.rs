//! End-to-end tests of the converter: every fixture architecture in every layout, reloaded
//! through `mimo_runtime::format`; determinism across thread counts; every bad input with its
//! error; and the built `mimo-quant` binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use half::bf16;
use mimo_kernels::dtype::{convert_to_vec, SrcDType};
use mimo_kernels::fp4::dequantize;
use mimo_quant::arch::is_routed_expert;
use mimo_quant::convert::{convert, ConvertConfig, ConvertError, ConvertSummary};
use mimo_quant::manifest::Manifest;
use mimo_quant::plan::PlanError;
use mimo_quant::quantizer::QuantError;
use mimo_runtime::checkpoint::{
    write_safetensors, Checkpoint, CheckpointError, DType, HeaderEntry, CONFIG_FILE, SINGLE_FILE,
};
use mimo_runtime::fixtures::{spec, write_fixture, write_spec, Arch, WriteOptions};
use mimo_runtime::format::{
    detect, load_linear, quantized_modules, read_global_scale, Detected, Layout,
};

mod common;
use common::convert_config as cfg;

fn run(c: &ConvertConfig) -> Result<ConvertSummary, ConvertError> {
    convert(c, &AtomicBool::new(false), &|_| {})
}

/// Nothing but the given names is left in `dir` (no temporary folders).
fn only(dir: &Path, names: &[&str]) {
    let mut got: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want);
}

fn group_of(module: &str) -> Option<String> {
    mimo_quant::arch::fused_group(module)
}

#[test]
fn every_architecture_in_every_layout_reloads() {
    for arch in Arch::ALL {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write_fixture(&src, arch, 42).unwrap();
        let source = Checkpoint::open(&src).unwrap();
        for layout in Layout::ALL {
            let out = d.path().join(layout.name());
            let s =
                run(&cfg(&src, &out, layout)).unwrap_or_else(|e| panic!("{arch:?} {layout}: {e}"));
            assert!(s.totals.quantized > 0, "{arch:?}");
            let ck = Checkpoint::open(&out).unwrap();
            assert_eq!(detect(&ck), Detected::Fp4(layout), "{arch:?} {layout}");
            let qc = &ck.config()["quantization_config"];
            assert!(qc.is_object());
            // Every Linear of the source is either quantized or in the ignore list.
            let modules = quantized_modules(&ck, layout);
            assert_eq!(modules.len(), s.totals.quantized);
            let ignore: Vec<String> = serde_json::from_value(qc["ignore"].clone()).unwrap();
            assert!(
                ignore.contains(&"lm_head".to_string()) || arch == Arch::Qwen3,
                "{arch:?}"
            );
            let mut shared: BTreeMap<String, f32> = BTreeMap::new();
            for m in &modules {
                let q = load_linear(&ck, layout, m).unwrap();
                let t = source.tensor(&format!("{m}.weight")).unwrap();
                assert_eq!(t.shape, [q.n, q.k]);
                let orig = convert_to_vec(SrcDType::BF16, t.data).unwrap();
                let deq = dequantize(&q).unwrap();
                let (mut sig, mut noise) = (0f64, 0f64);
                for (a, b) in orig.iter().zip(&deq) {
                    sig += (*a as f64).powi(2);
                    noise += ((a - b) as f64).powi(2);
                }
                let sqnr = 10.0 * (sig / noise).log10();
                // RTN FP4 on bell-shaped data gives about 16-22 dB; far less means a wrong layout.
                assert!(sqnr > 12.0, "{arch:?} {layout} {m}: {sqnr:.1} dB");
                if let (Some(g), Some(gs)) =
                    (group_of(m), read_global_scale(&ck, layout, m).unwrap())
                {
                    let prev = *shared.entry(g.clone()).or_insert(gs);
                    assert_eq!(
                        prev, gs,
                        "{arch:?} {layout}: fused set {g} does not share its global scale"
                    );
                }
            }
            // Kept tensors are byte-identical.
            for name in source.tensor_names() {
                if let Ok(t) = ck.tensor(name) {
                    if t.dtype == DType::BF16 {
                        assert_eq!(t.data, source.tensor(name).unwrap().data, "{name}");
                    }
                }
            }
            // The manifest lists every file with its hash, and verify agrees.
            let man = Manifest::read(&out).unwrap();
            assert_eq!(
                man.files.len(),
                std::fs::read_dir(&out).unwrap().count() - 1
            );
            let r = mimo_quant::verify::verify(&out, Some(&src)).unwrap();
            assert!(r.ok, "{arch:?} {layout}: {:?}", r.problems);
            assert_eq!(r.modules_checked, modules.len());
            assert!(out.join("generation_config.json").exists());
            assert_eq!(
                out.join("hf_quant_config.json").exists(),
                layout == Layout::ModelOptNvfp4
            );
        }
    }
}

#[test]
fn mixtral_and_deepseek_fused_sets() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::Mixtral, 1).unwrap();
    let out = d.path().join("out");
    run(&cfg(&src, &out, Layout::CtNvfp4)).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let g = |m: &str| read_global_scale(&ck, Layout::CtNvfp4, m).unwrap().unwrap();
    let e = "model.layers.1.block_sparse_moe.experts.2";
    assert_eq!(g(&format!("{e}.w1")), g(&format!("{e}.w3")));
    let a = "model.layers.0.self_attn";
    assert_eq!(g(&format!("{a}.q_proj")), g(&format!("{a}.v_proj")));
    // The shared value is the minimum of the members' own global scales (llm-compressor).
    let source = Checkpoint::open(&src).unwrap();
    let own = |m: &str| {
        let t = source.tensor(&format!("{m}.weight")).unwrap();
        let a = mimo_quant::quantizer::amax(&t).unwrap();
        mimo_quant::quantizer::own_scale(Layout::CtNvfp4, a, SrcDType::BF16).unwrap()
    };
    let want = own(&format!("{e}.w1")).min(own(&format!("{e}.w3")));
    assert_eq!(g(&format!("{e}.w1")), want);
    // w2 is not fused: its own scale.
    assert_eq!(g(&format!("{e}.w2")), own(&format!("{e}.w2")));
}

#[test]
fn sharded_output_with_index() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_spec(
        &src,
        &spec(Arch::Qwen3Moe),
        WriteOptions {
            seed: 3,
            max_shard_bytes: Some(150_000),
        },
    )
    .unwrap();
    let out = d.path().join("out");
    let mut c = cfg(&src, &out, Layout::CtMxfp4);
    c.max_shard_size = 40_000;
    let s = run(&c).unwrap();
    let shards = s
        .files
        .iter()
        .filter(|f| f.name.ends_with(".safetensors"))
        .count();
    assert!(shards > 1, "{shards}");
    assert!(out.join("model.safetensors.index.json").exists());
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.files().count(), shards);
    for f in ck.files() {
        // A shard exceeds the limit only when a single tensor group does.
        assert!(std::fs::metadata(f).unwrap().len() < 40_000 + 20_000);
    }
    assert!(mimo_quant::verify::verify(&out, Some(&src)).unwrap().ok);
}

fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn output_is_identical_on_one_and_two_threads() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::DeepseekV3, 9).unwrap();
    for layout in Layout::ALL {
        let mut trees = Vec::new();
        for threads in [1, 2] {
            let out = d.path().join(format!("out-{}-{threads}", layout.name()));
            let mut c = cfg(&src, &out, layout);
            c.max_shard_size = 60_000;
            // Same output path name in both runs would be needed for the manifest only if it
            // recorded the output path; it records the source path, which is the same.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(&c)).unwrap();
            trees.push(read_tree(&out));
        }
        assert!(trees[0].len() > 3);
        assert_eq!(trees[0], trees[1], "{layout}");
    }
}

// ---- bad input ----

fn fixture(d: &Path) -> PathBuf {
    let src = d.join("src");
    write_fixture(&src, Arch::Llama, 5).unwrap();
    src
}

fn fails(src: &Path, d: &Path) -> ConvertError {
    let out = d.join("out");
    let e = run(&cfg(src, &out, Layout::CtNvfp4)).unwrap_err();
    assert!(!out.exists());
    // No temporary folder left next to the output.
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter()
            .all(|n| !n.to_string_lossy().contains("mimo-quant-tmp")),
        "{left:?}"
    );
    e
}

#[test]
fn missing_config() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    std::fs::remove_file(src.join(CONFIG_FILE)).unwrap();
    let e = fails(&src, d.path());
    assert!(
        matches!(
            e,
            ConvertError::Checkpoint(CheckpointError::MissingConfig { .. })
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("{}: no config.json in the checkpoint folder", src.display())
    );
}

#[test]
fn index_naming_a_missing_shard() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_spec(
        &src,
        &spec(Arch::Llama),
        WriteOptions {
            seed: 1,
            max_shard_bytes: Some(200_000),
        },
    )
    .unwrap();
    let mut shards: Vec<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-"))
        .collect();
    shards.sort();
    assert!(shards.len() > 1);
    let shard = shards[1].as_str();
    std::fs::remove_file(src.join(shard)).unwrap();
    let e = fails(&src, d.path());
    assert!(
        matches!(&e, ConvertError::Checkpoint(CheckpointError::MissingShard { shard: s, .. }) if s == shard),
        "{e}"
    );
    assert!(
        e.to_string().contains("model.safetensors.index.json") && e.to_string().contains(shard),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let p = src.join(SINGLE_FILE);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = fails(&src, d.path());
    assert!(
        matches!(&e, ConvertError::Checkpoint(CheckpointError::Truncated { tensor, .. }) if !tensor.is_empty()),
        "{e}"
    );
    assert!(
        e.to_string().contains("truncated") && e.to_string().contains("model.safetensors"),
        "{e}"
    );
}

/// Replaces the header of the fixture's single file, keeping its data.
fn rewrite_header(src: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = src.join(SINGLE_FILE);
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h);
    let mut text = h.to_string().into_bytes();
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

#[test]
fn invalid_header_json() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let p = src.join(SINGLE_FILE);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = b'['; // the header's opening brace
    std::fs::write(&p, bytes).unwrap();
    let e = fails(&src, d.path());
    assert!(
        matches!(
            e,
            ConvertError::Checkpoint(CheckpointError::HeaderJson { .. })
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("{}: invalid safetensors header JSON", p.display())),
        "{e}"
    );
}

#[test]
fn out_of_range_offsets() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let name = "model.layers.1.mlp.up_proj.weight";
    rewrite_header(&src, |h| {
        let o = h[name]["data_offsets"].as_array().unwrap().clone();
        let len = o[1].as_u64().unwrap() - o[0].as_u64().unwrap();
        h[name]["data_offsets"] = serde_json::json!([10_000_000, 10_000_000 + len]);
    });
    let e = fails(&src, d.path());
    assert!(
        matches!(&e, ConvertError::Checkpoint(CheckpointError::OffsetsOutOfRange { tensor, .. }) if tensor == name),
        "{e}"
    );
}

#[test]
fn overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let a = "model.layers.0.self_attn.q_proj.weight";
    let b = "model.layers.0.self_attn.o_proj.weight";
    rewrite_header(&src, |h| {
        h[b]["data_offsets"] = h[a]["data_offsets"].clone();
    });
    let e = fails(&src, d.path());
    assert!(
        matches!(
            &e,
            ConvertError::Checkpoint(CheckpointError::Overlap { .. })
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains(a) || e.to_string().contains(b),
        "{e}"
    );
}

/// A one-layer checkpoint with chosen dtype/values for one Linear.
fn custom(d: &Path, dtype: DType, shape: [usize; 2], value: impl Fn(usize) -> f32) -> PathBuf {
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join(CONFIG_FILE),
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let n = shape[0] * shape[1];
    let data: Vec<u8> = match dtype {
        DType::BF16 => (0..n)
            .flat_map(|i| bf16::from_f32(value(i)).to_le_bytes())
            .collect(),
        DType::F32 => (0..n).flat_map(|i| value(i).to_le_bytes()).collect(),
        DType::F16 => (0..n)
            .flat_map(|i| half::f16::from_f32(value(i)).to_le_bytes())
            .collect(),
        DType::F64 => (0..n)
            .flat_map(|i| (value(i) as f64).to_le_bytes())
            .collect(),
        DType::I32 => (0..n).flat_map(|i| (i as i32).to_le_bytes()).collect(),
        _ => unreachable!(),
    };
    let good: Vec<u8> = (0..64 * 64)
        .flat_map(|i| bf16::from_f32((i % 7) as f32 * 0.01).to_le_bytes())
        .collect();
    let t = |name: &str, dtype, shape: Vec<usize>| HeaderEntry {
        name: name.into(),
        dtype,
        shape,
    };
    write_safetensors(
        &src.join(SINGLE_FILE),
        &[
            (
                t("model.layers.0.mlp.up_proj.weight", dtype, shape.to_vec()),
                data,
            ),
            (
                t(
                    "model.layers.0.mlp.down_proj.weight",
                    DType::BF16,
                    vec![64, 64],
                ),
                good,
            ),
        ],
        &[],
    )
    .unwrap();
    src
}

#[test]
fn f16_and_f32_sources_are_quantized() {
    for dtype in [DType::F16, DType::F32] {
        let d = tempfile::tempdir().unwrap();
        let src = custom(d.path(), dtype, [64, 64], |i| {
            ((i * 7919) % 101) as f32 * 0.001 - 0.05
        });
        for layout in Layout::ALL {
            let out = d.path().join(layout.name());
            let s = run(&cfg(&src, &out, layout)).unwrap();
            assert_eq!(s.totals.quantized, 2, "{dtype} {layout}");
            let r = mimo_quant::verify::verify(&out, Some(&src)).unwrap();
            assert!(r.ok, "{dtype} {layout}: {:?}", r.problems);
            let e = r
                .errors
                .iter()
                .find(|e| e.0 == "model.layers.0.mlp.up_proj")
                .unwrap();
            assert!(e.1.sqnr_db > 12.0, "{dtype} {layout}: {:?}", e.1);
        }
    }
}

#[test]
fn unsupported_dtype() {
    let d = tempfile::tempdir().unwrap();
    let src = custom(d.path(), DType::F64, [64, 64], |i| i as f32);
    let e = fails(&src, d.path());
    assert!(
        matches!(&e, ConvertError::Plan(PlanError::UnsupportedDType { tensor, dtype: DType::F64, .. }) if tensor == "model.layers.0.mlp.up_proj.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

/// A source whose up_proj holds `bad` at element `at` (dtype `dtype`).
fn with_bad_value(d: &Path, dtype: DType, at: usize, bad: f32) -> PathBuf {
    custom(d, dtype, [64, 64], |i| if i == at { bad } else { 0.01 })
}

#[test]
fn nan_and_inf_weights() {
    for (bad, dtype) in [
        (f32::NAN, DType::BF16),
        (f32::INFINITY, DType::BF16),
        (f32::NEG_INFINITY, DType::F32),
    ] {
        let d = tempfile::tempdir().unwrap();
        let src = with_bad_value(d.path(), dtype, 100, bad);
        let e = fails(&src, d.path());
        assert!(
            matches!(&e, ConvertError::Quant(QuantError::NonFinite { tensor, index: 100, .. }) if tensor == "model.layers.0.mlp.up_proj.weight"),
            "{e}"
        );
        assert!(
            e.to_string().contains("model.safetensors") && e.to_string().contains("non-finite"),
            "{e}"
        );
    }
}

#[test]
fn nan_and_inf_in_kept_tensors() {
    // A tensor kept in BF16 (here by --ignore) is copied, not quantized: a non-finite value in
    // it is refused just the same, not passed on to the output.
    for (bad, dtype) in [(f32::NAN, DType::BF16), (f32::INFINITY, DType::F32)] {
        let d = tempfile::tempdir().unwrap();
        let src = with_bad_value(d.path(), dtype, 9, bad);
        let out = d.path().join("out");
        let mut c = cfg(&src, &out, Layout::CtNvfp4);
        c.plan.ignore = vec!["model.layers.0.mlp.up_proj".into()];
        let e = run(&c).unwrap_err();
        assert!(
            matches!(&e, ConvertError::Quant(QuantError::NonFinite { tensor, index: 9, .. }) if tensor == "model.layers.0.mlp.up_proj.weight"),
            "{e}"
        );
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        assert!(!out.exists());
        // The same source converts once the tensor is finite.
        custom(d.path(), dtype, [64, 64], |_| 0.01);
        run(&c).unwrap();
    }
}

#[test]
fn a_checkpoint_without_tensors_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join(CONFIG_FILE),
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    write_safetensors(&src.join(SINGLE_FILE), &[], &[]).unwrap();
    let e = fails(&src, d.path());
    assert!(
        matches!(&e, ConvertError::Plan(PlanError::NoTensors { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("no tensors"), "{e}");
}

#[test]
fn verify_finds_a_non_finite_kept_tensor() {
    // Written by another tool (or altered afterwards): verify reads every float tensor.
    let d = tempfile::tempdir().unwrap();
    let src = custom(d.path(), DType::BF16, [64, 64], |_| 0.01);
    let out = d.path().join("out");
    let mut c = cfg(&src, &out, Layout::CtNvfp4);
    c.plan.ignore = vec!["model.layers.0.mlp.up_proj".into()];
    run(&c).unwrap();
    assert!(mimo_quant::verify::verify(&out, None).unwrap().ok);
    let shard = out.join(SINGLE_FILE);
    let mut bytes = std::fs::read(&shard).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let at = 8 + hlen + header[name]["data_offsets"][0].as_u64().unwrap() as usize + 2 * 5;
    bytes[at..at + 2].copy_from_slice(&bf16::NAN.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::remove_file(out.join("mimo-quant.json")).unwrap();
    let r = mimo_quant::verify::verify(&out, None).unwrap();
    assert!(!r.ok);
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains(name) && p.contains("non-finite") && p.contains("element 5")),
        "{:?}",
        r.problems
    );
}

#[test]
fn dimension_not_divisible_is_kept_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let src = custom(d.path(), DType::BF16, [64, 48], |i| (i % 13) as f32 * 0.01);
    let out = d.path().join("out");
    // 48 is a multiple of 16 (NVFP4) but not of 32 (MXFP4).
    let s = run(&cfg(&src, &out, Layout::CtMxfp4)).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains("model.layers.0.mlp.up_proj.weight") && w.contains("not divisible")), "{:?}", s.warnings);
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(
        ck.tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .dtype,
        DType::BF16
    );
    assert!(ck.contains("model.layers.0.mlp.down_proj.weight_packed"));
    let ignore = &ck.config()["quantization_config"]["ignore"];
    assert!(ignore
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "model.layers.0.mlp.up_proj"));
    let out2 = d.path().join("out2");
    let s = run(&cfg(&src, &out2, Layout::CtNvfp4)).unwrap();
    assert_eq!(s.totals.quantized, 2);
}

#[test]
fn already_quantized_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let q = d.path().join("q");
    run(&cfg(&src, &q, Layout::CtNvfp4)).unwrap();
    let out = d.path().join("again");
    let e = run(&cfg(&q, &out, Layout::CtMxfp4)).unwrap_err();
    assert!(
        matches!(&e, ConvertError::Plan(PlanError::AlreadyQuantized { what, .. }) if what == "nvfp4-pack-quantized"),
        "{e}"
    );
    assert!(!out.exists());
    // Without its config entry the tensors still give it away.
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join(CONFIG_FILE)).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(q.join(CONFIG_FILE), c.to_string()).unwrap();
    assert!(matches!(
        run(&cfg(&q, &out, Layout::CtMxfp4)),
        Err(ConvertError::Plan(PlanError::AlreadyQuantized { .. }))
    ));
}

#[test]
fn existing_output_needs_force_and_interrupt_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let out = d.path().join("out");
    run(&cfg(&src, &out, Layout::CtNvfp4)).unwrap();
    let e = run(&cfg(&src, &out, Layout::CtNvfp4)).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let mut c = cfg(&src, &out, Layout::CtMxfp4);
    c.force = true;
    run(&c).unwrap();
    assert_eq!(
        detect(&Checkpoint::open(&out).unwrap()),
        Detected::Fp4(Layout::CtMxfp4)
    );
    // A cancelled run removes its temporary folder and leaves the old output alone.
    let out2 = d.path().join("out2");
    let e = convert(
        &cfg(&src, &out2, Layout::CtNvfp4),
        &AtomicBool::new(true),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(e, ConvertError::Interrupted));
    only(d.path(), &["src", "out"]);
}

#[test]
fn ignore_patterns_and_lm_head() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let out = d.path().join("out");
    let mut c = cfg(&src, &out, Layout::CtNvfp4);
    c.plan.ignore = vec!["*.layers.0.*".into(), "*down_proj".into()];
    c.plan.quantize_lm_head = true;
    run(&c).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.contains("lm_head.weight_packed"));
    assert!(ck.contains("model.layers.0.self_attn.q_proj.weight"));
    assert!(ck.contains("model.layers.1.mlp.down_proj.weight"));
    assert!(ck.contains("model.layers.1.mlp.up_proj.weight_packed"));
    let mut bad = cfg(&src, &d.path().join("x"), Layout::CtNvfp4);
    bad.plan.ignore = vec!["[".into()];
    assert!(matches!(
        run(&bad),
        Err(ConvertError::Plan(PlanError::BadIgnore { .. }))
    ));
}

/// `--experts-only`: the routed experts are quantized and nothing else (attention, the dense
/// MLPs of DeepSeek's first layers and its shared experts stay as they were); a model without
/// routed experts is refused before anything is written.
#[test]
fn experts_only_quantizes_the_routed_experts_alone() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::DeepseekV3, 9).unwrap();
    let out = d.path().join("out");
    let mut c = cfg(&src, &out, Layout::CtNvfp4);
    c.plan.experts_only = true;
    run(&c).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let packed: Vec<&str> = ck
        .tensor_names()
        .filter_map(|n| n.strip_suffix(".weight_packed"))
        .collect();
    assert!(!packed.is_empty());
    for m in &packed {
        assert!(is_routed_expert(m), "{m} quantized");
    }
    let dense = |part: &str| {
        ck.tensor_names()
            .any(|n| n.contains(part) && n.ends_with("_proj.weight"))
    };
    assert!(dense(".self_attn."), "attention kept dense");
    assert!(dense(".shared_experts."), "shared experts kept dense");
    assert!(Manifest::read(&out).unwrap().options.experts_only);
    let llama = fixture(d.path());
    let mut c = cfg(&llama, &d.path().join("x"), Layout::CtNvfp4);
    c.plan.experts_only = true;
    assert!(matches!(
        run(&c),
        Err(ConvertError::Plan(PlanError::NoExperts { .. }))
    ));
    assert!(!d.path().join("x").exists());
}

/// The runtime's load-time memory check reads back which parts a conversion left dense: all
/// FP4 (lm_head BF16, as written by default), `--experts-only`, and k/v ignored.
#[test]
fn runtime_reads_back_which_parts_are_fp4() {
    use mimo_kernels::Fp4Format::Nvfp4;
    use mimo_runtime::cuda::{checkpoint_formats, Formats};
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 4).unwrap();
    let formats = |name: &str, f: &dyn Fn(&mut ConvertConfig)| {
        let out = d.path().join(name);
        let mut c = cfg(&src, &out, Layout::CtNvfp4);
        f(&mut c);
        run(&c).unwrap();
        checkpoint_formats(&Checkpoint::open(&out).unwrap()).unwrap()
    };
    let nv = Some(Nvfp4);
    // The fixture has no dense MLP or shared expert: `mlp` has nothing to read and stays None.
    let all = Formats {
        mlp: None,
        ..Formats::uniform(nv, false)
    };
    assert_eq!(formats("all", &|_| {}), all);
    assert_eq!(
        formats("experts", &|c| c.plan.experts_only = true),
        Formats {
            experts: nv,
            ..Formats::default()
        }
    );
    assert_eq!(
        formats("kv", &|c| c.plan.ignore =
            vec!["*k_proj*".into(), "*v_proj*".into()]),
        Formats { kv: None, ..all }
    );
    // Only v kept dense: the k/v pair counts as dense (an estimate errs on the safe side).
    assert_eq!(
        formats("v", &|c| c.plan.ignore = vec!["*v_proj*".into()]),
        Formats { kv: None, ..all }
    );
    assert_eq!(
        checkpoint_formats(&Checkpoint::open(&src).unwrap()).unwrap(),
        Formats::default()
    );
}

/// The plan's batch-1 decode bytes: every tensor, the routed experts at `top_k / experts` of
/// their bytes, one row of the untied embedding; counted by hand from the source tensors.
#[test]
fn plan_counts_the_bytes_a_decode_token_reads() {
    use mimo_quant::plan::Plan;
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 3).unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let config = ck.config().clone();
    let (k, e) = (
        config["num_experts_per_tok"].as_u64().unwrap() as f64,
        config["num_experts"].as_u64().unwrap() as f64,
    );
    assert!(k < e && !config["tie_word_embeddings"].as_bool().unwrap_or(false));
    let plan = |experts_only| {
        let mut o = cfg(&src, &d.path().join("out"), Layout::CtNvfp4).plan;
        o.experts_only = experts_only;
        Plan::build(&ck, &o).unwrap()
    };
    let p = plan(false);
    let (mut want_in, mut want_out) = (0.0, 0.0);
    for (i, en) in p.entries.iter().enumerate() {
        let share = if en.name.contains(".experts.") {
            k / e
        } else if en.name == "model.embed_tokens.weight" {
            1.0 / en.shape[0] as f64
        } else {
            1.0
        };
        want_in += share * en.bytes_in() as f64;
        want_out += share * p.bytes_out(i) as f64;
    }
    let t = p.totals();
    assert_eq!(t.decode_bytes_in, want_in.round() as u64);
    assert_eq!(t.decode_bytes_out, want_out.round() as u64);
    assert!(t.decode_bytes_in < t.bytes_in && t.decode_bytes_out < t.decode_bytes_in);
    // Keeping attention dense reads more per token, from the same source bytes.
    let x = plan(true).totals();
    assert_eq!(x.decode_bytes_in, t.decode_bytes_in);
    assert!(x.decode_bytes_out > t.decode_bytes_out);
}

#[test]
fn unknown_architecture_uses_the_generic_rule() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture(d.path());
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()).unwrap();
    c["model_type"] = "my_new_model".into();
    c["architectures"] = serde_json::json!(["MyNewModelForCausalLM"]);
    std::fs::write(src.join(CONFIG_FILE), c.to_string()).unwrap();
    let s = run(&cfg(&src, &d.path().join("out"), Layout::CtNvfp4)).unwrap();
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("unknown architecture")));
    assert_eq!(s.totals.quantized, 14);
}

// ---- the binary ----

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mimo-quant"))
}

#[test]
fn cli_fixture_plan_convert_inspect_verify() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("mimo");
    let st = bin()
        .args(["fixture", "--arch", "mimo"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let o = bin().arg("plan").arg(&src).arg("--json").output().unwrap();
    assert!(o.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(plan["bits_per_weight"].as_f64().unwrap() < 16.0);
    let out = d.path().join("out");
    let o = bin()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .args(["--json", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["layout"], "nvfp4-pack-quantized");
    assert!(s["min_sqnr_db"].as_f64().unwrap() > 12.0);
    // Refused without --force, exit code 2 and a message naming the folder.
    let o = bin()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .arg("--quiet")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let o = bin().arg("inspect").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("MiMoForCausalLM") && text.contains("nvfp4-pack-quantized"),
        "{text}"
    );
    let o = bin()
        .arg("verify")
        .arg(&out)
        .arg("--source")
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // A corrupted shard fails verification.
    let p = out.join(SINGLE_FILE);
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let o = bin().arg("verify").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sha256"));
    // MXFP4 in ModelOpt layout is refused with a clear message.
    let o = bin()
        .arg("convert")
        .arg(&src)
        .arg("-o")
        .arg(d.path().join("x"))
        .args(["--format", "mxfp4", "--layout", "modelopt"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NVFP4 only"));
}

/// A reader that closes the pipe early (`| head`) ends the output quietly: status 0, no panic.
#[test]
fn cli_output_into_a_closed_pipe_is_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("llama");
    write_fixture(&src, Arch::Llama, 4).unwrap();
    for args in [vec!["plan"], vec!["inspect"]] {
        let mut child = bin()
            .args(&args)
            .arg(&src)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the tool has written anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
    }
}

/// A fused set (q/k/v, gate/up) split between FP4 and dense by `--ignore` is warned about once,
/// naming a set and its members (vLLM and SGLang refuse such a set); whole sets kept dense
/// (`--ignore '*self_attn*'`, `--experts-only`) or an unfused Linear alone (`*o_proj*`) are not.
#[test]
fn partly_quantized_fused_sets_are_warned_about() {
    use mimo_quant::plan::{Plan, PlanOptions};
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 3).unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let base = cfg(&src, &d.path().join("out"), Layout::CtNvfp4).plan;
    let warning = |ignore: &[&str], experts_only: bool| -> Vec<String> {
        let opts = PlanOptions {
            ignore: ignore.iter().map(|s| s.to_string()).collect(),
            experts_only,
            ..base.clone()
        };
        let plan = Plan::build(&ck, &opts).unwrap();
        plan.warnings
            .into_iter()
            .filter(|w| w.contains("partly quantized"))
            .collect()
    };
    let kv = warning(&["*k_proj*", "*v_proj*"], false);
    assert_eq!(kv.len(), 1, "{kv:?}");
    assert!(
        kv[0].contains("self_attn.qkv: q_proj FP4, k_proj/v_proj kept dense"),
        "{}",
        kv[0]
    );
    assert!(kv[0].contains("vLLM and SGLang"), "{}", kv[0]);
    let gate = warning(&["*experts.0.gate_proj"], false);
    assert_eq!(gate.len(), 1, "{gate:?}");
    assert!(
        gate[0].contains("up_proj FP4, gate_proj kept dense"),
        "{}",
        gate[0]
    );
    for (ignore, experts_only) in [
        (&[][..], false),
        (&["*self_attn*"][..], false),
        (&["*o_proj*"][..], false),
        (&[][..], true),
    ] {
        assert!(
            warning(ignore, experts_only).is_empty(),
            "{ignore:?} {experts_only}"
        );
    }
}

/// The embedded model, and a recipe in `dir` that draws `samples` of the embedded set (seed
/// `seed`) and has the model continue their first `words` words by `new_tokens` tokens.
fn generating_recipe(
    dir: &Path,
    samples: usize,
    seed: u64,
    words: usize,
    new_tokens: usize,
) -> (PathBuf, PathBuf) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mimo-tiny-moe");
    let recipe = dir.join("self.json");
    let r = serde_json::json!({"data": "mimo-calib.jsonl", "samples": samples, "seq_len": 64,
        "seed": seed, "generate": {"prompt_words": words, "new_tokens": new_tokens}});
    std::fs::write(&recipe, r.to_string()).unwrap();
    (model, recipe)
}

/// `convert --calib RECIPE` with a `generate` object (the model writes its own calibration
/// text): the manifest records the recipe with it, and 1 and 2 threads give byte-identical
/// files (the CPU's text does not depend on the thread count).
#[test]
fn cli_self_generated_calibration_is_recorded_and_thread_independent() {
    let d = tempfile::tempdir().unwrap();
    let (model, recipe) = generating_recipe(d.path(), 8, 11, 4, 16);
    let run = |threads: &str| {
        let out = d.path().join(format!("out{threads}"));
        let o = bin()
            .arg("convert")
            .arg(&model)
            .arg("-o")
            .arg(&out)
            .args([
                "--method",
                "gptq",
                "--calib-device",
                "cpu",
                "--quiet",
                "--threads",
                threads,
            ])
            .arg("--calib")
            .arg(&recipe)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (one, two) = (run("1"), run("2"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("mimo-quant.json")).unwrap()).unwrap();
    let cal = &manifest["calibration"];
    assert_eq!(cal["recipe"]["generate"]["new_tokens"], 16, "{cal}");
    let mut names: Vec<_> = std::fs::read_dir(&one)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        let (a, b) = (
            std::fs::read(one.join(&n)).unwrap(),
            std::fs::read(two.join(&n)).unwrap(),
        );
        assert!(a == b, "{n:?} differs between 1 and 2 threads");
    }
}

/// `calibrate --save-text FILE` writes the samples (here the model's own text) as jsonl that
/// `--calib FILE` reads back, and never overwrites an existing file.
#[test]
fn cli_calibrate_saves_the_generated_text() {
    let d = tempfile::tempdir().unwrap();
    let (model, recipe) = generating_recipe(d.path(), 5, 3, 3, 12);
    let text = d.path().join("text.jsonl");
    let calibrate = |calib: &Path| {
        bin()
            .arg("calibrate")
            .arg(&model)
            .args(["--device", "cpu", "--quiet", "--json", "--save-text"])
            .arg(&text)
            .arg("--calib")
            .arg(calib)
            .output()
            .unwrap()
    };
    let o = calibrate(&recipe);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved = std::fs::read_to_string(&text).unwrap();
    let samples = mimo_quant::calib::data::parse_jsonl(&saved, &text).unwrap();
    assert_eq!(samples.len(), 5);
    let set = mimo_quant::calib::data::parse_jsonl(
        mimo_quant::calib::data::EMBEDDED_SET,
        Path::new("embedded"),
    )
    .unwrap();
    for s in &samples {
        // Each is an opening of the embedded set, continued by the model.
        let opening = set
            .iter()
            .map(|e| mimo_quant::calib::selfgen::prompt_of(&e.text, 3))
            .find(|p| s.text.starts_with(p));
        assert!(
            opening.is_some_and(|p| s.text.len() > p.len()),
            "{:?}",
            s.text
        );
    }
    // The file is not overwritten; the saved text calibrates as a file of its own.
    let again = calibrate(&recipe);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&text).unwrap(), saved);
    let o = bin()
        .arg("calibrate")
        .arg(&model)
        .args(["--device", "cpu", "--quiet", "--json", "--calib"])
        .arg(&text)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["tokens"].as_u64().unwrap() > 5 * 12, "{v}");
}
