//! The persistent stage-chain probe (stage_probe.cu): a chain of one-token NVFP4 products run
//! by one block per SM, each block's weights of the next stage streamed into shared memory by
//! bulk copies while the current stage waits at a grid barrier and computes. It measures the
//! plan of docs/cuda-backend-notes.md ("What 1,000 tokens/s on Qwen3-30B-A3B would take") on
//! the products alone, before any of it is built into the runtime; `mimo-bench-kernels
//! --layer-probe` times it and the GPU tests check its outputs against [`stage_reference`] and
//! [`attention_reference`].

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::weights::{mult_lut, repack_word, scale_shift};
use crate::fp4::{dequantize_row, Fp4Format, Fp4Matrix};

/// Warps per block of `stage_probe` and `stage_probe_w16`; the cross-warp sums are sized for
/// the larger (`SP_MAX_WARPS`).
const WARPS: usize = 8;
const WIDE_WARPS: usize = 16;
/// Most 16-row tiles one block may own in a stage (`SP_MAX_TILES`).
pub const PROBE_MAX_TILES: usize = 8;
/// Start of the input row in shared memory (`SP_X_OFF`).
const X_OFF: usize = 128 + WIDE_WARPS * PROBE_MAX_TILES * 16 * 4;
/// Bytes per 16-row tile and 128-element chunk: packed words and scale bytes.
const TILE_CHUNK_W: usize = 1024;
const TILE_CHUNK_S: usize = 128;

/// What a stage computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbeKind {
    /// A one-token NVFP4 product (`n`, `k`, `gated`, `late`).
    #[default]
    Product,
    /// Decode attention's first half: q is the first `heads * 128` elements of the previous
    /// output; per split of 64 keys and per head, the scores' max and sum and the weighted
    /// values (head_dim 128), the split's keys and values of a `[kv_heads][context][128]` cache
    /// streamed into shared memory like weights.
    AttentionSplits {
        /// Query heads.
        heads: usize,
        /// Key/value heads (a divisor of `heads`).
        kv_heads: usize,
        /// Keys attended to, a multiple of 64, at most 2,048.
        context: usize,
    },
    /// Decode attention's second half: the splits of the previous stage merged into the
    /// `heads * 128` bf16 attention output.
    AttentionCombine,
}

/// Bytes of one attention split's keys (or values) in shared memory.
const SPLIT_BYTES: usize = 64 * 128 * 2;
/// Words of one split's partial (`SP_PART`): max, sum, 128 weighted values.
const PART_WORDS: usize = 130;

/// One stage of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeStage {
    /// Output rows, a multiple of 16 (of 32 when gated).
    pub n: usize,
    /// Input elements, a multiple of 128; stage s > 0 reads the first `k` of stage s - 1's
    /// output.
    pub k: usize,
    /// Tiles (2j, 2j + 1) are the gate and up rows of outputs 16j .. 16j + 16, stored as
    /// silu(gate) * up: the output has n / 2 elements.
    pub gated: bool,
    /// The stage's weights are asked for only after its input is ready (an MoE expert stage,
    /// whose rows depend on the router), not during the previous stage.
    pub late: bool,
    /// What it computes.
    pub kind: ProbeKind,
}

impl ProbeStage {
    /// A one-token product `[n, k]`.
    pub fn product(n: usize, k: usize, gated: bool, late: bool) -> Self {
        ProbeStage {
            n,
            k,
            gated,
            late,
            kind: ProbeKind::Product,
        }
    }

    /// Decode attention of `heads` query heads over `context` keys, as two stages: the splits,
    /// then their combine (whose output, `heads * 128` elements, the next stage reads).
    pub fn attention(heads: usize, kv_heads: usize, context: usize) -> [Self; 2] {
        let n = heads * 128;
        [
            ProbeStage {
                n,
                k: n,
                gated: false,
                late: false,
                kind: ProbeKind::AttentionSplits {
                    heads,
                    kv_heads,
                    context,
                },
            },
            ProbeStage {
                n,
                k: 0,
                gated: false,
                late: false,
                kind: ProbeKind::AttentionCombine,
            },
        ]
    }

