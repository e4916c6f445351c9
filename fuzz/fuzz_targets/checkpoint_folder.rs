//! Checkpoint::open on a folder built from the input (config.json, optional index, one shard):
//! never panics, and every tensor it lists can be read without leaving the mapping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mimo_runtime::checkpoint::Checkpoint;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let dir = common::write_folder(data, None);
    if let Ok(ck) = Checkpoint::open(&dir) {
        let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
        for n in &names {
            let t = ck.tensor(n).expect("a listed tensor is readable");
            let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
            assert_eq!(t.dtype.byte_len(numel), Some(t.data.len() as u64));
            std::hint::black_box(t.data.iter().fold(0u8, |a, &b| a ^ b));
        }
        let _ = mimo_runtime::format::detect(&ck);
    }
});
