//! Tests of checkpoint parsing: a valid file round-trips, each kind of bad input gets its error.

use super::*;
use std::fs;

fn entry(name: &str, dtype: DType, shape: &[usize]) -> HeaderEntry {
    HeaderEntry {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_dir(dir: &Path, tensors: &[(HeaderEntry, Vec<u8>)]) {
    fs::write(dir.join(CONFIG_FILE), r#"{"model_type":"llama"}"#).unwrap();
    write_safetensors(&dir.join(SINGLE_FILE), tensors, &[]).unwrap();
}

/// Writes a raw file: 8-byte length, the given header text, then `data`.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    fs::write(path, v).unwrap();
}

fn raw_dir(header: &str, data: &[u8]) -> (tempfile::TempDir, Result<Checkpoint, CheckpointError>) {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    raw_file(&d.path().join(SINGLE_FILE), header, data);
    let r = Checkpoint::open(d.path());
    (d, r)
}

#[test]
fn single_file_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let a = bytes(2 * 3 * 2, 1);
    let b = bytes(4 * 4, 7);
    write_dir(
        d.path(),
        &[
            (entry("b.weight", DType::F32, &[2, 2]), b.clone()),
            (entry("a.weight", DType::BF16, &[2, 3]), a.clone()),
        ],
    );
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(
        ck.tensor_names().collect::<Vec<_>>(),
        ["a.weight", "b.weight"]
    );
    let t = ck.tensor("a.weight").unwrap();
    assert_eq!(
        (t.dtype, t.shape, t.data),
        (DType::BF16, &[2usize, 3][..], &a[..])
    );
    let t = ck.tensor("b.weight").unwrap();
    assert_eq!(
        (t.dtype, t.shape, t.data),
        (DType::F32, &[2usize, 2][..], &b[..])
    );
    assert_eq!(ck.config()["model_type"], "llama");
    assert!(matches!(
        ck.tensor("c"),
        Err(CheckpointError::TensorNotFound { .. })
    ));
}

#[test]
fn header_is_padded_to_eight() {
    let h = header_bytes(&[entry("x", DType::U8, &[3])], &[]);
    assert_eq!((h.len() - 8) % 8, 0);
    assert_eq!(
        u64::from_le_bytes(h[..8].try_into().unwrap()) as usize,
        h.len() - 8
    );
}

fn sharded(dir: &Path, index: &str) {
    fs::write(dir.join(CONFIG_FILE), "{}").unwrap();
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[(entry("a", DType::BF16, &[2]), bytes(4, 0))],
        &[],
    )
    .unwrap();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[(entry("b", DType::BF16, &[2]), bytes(4, 9))],
        &[],
    )
    .unwrap();
    fs::write(dir.join(INDEX_FILE), index).unwrap();
}

#[test]
fn sharded_round_trip() {
    let d = tempfile::tempdir().unwrap();
    sharded(
        d.path(),
        r#"{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#,
    );
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.tensor("b").unwrap().data, &bytes(4, 9)[..]);
    assert_eq!(ck.files().count(), 2);
    assert_eq!(ck.index_metadata().unwrap()["total_size"], 8);
}

#[test]
fn index_naming_a_missing_shard() {
    let d = tempfile::tempdir().unwrap();
    sharded(
        d.path(),
        r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00003-of-00002.safetensors"}}"#,
    );
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::MissingShard { shard, tensor, .. } if shard == "model-00003-of-00002.safetensors" && tensor == "b"),
        "{e}"
    );
    assert!(e.to_string().contains(INDEX_FILE), "{e}");
}

#[test]
fn index_escaping_the_folder() {
    for shard in [
        "../x.safetensors",
        "/etc/passwd",
        "a/../../x.safetensors",
        "",
    ] {
        let d = tempfile::tempdir().unwrap();
        sharded(d.path(), &format!(r#"{{"weight_map":{{"a":"{shard}"}}}}"#));
        let e = Checkpoint::open(d.path()).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::UnsafeShardPath { tensor, .. } if tensor == "a"),
            "{shard}: {e}"
        );
    }
}

#[test]
fn index_mapping_a_tensor_to_the_wrong_shard() {
    let d = tempfile::tempdir().unwrap();
    sharded(
        d.path(),
        r#"{"weight_map":{"a":"model-00002-of-00002.safetensors"}}"#,
    );
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::IndexMismatch { tensor, .. } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn invalid_index_json() {
    let d = tempfile::tempdir().unwrap();
    sharded(d.path(), r#"{"weight_map": ["#);
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::IndexJson { .. })
    ));
}

#[test]
fn missing_config() {
    let d = tempfile::tempdir().unwrap();
    write_safetensors(
        &d.path().join(SINGLE_FILE),
        &[(entry("a", DType::U8, &[1]), vec![1])],
        &[],
    )
    .unwrap();
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::MissingConfig { .. }), "{e}");
    assert!(e.to_string().contains("config.json"));
}

#[test]
fn invalid_config_json() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(CONFIG_FILE), "{\"a\":").unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::ConfigJson { .. })
    ));
    fs::write(d.path().join(CONFIG_FILE), "[1]").unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::ConfigJson { .. })
    ));
}

