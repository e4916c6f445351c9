//! A summary of any checkpoint folder: ours, another tool's, or a dense original.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use mimo_runtime::checkpoint::{Checkpoint, CheckpointError};
use mimo_runtime::format::{detect, quantized_modules, Detected};

use crate::arch::family;
use crate::manifest::Manifest;

/// What `inspect` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// The folder.
    pub path: String,
    /// Architecture name from config.json.
    pub architecture: String,
    /// Quantization found ("dense", a layout name, or another method).
    pub quantization: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensor count per dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Number of weight files.
    pub files: usize,
    /// Quantized Linear modules.
    pub quantized_modules: usize,
    /// Producer from mimo-quant.json, if present.
    pub producer: Option<String>,
    /// Lowest per-tensor SQNR from mimo-quant.json, if present.
    pub min_sqnr_db: Option<f64>,
}

/// Inspects `dir`.
pub fn inspect(dir: &Path) -> Result<Inspection, CheckpointError> {
    let ck = Checkpoint::open(dir)?;
    let (_, arch) = family(ck.config());
    let mut dtypes = BTreeMap::new();
    let mut bytes = 0u64;
    for name in ck.tensor_names() {
        let t = ck.tensor(name)?;
        *dtypes.entry(t.dtype.to_string()).or_insert(0) += 1;
        bytes += t.data.len() as u64;
    }
    let det = detect(&ck);
    let (quantization, qm) = match &det {
        Detected::Dense => ("dense".to_string(), 0),
        Detected::Fp4(l) => (l.name().to_string(), quantized_modules(&ck, *l).len()),
        Detected::GptOssMxfp4 => ("gpt-oss mxfp4".to_string(), 0),
        Detected::Other(w) => (w.clone(), 0),
    };
    let manifest = Manifest::read(dir).ok();
    Ok(Inspection {
        path: dir.display().to_string(),
        architecture: arch,
        quantization,
        tensors: ck.len(),
        dtypes,
        bytes,
        files: ck.files().count(),
        quantized_modules: qm,
        producer: manifest
            .as_ref()
            .map(|m| format!("{} {}", m.tool.name, m.tool.version)),
        min_sqnr_db: manifest.as_ref().and_then(|m| {
            m.tensors
                .values()
                .filter_map(|t| t.sqnr_db)
                .reduce(f64::min)
        }),
    })
}

impl Inspection {
    /// Human-readable text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}", self.path);
        let _ = writeln!(s, "  architecture:      {}", self.architecture);
        let _ = writeln!(s, "  quantization:      {}", self.quantization);
        let _ = writeln!(s, "  quantized modules: {}", self.quantized_modules);
        let _ = writeln!(
            s,
            "  tensors:           {} in {} file(s), {} bytes",
            self.tensors, self.files, self.bytes
        );
        let d: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(s, "  dtypes:            {}", d.join(", "));
        if let Some(p) = &self.producer {
            let _ = writeln!(s, "  producer:          {p}");
        }
        if let Some(q) = self.min_sqnr_db {
            let _ = writeln!(s, "  min SQNR:          {q:.2} dB");
        }
        s
    }
}
