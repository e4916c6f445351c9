//! Bit-for-bit interop with compressed-tensors: the files in tests/data were written by
//! compressed-tensors 0.20.0 itself (tests/golden/gen_compressed_tensors.py, on CPU); our
//! quantizers must reproduce every packed byte, scale byte and the global scale.

use std::path::PathBuf;

use mimo_kernels::{fp4, SrcDType};

struct Case {
    n: usize,
    k: usize,
    dtype: SrcDType,
    mxfp4: bool,
    global_scale: f32,
    w: Vec<f32>,
    packed: Vec<u8>,
    scales: Vec<u8>,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn load(name: &str) -> Case {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (n, k) = (u32_at(&b, 0) as usize, u32_at(&b, 4) as usize);
    let dtype = if u32_at(&b, 8) == 1 {
        SrcDType::BF16
    } else {
        SrcDType::F32
    };
    let mxfp4 = u32_at(&b, 12) == 1;
    let global_scale = f32::from_bits(u32_at(&b, 16));
    let mut off = 20;
    let wbytes = n * k * dtype.size();
    let w = mimo_kernels::dtype::convert_to_vec(dtype, &b[off..off + wbytes]).unwrap();
    off += wbytes;
    let packed = b[off..off + n * k / 2].to_vec();
    off += n * k / 2;
    let scales = b[off..].to_vec();
    assert_eq!(scales.len(), n * k / if mxfp4 { 32 } else { 16 }, "{name}");
    Case {
        n,
        k,
        dtype,
        mxfp4,
        global_scale,
        w,
        packed,
        scales,
    }
}

fn check(name: &str) {
    let c = load(name);
    let m = if c.mxfp4 {
        fp4::quantize_mxfp4(&c.w, c.n, c.k).unwrap()
    } else {
        // amax in the weight dtype is exact (a max of stored values).
        let gs = fp4::nvfp4_global_scale_in(fp4::amax(&c.w), c.dtype).unwrap();
        assert_eq!(
            gs.to_bits(),
            c.global_scale.to_bits(),
            "{name}: global scale"
        );
        fp4::quantize_nvfp4_in(&c.w, c.n, c.k, gs, c.dtype).unwrap()
    };
    for (i, (a, b)) in m.scales.iter().zip(&c.scales).enumerate() {
        assert_eq!(
            a,
            b,
            "{name}: scale byte {i} (row {}, block {})",
            i / (m.scales.len() / c.n),
            i % (m.scales.len() / c.n)
        );
    }
    for (i, (a, b)) in m.packed.iter().zip(&c.packed).enumerate() {
        assert_eq!(
            a,
            b,
            "{name}: packed byte {i} (row {}, elements {})",
            i / (c.k / 2),
            2 * (i % (c.k / 2))
        );
    }
    // The data must exercise what matters: non-zero codes of both signs and varied scales.
    assert!(c.packed.iter().any(|&b| b & 0x8 != 0) && c.packed.iter().any(|&b| b & 0x7 != 0));
    assert!(
        c.scales
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 4
    );
}

#[test]
fn nvfp4_bf16_matches_compressed_tensors() {
    check("ct_nvfp4_bf16_1.bin");
    check("ct_nvfp4_bf16_2.bin");
}

#[test]
fn nvfp4_f32_matches_compressed_tensors() {
    check("ct_nvfp4_f32_1.bin");
    check("ct_nvfp4_f32_2.bin");
}

#[test]
fn mxfp4_bf16_matches_compressed_tensors() {
    check("ct_mxfp4_bf16_1.bin");
    check("ct_mxfp4_bf16_2.bin");
}

#[test]
fn mxfp4_f32_matches_compressed_tensors() {
    check("ct_mxfp4_f32_1.bin");
    check("ct_mxfp4_f32_2.bin");
}
