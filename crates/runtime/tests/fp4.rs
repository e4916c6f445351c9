//! FP4 checkpoints end to end: a fixture's Linear weights are quantized (mimo_kernels) and written
//! in each on-disk layout (names from `format`); the runtime must load them packed and produce the
//! same logits as a dense F32 checkpoint holding the dequantized weights. Also: a corrupt FP4
//! scale is a load error naming the tensor.

use std::path::Path;

use mimo_kernels::{Fp4Format, Fp4Matrix, SrcDType};
use mimo_runtime::checkpoint::{write_safetensors, Checkpoint, DType, HeaderEntry};
use mimo_runtime::fixtures::{self, Arch as FixArch};
use mimo_runtime::format::{self, Layout};
use mimo_runtime::model::{Logits, Model};
use mimo_runtime::weights::LoadError;

const TOKENS: [u32; 10] = [1, 17, 42, 99, 5, 200, 3, 128, 64, 7];

/// Linear weights that usual recipes quantize (not embeddings, lm_head, norms or routers).
fn is_quantized_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && name.starts_with("model.layers.")
        && !name.ends_with("mlp.gate.weight")
        && !name.ends_with("block_sparse_moe.gate.weight")
        && !name.ends_with("shared_expert_gate.weight")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `src` quantized in `layout` to `fp4_dir`, and the dequantized weights as dense F32 to
