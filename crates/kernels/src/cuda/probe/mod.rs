//! The persistent stage-chain probe (stage_probe.cu): a chain of one-token NVFP4 products (and
//! decode attention as two stages) run by one block per SM, each block's weights of the next
//! stage streamed into shared memory by bulk copies while the current stage waits and
//! computes. It measures the plan of docs/cuda-backend-notes.md ("What 1,000 tokens/s on
//! Qwen3-30B-A3B would take") before any of it is built into the runtime; `mimo-bench-kernels
//! --layer-probe` times it and the GPU tests check its outputs against [`stage_reference`] and
//! [`attention_reference`].
//!
//! stages.rs: what a chain is made of and where it sits in shared memory; reference.rs: the CPU
//! results and the timing split; this file: the chain on the device.

mod reference;
mod stages;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::weights::{mult_lut, repack_word, scale_shift};
use crate::fp4::{Fp4Format, Fp4Matrix};

pub use reference::{attention_reference, stage_reference, stage_timings, StageTiming};
use stages::{check_stages, place_stages, TILE_CHUNK_S, TILE_CHUNK_W};
pub use stages::{qwen3_moe_layer, ProbeData, ProbeKind, ProbeStage, PROBE_MAX_TILES};

/// Warps per block of `stage_probe` and `stage_probe_w16`; the cross-warp sums are sized for
/// the larger (`SP_MAX_WARPS`).
const WARPS: usize = 8;
const WIDE_WARPS: usize = 16;
/// Start of the input row in shared memory (`SP_X_OFF`).
pub(super) const X_OFF: usize = 128 + WIDE_WARPS * PROBE_MAX_TILES * 16 * 4;

/// How a probe launch runs (A/B of its parts; results are right only without `skip_copy`, and
/// `skip_compute` stores zeros).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeMode {
    /// No decode and mma: the weight streams and the waits alone.
    pub skip_compute: bool,
    /// No weight copies: the waits and the products on whatever shared memory holds.
    pub skip_copy: bool,
    /// Every stage after the first is copied only once its own input is ready (no prefetch).
    pub all_late: bool,
    /// The late flags ignored: every stage is copied while the previous one runs.
    pub no_late: bool,
    /// No grid barrier: each block polls its input until every word carries the stage's tag.
    pub flagged: bool,
    /// 16 warps per block instead of 8 (at most 128 registers a thread).
    pub wide: bool,
    /// A block's tiles one after another in a loop body of one tile (`sp_compute_rolled`)
    /// instead of all of them unrolled: a small instruction footprint.
    pub rolled: bool,
}

impl ProbeMode {
    fn flags(self) -> i32 {
        self.skip_compute as i32
            | (self.skip_copy as i32) << 1
            | (self.all_late as i32) << 2
            | (self.no_late as i32) << 3
            | (self.flagged as i32) << 4
            | (self.rolled as i32) << 5
    }
}

/// The tag in the high half of stage `s`'s output words after launch `launch` of a chain of
/// `stages` (`sp_tag` of the epoch `launch % 65535` the kernel is given): never 0, and unlike
/// the previous launch's tag for the same stage (the stage count is below 65,535), so a
/// consumer never takes a word the previous launch left.
pub fn probe_tag(launch: u64, stages: usize, s: usize) -> u32 {
    ((launch % 65535 * stages as u64 + s as u64) % 65535) as u32 + 1
}

/// A chain of products on the device, ready to launch.
pub struct StageChain {
    stages: Vec<ProbeStage>,
    // Kept alive: the stage table points into them.
    _packed: Vec<CudaSlice<u8>>,
    _scales: Vec<CudaSlice<u8>>,
    outs: Vec<CudaSlice<u32>>,
    table: CudaSlice<u64>,
    lut: CudaSlice<u16>,
    counter: CudaSlice<u64>,
    stamps: CudaSlice<u64>,
    arrivals: u64,
    launches: u64,
    grid: usize,
    smem: usize,
}

/// The probe's tile-major layout of one matrix (see stage_probe.cu): for tile T and chunk c,
/// 1024 bytes of re-packed words (row r of the tile at r * 64) and 128 scale bytes (row r at
/// r * 8).
fn tile_major(m: &Fp4Matrix) -> (Vec<u8>, Vec<u8>) {
    let (rows_b, srow_b) = (m.k / 2, m.k / 16);
    let (tiles, chunks) = (m.n / 16, m.k / 128);
    let mut w = vec![0u8; m.n * rows_b];
    let mut s = vec![0u8; m.n * srow_b];
    for t in 0..tiles {
        for c in 0..chunks {
            let tc = t * chunks + c;
            for r in 0..16 {
                let row = 16 * t + r;
                let src = &m.packed[row * rows_b + c * 64..row * rows_b + c * 64 + 64];
                let dst = &mut w[tc * TILE_CHUNK_W + r * 64..tc * TILE_CHUNK_W + r * 64 + 64];
                for (d, q) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
                    let word = repack_word(u32::from_le_bytes([q[0], q[1], q[2], q[3]]));
                    d.copy_from_slice(&word.to_le_bytes());
                }
                let ss = &m.scales[row * srow_b + c * 8..row * srow_b + c * 8 + 8];
                s[tc * TILE_CHUNK_S + r * 8..tc * TILE_CHUNK_S + r * 8 + 8].copy_from_slice(ss);
            }
        }
    }
    (w, s)
}

