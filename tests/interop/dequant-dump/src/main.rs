//! `mimo-interop-dequant-dump DIR OUT.safetensors`: our dequantization of every quantized Linear
//! of the FP4 checkpoint DIR, as `<module>.weight` F32 [N, K] tensors, plus a JSON summary on
//! stdout (layout, module count). Only library calls: the layout is detected and each Linear
//! loaded by `mimo_runtime::format`, dequantized by `mimo_kernels::fp4::dequantize`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use mimo_runtime::checkpoint::Checkpoint;
use mimo_runtime::format::{detect, load_linear, quantized_modules, Detected};
use safetensors::tensor::{Dtype, TensorView};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        bail!("usage: {} CHECKPOINT_DIR OUT.safetensors", args[0]);
    }
    let dir = PathBuf::from(&args[1]);
    let out = PathBuf::from(&args[2]);
    let ck = Checkpoint::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let layout = match detect(&ck) {
        Detected::Fp4(l) => l,
        other => bail!(
            "{}: not an FP4 checkpoint this tool reads ({other:?})",
            dir.display()
        ),
    };
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut global: HashMap<String, f32> = HashMap::new();
    for module in quantized_modules(&ck, layout) {
        let m = load_linear(&ck, layout, &module).with_context(|| format!("loading {module}"))?;
        let w =
            mimo_kernels::fp4::dequantize(&m).with_context(|| format!("dequantizing {module}"))?;
        let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        global.insert(module.clone(), m.global_scale);
        bytes.push((format!("{module}.weight"), vec![m.n, m.k], raw));
    }
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &out)
        .with_context(|| format!("writing {}", out.display()))?;
    let summary = serde_json::json!({
        "layout": layout.name(),
        "modules": bytes.len(),
        // Per-module global scale as our reader holds it (compressed-tensors convention).
        "global_scale": global,
    });
    println!("{summary}");
    Ok(())
}