/// `ref_dir`. `corrupt` sets the first block scale of the first quantized tensor to NaN (0x7F).
fn quantize_checkpoint(src: &Path, fp4_dir: &Path, ref_dir: &Path, layout: Layout, corrupt: bool) {
    let ck = Checkpoint::open(src).unwrap();
    let (mut q, mut r) = (Vec::new(), Vec::new());
    let mut quantized = Vec::new();
    let mut corrupted = false;
    for name in ck.tensor_names() {
        let t = ck.tensor(name).unwrap();
        assert_eq!(t.dtype, DType::BF16);
        let vals = mimo_kernels::dtype::convert_to_vec(SrcDType::BF16, t.data).unwrap();
        if !is_quantized_linear(name, t.shape) {
            let e = HeaderEntry {
                name: name.to_string(),
                dtype: DType::BF16,
                shape: t.shape.to_vec(),
            };
            q.push((e.clone(), t.data.to_vec()));
            r.push((e, t.data.to_vec()));
            continue;
        }
        let (n, k) = (t.shape[0], t.shape[1]);
        let module = name.strip_suffix(".weight").unwrap().to_string();
        let (mut m, global): (Fp4Matrix, Option<f32>) = match layout {
            Layout::CtNvfp4 => {
                let gs = mimo_kernels::nvfp4_global_scale(mimo_kernels::fp4::amax(&vals));
                (
                    mimo_kernels::quantize_nvfp4(&vals, n, k, gs).unwrap(),
                    Some(gs),
                )
            }
            Layout::CtMxfp4 => (mimo_kernels::quantize_mxfp4(&vals, n, k).unwrap(), None),
            Layout::ModelOptNvfp4 => {
                let (m, ws2) = mimo_kernels::quantize_nvfp4_modelopt(&vals, n, k).unwrap();
                (m, Some(ws2))
            }
        };
        if corrupt && !corrupted {
            m.scales[0] = 0x7F;
            corrupted = true;
        }
        let entries = layout.tensor_entries(&module, n, k);
        let mut data = vec![m.packed.clone(), m.scales.clone()];
        if let Some(g) = global {
            data.push(g.to_le_bytes().to_vec());
        }
        assert_eq!(entries.len(), data.len(), "{:?}", entries);
        q.extend(entries.into_iter().zip(data));
        if !corrupt {
            // The reference holds exactly what the loader will multiply with.
            let deq = mimo_kernels::dequantize(&m).unwrap();
            let e = HeaderEntry {
                name: name.to_string(),
                dtype: DType::F32,
                shape: vec![n, k],
            };
            r.push((e, f32_bytes(&deq)));
        }
        quantized.push(module);
    }
    let cfg: serde_json::Value = ck.config().clone();
    for (dir, tensors, quant) in [(fp4_dir, q, true), (ref_dir, r, false)] {
        std::fs::create_dir_all(dir).unwrap();
        write_safetensors(&dir.join("model.safetensors"), &tensors, &[]).unwrap();
        let mut c = cfg.clone();
        if quant {
            let ignore = vec!["lm_head".to_string()];
            c["quantization_config"] = format::quantization_config(layout, &ignore, "test");
            if let Some(h) = format::hf_quant_config(layout, &ignore, "test") {
                std::fs::write(dir.join(format::HF_QUANT_CONFIG_FILE), h.to_string()).unwrap();
            }
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    }
    assert!(!quantized.is_empty());
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn logits(dir: &Path) -> (Vec<f32>, Model) {
    let model = Model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut cache = model.new_cache(32);
    (
        model.forward(&TOKENS, &mut cache, Logits::All).unwrap(),
        model,
    )
}

#[test]
fn fp4_layouts_match_dense_dequantized_reference() {
    for arch in [
        FixArch::Llama,
        FixArch::Qwen3Moe,
        FixArch::Mixtral,
        FixArch::Qwen2Moe,
    ] {
        let src = tempfile::tempdir().unwrap();
        fixtures::write_fixture(src.path(), arch, 99).unwrap();
        let (_, bf16_model) = logits(src.path());
        for layout in Layout::ALL {
            let (fq, fr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            quantize_checkpoint(src.path(), fq.path(), fr.path(), layout, false);
            let (lq, mq) = logits(fq.path());
            let (lr, _) = logits(fr.path());
            // The FP4 kernel is bit-identical to the f32 kernel on dequantized weights.
            let d = max_abs_diff(&lq, &lr);
            assert!(
                d <= 1e-5,
                "{arch:?} {layout:?}: FP4 vs dequantized dense differ by {d:e}"
            );
            // And the weights really are packed: FP4 needs well under half the BF16 bytes.
            assert!(
                (mq.weight_bytes() as f64) < 0.75 * bf16_model.weight_bytes() as f64,
                "{arch:?} {layout:?}: {} vs {} bytes",
                mq.weight_bytes(),
                bf16_model.weight_bytes()
            );
            let block = if layout.format() == Fp4Format::Mxfp4 {
                32
            } else {
                16
            };
            assert_eq!(layout.format().block_size(), block);
        }
    }
}

#[test]
fn fp4_logits_stay_close_to_bf16() {
    let src = tempfile::tempdir().unwrap();
    fixtures::write_fixture(src.path(), FixArch::Llama, 5).unwrap();
    let (lb, _) = logits(src.path());
    let (fq, fr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    quantize_checkpoint(src.path(), fq.path(), fr.path(), Layout::CtNvfp4, false);
    let (lq, _) = logits(fq.path());
    let d = max_abs_diff(&lb, &lq);
    // Quantization moves logits, but not wildly: a broken scale convention (e.g. multiplying
    // by the global scale instead of dividing) would move them by orders of magnitude more.
    assert!(d > 1e-6 && d < 0.5, "NVFP4 vs BF16 max|diff| {d}");
}

#[test]
fn corrupt_fp4_scale_is_a_clear_error() {
    let src = tempfile::tempdir().unwrap();
    fixtures::write_fixture(src.path(), FixArch::Llama, 3).unwrap();
    let (fq, fr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    quantize_checkpoint(src.path(), fq.path(), fr.path(), Layout::CtNvfp4, true);
    let err = Model::load(fq.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Linear { .. }), "{err:?}");
    assert!(
        msg.contains(".weight_scale") && msg.contains("model.safetensors") && msg.contains("NaN"),
        "{msg}"
    );
}
