//! Bit-exact tests of the layouts: names, dtypes, shapes, stored bytes, config JSON, detection
//! and loading back.

use super::*;
use crate::checkpoint::{write_safetensors, Checkpoint, CONFIG_FILE, SINGLE_FILE};
use mimo_kernels::fp4::{dequantize, quantize_mxfp4, quantize_nvfp4, quantize_nvfp4_modelopt};
use serde_json::json;

fn random_rows(n: usize, k: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n * k)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 0.3
        })
        .collect()
}

#[test]
fn names_dtypes_shapes() {
    let e = Layout::CtNvfp4.tensor_entries("m.q_proj", 8, 64);
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.name.as_str(), e.dtype, e.shape.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("m.q_proj.weight_packed", DType::U8, vec![8, 32]),
            ("m.q_proj.weight_scale", DType::F8_E4M3, vec![8, 4]),
            ("m.q_proj.weight_global_scale", DType::F32, vec![1]),
        ]
    );
    let e = Layout::CtMxfp4.tensor_entries("m.q_proj", 8, 64);
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.name.as_str(), e.dtype, e.shape.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("m.q_proj.weight_packed", DType::U8, vec![8, 32]),
            ("m.q_proj.weight_scale", DType::U8, vec![8, 2])
        ]
    );
    let e = Layout::ModelOptNvfp4.tensor_entries("m.q_proj", 8, 64);
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.name.as_str(), e.dtype, e.shape.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("m.q_proj.weight", DType::U8, vec![8, 32]),
            ("m.q_proj.weight_scale", DType::F8_E4M3, vec![8, 4]),
            ("m.q_proj.weight_scale_2", DType::F32, vec![]),
        ]
    );
}

/// A hand-made NVFP4 row: nibble order, E4M3 scale and the divisor convention.
#[test]
fn ct_nvfp4_dequantizes_by_hand() {
    // byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) element 1; 0xF7: 6.0, -6.0.
    let mut packed = vec![0u8; 8];
    packed[0] = 0x21;
    packed[1] = 0xF7;
    // E4M3 0x40 = 2.0 (exponent 8 - bias 7), global scale 4.0 -> multiplier 0.5.
    let m = Fp4Matrix {
        format: Fp4Format::Nvfp4,
        n: 1,
        k: 16,
        packed,
        scales: vec![0x40],
        global_scale: 4.0,
    };
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    write_safetensors(
        &d.path().join(SINGLE_FILE),
        &Layout::CtNvfp4.encode("l", &m, None),
        &[],
    )
    .unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(
        ck.tensor("l.weight_global_scale").unwrap().data,
        &4.0f32.to_le_bytes()
    );
    let back = load_linear(&ck, Layout::CtNvfp4, "l").unwrap();
    let w = dequantize(&back).unwrap();
    assert_eq!(&w[..4], &[0.25, 0.5, 3.0, -3.0]);
    assert!(w[4..].iter().all(|&x| x == 0.0));
}

/// ModelOpt stores weight_scale_2 as a multiplier.
#[test]
fn modelopt_stores_multiplier() {
    let w = random_rows(4, 32, 3);
    let (m, s2) = quantize_nvfp4_modelopt(&w, 4, 32).unwrap();
    let enc = Layout::ModelOptNvfp4.encode("x", &m, Some(s2));
    assert_eq!(enc[2].1, s2.to_le_bytes());
    let amax = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert_eq!(s2, amax / 2688.0);
}

fn write_layout(
    dir: &std::path::Path,
    layout: Layout,
    modules: &[(&str, &Fp4Matrix, Option<f32>)],
    with_config: bool,
) {
    let mut cfg = json!({"model_type": "llama"});
    if with_config {
        cfg["quantization_config"] = quantization_config(layout, &["lm_head".into()], "0.1.0");
    }
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_string()).unwrap();
    if let Some(h) = hf_quant_config(layout, &["lm_head".into()], "0.1.0") {
        if with_config {
            std::fs::write(dir.join(HF_QUANT_CONFIG_FILE), h.to_string()).unwrap();
        }
    }
    let mut all = Vec::new();
    for (name, m, s2) in modules {
        all.extend(layout.encode(name, m, *s2));
    }
    write_safetensors(&dir.join(SINGLE_FILE), &all, &[]).unwrap();
}