impl StageChain {
    /// Uploads a chain: `stages[i]` with its NVFP4 matrix `[n, k]` (gated: the rows of tile
    /// pairs as [`ProbeStage::gated`] says). One block per SM.
    pub fn new(gpu: &GpuContext, stages: &[(ProbeStage, ProbeData)]) -> Result<Self, CudaError> {
        let grid = gpu.sm_count() as usize;
        let shape = |reason: String| CudaError::Shape {
            what: "stage probe".into(),
            reason,
        };
        let list: Vec<ProbeStage> = stages.iter().map(|s| s.0).collect();
        check_stages(&list, grid).map_err(shape)?;
        for (i, (st, data)) in stages.iter().enumerate() {
            let m = match (st.kind, data) {
                (ProbeKind::Product, ProbeData::Weights(m)) => m,
                (
                    ProbeKind::AttentionSplits {
                        kv_heads, context, ..
                    },
                    ProbeData::KvCache { k, v },
                ) if k.len() == kv_heads * context * 128 && v.len() == k.len() => continue,
                (ProbeKind::AttentionCombine { .. }, ProbeData::None) => continue,
                _ => {
                    return Err(shape(format!(
                        "stage {i}: {:?} given for a {:?} stage",
                        data, st.kind
                    )))
                }
            };
            if m.format != Fp4Format::Nvfp4 || (m.n, m.k) != (st.n, st.k) {
                return Err(shape(format!(
                    "stage {i}: a {} matrix [{}, {}] for an NVFP4 stage [{}, {}]",
                    m.format.name(),
                    m.n,
                    m.k,
                    st.n,
                    st.k
                )));
            }
            m.validate_shape().map_err(|source| CudaError::Fp4 {
                name: format!("stage {i}"),
                source,
            })?;
        }
        let max_k = list.iter().map(|s| s.k).max().unwrap_or(0);
        let ring0 = (X_OFF + 2 * max_k + 16).next_multiple_of(128);
        // An SM's shared memory less the 1 KiB reserved per block and the kernel's static table.
        let limit = (gpu.sm_shared_bytes() as usize).saturating_sub(2048);
        let (offsets, smem) = place_stages(&list, grid, ring0, limit).map_err(shape)?;
        let stream = gpu.stream();
        let up = |what: &'static str, v: &[u8]| stream.clone_htod(v).map_err(drv(what));
        let mut packed = Vec::new();
        let mut scales = Vec::new();
        let mut outs: Vec<CudaSlice<u32>> = Vec::new();
        let mut table = Vec::with_capacity(8 * list.len());
        let shift = scale_shift(Fp4Format::Nvfp4, &[]);
        let bits = |v: &[bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        for ((st, data), &(woff, soff)) in stages.iter().zip(&offsets) {
            let (w, s, post) = match data {
                ProbeData::Weights(m) => {
                    let (w, s) = tile_major(m);
                    (w, s, 2f32.powi(shift) / m.global_scale)
                }
                ProbeData::KvCache { k, v } => (bits(k), bits(v), 1.0),
                ProbeData::None => (vec![0u8; 16], vec![0u8; 16], 1.0),
            };
            let pw = up("probe weights", &w)?;
            let ps = up("probe scales", &s)?;
            let out = stream
                .alloc_zeros::<u32>(st.out_words())
                .map_err(drv("probe output"))?;
            let (kind, ctx, kvh) = match st.kind {
                ProbeKind::Product => (0u64, 0u64, 0u64),
                ProbeKind::AttentionSplits {
                    kv_heads, context, ..
                } => (1, context as u64, kv_heads as u64),
                ProbeKind::AttentionCombine {
                    kv_heads, context, ..
                } => (2, context as u64, kv_heads as u64),
            };
            {
                let (op, _c) = out.device_ptr(stream);
                // The combine reads the splits' partials: the previous stage's output
                // (check_stages puts the splits right before it).
                let (wp, sp) = match (st.kind, outs.last()) {
                    (ProbeKind::AttentionCombine { .. }, Some(partials)) => {
                        (partials.device_ptr(stream).0, 0)
                    }
                    _ => (pw.device_ptr(stream).0, ps.device_ptr(stream).0),
                };
                table.extend_from_slice(&[
                    wp,
                    sp,
                    op,
                    st.n as u64 | (st.k as u64) << 32,
                    st.gated as u64 | (st.late as u64) << 1 | kind << 2,
                    post.to_bits() as u64,
                    woff as u64 | (soff as u64) << 32,
                    ctx | kvh << 32,
                ]);
            }
            packed.push(pw);
            scales.push(ps);
            outs.push(out);
        }
        Ok(StageChain {
            table: stream
                .clone_htod(&table)
                .map_err(drv("probe stage table"))?,
            lut: stream
                .clone_htod(&mult_lut(Fp4Format::Nvfp4, shift))
                .map_err(drv("probe scale table"))?,
            counter: stream.alloc_zeros::<u64>(1).map_err(drv("probe counter"))?,
            stamps: stream
                .alloc_zeros::<u64>(4 * grid * list.len())
                .map_err(drv("probe stamps"))?,
            stages: list,
            _packed: packed,
            _scales: scales,
            outs,
            arrivals: 0,
            launches: 0,
            grid,
            smem,
        })
    }

    /// The stages.
    pub fn stages(&self) -> &[ProbeStage] {
        &self.stages
    }

    /// Blocks of a launch (one per SM).
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// Dynamic shared memory of a launch, bytes.
    pub fn smem_bytes(&self) -> usize {
        self.smem
    }

    /// Launches the chain once on the context's stream; `x0` is stage 0's input (`k0`
    /// elements, bf16 bits).
    pub fn launch(
        &mut self,
        gpu: &GpuContext,
        x0: &CudaSlice<u16>,
        mode: ProbeMode,
    ) -> Result<(), CudaError> {
        if x0.len() < self.stages[0].k {
            return Err(CudaError::Mismatch {
                what: "stage probe",
                reason: format!("x0 holds {}, stage 0 reads {}", x0.len(), self.stages[0].k),
            });
        }
        let (name, warps) = if mode.wide {
            ("stage_probe_w16", WIDE_WARPS)
        } else {
            ("stage_probe", WARPS)
        };
        let f = gpu.function(name)?;
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.smem as i32,
        )
        .map_err(drv("stage probe dynamic shared memory limit"))?;
        let cfg = LaunchConfig {
            grid_dim: (self.grid as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: self.smem as u32,
        };
        let s = self.stages.len() as i32;
        let base = self.arrivals;
        // The kernel's tags depend on the launch modulo 65,535 only (probe_tag).
        let epoch = (self.launches % 65535) as u32;
        let flags = mode.flags();
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&self.table)
            .arg(&s)
            .arg(x0)
            .arg(&self.lut)
            .arg(&mut self.counter)
            .arg(&base)
            .arg(&epoch)
            .arg(&flags)
            .arg(&mut self.stamps);
        // SAFETY: arguments match `stage_probe`; the table points at this chain's buffers
        // (shapes checked in `new`, the input row's length above); the shared memory holds the
        // placement of `place_stages`; one block per SM (the shared memory asks for more than
        // half an SM), all resident at once, so the grid barrier cannot wait on an unplaced
        // block.
        unsafe { b.launch(cfg) }.map_err(drv("launch stage_probe"))?;
        if !mode.flagged {
            self.arrivals += (self.stages.len() as u64 - 1) * self.grid as u64;
        }
        self.launches += 1;
        Ok(())
    }

