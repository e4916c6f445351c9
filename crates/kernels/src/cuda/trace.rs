//! Decode timeline: with `MIMO_TRACE=1` in the environment, every kernel source is compiled
//! with `MIMO_TRACE` defined and thread 0 of every block appends one record per `pdl_enter`
//! call and `trace_mark()` point (common.cuh) to one device buffer (a region and a counter per
//! SM): which launch (%gridid), %globaltimer before and after the programmatic-dependency wait
//! (a mark: the same time twice), the block, its SM and the source line. Without the variable
//! the kernels are compiled exactly as before and nothing here allocates.
//!
//! This is how the time between kernels of a PDL chain can be seen on a machine without a
//! system profiler: when each launch's blocks were scheduled, and when each one's wait on the
//! previous kernel returned (that kernel's end on the critical path).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaModule, CudaSlice, CudaStream, DevicePtr};

use super::error::{drv, CudaError};

/// Records per SM id (32 bytes each; 256 ids): several decode steps of a 48-layer model.
const PER_SM: usize = 8192;
/// SM ids with a region of their own (the record keeps 8 bits of %smid).
const SMS: usize = 256;
/// Words before the records: unused, records per SM, two unused, one counter per SM id.
const HEADER_WORDS: usize = 4 + SMS;

/// Whether `MIMO_TRACE=1` was set when the process first asked.
pub(crate) fn trace_requested() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("MIMO_TRACE").is_ok_and(|v| v == "1"))
}

/// The NVRTC options of a traced `file`: the define and the file's number in records.
pub(crate) fn trace_defines(file: &str) -> Vec<String> {
    vec![
        "-DMIMO_TRACE".into(),
        format!("-DMIMO_TRACE_FILE={}", trace_file_id(file)),
    ]
}

/// The kernel sources records can name: file number `i + 1` is `TRACED_FILES[i]`.
const TRACED_FILES: [&str; 3] = ["fp4_gemm.cu", "moe.cu", "ops.cu"];

/// The number records carry for a kernel source file (0: unknown).
fn trace_file_id(file: &str) -> u8 {
    TRACED_FILES
        .iter()
        .position(|f| *f == file)
        .map_or(0, |i| i as u8 + 1)
}

/// Source file of a record's `pdl_enter` call, by the number `trace_defines` gave it.
pub fn trace_file_name(id: u8) -> &'static str {
    (id as usize)
        .checked_sub(1)
        .and_then(|i| TRACED_FILES.get(i))
        .copied()
        .unwrap_or("?")
}

/// One `pdl_enter` call or `trace_mark` point of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// The launch (%gridid): the same for every block of one kernel launch.
    pub grid: u64,
    /// %globaltimer (ns) when the call began.
    pub wait_begin_ns: u64,
    /// %globaltimer (ns) when the wait returned: every grid before this one had finished.
    pub wait_end_ns: u64,
    /// Linear block index in the grid.
    pub block: u32,
    /// Source line of the `pdl_enter` call or `trace_mark`.
    pub line: u16,
    /// A `trace_mark` point (both times equal), not a wait.
    pub mark: bool,
    /// Source file number ([`trace_file_name`]).
    pub file: u8,
    /// Multiprocessor the block ran on.
    pub sm: u8,
}

/// The device buffer the kernels write to.
pub(crate) struct TraceBuffer {
    buf: CudaSlice<u64>,
}

impl TraceBuffer {
    /// Allocates the buffer where tracing was requested.
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Option<TraceBuffer>, CudaError> {
        if !trace_requested() {
            return Ok(None);
        }
        let mut buf = stream
            .alloc_zeros::<u64>(HEADER_WORDS + 4 * SMS * PER_SM)
            .map_err(drv("trace buffer"))?;
        stream
            .memcpy_htod(&[0, PER_SM as u64, 0, 0], &mut buf.slice_mut(..4))
            .map_err(drv("trace header"))?;
        Ok(Some(TraceBuffer { buf }))
    }

    /// Points `module`'s `mimo_trace` at this buffer.
    pub(crate) fn attach(
        &self,
        module: &Arc<CudaModule>,
        stream: &Arc<CudaStream>,
    ) -> Result<(), CudaError> {
        let (ptr, _sync) = self.buf.device_ptr(stream);
        let addr: u64 = ptr;
        let mut sym = module
            .get_global("mimo_trace", stream)
            .map_err(drv("trace symbol"))?;
        stream
            .memcpy_htod(&addr.to_le_bytes(), &mut sym)
            .map_err(drv("set trace symbol"))?;
        Ok(())
    }

    /// Empties the buffer (queued on `stream`).
    pub(crate) fn reset(&mut self, stream: &Arc<CudaStream>) -> Result<(), CudaError> {
        stream
            .memcpy_htod(&[0u64; SMS], &mut self.buf.slice_mut(4..HEADER_WORDS))
            .map_err(drv("trace reset"))
    }

    /// The records written since the last reset (waits for the stream); the second value is
    /// how many did not fit.
    pub(crate) fn read(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<(Vec<TraceRecord>, u64), CudaError> {
        let words = stream.clone_dtoh(&self.buf).map_err(drv("trace read"))?;
        let mut recs = Vec::new();
        let mut dropped = 0u64;
        for sm in 0..SMS {
            let count = words[4 + sm];
            let kept = (count as usize).min(PER_SM);
            dropped += count - kept as u64;
            let base = HEADER_WORDS + 4 * sm * PER_SM;
            recs.extend(
                words[base..base + 4 * kept]
                    .chunks_exact(4)
                    .map(decode_record),
            );
        }
        Ok((recs, dropped))
    }
}

/// One record as common.cuh's `trace_record` writes it: grid, two times, then
/// `block << 32 | line << 16 | file << 8 | SM`, bit 15 of the line marking a `trace_mark`.
fn decode_record(r: &[u64]) -> TraceRecord {
    TraceRecord {
        grid: r[0],
        wait_begin_ns: r[1],
        wait_end_ns: r[2],
        block: (r[3] >> 32) as u32,
        line: ((r[3] >> 16) & 0x7FFF) as u16,
        mark: (r[3] >> 31) & 1 == 1,
        file: (r[3] >> 8) as u8,
        sm: r[3] as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_numbers_name_their_files() {
        for f in ["fp4_gemm.cu", "moe.cu", "ops.cu"] {
            assert_eq!(trace_file_name(trace_file_id(f)), f);
        }
        assert_eq!(trace_file_id("other.cu"), 0);
        assert_eq!(trace_file_name(0), "?");
    }

    #[test]
    fn records_decode_as_the_device_packs_them() {
        let (block, line, file, sm) = (70_000u64, 836u64, 3u64, 131u64);
        let r = decode_record(&[9, 100, 250, block << 32 | line << 16 | file << 8 | sm]);
        let want = TraceRecord {
            grid: 9,
            wait_begin_ns: 100,
            wait_end_ns: 250,
            block: 70_000,
            line: 836,
            mark: false,
            file: 3,
            sm: 131,
        };
        assert_eq!(r, want);
        let m = decode_record(&[
            9,
            300,
            300,
            block << 32 | (line | 0x8000) << 16 | file << 8 | sm,
        ]);
        assert_eq!(
            m,
            TraceRecord {
                wait_begin_ns: 300,
                wait_end_ns: 300,
                mark: true,
                ..want
            }
        );
    }
}