#[test]
fn every_layout_round_trips_and_is_detected() {
    let w = random_rows(6, 64, 11);
    for layout in Layout::ALL {
        let (m, s2) = match layout {
            Layout::CtNvfp4 => (quantize_nvfp4(&w, 6, 64, 2688.0 / 0.15).unwrap(), None),
            Layout::CtMxfp4 => (quantize_mxfp4(&w, 6, 64).unwrap(), None),
            Layout::ModelOptNvfp4 => {
                let (m, s) = quantize_nvfp4_modelopt(&w, 6, 64).unwrap();
                (m, Some(s))
            }
        };
        for with_config in [true, false] {
            let d = tempfile::tempdir().unwrap();
            write_layout(
                d.path(),
                layout,
                &[("a.b", &m, s2), ("a.c", &m, s2)],
                with_config,
            );
            let ck = Checkpoint::open(d.path()).unwrap();
            assert_eq!(
                detect(&ck),
                Detected::Fp4(layout),
                "{layout} config={with_config}"
            );
            assert_eq!(quantized_modules(&ck, layout), ["a.b", "a.c"]);
            let back = load_linear(&ck, layout, "a.c").unwrap();
            assert_eq!((back.n, back.k, back.format), (6, 64, layout.format()));
            assert_eq!(back.packed, m.packed);
            assert_eq!(back.scales, m.scales);
            match layout {
                Layout::ModelOptNvfp4 => assert_eq!(back.global_scale, 1.0 / s2.unwrap()),
                _ => assert_eq!(back.global_scale.to_bits(), m.global_scale.to_bits()),
            }
            let err = dequantize(&back)
                .unwrap()
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 0.05, "{layout}: {err}");
        }
    }
}

#[test]
fn ct_nvfp4_config_keys() {
    let c = quantization_config(Layout::CtNvfp4, &["lm_head".into()], "1.2.3");
    assert_eq!(c["quant_method"], "compressed-tensors");
    assert_eq!(c["format"], "nvfp4-pack-quantized");
    assert_eq!(c["quantization_status"], "compressed");
    assert_eq!(c["ignore"], json!(["lm_head"]));
    let g = &c["config_groups"]["group_0"];
    assert_eq!(g["targets"], json!(["Linear"]));
    assert_eq!(g["input_activations"], serde_json::Value::Null);
    let wq = &g["weights"];
    assert_eq!(
        (
            wq["num_bits"].clone(),
            wq["type"].clone(),
            wq["strategy"].clone(),
            wq["group_size"].clone()
        ),
        (json!(4), json!("float"), json!("tensor_group"), json!(16))
    );
    assert_eq!(
        (wq["symmetric"].clone(), wq["dynamic"].clone()),
        (json!(true), json!(false))
    );
    let m = quantization_config(Layout::CtMxfp4, &[], "1");
    assert_eq!(
        m["config_groups"]["group_0"]["weights"]["strategy"],
        "group"
    );
    assert_eq!(m["config_groups"]["group_0"]["weights"]["group_size"], 32);
    assert_eq!(
        m["config_groups"]["group_0"]["weights"]["scale_dtype"],
        "uint8"
    );
    assert!(hf_quant_config(Layout::CtNvfp4, &[], "1").is_none());
}

#[test]
fn modelopt_config_keys() {
    let h = hf_quant_config(Layout::ModelOptNvfp4, &["lm_head".into()], "1").unwrap();
    let q = &h["quantization"];
    assert_eq!(q["quant_algo"], "W4A16_NVFP4");
    assert_eq!(q["group_size"], 16);
    assert_eq!(q["exclude_modules"], json!(["lm_head"]));
    assert!(q.get("kv_cache_quant_algo").is_some());
    let c = quantization_config(Layout::ModelOptNvfp4, &["lm_head".into()], "1");
    assert_eq!(c["quant_method"], "modelopt");
    assert_eq!(c["ignore"], json!(["lm_head"]));
}

#[test]
fn other_quantizations_are_detected() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join(CONFIG_FILE),
        r#"{"quantization_config": {"quant_method": "fp8"}}"#,
    )
    .unwrap();
    write_safetensors(
        &d.path().join(SINGLE_FILE),
        &[(
            HeaderEntry {
                name: "a.weight".into(),
                dtype: DType::BF16,
                shape: vec![1],
            },
            vec![0, 0],
        )],
        &[],
    )
    .unwrap();
    assert_eq!(
        detect(&Checkpoint::open(d.path()).unwrap()),
        Detected::Other("fp8".into())
    );
    std::fs::write(
        d.path().join(CONFIG_FILE),
        r#"{"quantization_config": {"quant_method": "mxfp4"}}"#,
    )
    .unwrap();
    assert_eq!(
        detect(&Checkpoint::open(d.path()).unwrap()),
        Detected::GptOssMxfp4
    );
    std::fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    assert_eq!(
        detect(&Checkpoint::open(d.path()).unwrap()),
        Detected::Dense
    );
    write_safetensors(
        &d.path().join(SINGLE_FILE),
        &[(
            HeaderEntry {
                name: "a.weight".into(),
                dtype: DType::F8_E4M3,
                shape: vec![1],
            },
            vec![0],
        )],
        &[],
    )
    .unwrap();
    assert!(matches!(
        detect(&Checkpoint::open(d.path()).unwrap()),
        Detected::Other(_)
    ));
}

