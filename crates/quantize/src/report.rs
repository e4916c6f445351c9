//! `mimo-quant report DIR`: the per-layer and per-expert quantization error of a converted
//! checkpoint as a picture (`report.svg`, hand-written SVG) and a summary (worst layers and
//! tensors), both read from the manifest (`mimo-quant.json`) alone.
//!
//! The picture is a set of heat maps sharing one row per decoder layer: first the layer's own
//! projections (q/k/v/o, dense MLP, shared experts), then one panel per routed-expert projection
//! with one column per expert. Cells are coloured by SQNR (dB); every cell carries a tooltip
//! with the tensor name, SQNR and largest absolute error.
//!
//! `convert` writes it next to the manifest before hashing the output files, from the same
//! per-tensor records and options the manifest then holds (never from the file list), so the
//! manifest lists and hashes `report.svg` like any other file and `verify` checks it, and
//! `mimo-quant report DIR` later regenerates the same bytes. The picture names a fixed number
//! of worst tensors ([`PICTURE_WORST`]); `--top` only changes the printed summary.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use mimo_runtime::format::Layout;

use crate::convert::ConvertConfig;
use crate::manifest::{Manifest, TensorRecord, MANIFEST_FILE};
use crate::methods::Method;
use crate::writer::WriteError;

/// File name of the picture in the output folder.
pub const REPORT_FILE: &str = "report.svg";

/// How many worst tensors the picture names.
pub const PICTURE_WORST: usize = 10;

/// What a report is made from: the manifest's options and per-tensor records.
#[derive(Debug, Clone)]
pub struct ReportInput<'a> {
    /// Model (hub repo, else the source folder name).
    pub model: String,
    /// Architecture.
    pub architecture: &'a str,
    /// nvfp4 / mxfp4.
    pub format: String,
    /// On-disk layout name.
    pub layout: &'a str,
    /// Quantization method.
    pub method: &'a str,
    /// Per source tensor.
    pub tensors: &'a BTreeMap<String, TensorRecord>,
}

impl<'a> ReportInput<'a> {
    /// The input held by a manifest.
    pub fn from_manifest(m: &'a Manifest) -> ReportInput<'a> {
        ReportInput {
            model: model_name(m.source.repo.as_deref(), &m.source.path),
            architecture: &m.architecture,
            format: m.options.format.clone(),
            layout: &m.options.layout,
            method: &m.options.method,
            tensors: &m.tensors,
        }
    }
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The manifest file could not be read.
    #[error("{path}: cannot read the manifest")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The manifest is not valid mimo-quant.json.
    #[error("{path}: not a valid mimo-quant manifest: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The manifest lists no quantized tensor with an error measurement.
    #[error("{path}: the manifest has no quantized tensors to report")]
    Empty { path: PathBuf },
    /// The picture could not be written.
    #[error("{path}: cannot write the report")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `mimo-quant report` arguments.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Converted checkpoint folder (holding mimo-quant.json).
    pub dir: PathBuf,
    /// Where to write the picture (default: DIR/report.svg).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// How many worst tensors to name.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A layer: (container path, index); `None` for tensors outside the layers.
type LayerKey = Option<(String, usize)>;

/// Where one quantized tensor sits in the picture.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    /// Layer sort key: (container path, index); `None` for tensors outside the layers.
    layer: LayerKey,
    /// Column: the projection (e.g. `self_attn.q_proj`, or `down_proj` for an expert).
    column: String,
    /// Routed expert index.
    expert: Option<usize>,
}

/// One quantized tensor's error.
#[derive(Debug, Clone, Serialize)]
pub struct TensorError {
    /// Source tensor name.
    pub name: String,
    /// Layer label (`layers.3`), or `other`.
    pub layer: String,
    /// SQNR in dB (`None`: exact).
    pub sqnr_db: Option<f64>,
    /// Largest absolute error.
    pub max_abs_err: Option<f32>,
}

/// One layer's error.
#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    /// Layer label (`layers.3`, `mtp_layers.0`, `other`).
    pub layer: String,
    /// Quantized tensors in the layer.
    pub tensors: usize,
    /// Lowest SQNR (dB).
    pub min_sqnr_db: Option<f64>,
    /// Mean SQNR (dB) over tensors with a finite SQNR.
    pub mean_sqnr_db: Option<f64>,
    /// The tensor with the lowest SQNR.
    pub worst_tensor: Option<String>,
    /// Largest absolute error in the layer.
    pub max_abs_err: Option<f32>,
}

