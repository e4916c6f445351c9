//! The safetensors header parser on arbitrary bytes: never panics, and every range it accepts
//! lies inside the buffer, has the byte length of its dtype and shape, and overlaps no other.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mimo_runtime::checkpoint::parse_header;

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, _meta)) = parse_header(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for e in tensors.values() {
        assert!(
            e.start <= e.end && e.end <= data.len(),
            "range outside the buffer"
        );
        let numel: u64 = e.shape.iter().map(|&d| d as u64).product();
        assert_eq!(e.dtype.byte_len(numel), Some((e.end - e.start) as u64));
        // Touch the bytes the reader would hand out.
        std::hint::black_box(&data[e.start..e.end]);
        if e.end > e.start {
            ranges.push((e.start, e.end));
        }
    }
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "accepted overlapping ranges");
    }
});
