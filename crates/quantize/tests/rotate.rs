//! `mimo-quant rotate`: the rotated checkpoint is the same model. Every fixture architecture the
//! rotation supports is rotated (with and without the per-head value rotation) and run by the
//! CPU runtime next to the original: the logits agree up to the BF16 rounding of the rotated
//! weights, while the weights themselves changed. Unsupported architectures are refused before
//! anything is written.

use std::sync::atomic::AtomicBool;

use mimo_kernels::dtype::{convert_to_vec, SrcDType};
use mimo_quant::convert::convert;
use mimo_quant::rotate::{rotate, RotateError, RotateOptions};
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::fixtures::{write_fixture, Arch};
use mimo_runtime::format::Layout;
use mimo_runtime::model::{Logits, Model};

mod common;

fn logits(dir: &std::path::Path) -> Vec<f32> {
    let m = Model::load(dir).expect("model loads");
    let mut cache = m.new_cache(64);
    m.forward(&[1, 5, 9, 3, 17, 2, 30, 11], &mut cache, Logits::All)
        .expect("forward")
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn tensor_f32(ck: &Checkpoint, name: &str) -> Vec<f32> {
    let t = ck.tensor(name).expect(name);
    convert_to_vec(SrcDType::BF16, t.data).expect(name)
}

#[test]
fn rotated_fixtures_compute_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in Arch::ALL {
        let src = tmp.path().join(arch.model_type());
        write_fixture(&src, arch, 5).unwrap();
        for heads in [true, false] {
            let dst = tmp
                .path()
                .join(format!("{}-rot-{heads}", arch.model_type()));
            let opts = RotateOptions {
                seed: 3,
                heads,
                force: false,
            };
            let r = rotate(&src, &dst, &opts);
            if matches!(arch, Arch::Mimo | Arch::DeepseekV3) {
                assert!(
                    matches!(r, Err(RotateError::Unsupported { .. })),
                    "{arch:?}: {r:?}"
                );
                assert!(!dst.exists(), "{arch:?}: refused, yet output written");
                continue;
            }
            let s = r.unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            assert_eq!(s.head_block.is_some(), heads);
            let (a, b) = (logits(&src), logits(&dst));
            let d = rel_diff(&a, &b);
            assert!(
                d < 0.01,
                "{arch:?} heads={heads}: relative logit difference {d}"
            );

            // The weights did change: rows of q_proj are rotated, norms are ones.
            let (cs, cd) = (
                Checkpoint::open(&src).unwrap(),
                Checkpoint::open(&dst).unwrap(),
            );
            let q = "model.layers.0.self_attn.q_proj.weight";
            assert!(
                rel_diff(&tensor_f32(&cs, q), &tensor_f32(&cd, q)) > 0.5,
                "{arch:?}"
            );
            let n = tensor_f32(&cd, "model.layers.1.input_layernorm.weight");
            assert!(n.iter().all(|&x| x == 1.0), "{arch:?}");
            // Every source tensor is there with its shape (and lm_head where embeddings were tied).
            for name in cs.tensor_names() {
                assert_eq!(
                    cs.tensor(name).unwrap().shape,
                    cd.tensor(name).unwrap().shape,
                    "{arch:?} {name}"
                );
            }
            assert!(cd.contains("lm_head.weight"), "{arch:?}");
            assert_ne!(
                cd.config()["tie_word_embeddings"].as_bool(),
                Some(true),
                "{arch:?}"
            );
        }
    }
}

#[test]
fn existing_output_is_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_fixture(&src, Arch::Llama, 1).unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let mut opts = RotateOptions {
        seed: 0,
        heads: true,
        force: false,
    };
    let e = rotate(&src, &dst, &opts).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    opts.force = true;
    rotate(&src, &dst, &opts).unwrap();
    assert!(dst.join("model.safetensors").is_file());
}

#[test]
fn quantized_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_fixture(&src, Arch::Llama, 1).unwrap();
    let q = tmp.path().join("q");
    let cfg = common::convert_config(&src, &q, Layout::CtNvfp4);
    convert(&cfg, &AtomicBool::new(false), &|_| {}).unwrap();
    let dst = tmp.path().join("dst");
    let opts = RotateOptions {
        seed: 0,
        heads: true,
        force: false,
    };
    match rotate(&q, &dst, &opts) {
        Err(e @ (RotateError::Dtype { .. } | RotateError::UnknownTensor { .. })) => {
            let msg = e.to_string();
            assert!(msg.contains("model.layers."), "{msg}");
        }
        r => panic!("a quantized checkpoint was rotated: {r:?}"),
    }
    assert!(!dst.exists());
}