/// What `report --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ReportSummary {
    /// Model (source folder name or hub repo).
    pub model: String,
    /// Architecture.
    pub architecture: String,
    /// nvfp4 / mxfp4.
    pub format: String,
    /// On-disk layout.
    pub layout: String,
    /// Quantization method.
    pub method: String,
    /// Quantized tensors.
    pub quantized: usize,
    /// Tensors kept dense.
    pub kept: usize,
    /// Lowest SQNR over quantized tensors (dB).
    pub min_sqnr_db: Option<f64>,
    /// Mean SQNR over quantized tensors (dB).
    pub mean_sqnr_db: Option<f64>,
    /// Every layer in order.
    pub layers: Vec<LayerError>,
    /// Up to five layers with the lowest mean SQNR, worst first.
    pub worst_layers: Vec<LayerError>,
    /// The tensors with the lowest SQNR, worst first.
    pub worst_tensors: Vec<TensorError>,
}

/// The summary and the picture.
#[derive(Debug, Clone)]
pub struct Report {
    /// Summary.
    pub summary: ReportSummary,
    /// SVG document.
    pub svg: String,
}

/// Containers whose numbered children are decoder layers.
const LAYER_CONTAINERS: &[&str] = &["layers", "mtp_layers", "h", "blocks", "layer"];
/// Module names dropped from a column label (they hold the projections).
const HOLDERS: &[&str] = &[
    "self_attn",
    "attn",
    "mlp",
    "block_sparse_moe",
    "feed_forward",
];

fn place(name: &str) -> Place {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let parts: Vec<&str> = module.split('.').collect();
    let at = (0..parts.len().saturating_sub(1))
        .find(|&i| LAYER_CONTAINERS.contains(&parts[i]) && parts[i + 1].parse::<usize>().is_ok());
    let Some(i) = at else {
        return Place {
            layer: None,
            column: module.to_string(),
            expert: None,
        };
    };
    let idx = parts[i + 1].parse::<usize>().unwrap_or(0);
    let rest = &parts[i + 2..];
    let layer = Some((parts[..=i].join("."), idx));
    let ex = (0..rest.len().saturating_sub(1))
        .find(|&j| rest[j] == "experts" && rest[j + 1].parse::<usize>().is_ok());
    if let Some(j) = ex {
        return Place {
            layer,
            column: rest[j + 2..].join("."),
            expert: rest[j + 1].parse().ok(),
        };
    }
    let rest = if rest.len() > 1 && HOLDERS.contains(&rest[0]) {
        &rest[1..]
    } else {
        rest
    };
    Place {
        layer,
        column: rest.join("."),
        expert: None,
    }
}

fn layer_label(layer: &LayerKey) -> String {
    match layer {
        Some((path, i)) => {
            let last = path.rsplit('.').next().unwrap_or(path);
            format!("{last}.{i}")
        }
        None => "other".into(),
    }
}