    /// Elements of the stage's output that the next stage may read (the splits' partials are
    /// for the combine only).
    pub fn out_len(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { .. } => 0,
            _ if self.gated => self.n / 2,
            _ => self.n,
        }
    }

    /// 32-bit words of the stage's output buffer.
    fn out_words(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { heads, context, .. } => {
                2 * PART_WORDS * heads * (context / 64)
            }
            _ => self.out_len(),
        }
    }

    /// Units the blocks share: splits (split, head), combine slices of 32 elements.
    fn units(&self) -> usize {
        match self.kind {
            ProbeKind::AttentionSplits { heads, context, .. } => heads * (context / 64),
            ProbeKind::AttentionCombine => self.n / 32,
            ProbeKind::Product => 0,
        }
    }
}

/// What a stage reads besides its input: a product's matrix, the splits' key/value cache
/// (`[kv_heads][context][128]` bf16 each), nothing for the combine.
#[derive(Clone, Copy, Debug)]
pub enum ProbeData<'a> {
    /// A product's NVFP4 matrix `[n, k]`.
    Weights(&'a Fp4Matrix),
    /// The attention splits' keys and values.
    KvCache {
        /// Keys.
        k: &'a [bf16],
        /// Values.
        v: &'a [bf16],
    },
    /// Nothing (the combine).
    None,
}

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

