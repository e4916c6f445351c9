//! `mimo-quant report`: the picture written by convert next to the manifest is well-formed XML,
//! has a row for every layer and a cell for every quantized tensor, is listed and hashed by the
//! manifest (verify checks it), is byte-identical when regenerated or converted again, and a
//! bad manifest is a clear error naming the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use mimo_quant::convert::{convert_with, ConvertConfig};
use mimo_quant::manifest::{Manifest, TensorRecord};
use mimo_quant::methods::QuantOptions;
use mimo_quant::report::{build, report_dir, ReportError, ReportInput, REPORT_FILE};
use mimo_runtime::fixtures::{write_fixture, Arch};
use mimo_runtime::format::Layout;

mod common;
use common::convert_config;

/// A minimal XML well-formedness check: one root, every start tag closed in order, attribute
/// values quoted, only the five predefined entities or character references, no `<` in text.
fn check_xml(doc: &str) -> Result<(), String> {
    let b = doc.as_bytes();
    let mut i = 0;
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let entity = |at: usize| -> Result<usize, String> {
        let end = doc[at..]
            .find(';')
            .ok_or(format!("unterminated entity at {at}"))?;
        let name = &doc[at + 1..at + end];
        let ok = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
            || (name.starts_with("#x")
                && name.len() > 2
                && name[2..].chars().all(|c| c.is_ascii_hexdigit()))
            || (name.starts_with('#')
                && name.len() > 1
                && name[1..].chars().all(|c| c.is_ascii_digit()));
        if ok {
            Ok(at + end + 1)
        } else {
            Err(format!("bad entity '&{name};' at {at}"))
        }
    };
    while i < b.len() {
        match b[i] {
            b'<' if doc[i..].starts_with("<?") => {
                i += doc[i..].find("?>").ok_or("unterminated <?")? + 2;
            }
            b'<' if doc[i..].starts_with("<!--") => {
                i += doc[i..].find("-->").ok_or("unterminated comment")? + 3;
            }
            b'<' if doc[i..].starts_with("</") => {
                let end = i + doc[i..].find('>').ok_or("unterminated end tag")?;
                let name = doc[i + 2..end].trim();
                match stack.pop() {
                    Some(open) if open == name => {}
                    other => return Err(format!("</{name}> at {i} closes {other:?}")),
                }
                i = end + 1;
            }
            b'<' => {
                if stack.is_empty() {
                    roots += 1;
                }
                let mut j = i + 1;
                while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' && b[j] != b'/' {
                    j += 1;
                }
                let name = doc[i + 1..j].to_string();
                if name.is_empty() {
                    return Err(format!("empty tag name at {i}"));
                }
                // Attributes: name="value" pairs.
                loop {
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if j >= b.len() {
                        return Err(format!("unterminated <{name}>"));
                    }
                    if b[j] == b'>' {
                        stack.push(name.clone());
                        j += 1;
                        break;
                    }
                    if doc[j..].starts_with("/>") {
                        j += 2;
                        break;
                    }
                    let eq = j + doc[j..]
                        .find('=')
                        .ok_or(format!("attribute without = at {j}"))?;
                    let an = doc[j..eq].trim();
                    if an.is_empty() || an.contains(|c: char| c.is_whitespace() || c == '<') {
                        return Err(format!("bad attribute name '{an}' at {j}"));
                    }
                    let q = b.get(eq + 1).copied().ok_or("attribute at end")?;
                    if q != b'"' && q != b'\'' {
                        return Err(format!("unquoted attribute {an} at {eq}"));
                    }
                    let close = eq
                        + 2
                        + doc[eq + 2..]
                            .find(q as char)
                            .ok_or(format!("unterminated attribute {an}"))?;
                    let mut k = eq + 2;
                    while k < close {
                        match b[k] {
                            b'<' => return Err(format!("'<' in attribute {an} at {k}")),
                            b'&' => k = entity(k)?,
                            _ => k += 1,
                        }
                    }
                    j = close + 1;
                }
                i = j;
            }
            b'&' => i = entity(i)?,
            c => {
                if stack.is_empty() && !c.is_ascii_whitespace() {
                    return Err(format!("text outside the root at {i}"));
                }
                i += 1;
            }
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!("<{open}> never closed"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(())
}

#[test]
fn the_xml_check_can_fail() {
    assert!(check_xml("<a><b/></a>").is_ok());
    assert!(check_xml("<?xml version=\"1.0\"?>\n<a x=\"1 &amp; 2\">t &lt; u</a>\n").is_ok());
    for bad in [
        "<a><b></a></b>",
        "<a>",
        "<a></a><b></b>",
        "<a x=1></a>",
        "<a>x & y</a>",
        "<a x=\"<\"></a>",
        "<a>&bogus;</a>",
    ] {
        assert!(check_xml(bad).is_err(), "{bad} passed");
    }
}

fn convert_moe(src: &Path, out: &Path) {
    let cfg = ConvertConfig {
        force: true,
        ..convert_config(src, out, Layout::CtNvfp4)
    };
    convert_with(
        &cfg,
        &QuantOptions::default(),
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap();
}

#[test]
fn convert_writes_a_complete_deterministic_report() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    write_fixture(&src, Arch::Qwen3Moe, 7).unwrap();
    let out = d.path().join("out");
    convert_moe(&src, &out);
    let svg = std::fs::read_to_string(out.join(REPORT_FILE)).unwrap();
    check_xml(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));

    // Every layer has a row label, every quantized tensor a cell (its name in a tooltip).
    let man = Manifest::read(&out).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    assert!(layers >= 2);
    for l in 0..layers {
        assert!(svg.contains(&format!(">layers.{l}</text>")), "layer {l}");
    }
    let quantized: Vec<&String> = man
        .tensors
        .iter()
        .filter(|(_, r)| r.action == "quantized")
        .map(|(n, _)| n)
        .collect();
    assert!(quantized.iter().any(|n| n.contains(".experts.")));
    for n in &quantized {
        assert!(svg.contains(&format!("<title>{n} | SQNR")), "{n}");
    }
    assert_eq!(svg.matches("<title>").count(), quantized.len());
    // Title names model, format and method; expert panels exist; the worst tensor is named.
    assert!(svg.contains("src - NVFP4 rtn"), "title");
    assert!(svg.contains("experts: down_proj"));
    let r = report_dir(&out, 3).unwrap();
    let worst = &r.summary.worst_tensors[0];
    assert!(
        svg.contains(&format!("  {}</text>", worst.name)),
        "{}",
        worst.name
    );
    assert_eq!(r.summary.worst_tensors.len(), 3);
    assert_eq!(r.summary.layers.len() as u64, layers);
    let min = quantized
        .iter()
        .filter_map(|n| man.tensors[*n].sqnr_db)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(worst.sqnr_db, Some(min));

    // The manifest lists and hashes the picture, so verify checks it.
    assert!(man.files.iter().any(|f| f.name == REPORT_FILE));
    assert!(mimo_quant::verify::verify(&out, None).unwrap().ok);
    // Regenerated from the manifest alone: the same bytes (whatever --top the summary uses).
    assert_eq!(r.svg, svg);
    assert_eq!(report_dir(&out, 1).unwrap().svg, svg);
    // A second conversion writes the same bytes.
    let out2 = d.path().join("out2");
    convert_moe(&src, &out2);
    assert_eq!(
        std::fs::read(out2.join(REPORT_FILE)).unwrap(),
        svg.as_bytes()
    );
    // Corrupting the picture is caught by verify.
    std::fs::write(out.join(REPORT_FILE), svg.replace("layers.0", "layers.X")).unwrap();
    assert!(!mimo_quant::verify::verify(&out, None).unwrap().ok);
}

#[test]
fn bad_manifests_are_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let e = report_dir(d.path(), 10).unwrap_err();
    assert!(matches!(e, ReportError::Read { .. }), "{e}");
    assert!(e.to_string().contains("mimo-quant.json"), "{e}");

    std::fs::write(d.path().join("mimo-quant.json"), "{\"tool\": 3").unwrap();
    let e = report_dir(d.path(), 10).unwrap_err();
    assert!(matches!(e, ReportError::Parse { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&d.path().join("mimo-quant.json").display().to_string()),
        "{e}"
    );

    // Valid JSON, but nothing quantized.
    let m = serde_json::json!({
        "tool": {"name": "mimo-quant", "version": "0"},
        "source": {"path": "x", "files": []},
        "options": {"format": "nvfp4", "layout": "l", "method": "rtn", "ignore": [],
                    "quantize_lm_head": false, "max_shard_size": 1},
        "architecture": "A",
        "tensors": {"model.norm.weight": {"action": "kept", "dtype": "BF16", "shape": [4]}},
        "files": []
    });
    std::fs::write(d.path().join("mimo-quant.json"), m.to_string()).unwrap();
    let e = report_dir(d.path(), 10).unwrap_err();
    assert!(matches!(e, ReportError::Empty { .. }), "{e}");
    assert!(e.to_string().contains("mimo-quant.json"), "{e}");
}

#[test]
fn hostile_tensor_names_are_escaped() {
    let rec = |s: f64| TensorRecord {
        action: "quantized".into(),
        reason: None,
        dtype: "BF16".into(),
        shape: vec![16, 16],
        fused_group: None,
        global_scale: Some(1.0),
        sqnr_db: Some(s),
        max_abs_err: Some(0.5),
    };
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "model.layers.0.self_attn.<q&\"'>.weight".to_string(),
        rec(10.0),
    );
    tensors.insert(
        "model.layers.1.mlp.experts.3.w\u{1}.weight".to_string(),
        rec(12.0),
    );
    tensors.insert("lm_head.weight".to_string(), rec(11.0));
    let input = ReportInput {
        model: "m<&>".into(),
        architecture: "A&B",
        format: "nvfp4".into(),
        layout: "l",
        method: "gptq",
        tensors: &tensors,
    };
    let r = build(&input, 10).unwrap();
    check_xml(&r.svg).unwrap();
    assert!(r.svg.contains("&lt;q&amp;&quot;&apos;&gt;"));
    // lm_head sits in its own row after the layers; worst first.
    assert_eq!(r.summary.layers.last().unwrap().layer, "other");
    assert_eq!(
        r.summary.worst_tensors[0].name,
        "model.layers.0.self_attn.<q&\"'>.weight"
    );
    // Equal SQNR everywhere still gives a usable colour range.
    let mut flat = BTreeMap::new();
    flat.insert(
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        rec(9.0),
    );
    flat.insert(
        "model.layers.0.self_attn.k_proj.weight".to_string(),
        rec(9.0),
    );
    let r = build(
        &ReportInput {
            tensors: &flat,
            ..input
        },
        10,
    )
    .unwrap();
    check_xml(&r.svg).unwrap();
    assert!(!r.svg.contains("NaN"));
}