/// Column order: attention before MLP, a module's own projections before a sub-module's (the
/// shared expert), then q, k, v, o, gate, up, down; then by name.
fn column_key(name: &str, c: &str) -> ColumnKey {
    let attn = u8::from(!(name.contains("attn") || name.contains("attention")));
    let leaf = c.rsplit('.').next().unwrap_or(c);
    let rank = match leaf {
        "q_proj" | "q_a_proj" | "wq" => 0,
        "q_b_proj" => 1,
        "k_proj" | "kv_a_proj_with_mqa" | "wk" => 2,
        "kv_b_proj" => 3,
        "v_proj" | "wv" => 4,
        "o_proj" | "wo" | "dense" => 5,
        "gate_proj" | "w1" => 6,
        "up_proj" | "w3" => 7,
        "down_proj" | "w2" => 8,
        _ => 9,
    };
    let holder = c.rsplit_once('.').map_or("", |(h, _)| h).to_string();
    (attn, holder, rank, c.to_string())
}

/// See [`column_key`].
type ColumnKey = (u8, String, u8, String);

/// The hub repo, else the last component of the source path as the manifest records it.
fn model_name(repo: Option<&str>, path: &str) -> String {
    if let Some(r) = repo {
        return r.to_string();
    }
    Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

fn finite(r: &TensorRecord) -> Option<f64> {
    r.sqnr_db.filter(|s| s.is_finite())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Reads `DIR/mimo-quant.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ReportError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ReportError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ReportError::Parse { path, source })
}

/// Builds the summary (naming `top` worst tensors) and the picture; `None` when no tensor was
/// quantized.
pub fn build(m: &ReportInput<'_>, top: usize) -> Option<Report> {
    let quantized: Vec<(&String, &TensorRecord, Place)> = m
        .tensors
        .iter()
        .filter(|(_, r)| r.action == "quantized")
        .map(|(n, r)| (n, r, place(n)))
        .collect();
    if quantized.is_empty() {
        return None;
    }
    let all: Vec<f64> = quantized.iter().filter_map(|(_, r, _)| finite(r)).collect();

    // Per layer, in layer order.
    let mut by_layer: BTreeMap<LayerKey, Vec<(&String, &TensorRecord)>> = BTreeMap::new();
    for (n, r, p) in &quantized {
        by_layer.entry(p.layer.clone()).or_default().push((n, r));
    }
    // Tensors outside the layers (lm_head) go last, not first.
    let mut layer_keys: Vec<LayerKey> = by_layer.keys().cloned().collect();
    layer_keys.sort_by_key(|k| (k.is_none(), k.clone()));
    let layers: Vec<LayerError> = layer_keys
        .iter()
        .map(|k| {
            let ts = &by_layer[k];
            let s: Vec<f64> = ts.iter().filter_map(|(_, r)| finite(r)).collect();
            let worst = ts
                .iter()
                .filter_map(|(n, r)| finite(r).map(|s| (s, *n)))
                .min_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
            LayerError {
                layer: layer_label(k),
                tensors: ts.len(),
                min_sqnr_db: worst.map(|w| w.0),
                mean_sqnr_db: mean(&s),
                worst_tensor: worst.map(|w| w.1.clone()),
                max_abs_err: ts
                    .iter()
                    .filter_map(|(_, r)| r.max_abs_err)
                    .reduce(f32::max),
            }
        })
        .collect();
    let mut worst_layers: Vec<LayerError> = layers
        .iter()
        .filter(|l| l.mean_sqnr_db.is_some())
        .cloned()
        .collect();
    worst_layers.sort_by(|a, b| {
        a.mean_sqnr_db
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.mean_sqnr_db.unwrap_or(f64::INFINITY))
            .then_with(|| a.layer.cmp(&b.layer))
    });
    worst_layers.truncate(5);
    let mut worst: Vec<TensorError> = quantized
        .iter()
        .filter(|(_, r, _)| finite(r).is_some())
        .map(|(n, r, p)| TensorError {
            name: (*n).clone(),
            layer: layer_label(&p.layer),
            sqnr_db: r.sqnr_db,
            max_abs_err: r.max_abs_err,
        })
        .collect();
    worst.sort_by(|a, b| {
        a.sqnr_db
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.sqnr_db.unwrap_or(f64::INFINITY))
            .then_with(|| a.name.cmp(&b.name))
    });
    let picture_worst: Vec<TensorError> = worst.iter().take(PICTURE_WORST).cloned().collect();
    worst.truncate(top);

    let summary = ReportSummary {
        model: m.model.clone(),
        architecture: m.architecture.to_string(),
        format: m.format.clone(),
        layout: m.layout.to_string(),
        method: m.method.to_string(),
        quantized: quantized.len(),
        kept: m.tensors.len() - quantized.len(),
        min_sqnr_db: all.iter().copied().reduce(f64::min),
        mean_sqnr_db: mean(&all),
        layers,
        worst_layers,
        worst_tensors: worst,
    };
    let svg = svg(&summary, &picture_worst, &quantized, &layer_keys);
    Some(Report { summary, svg })
}

/// Reads the manifest of `dir` and builds its report, naming the manifest in every error.
pub fn report_dir(dir: &Path, top: usize) -> Result<Report, ReportError> {
    let m = read_manifest(dir)?;
    build(&ReportInput::from_manifest(&m), top).ok_or_else(|| ReportError::Empty {
        path: dir.join(MANIFEST_FILE),
    })
}

/// Writes `dir/report.svg` during `convert`, before the output files are hashed, from the
/// values the manifest will record; a conversion without quantized tensors writes nothing.
pub fn write_svg(
    dir: &Path,
    cfg: &ConvertConfig,
    layout: Layout,
    method: Method,
    architecture: &str,
    tensors: &BTreeMap<String, TensorRecord>,
) -> Result<(), WriteError> {
    let input = ReportInput {
        model: model_name(
            cfg.source_repo.as_ref().map(|r| r.0.as_str()),
            &cfg.source.display().to_string(),
        ),
        architecture,
        format: layout.format().to_string(),
        layout: layout.name(),
        method: method.name(),
        tensors,
    };
    let Some(r) = build(&input, PICTURE_WORST) else {
        return Ok(());
    };
    let path = dir.join(REPORT_FILE);
    std::fs::write(&path, r.svg.as_bytes()).map_err(|source| WriteError::Io { path, source })
}

/// Runs `mimo-quant report`.
pub fn run_report(a: ReportArgs) -> anyhow::Result<i32> {
    let r = report_dir(&a.dir, a.top)?;
    let out = a.output.unwrap_or_else(|| a.dir.join(REPORT_FILE));
    std::fs::write(&out, r.svg.as_bytes()).map_err(|source| ReportError::Write {
        path: out.clone(),
        source,
    })?;
    if a.json {
        let mut v = serde_json::to_value(&r.summary)?;
        v["svg"] = serde_json::json!(out.display().to_string());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        mimo_runtime::out!("{}", render_text(&r.summary));
        println!("wrote {}", out.display());
    }
    Ok(0)
}

fn db(v: Option<f64>) -> String {
    v.map_or_else(|| "exact".into(), |s| format!("{s:.2} dB"))
}

fn err(v: Option<f32>) -> String {
    v.map_or_else(|| "-".into(), |e| format!("{e:.4}"))
}

/// The terminal summary: totals, worst layers, worst tensors.
pub fn render_text(s: &ReportSummary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({}) {} {} [{}]: {} quantized, {} kept; SQNR min {}, mean {}",
        s.model,
        s.architecture,
        s.format,
        s.method,
        s.layout,
        s.quantized,
        s.kept,
        db(s.min_sqnr_db),
        db(s.mean_sqnr_db)
    );
    let _ = writeln!(o, "worst layers (by mean SQNR):");
    for l in &s.worst_layers {
        let _ = writeln!(
            o,
            "  {:<16} mean {:>10}  min {:>10}  max|err| {:>8}  worst {}",
            l.layer,
            db(l.mean_sqnr_db),
            db(l.min_sqnr_db),
            err(l.max_abs_err),
            l.worst_tensor.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(o, "worst tensors:");
    for t in &s.worst_tensors {
        let _ = writeln!(
            o,
            "  {:>10}  max|err| {:>8}  {}",
            db(t.sqnr_db),
            err(t.max_abs_err),
            t.name
        );
    }
    o
}

/// Escapes text for XML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// Viridis anchors: dark (worst SQNR) to bright (best).
const RAMP: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
];

/// Colour of `t` in [0, 1] on the ramp.
fn ramp(t: f64) -> String {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let x = t * (RAMP.len() - 1) as f64;
    let i = (x.floor() as usize).min(RAMP.len() - 2);
    let f = x - i as f64;
    let (a, b) = (RAMP[i], RAMP[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// Missing cell (no such tensor, or kept dense).
const EMPTY: &str = "#e6e6e6";

/// One heat-map panel: a title and its columns (label, expert or not).
struct Panel {
    title: String,
    columns: Vec<String>,
    /// (layer, column index) -> (name, record).
    cells: BTreeMap<(usize, usize), (String, TensorRecord)>,
    cell_w: usize,
    /// Columns are expert indices (labelled sparsely) rather than projection names.
    experts: bool,
}

fn svg(
    s: &ReportSummary,
    worst: &[TensorError],
    quantized: &[(&String, &TensorRecord, Place)],
    layer_keys: &[LayerKey],
) -> String {
    let row_of: BTreeMap<&LayerKey, usize> =
        layer_keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let rows = layer_keys.len();

    // Panel 1: each layer's own projections; then one panel per routed-expert projection.
    let mut dense_cols: BTreeMap<ColumnKey, ()> = BTreeMap::new();
    let mut expert_cols: BTreeMap<ColumnKey, BTreeSet<usize>> = BTreeMap::new();
    for (n, _, p) in quantized {
        let key = column_key(n, &p.column);
        match p.expert {
            None => {
                dense_cols.insert(key, ());
            }
            Some(e) => {
                expert_cols.entry(key).or_default().insert(e);
            }
        }
    }
    let mut panels = Vec::new();
    if !dense_cols.is_empty() {
        let columns: Vec<String> = dense_cols.keys().map(|k| k.3.clone()).collect();
        let mut cells = BTreeMap::new();
        for (n, r, p) in quantized.iter().filter(|q| q.2.expert.is_none()) {
            if let Some(c) = columns.iter().position(|c| *c == p.column) {
                cells.insert((row_of[&p.layer], c), ((*n).clone(), (*r).clone()));
            }
        }
        panels.push(Panel {
            title: "projections".into(),
            columns,
            cells,
            cell_w: 26,
            experts: false,
        });
    }
    for (key, experts) in &expert_cols {
        let n_exp = experts.iter().next_back().map_or(0, |e| e + 1);
        let mut cells = BTreeMap::new();
        for (n, r, p) in quantized
            .iter()
            .filter(|q| q.2.expert.is_some() && q.2.column == key.3)
        {
            if let Some(e) = p.expert {
                cells.insert((row_of[&p.layer], e), ((*n).clone(), (*r).clone()));
            }
        }
        panels.push(Panel {
            title: format!("experts: {}", key.3),
            columns: (0..n_exp).map(|e| e.to_string()).collect(),
            cells,
            cell_w: (320 / n_exp.max(1)).clamp(3, 22),
            experts: true,
        });
    }

    let lo = s.min_sqnr_db.unwrap_or(0.0);
    let hi = quantized
        .iter()
        .filter_map(|q| finite(q.1))
        .reduce(f64::max)
        .unwrap_or(lo);
    let (lo, hi) = if hi - lo < 1e-9 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let colour = |r: &TensorRecord| match finite(r) {
        Some(v) => ramp((v - lo) / (hi - lo)),
        None => ramp(1.0),
    };

    let cell_h = (560 / rows.max(1)).clamp(6, 22);
    let left = 110usize;
    // Room for the rotated projection names above the first panel.
    let longest = panels
        .iter()
        .filter(|p| !p.experts)
        .flat_map(|p| p.columns.iter().map(|c| c.chars().count()))
        .max()
        .unwrap_or(0);
    let label_h = (longest * 5).max(24);
    let top = 100 + label_h;
    let gap = 24usize;
    let label_every = |n: usize, w: usize| (n * 14).div_ceil(w.max(1) * n.max(1)).max(1);
    let mut widths = Vec::new();
    for p in &panels {
        // At least as wide as the panel's title (bold 11 px: about 7 px a character).
        widths.push((p.columns.len() * p.cell_w).max(p.title.chars().count() * 7));
    }
    let grid_w: usize = widths.iter().sum::<usize>() + gap * panels.len().saturating_sub(1);
    let grid_h = rows * cell_h;
    let width = (left + grid_w + 30).max(760);
    let worst_h = 20 * (worst.len() + 1);
    let height = top + grid_h + 110 + worst_h;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        o,
        r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="12" y="24" font-size="16" font-weight="bold">{} - {} {} ({})</text>"#,
        esc(&s.model),
        esc(&s.format.to_uppercase()),
        esc(&s.method),
        esc(&s.layout)
    );
    let _ = writeln!(
        o,
        r#"<text x="12" y="44">{}: {} quantized tensors, {} kept dense; SQNR min {}, mean {}.</text>
<text x="12" y="62">Each cell is one tensor coloured by its SQNR; rows are layers. Hover a cell for its name, SQNR and max abs error.</text>"#,
        esc(&s.architecture),
        s.quantized,
        s.kept,
        esc(&db(s.min_sqnr_db)),
        esc(&db(s.mean_sqnr_db))
    );

    // Row labels (layers) and the axis title.
    let _ = writeln!(
        o,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle" font-weight="bold">layer</text>"#,
        top + grid_h / 2,
        top + grid_h / 2
    );
    let row_label_every = (12 / cell_h.max(1)).max(1);
    for (i, k) in layer_keys.iter().enumerate() {
        if i % row_label_every == 0 || i + 1 == rows {
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="end" font-size="{}">{}</text>"#,
                left - 6,
                top + i * cell_h + cell_h / 2 + 4,
                cell_h.clamp(7, 11),
                esc(&layer_label(k))
            );
        }
    }

    let mut x0 = left;
    for (p, w) in panels.iter().zip(&widths) {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
            x0,
            top - label_h - 14,
            esc(&p.title)
        );
        if p.experts {
            let every = label_every(p.columns.len(), p.cell_w);
            let _ = writeln!(
                o,
                r##"<text x="{}" y="{}" font-size="9" fill="#555555">expert</text>"##,
                x0,
                top - 20
            );
            for (c, label) in p.columns.iter().enumerate() {
                if c % every == 0 {
                    let cx = x0 + c * p.cell_w + p.cell_w / 2;
                    let _ = writeln!(
                        o,
                        r#"<text x="{cx}" y="{}" text-anchor="middle" font-size="9">{}</text>"#,
                        top - 6,
                        esc(label)
                    );
                }
            }
        } else {
            for (c, label) in p.columns.iter().enumerate() {
                let cx = x0 + c * p.cell_w + p.cell_w / 2;
                let y = top - 6;
                let _ = writeln!(
                    o,
                    r#"<text x="{cx}" y="{y}" transform="rotate(-60 {cx} {y})" font-size="9">{}</text>"#,
                    esc(label)
                );
            }
        }
        // Background for missing cells, then the cells.
        let _ = writeln!(
            o,
            r##"<rect x="{x0}" y="{top}" width="{}" height="{grid_h}" fill="{EMPTY}" stroke="#999999" stroke-width="0.5"/>"##,
            p.columns.len() * p.cell_w
        );
        for ((row, col), (name, r)) in &p.cells {
            let _ = writeln!(
                o,
                r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{} | SQNR {} | max abs err {}</title></rect>"#,
                x0 + col * p.cell_w,
                top + row * cell_h,
                p.cell_w,
                cell_h,
                colour(r),
                esc(name),
                esc(&db(finite(r))),
                esc(&err(r.max_abs_err))
            );
        }
        x0 += w + gap;
    }

    // Legend: a colour bar with ticks, and the missing-cell swatch.
    let ly = top + grid_h + 30;
    let lw = 300usize;
    let _ = writeln!(
        o,
        r#"<defs><linearGradient id="ramp" x1="0" y1="0" x2="1" y2="0">"#
    );
    for (i, _) in RAMP.iter().enumerate() {
        let t = i as f64 / (RAMP.len() - 1) as f64;
        let _ = writeln!(o, r#"<stop offset="{:.3}" stop-color="{}"/>"#, t, ramp(t));
    }
    let _ = writeln!(o, "</linearGradient></defs>");
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="{}" font-weight="bold">SQNR (dB): dark = larger error, bright = smaller</text>"#,
        ly - 6
    );
    let _ = writeln!(
        o,
        r##"<rect x="{left}" y="{ly}" width="{lw}" height="14" fill="url(#ramp)" stroke="#999999" stroke-width="0.5"/>"##
    );
    // Enough decimals that the ticks differ.
    let prec = if hi - lo < 1.0 {
        2
    } else if hi - lo < 10.0 {
        1
    } else {
        0
    };
    for i in 0..=4usize {
        let x = left + lw * i / 4;
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let _ = writeln!(
            o,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#333333"/><text x="{x}" y="{}" text-anchor="middle" font-size="10">{v:.prec$}</text>"##,
            ly + 14,
            ly + 18,
            ly + 30
        );
    }
    let sx = left + lw + 30;
    let _ = writeln!(
        o,
        r##"<rect x="{sx}" y="{ly}" width="14" height="14" fill="{EMPTY}" stroke="#999999" stroke-width="0.5"/><text x="{}" y="{}">no such tensor, or kept dense</text>"##,
        sx + 20,
        ly + 11
    );

    // The worst tensors, named.
    let wy = ly + 60;
    let _ = writeln!(
        o,
        r#"<text x="12" y="{wy}" font-weight="bold">Worst tensors (lowest SQNR)</text>"#
    );
    for (i, t) in worst.iter().enumerate() {
        let _ = writeln!(
            o,
            r#"<text x="12" y="{}" font-family="DejaVu Sans Mono, monospace" xml:space="preserve">{:>2}. {:>9}  max abs err {:>8}  {}</text>"#,
            wy + 20 * (i + 1),
            i + 1,
            esc(&db(t.sqnr_db)),
            esc(&err(t.max_abs_err)),
            esc(&t.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places() {
        let p = place("model.layers.3.mlp.experts.5.down_proj.weight");
        assert_eq!(p.layer, Some(("model.layers".into(), 3)));
        assert_eq!(p.expert, Some(5));
        assert_eq!(p.column, "down_proj");
        let p = place("model.layers.12.self_attn.q_proj.weight");
        assert_eq!((p.expert, p.column.as_str()), (None, "q_proj"));
        let p = place("model.layers.1.mlp.shared_expert.up_proj.weight");
        assert_eq!(p.column, "shared_expert.up_proj");
        let p = place("model.mtp_layers.0.mlp.gate_proj.weight");
        assert_eq!(layer_label(&p.layer), "mtp_layers.0");
        let p = place("lm_head.weight");
        assert_eq!((p.layer, p.column.as_str()), (None, "lm_head"));
    }

    #[test]
    fn ramp_ends_and_escaping() {
        assert_eq!(ramp(0.0), "#440154");
        assert_eq!(ramp(1.0), "#fde725");
        assert_eq!(ramp(f64::NAN), "#fde725");
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }
}