#[test]
fn load_errors_name_tensor() {
    let w = random_rows(2, 32, 5);
    let m = quantize_mxfp4(&w, 2, 32).unwrap();
    let d = tempfile::tempdir().unwrap();
    write_layout(d.path(), Layout::CtMxfp4, &[("a", &m, None)], true);
    let ck = Checkpoint::open(d.path()).unwrap();
    let e = load_linear(&ck, Layout::CtNvfp4, "a").unwrap_err();
    assert!(
        matches!(&e, FormatError::WrongDType { tensor, .. } if tensor == "a.weight_scale"),
        "{e}"
    );
    let e = load_linear(&ck, Layout::CtMxfp4, "b").unwrap_err();
    assert!(
        matches!(&e, FormatError::MissingTensor { tensor, .. } if tensor == "b.weight_packed"),
        "{e}"
    );
    // A zero global scale is refused.
    let mut z = quantize_nvfp4(&w, 2, 32, 100.0).unwrap();
    z.global_scale = 0.0;
    let d = tempfile::tempdir().unwrap();
    write_layout(d.path(), Layout::CtNvfp4, &[("a", &z, None)], true);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert!(matches!(
        load_linear(&ck, Layout::CtNvfp4, "a"),
        Err(FormatError::BadGlobalScale { .. })
    ));
}

/// Scales that are finite and positive but make the largest dequantized weight inf (issue 10,
/// F3) are refused naming the tensor; the largest legal ones still load.
#[test]
fn overflowing_scales_are_refused() {
    let w = random_rows(2, 32, 7);
    let load = |layout: Layout, m: &Fp4Matrix, s2: Option<f32>| {
        let d = tempfile::tempdir().unwrap();
        write_layout(d.path(), layout, &[("a", m, s2)], true);
        let ck = Checkpoint::open(d.path()).unwrap();
        load_linear(&ck, layout, "a")
    };
    // compressed-tensors: 2688 / 1e-45 = inf; 2688 / 1e-35 is finite.
    let mut m = quantize_nvfp4(&w, 2, 32, 100.0).unwrap();
    m.global_scale = 1e-45;
    let e = load(Layout::CtNvfp4, &m, None).unwrap_err();
    assert!(
        matches!(&e, FormatError::GlobalScaleOverflow { tensor, .. } if tensor == "a.weight_global_scale"),
        "{e}"
    );
    m.global_scale = 1e-35;
    assert!(load(Layout::CtNvfp4, &m, None).is_ok());
    // ModelOpt: 2688 * 1e36 = inf; a denormal weight_scale_2 makes its inverse inf.
    let (mo, _) = quantize_nvfp4_modelopt(&w, 2, 32).unwrap();
    for s2 in [1e36f32, 1e-45] {
        let e = load(Layout::ModelOptNvfp4, &mo, Some(s2)).unwrap_err();
        assert!(
            matches!(&e, FormatError::GlobalScaleOverflow { tensor, .. } if tensor == "a.weight_scale_2"),
            "{s2}: {e}"
        );
    }
    assert!(load(Layout::ModelOptNvfp4, &mo, Some(1e30)).is_ok());
    // MXFP4: codes 253 and 254 overflow 6 * 2^(e-127); 252 does not.
    let mut mx = quantize_mxfp4(&w, 2, 32).unwrap();
    for code in [253u8, 254] {
        mx.scales[1] = code;
        let e = load(Layout::CtMxfp4, &mx, None).unwrap_err();
        assert!(
            matches!(&e, FormatError::ScaleCodeOverflow { tensor, index: 1, .. } if tensor == "a.weight_scale"),
            "{code}: {e}"
        );
    }
    mx.scales[1] = 252;
    assert!(load(Layout::CtMxfp4, &mx, None).is_ok());
    assert!((6.0f32 * 2f32.powi(252 - 127)).is_finite());
    assert!(!(6.0f32 * 2f32.powi(253 - 127)).is_finite());
}