/// The tag in the high half of stage `s`'s output words after launch `epoch` of a chain of
/// `stages` (`sp_tag`: unique per launch and stage modulo 65,535, never 0).
pub fn probe_tag(epoch: u32, stages: usize, s: usize) -> u32 {
    ((epoch as u64 * stages as u64 + s as u64) % 65535) as u32 + 1
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
    launches: u32,
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

/// Tiles `[t0, t1)` of block `b` of `grid` (the kernel's `sp_tiles`).
fn block_tiles(st: &ProbeStage, b: usize, grid: usize) -> (usize, usize) {
    let tpu = if st.gated { 2 } else { 1 };
    let units = st.n / 16 / tpu;
    (b * units / grid * tpu, (b + 1) * units / grid * tpu)
}

/// Largest number of tiles (attention: units) any block owns in a stage.
fn max_tiles(st: &ProbeStage, grid: usize) -> usize {
    if st.kind != ProbeKind::Product {
        return st.units().div_ceil(grid);
    }
    (0..grid)
        .map(|b| {
            let (t0, t1) = block_tiles(st, b, grid);
            t1 - t0
        })
        .max()
        .unwrap_or(0)
}

/// Shared-memory placement of every stage's weights: stage s and s + 1 are in shared memory at
/// once (s + 1 streams while s computes), so each starts where the previous one ends, or at
/// the ring's start when it would run past `limit`. Returns (weight offset, scale offset) per
/// stage and the bytes used, or why the chain does not fit.
fn place_stages(
    stages: &[ProbeStage],
    grid: usize,
    ring0: usize,
    limit: usize,
) -> Result<(Vec<(usize, usize)>, usize), String> {
    let mut out = Vec::with_capacity(stages.len());
    let mut prev: Option<(usize, usize)> = None; // previous stage's [start, end)
    let mut used = ring0;
    for (i, st) in stages.iter().enumerate() {
        let tiles = max_tiles(st, grid);
        let chunks = st.k / 128;
        let (wb, bytes) = match st.kind {
            ProbeKind::Product => (
                tiles * chunks * TILE_CHUNK_W,
                tiles * chunks * (TILE_CHUNK_W + TILE_CHUNK_S),
            ),
            ProbeKind::AttentionSplits { .. } => (0, tiles * 2 * SPLIT_BYTES),
            ProbeKind::AttentionCombine => (0, 0),
        };
        let mut start = prev.map_or(ring0, |p| p.1.next_multiple_of(128));
        if start + bytes > limit {
            start = ring0;
        }
        let end = start + bytes;
        if end > limit || prev.is_some_and(|p| start < p.1 && p.0 < end) {
            return Err(format!(
                "stages {} and {i} need {} + {bytes} bytes of shared memory per block; {} are \
                 free",
                i.saturating_sub(1),
                prev.map_or(0, |p| p.1 - p.0),
                limit - ring0
            ));
        }
        out.push((start, start + wb));
        used = used.max(end);
        prev = Some((start, end));
    }
    Ok((out, used))
}

/// Checks a chain's shapes (what the kernel assumes).
fn check_stages(stages: &[ProbeStage], grid: usize) -> Result<(), String> {
    if stages.is_empty() {
        return Err("no stages".into());
    }
    for (i, st) in stages.iter().enumerate() {
        match st.kind {
            ProbeKind::AttentionSplits {
                heads,
                kv_heads,
                context,
            } => {
                if heads == 0
                    || kv_heads == 0
                    || heads % kv_heads != 0
                    || context == 0
                    || context % 64 != 0
                    || context > 2048
                    || st.n != heads * 128
                    || st.k != st.n
                {
                    return Err(format!(
                        "stage {i}: attention of {heads} heads over {kv_heads} KV heads and \
                         {context} keys (a multiple of 64, at most 2048)"
                    ));
                }
                if stages.get(i + 1).map(|n| (n.kind, n.n))
                    != Some((ProbeKind::AttentionCombine, st.n))
                {
                    return Err(format!("stage {i}: attention splits without their combine"));
                }
                if max_tiles(st, grid) > PROBE_MAX_TILES / 2 {
                    return Err(format!(
                        "stage {i}: {} attention units per block over {grid} blocks (at most {})",
                        max_tiles(st, grid),
                        PROBE_MAX_TILES / 2
                    ));
                }
            }
            ProbeKind::AttentionCombine => {
                if i == 0 || !matches!(stages[i - 1].kind, ProbeKind::AttentionSplits { .. }) {
                    return Err(format!(
                        "stage {i}: a combine without attention splits before it"
                    ));
                }
                continue;
            }
            ProbeKind::Product => {}
        }
        let rows = if st.gated { 32 } else { 16 };
        if st.kind == ProbeKind::Product
            && (st.n == 0 || st.n % rows != 0 || st.k == 0 || st.k % 128 != 0)
        {
            return Err(format!(
                "stage {i}: [{}, {}] needs n a multiple of {rows} and k of 128",
                st.n, st.k
            ));
        }
        if max_tiles(st, grid) > PROBE_MAX_TILES {
            return Err(format!(
                "stage {i}: {} tiles per block over {grid} blocks (at most {PROBE_MAX_TILES})",
                max_tiles(st, grid)
            ));
        }
        if i > 0 && stages[i - 1].out_len() < st.k {
            return Err(format!(
                "stage {i} reads {} elements; stage {} writes {}",
                st.k,
                i - 1,
                stages[i - 1].out_len()
            ));
        }
    }
    Ok(())
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
                (ProbeKind::AttentionCombine, ProbeData::None) => continue,
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
        let mut outs = Vec::new();
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
                ProbeKind::AttentionCombine => {
                    match table.len().checked_sub(8).map(|i| table[i + 7]) {
                        Some(prev) => (2, prev & 0xffff_ffff, prev >> 32),
                        None => (2, 0, 0),
                    }
                }
            };
            {
                let (op, _c) = out.device_ptr(stream);
                // The combine reads the splits' partials: the previous stage's output.
                let (wp, sp) = if st.kind == ProbeKind::AttentionCombine {
                    let prev = table.len() - 8;
                    (table[prev + 2], 0)
                } else {
                    (pw.device_ptr(stream).0, ps.device_ptr(stream).0)
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
        let epoch = self.launches;
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
        self.launches = self.launches.wrapping_add(1);
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

    /// Launches so far (the next launch's epoch).
    pub fn launches(&self) -> u32 {
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

/// Where one stage's time went, from a launch's stamps (microseconds; medians over the blocks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTiming {
    /// From the previous stage's last store (stage 0: the first block's start) to this
    /// stage's last store.
    pub span_us: f64,
    /// From the previous stage's last store to this block's input row in shared memory: the
    /// grid barrier and the input's load.
    pub input_us: f64,
    /// From the input row in shared memory to the weights in shared memory (0 when they were
    /// there first).
    pub weights_wait_us: f64,
    /// From both in shared memory to the block's outputs stored.
    pub compute_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Splits a launch's stamps ([`StageChain::stamps`]: `[stage][block][top, input, weights,
/// stored]`, nanoseconds) into [`StageTiming`]s.
pub fn stage_timings(stamps: &[u64], grid: usize, stages: usize) -> Vec<StageTiming> {
    let at = |s: usize, b: usize, i: usize| stamps[(s * grid + b) * 4 + i] as f64 * 1e-3;
    let mut prev_end = (0..grid).map(|b| at(0, b, 0)).fold(f64::INFINITY, f64::min);
    let mut out = Vec::with_capacity(stages);
    for s in 0..stages {
        let end = (0..grid).map(|b| at(s, b, 3)).fold(0.0, f64::max);
        out.push(StageTiming {
            span_us: end - prev_end,
            input_us: median((0..grid).map(|b| at(s, b, 1) - prev_end).collect()),
            weights_wait_us: median((0..grid).map(|b| at(s, b, 2) - at(s, b, 1)).collect()),
            compute_us: median((0..grid).map(|b| at(s, b, 3) - at(s, b, 2)).collect()),
        });
        prev_end = end;
    }
    out
}

/// One stage on the CPU from its bf16 input: the f64 sums of the dequantized weights times the
/// input, or for a gated stage silu(gate) * up of the sums rounded to bf16 (`swiglu_bf16`); the
/// kernel stores these rounded to bf16.
pub fn stage_reference(
    st: &ProbeStage,
    m: &Fp4Matrix,
    input: &[bf16],
) -> Result<Vec<f64>, CudaError> {
    if st.kind != ProbeKind::Product || input.len() < st.k || (m.n, m.k) != (st.n, st.k) {
        return Err(CudaError::Mismatch {
            what: "stage_reference",
            reason: format!(
                "[{}, {}] matrix, input of {}, for a stage [{}, {}]",
                m.n,
                m.k,
                input.len(),
                st.n,
                st.k
            ),
        });
    }
    let x: Vec<f64> = input[..st.k].iter().map(|v| v.to_f64()).collect();
    let mut row = vec![0f32; st.k];
    let mut y = vec![0f64; st.n];
    for (r, yr) in y.iter_mut().enumerate() {
        dequantize_row(m, r, &mut row).map_err(|source| CudaError::Fp4 {
            name: "stage_reference".into(),
            source,
        })?;
        *yr = row.iter().zip(&x).map(|(w, x)| *w as f64 * x).sum();
    }
    if !st.gated {
        return Ok(y);
    }
    Ok((0..st.n / 2)
        .map(|o| {
            let (j, rr) = (o / 16, o % 16);
            let gate = bf16::from_f64(y[32 * j + rr]).to_f32();
            let up = bf16::from_f64(y[32 * j + 16 + rr]).to_f32();
            (gate / (1.0 + (-gate).exp()) * up) as f64
        })
        .collect())
}

/// Decode attention on the CPU: for each head, softmax(q k^T / sqrt(128)) v over the
/// `context` keys of its KV head (`[kv_heads][context][128]` caches), in f64 from the bf16
/// inputs; `heads * 128` values.
pub fn attention_reference(
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    heads: usize,
    kv_heads: usize,
    context: usize,
) -> Vec<f64> {
    let f = |x: &bf16| x.to_f64();
    let mut out = vec![0f64; heads * 128];
    for h in 0..heads {
        let kv = h / (heads / kv_heads);
        let qh: Vec<f64> = q[h * 128..h * 128 + 128].iter().map(f).collect();
        let row = |p: usize| (kv * context + p) * 128;
        let scores: Vec<f64> = (0..context)
            .map(|p| {
                let r = row(p);
                k[r..r + 128]
                    .iter()
                    .zip(&qh)
                    .map(|(a, b)| f(a) * b)
                    .sum::<f64>()
                    / 128f64.sqrt()
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = w.iter().sum();
        for (p, wp) in w.iter().enumerate() {
            let r = row(p);
            for d in 0..128 {
                out[h * 128 + d] += wp * f(&v[r + d]) / sum;
            }
        }
    }
    out
}

/// The products of one Qwen3-30B-A3B decoder layer at one token as a probe chain: q/k/v
/// [2048 -> 5120], o_proj [4096 -> 2048], the eight chosen experts' gate/up as one gated
/// [2048 -> 2 x 6144] (late: its rows are known only after the router) and their down as one
/// [6144 -> 2048] (the eight experts' sums added, as the combine does). With `context`, the
/// decode attention of its 32 query and 4 KV heads over that many keys between q/k/v and
/// o_proj (q/k norms, RoPE and the cache write left out); without, no attention. The router and
/// the top-k are left out.
pub fn qwen3_moe_layer(context: Option<usize>) -> Vec<ProbeStage> {
    let st = ProbeStage::product;
    let mut v = vec![st(5120, 2048, false, false)];
    if let Some(c) = context {
        v.extend(ProbeStage::attention(32, 4, c));
    }
    v.extend([
        st(2048, 4096, false, false),
        st(12288, 2048, true, true),
        st(2048, 6144, false, false),
    ]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qwen3_layer_fits_one_block_per_sm() {
        let layer: Vec<ProbeStage> = (0..4).flat_map(|_| qwen3_moe_layer(None)).collect();
        check_stages(&layer, 132).unwrap();
        // With attention over 512 keys: 256 split units, two per block (64 KiB of keys and
        // values), beside q/k/v's 55 KiB.
        let att: Vec<ProbeStage> = (0..4).flat_map(|_| qwen3_moe_layer(Some(512))).collect();
        check_stages(&att, 132).unwrap();
        assert_eq!(max_tiles(&att[1], 132), 2);
        let ring1 = (X_OFF + 2 * 6144 + 16).next_multiple_of(128);
        place_stages(&att, 132, ring1, 233_472 - 2048).unwrap();
        let ring0 = (X_OFF + 2 * 6144 + 16).next_multiple_of(128);
        let (offs, used) = place_stages(&layer, 132, ring0, 233_472 - 2048).unwrap();
        assert!(used <= 233_472 - 2048, "{used}");
        // Consecutive stages never overlap; gate/up (3 tile pairs per block at most) is 110,592
        // bytes of weights and scales.
        assert_eq!(max_tiles(&layer[2], 132), 6);
        for w in offs.windows(2) {
            assert_ne!(w[0].0, w[1].0);
        }
    }

    #[test]
    fn bad_chains_are_refused_with_the_stage() {
        let st = |n, k| ProbeStage::product(n, k, false, false);
        assert!(check_stages(&[st(100, 256)], 132)
            .unwrap_err()
            .contains("stage 0"));
        let e = check_stages(&[st(256, 256), st(64, 512)], 132).unwrap_err();
        assert!(e.contains("stage 1 reads 512"), "{e}");
        let e = check_stages(&[st(16 * 9 * 2, 256)], 2).unwrap_err();
        assert!(e.contains("9 tiles per block"), "{e}");
        let big = st(16 * 8 * 132, 8192);
        assert!(place_stages(&[big], 132, 0, 200_000).is_err());
        // Attention halves only as a pair, within the kernel's limits.
        let [splits, combine] = ProbeStage::attention(32, 4, 512);
        let e = check_stages(&[st(5120, 256), splits, st(2048, 4096)], 132).unwrap_err();
        assert!(e.contains("without their combine"), "{e}");
        let e = check_stages(&[st(5120, 256), combine], 132).unwrap_err();
        assert!(e.contains("without attention splits"), "{e}");
        let [long, _] = ProbeStage::attention(32, 4, 4096);
        let e = check_stages(&[st(5120, 256), long, combine], 132).unwrap_err();
        assert!(e.contains("at most 2048"), "{e}");
        check_stages(&[st(5120, 256), splits, combine, st(2048, 4096)], 132).unwrap();
    }

    #[test]
    fn stage_timings_split_the_stamps() {
        // Two blocks, two stages (ns): block 0 starts at 1000, block 1 at 1500.
        let stamps = [
            1000, 2000, 2500, 4000, // stage 0, block 0
            1500, 2100, 2100, 5000, // stage 0, block 1
            4100, 6000, 6000, 9000, // stage 1, block 0
            5100, 7000, 8000, 8500, // stage 1, block 1
        ];
        let t = stage_timings(&stamps, 2, 2);
        assert_eq!(t.len(), 2);
        assert!((t[0].span_us - 4.0).abs() < 1e-9, "{t:?}");
        // medians of two blocks take the upper one
        assert!((t[0].input_us - 1.1).abs() < 1e-9, "{t:?}");
        assert!((t[0].weights_wait_us - 0.5).abs() < 1e-9, "{t:?}");
        assert!((t[0].compute_us - 2.9).abs() < 1e-9, "{t:?}");
        assert!((t[1].span_us - 4.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].input_us - 2.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].weights_wait_us - 1.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].compute_us - 3.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn tiles_cover_every_row_once() {
        for st in qwen3_moe_layer(None) {
            let mut next = 0;
            for b in 0..132 {
                let (t0, t1) = block_tiles(&st, b, 132);
                assert_eq!(t0, next);
                next = t1;
            }
            assert_eq!(next * 16, st.n);
        }
    }
}
