//! The FP4 checkpoint reader (mimo_runtime::format): detect the layout, list the quantized
//! modules and load each into an Fp4Matrix, on a folder built from the input with a
//! compressed-tensors NVFP4 config (the input may override it). Never panics, and every matrix
//! it returns has consistent sizes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::format::{detect, load_linear, quantized_modules, Detected};

#[path = "common.rs"]
mod common;

const CT_NVFP4: &str = r#"{"model_type":"llama","quantization_config":{"quant_method":"compressed-tensors","format":"nvfp4-pack-quantized"}}"#;

fuzz_target!(|data: &[u8]| {
    let dir = common::write_folder(data, Some(CT_NVFP4));
    let Ok(ck) = Checkpoint::open(&dir) else {
        return;
    };
    let Detected::Fp4(layout) = detect(&ck) else {
        return;
    };
    for module in quantized_modules(&ck, layout) {
        if let Ok(m) = load_linear(&ck, layout, &module) {
            let block = m.format.block_size();
            assert_eq!(m.packed.len(), m.n * m.k / 2, "{module}: packed size");
            assert_eq!(m.scales.len(), m.n * (m.k / block), "{module}: scales size");
            if m.n * m.k <= 1 << 16 {
                let _ = mimo_kernels::fp4::dequantize(&m);
            }
        }
    }
});
