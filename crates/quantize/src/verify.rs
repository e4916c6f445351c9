//! Checking a converted checkpoint: file hashes against the manifest, headers, layout tensors'
//! dtypes and shapes, finite scales and float tensors; with a source, the dequantized weights
//! against the original.

use std::fmt::Write as _;
use std::path::Path;

use mimo_kernels::dtype::convert_to_vec;
use mimo_kernels::e4m3;
use mimo_kernels::e8m0;
use mimo_kernels::fp4::{dequantize, Fp4Format};
use mimo_runtime::checkpoint::{is_plain_relative, Checkpoint, CheckpointError};
use mimo_runtime::format::{detect, load_linear, quantized_modules, Detected};

use crate::manifest::{sha256_file, Manifest, MANIFEST_FILE};
use crate::quantizer::{check_finite, src_dtype, ErrorAcc, ErrorStats};

/// Outcome of `verify`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Layout found.
    pub layout: String,
    /// Files whose hash was checked against mimo-quant.json.
    pub files_checked: usize,
    /// Quantized modules checked.
    pub modules_checked: usize,
    /// Kept tensors compared byte for byte with the source.
    pub kept_compared: usize,
    /// Problems found, each naming the file or tensor.
    pub problems: Vec<String>,
    /// Things not checked (e.g. no manifest), which do not fail verification.
    pub warnings: Vec<String>,
    /// Per module error against the source (with --source).
    pub errors: Vec<(String, ErrorStats)>,
}

/// Checks every file the manifest lists against its sha256 and size. A manifest that exists but
/// cannot be read is a problem (a tampered checkpoint must not pass by breaking it); a missing
/// one is a warning. Names must be plain relative paths inside `dir` (the shard index's rule)
/// and only regular files are hashed, so a manifest cannot make us read `/dev/zero` or files
/// outside the folder.
fn check_manifest(dir: &Path, r: &mut VerifyReport) {
    let path = dir.join(MANIFEST_FILE);
    let m = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.warnings.push(format!(
                "{}: not found: file hashes not checked",
                path.display()
            ));
            return;
        }
        Err(e) => {
            r.problems
                .push(format!("{}: cannot read the manifest: {e}", path.display()));
            return;
        }
    };
    for f in &m.files {
        if !is_plain_relative(&f.name) {
            r.problems.push(format!(
                "{}: file name '{}' is not a plain file name inside the checkpoint folder",
                path.display(),
                f.name
            ));
            continue;
        }
        let p = dir.join(&f.name);
        // metadata follows symlinks: a hub snapshot's links to blobs/ are regular files.
        match std::fs::metadata(&p) {
            Ok(md) if md.is_file() => {}
            Ok(_) => {
                r.problems.push(format!(
                    "{}: file '{}' is not a regular file",
                    path.display(),
                    f.name
                ));
                continue;
            }
            Err(e) => {
                r.problems.push(format!("{}: {e}", p.display()));
                continue;
            }
        }
        match sha256_file(&p) {
            Ok(h) if h.sha256 == f.sha256 && h.bytes == f.bytes => {}
            Ok(h) => r.problems.push(format!(
                "{}: sha256 {} does not match the manifest ({})",
                p.display(),
                h.sha256,
                f.sha256
            )),
            Err(e) => r.problems.push(format!("{}: {e}", p.display())),
        }
        r.files_checked += 1;
    }
}

/// An error's message followed by its causes (`a: b: c`), as anyhow's `{:#}` prints it.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// Verifies `dir`, and against `source` when given.
pub fn verify(dir: &Path, source: Option<&Path>) -> Result<VerifyReport, CheckpointError> {
    let mut r = VerifyReport::default();
    check_manifest(dir, &mut r);
    let ck = Checkpoint::open(dir)?;
    let layout = match detect(&ck) {
        Detected::Fp4(l) => l,
        other => {
            r.layout = format!("{other:?}");
            r.problems.push(format!(
                "{}: not an FP4 checkpoint we can verify ({other:?})",
                dir.display()
            ));
            return Ok(r);
        }
    };
    r.layout = layout.name().into();
    let src = source.map(Checkpoint::open).transpose()?;
    for module in quantized_modules(&ck, layout) {
        r.modules_checked += 1;
        let m = match load_linear(&ck, layout, &module) {
            Ok(m) => m,
            Err(e) => {
                r.problems.push(with_causes(&e));
                continue;
            }
        };
        let bad_scale = match m.format {
            Fp4Format::Nvfp4 => m.scales.iter().position(|&c| e4m3::is_nan_code(c)),
            Fp4Format::Mxfp4 => m.scales.iter().position(|&c| c == e8m0::NAN_CODE),
        };
        if let Some(i) = bad_scale {
            r.problems.push(format!(
                "{module}: block scale {i} is NaN (code {:#04x})",
                m.scales[i]
            ));
            continue;
        }
        let Some(src) = &src else { continue };
        let name = format!("{module}.weight");
        let t = match src.tensor(&name) {
            Ok(t) => t,
            Err(e) => {
                r.problems.push(with_causes(&e));
                continue;
            }
        };
        if t.shape != [m.n, m.k] {
            r.problems.push(format!(
                "{module}: shape [{}, {}] differs from the source's {:?}",
                m.n, m.k, t.shape
            ));
            continue;
        }
        let (Ok(dt), Ok(deq)) = (src_dtype(&t), dequantize(&m)) else {
            r.problems
                .push(format!("{module}: cannot dequantize or read the source"));
            continue;
        };
        let Ok(orig) = convert_to_vec(dt, t.data) else {
            continue;
        };
        let mut acc = ErrorAcc::default();
        acc.add(&orig, &deq);
        r.errors.push((module.clone(), acc.finish()));
    }
    // Every float tensor (kept weights, norms, biases, global scales) must be finite: a NaN
    // norm weight loads fine and turns every logit into NaN.
    for name in ck.tensor_names() {
        if let Err(e) = check_finite(&ck.tensor(name)?) {
            r.problems.push(e.to_string());
        }
    }
    if let Some(src) = &src {
        // Tensors kept dense must be byte-identical to the source.
        for name in ck.tensor_names() {
            if let Ok(s) = src.tensor(name) {
                let t = ck.tensor(name)?;
                if t.dtype == s.dtype && t.shape == s.shape {
                    r.kept_compared += 1;
                    if t.data != s.data {
                        r.problems
                            .push(format!("{name}: kept tensor differs from the source"));
                    }
                }
            }
        }
    }
    r.ok = r.problems.is_empty();
    Ok(r)
}

impl VerifyReport {
    /// Human-readable text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: layout {}, {} file hash(es), {} quantized module(s), {} kept tensor(s) compared",
            if self.ok { "OK" } else { "FAILED" },
            self.layout,
            self.files_checked,
            self.modules_checked,
            self.kept_compared
        );
        if !self.errors.is_empty() {
            let min = self
                .errors
                .iter()
                .map(|e| e.1.sqnr_db)
                .fold(f64::INFINITY, f64::min);
            let max_err = self
                .errors
                .iter()
                .map(|e| e.1.max_abs_err)
                .fold(0.0f32, f32::max);
            let _ = writeln!(
                s,
                "  against source: min SQNR {min:.2} dB, max abs error {max_err:.3e}"
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        for p in &self.problems {
            let _ = writeln!(s, "  problem: {p}");
        }
        s
    }
}
