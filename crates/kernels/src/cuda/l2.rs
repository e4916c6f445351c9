//! Device ranges a kernel asks L2 to fetch for the kernel after it (common.cuh `L2Ranges` and
//! `prefetch_l2_share`): each block of the launch asks for its share with one bulk prefetch per
//! range, so the bytes arrive while a latency-bound kernel leaves DRAM idle.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};

/// Ranges per launch (common.cuh `L2_RANGES`).
pub const L2_RANGES: usize = 8;

/// Up to `L2_RANGES` device ranges, as the kernels take them by value; empty slots have 0
/// bytes. Only addresses are held: the caller keeps the buffers alive until the launch (or the
/// graph it is captured in) is done.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L2Ranges {
    ptr: [u64; L2_RANGES],
    bytes: [u64; L2_RANGES],
}

const _: () = assert!(std::mem::size_of::<L2Ranges>() == 16 * L2_RANGES);

// SAFETY: plain-old-data, #[repr(C)], the same field order and types as the CUDA struct.
unsafe impl DeviceRepr for L2Ranges {}

impl L2Ranges {
    /// No ranges: the kernels skip the prefetch.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds bytes `[off, off + bytes)` of `s` (clamped to its length). Returns false, adding
    /// nothing, where every slot is taken or nothing would be added.
    pub fn push<T>(
        &mut self,
        stream: &CudaStream,
        s: &CudaSlice<T>,
        off: usize,
        bytes: usize,
    ) -> bool {
        let len = s.len() * std::mem::size_of::<T>();
        let off = off.min(len);
        let bytes = bytes.min(len - off) as u64;
        let Some(slot) = self.bytes.iter().position(|&b| b == 0) else {
            return false;
        };
        if bytes == 0 {
            return false;
        }
        let (ptr, _sync) = s.device_ptr(stream);
        self.ptr[slot] = ptr + off as u64;
        self.bytes[slot] = bytes;
        true
    }
}

#[cfg(test)]
mod tests {

    /// The piece of a range of `bytes` bytes that block `b` of `blocks` asks for, as
    /// `prefetch_l2_share` cuts it: (offset, length), or None where the block has none. Every
    /// piece but the last is a multiple of 128 bytes, and the pieces cover the range once.
    fn l2_share(bytes: u64, blocks: u64, b: u64) -> Option<(u64, u64)> {
        if bytes == 0 || blocks == 0 {
            return None;
        }
        let piece = (bytes.div_ceil(blocks) + 127) & !127;
        let lo = b * piece;
        (lo < bytes).then(|| (lo, piece.min(bytes - lo)))
    }

    #[test]
    fn shares_cover_each_range_once() {
        for &bytes in &[1u64, 127, 128, 129, 9_437_184, 10_485_761, 4_718_592 + 17] {
            for &blocks in &[1u64, 7, 128, 352, 1000, 20_000] {
                let mut next = 0;
                for b in 0..blocks {
                    if let Some((lo, len)) = l2_share(bytes, blocks, b) {
                        assert_eq!(lo, next, "bytes {bytes} blocks {blocks} block {b}");
                        assert!(len > 0);
                        if lo + len < bytes {
                            assert_eq!(len % 128, 0);
                        }
                        next = lo + len;
                    }
                }
                assert_eq!(next, bytes, "bytes {bytes} blocks {blocks}");
            }
        }
        assert_eq!(l2_share(0, 4, 0), None);
        assert_eq!(l2_share(100, 0, 0), None);
    }
}