#[test]
fn no_weights() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::NoWeights { .. })
    ));
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    write_dir(
        d.path(),
        &[
            (entry("a", DType::BF16, &[8]), bytes(16, 0)),
            (entry("b", DType::BF16, &[8]), bytes(16, 1)),
        ],
    );
    let p = d.path().join(SINGLE_FILE);
    let full = fs::read(&p).unwrap();
    fs::write(&p, &full[..full.len() - 5]).unwrap();
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Truncated { tensor, end: 32, data_len: 27, .. } if tensor == "b"),
        "{e}"
    );
    assert!(e.to_string().contains("model.safetensors"));
    // Cut inside the header, and inside the length prefix.
    fs::write(&p, &full[..20]).unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::TruncatedHeader { len: 20, .. })
    ));
    fs::write(&p, &full[..5]).unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::TruncatedHeader {
            len: 5,
            needed: 8,
            ..
        })
    ));
}

#[test]
fn header_too_large() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    fs::write(
        d.path().join(SINGLE_FILE),
        (MAX_HEADER_LEN + 1).to_le_bytes(),
    )
    .unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::HeaderTooLarge { .. })
    ));
}

#[test]
fn invalid_header_json() {
    let (_d, r) = raw_dir(r#"{"a": {"dtype": "BF16", "#, &[]);
    let e = r.unwrap_err();
    assert!(matches!(e, CheckpointError::HeaderJson { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"));
    let (_d, r) = raw_dir("[1, 2]", &[]);
    assert!(matches!(r, Err(CheckpointError::HeaderJson { .. })));
    let (_d, r) = raw_dir(r#"{"a": {"dtype": "BF16", "shape": [1]}}"#, &[0, 0]);
    assert!(matches!(r, Err(CheckpointError::InvalidEntry { ref tensor, .. }) if tensor == "a"));
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 2]}}"#,
        &[0, 0],
    );
    assert!(matches!(r, Err(CheckpointError::InvalidEntry { .. })));
}

#[test]
fn out_of_range_offsets() {
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "b": {"dtype": "U8", "shape": [2], "data_offsets": [100, 102]}}"#,
        &[0; 4],
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, CheckpointError::OffsetsOutOfRange { tensor, begin: 100, end: 102, data_len: 4, .. } if tensor == "b"),
        "{e}"
    );
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "U8", "shape": [0], "data_offsets": [3, 2]}}"#,
        &[0; 4],
    );
    let e = r.expect_err("reversed offsets were accepted");
    assert!(
        matches!(&e, CheckpointError::OffsetsOutOfRange { tensor, .. } if tensor == "a"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("[3, 2] out of range (the first offset is after the second)"),
        "{e}"
    );
}

#[test]
fn overlapping_offsets() {
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "BF16", "shape": [1], "data_offsets": [2, 4]}}"#,
        &[0; 4],
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Overlap { tensor, other, .. } if tensor == "a" && other == "b"),
        "{e}"
    );
    // Overlap with a range that is not the neighbour in start order.
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}, "c": {"dtype": "U8", "shape": [1], "data_offsets": [5, 6]}}"#,
        &[0; 8],
    );
    assert!(matches!(r, Err(CheckpointError::Overlap { .. })));
}

#[test]
fn size_mismatch() {
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}}"#,
        &[0; 4],
    );
    assert!(matches!(
        r,
        Err(CheckpointError::SizeMismatch {
            expected: 6,
            actual: 4,
            ..
        })
    ));
}

#[test]
fn unknown_dtype() {
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}"#,
        &[0; 8],
    );
    let e = r.unwrap_err();
    assert!(
        matches!(&e, CheckpointError::UnknownDType { tensor, dtype, .. } if tensor == "a" && dtype == "C64"),
        "{e}"
    );
}

#[test]
fn duplicate_names() {
    let (_d, r) = raw_dir(
        r#"{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}"#,
        &[0; 2],
    );
    assert!(matches!(r, Err(CheckpointError::DuplicateTensor { ref tensor, .. }) if tensor == "a"));
    // Across shards.
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join(CONFIG_FILE), "{}").unwrap();
    write_safetensors(
        &d.path().join("x-1.safetensors"),
        &[(entry("a", DType::U8, &[1]), vec![1])],
        &[],
    )
    .unwrap();
    write_safetensors(
        &d.path().join("x-2.safetensors"),
        &[(entry("a", DType::U8, &[1]), vec![2])],
        &[],
    )
    .unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(CheckpointError::DuplicateTensor { .. })
    ));
}

#[test]
fn metadata_is_read() {
    let (_d, r) = raw_dir(
        r#"{"__metadata__": {"format": "pt"}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}"#,
        &[0],
    );
    assert_eq!(r.unwrap().len(), 1);
    let (_d, r) = raw_dir(r#"{"__metadata__": {"format": 1}}"#, &[]);
    assert!(matches!(r, Err(CheckpointError::HeaderJson { .. })));
}
