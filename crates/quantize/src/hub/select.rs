//! Which files of a repo are downloaded: the conversion inputs of a model, the data files of a
//! calibration dataset.

/// Name of the sharded-checkpoint index.
pub(crate) const INDEX_FILE: &str = "model.safetensors.index.json";

/// Files, besides the weights, that conversion reads or copies next to its output.
const MODEL_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    // Companions of the tokenizer that transformers loads when they exist.
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Whether a model repo file is a conversion input, before looking at the index: top-level only
/// (so `original/`, `onnx/`... are never taken), safetensors weights and the index, config,
/// tokenizer and generation files. `.bin`, `.pth`, `.pt`, `.gguf` never match.
pub(crate) fn is_model_file(path: &str) -> bool {
    if path.contains('/') {
        return false;
    }
    if MODEL_SIDE_FILES.contains(&path) || path == INDEX_FILE {
        return true;
    }
    // tokenizer.json, tokenizer_config.json (the `tokenizer*.json` family).
    if path.starts_with("tokenizer") && path.ends_with(".json") {
        return true;
    }
    path.ends_with(".safetensors")
}

/// Narrows the weights to the shards named by the index's `weight_map` when there is one, so that
/// a repo that ships both a sharded checkpoint and e.g. `consolidated.safetensors` downloads only
/// the former. Returns the kept paths (sorted, unique) and the shards the index names that the
/// repo does not list.
pub(crate) fn narrow_to_index(
    candidates: &[String],
    index_shards: Option<&[String]>,
) -> (Vec<String>, Vec<String>) {
    let Some(shards) = index_shards else {
        return (candidates.to_vec(), Vec::new());
    };
    let mut kept: Vec<String> = candidates
        .iter()
        .filter(|p| !p.ends_with(".safetensors") || shards.contains(p))
        .cloned()
        .collect();
    kept.sort();
    kept.dedup();
    let missing = shards
        .iter()
        .filter(|s| !candidates.contains(s))
        .cloned()
        .collect();
    (kept, missing)
}

/// Shard file names of an index (`weight_map` values), sorted and unique.
pub(crate) fn index_shards(index_json: &[u8]) -> Result<Vec<String>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(index_json).map_err(|e| format!("invalid JSON: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| "no `weight_map` object".to_string())?;
    let mut shards = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map[{tensor}] is not a string"))?;
        // A shard outside the top level would escape the snapshot folder; refuse it.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(format!(
                "weight_map[{tensor}] names an unexpected file `{file}`"
            ));
        }
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Whether a dataset repo file is a data file of the wanted split. Without a split, files of a
/// `train` split are preferred when there are any (see [`select_dataset_files`]).
fn is_data_file(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.ends_with(".jsonl") || lower.ends_with(".parquet")
}

/// Whether `path` belongs to `split`: a folder named after it (`train/x.parquet`,
/// `data/train/...`), or a file name that is the split or starts with `split-`, `split_`, `split.`
/// (`train.jsonl`, `train-00000-of-00002.parquet`), the conventions of the datasets library.
fn in_split(path: &str, split: &str) -> bool {
    let mut parts: Vec<&str> = path.split('/').collect();
    let file = parts.pop().unwrap_or_default();
    if parts.contains(&split) {
        return true;
    }
    let stem = file.split('.').next().unwrap_or_default();
    stem == split
        || file.starts_with(&format!("{split}-"))
        || file.starts_with(&format!("{split}_"))
}

/// The data files to download from a dataset repo's file list, sorted. With `split` only that
/// split; without, the `train` split if the repo has one, else every jsonl/parquet file.
pub(crate) fn select_dataset_files(files: &[String], split: Option<&str>) -> Vec<String> {
    let data: Vec<&String> = files.iter().filter(|p| is_data_file(p)).collect();
    let mut out: Vec<String> = match split {
        Some(s) => data
            .into_iter()
            .filter(|p| in_split(p, s))
            .cloned()
            .collect(),
        None => {
            let train: Vec<String> = data
                .iter()
                .filter(|p| in_split(p, "train"))
                .map(|p| p.to_string())
                .collect();
            if train.is_empty() {
                data.into_iter().cloned().collect()
            } else {
                train
            }
        }
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_are_conversion_inputs_only() {
        for yes in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "special_tokens_map.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
        ] {
            assert!(is_model_file(yes), "{yes}");
        }
        for no in [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "consolidated.00.pth",
            "model.gguf",
            "original/model.safetensors",
            "original/tokenizer.model",
            "onnx/model.onnx",
            "README.md",
            ".gitattributes",
            "model.pt",
            "tf_model.h5",
        ] {
            assert!(!is_model_file(no), "{no}");
        }
    }

    #[test]
    fn index_narrows_the_weights() {
        let files: Vec<String> = [
            "config.json",
            "consolidated.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            INDEX_FILE,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let index = br#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors",
            "b":"model-00002-of-00002.safetensors","c":"model-00003-of-00003.safetensors"}}"#;
        let shards = index_shards(index).unwrap();
        let (kept, missing) = narrow_to_index(&files, Some(&shards));
        assert_eq!(
            kept,
            vec![
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                INDEX_FILE
            ]
        );
        assert_eq!(missing, vec!["model-00003-of-00003.safetensors"]);
        assert!(index_shards(br#"{"weight_map":{"a":"../x.safetensors"}}"#).is_err());
        assert!(index_shards(b"{}").is_err());
    }

    #[test]
    fn dataset_splits() {
        let files: Vec<String> = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/validation-00000-of-00001.parquet",
            "test.jsonl",
            "train.jsonl",
            "trainer.jsonl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            select_dataset_files(&files, None),
            vec![
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
                "train.jsonl"
            ]
        );
        assert_eq!(
            select_dataset_files(&files, Some("test")),
            vec!["test.jsonl"]
        );
        assert_eq!(
            select_dataset_files(&files, Some("validation")),
            vec!["data/validation-00000-of-00001.parquet"]
        );
        assert!(select_dataset_files(&files, Some("dev")).is_empty());
        let only_other = vec!["a.jsonl".to_string(), "b.txt".to_string()];
        assert_eq!(select_dataset_files(&only_other, None), vec!["a.jsonl"]);
    }
}