    /// Sets every word of every stage's output to `bits` with tag 0 (tests poison them with
    /// NaN).
    pub fn fill_outputs(&mut self, gpu: &GpuContext, bits: u16) -> Result<(), CudaError> {
        for o in &mut self.outs {
            let v = vec![bits as u32; o.len()];
            gpu.stream()
                .memcpy_htod(&v, o)
                .map_err(drv("probe output fill"))?;
        }
        Ok(())
    }

    /// Stage `i`'s output words after a launch: bf16 bits in the low half, the [`probe_tag`]
    /// of the launch that wrote them in the high half.
    pub fn output_words(&self, gpu: &GpuContext, i: usize) -> Result<Vec<u32>, CudaError> {
        let o = self.outs.get(i).ok_or_else(|| CudaError::Mismatch {
            what: "stage probe",
            reason: format!("no stage {i}"),
        })?;
        gpu.stream().clone_dtoh(o).map_err(drv("probe output"))
    }

    /// Launches so far (the next launch's number, for [`probe_tag`]).
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// The last launch's %globaltimer stamps: `[stage][block][4]` (top, input ready, weights
    /// ready, stored), nanoseconds.
    pub fn stamps(&self, gpu: &GpuContext) -> Result<Vec<u64>, CudaError> {
        gpu.stream()
            .clone_dtoh(&self.stamps)
            .map_err(drv("probe stamps"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_tags_are_never_zero_and_differ_between_neighbouring_launches() {
        let stages = 48;
        for epoch in [0u64, 1, 1364, 1365, 65534, u32::MAX as u64, u64::MAX - 1] {
            for s in 0..stages {
                let t = probe_tag(epoch, stages, s);
                assert!((1..=65535).contains(&t), "{epoch} {s}: {t}");
                assert_ne!(t, probe_tag(epoch + 1, stages, s), "{epoch} {s}");
                if s + 1 < stages {
                    assert_ne!(t, probe_tag(epoch, stages, s + 1), "{epoch} {s}");
                }
            }
        }
    }
}
