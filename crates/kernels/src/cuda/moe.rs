//! Grouped MoE layer on FP4 experts: routing table, grouped gate/up GEMM, SwiGLU, grouped down
//! GEMM and weighted combine, all queued on the stream from the router's device output.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::{GpuContext, Tuning};
use super::error::{drv, CudaError};
use super::gemm::{check_len, reduction_smem, Fp4GemmConfig, K_CHUNK};
use super::moe_one_token::moe_layer_one_token;
use super::tiled::moe_tiled_product;
use super::weights::GpuFp4Weight;
use super::{arg_or_null, NULL_PTR};
use crate::fp4::Fp4Format;

/// FP4 experts of one MoE layer: `gate_up` is `[2 * inter, hidden]` per expert (gate rows
/// first, then up rows), `down` is `[hidden, inter]`.
pub struct MoeWeights {
    /// Stacked gate and up projections.
    pub gate_up: GpuFp4Weight,
    /// Stacked down projections.
    pub down: GpuFp4Weight,
}

impl MoeWeights {
    /// Checks that the two stacks fit together; returns (experts, hidden, inter).
    pub fn dims(&self) -> Result<(usize, usize, usize), CudaError> {
        let (gu, d) = (&self.gate_up, &self.down);
        if gu.experts != d.experts || gu.n != 2 * d.k || d.n != gu.k {
            return Err(CudaError::Mismatch {
                what: "MoeWeights",
                reason: format!(
                    "gate_up {} x [{}, {}], down {} x [{}, {}]",
                    gu.experts, gu.n, gu.k, d.experts, d.n, d.k
                ),
            });
        }
        Ok((gu.experts, gu.k, d.k))
    }
}

/// Device scratch of one MoE layer call for up to `max_tokens` tokens.
pub struct MoeWorkspace {
    /// The most (token, expert) pairs it holds.
    pub(super) max_pairs: usize,
    /// The count of invalid router ids.
    pub(super) bad: CudaSlice<i32>,
    /// The pairs' SwiGLU rows (the down projection's input).
    pub(super) act: CudaSlice<bf16>,
    down_out: CudaSlice<bf16>,
    /// The tiled path's tile table.
    route: MoeRoute,
}

/// Most experts the grouped kernel handles (its shared-memory presence table), and the most the
/// one-token kernels rank from the router's logits (the kernels' `MOE_ROUTER_MAX_EXPERTS`).
pub const MOE_MAX_EXPERTS: usize = 1024;

impl MoeWorkspace {
    /// Allocates scratch for `max_tokens` tokens routed to `top_k` experts each.
    pub fn new(
        gpu: &GpuContext,
        w: &MoeWeights,
        max_tokens: usize,
        top_k: usize,
    ) -> Result<Self, CudaError> {
        let (_, hidden, inter) = w.dims()?;
        let p = max_tokens * top_k;
        let s = gpu.stream();
        let zb = |len: usize| {
            s.alloc_zeros::<bf16>(len.max(1))
                .map_err(drv("alloc MoE scratch"))
        };
        let (experts, _, _) = w.dims()?;
        Ok(MoeWorkspace {
            max_pairs: p,
            bad: s.alloc_zeros::<i32>(1).map_err(drv("alloc MoE status"))?,
            act: zb(p * inter)?,
            down_out: zb(p * hidden)?,
            route: MoeRoute::new(gpu, p, experts)?,
        })
    }

    /// Router ids outside `[0, experts)` seen by the last call (reads back: synchronizes).
    /// Such pairs are left out of the sum.
    pub fn invalid_ids(&self, gpu: &GpuContext) -> Result<i32, CudaError> {
        let v = gpu
            .stream()
            .clone_dtoh(&self.bad)
            .map_err(drv("read MoE status"))?;
        Ok(v.first().copied().unwrap_or(0))
    }
}

/// Block shape of the two grouped launches of [`moe_layer_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// Warps of the gate/up + SwiGLU launch (1..=16; they split K inside the block).
    pub gate_up_warps: u32,
    /// Warps of the down launch (1..=16).
    pub down_warps: u32,
    /// 16-row tiles each gate/up block computes in turn (1..=64), after one routing prologue.
    pub gate_up_row_tiles: u32,
    /// 16-row tiles each down block computes in turn (1..=64).
    pub down_row_tiles: u32,
    /// K chunks each down warp loads before using the first (1 or 2; 2 needs >= 2 chunks per
    /// warp).
    pub down_group: u32,
    /// (token, expert) pairs per pass over an expert's weights in both launches (8 or 16):
    /// 8 needs fewer registers where experts see few pairs each.
    pub pairs_per_pass: u32,
}

impl MoeConfig {
    /// Refuses shapes the launches cannot take: warps 1..=16, row tiles 1..=64, down group 1
    /// or 2, 8 or 16 pairs per pass.
    pub fn check(&self) -> Result<(), CudaError> {
        let ok = |v: u32| (1..=16).contains(&v);
        let tiles_ok = |v: u32| (1..=64).contains(&v);
        if !ok(self.gate_up_warps)
            || !ok(self.down_warps)
            || !tiles_ok(self.gate_up_row_tiles)
            || !tiles_ok(self.down_row_tiles)
            || !(1..=2).contains(&self.down_group)
            || !matches!(self.pairs_per_pass, 8 | 16)
        {
            return Err(CudaError::Shape {
                what: "MoeConfig".into(),
                reason: format!(
                    "{self:?}: warps 1..=16, row tiles 1..=64, down group 1 or 2, 8 or 16 pairs \
                     per pass"
                ),
            });
        }
        Ok(())
    }

    /// Few warps per block (4 for gate/up, 2 for down, at most one K chunk each): the grouped
    /// kernels hold up to 128 registers per thread, so a 16-warp block fills an SM alone and
    /// every wave of blocks repeats the routing prologue before its first weight load; small
    /// blocks let several per SM run at once, one block's prologue overlapping another's loads.
    /// From the H100 sweep (round 2): 4 and 2 warps at batch 1, 2 and 1 from 8 tokens on.
    /// From 8 to 32 tokens (a few pairs per expert; H100 sweep of 2026-11-26,
    /// bench/results/kernels-h100-moe-shape-sweep.json): 8 pairs per pass (the gate/up kernel
    /// then fits its registers without spilling), 2 gate/up and 4 down row tiles per block
    /// after one routing prologue, two-chunk load groups in the down launch: 16-32 tokens
    /// 19 % faster than one tile of 16 pairs.
    pub fn auto(hidden: usize, inter: usize, tokens: usize) -> Self {
        let chunks = |k: usize| k.div_ceil(K_CHUNK) as u32;
        let (gu, d) = if tokens < 8 { (4, 2) } else { (2, 1) };
        let few = (8..=32).contains(&tokens);
        MoeConfig {
            gate_up_warps: chunks(hidden).clamp(1, gu),
            down_warps: chunks(inter).clamp(1, d),
            gate_up_row_tiles: if few { 2 } else { 1 },
            down_row_tiles: if few { 4 } else { 1 },
            down_group: if few || chunks(inter) >= 16 { 2 } else { 1 },
            pairs_per_pass: if few { 8 } else { 16 },
        }
    }
}

/// One MoE layer: `out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))` over the
/// `top_k` experts `e = topk_ids[t, j]`. Three launches (grouped gate/up with SwiGLU in its
/// epilogue, grouped down, weighted combine), two for one token (see `moe_layer_one_token`;
/// `Tuning::moe_direct`), no host synchronization; results are deterministic (fixed summation
/// orders, no float atomics). In a graph with programmatic edges ([`super::PdlGraph`]) the
/// one-token down projection reads `topk_ids` and its first weights before waiting on the
/// gate/up kernel before it, so the weights and ids must come from earlier kernels than this
/// call's own (as the runtime's router does) or from the host. Prefill-sized batches (at least
/// `Tuning::moe_tiled_min_pairs` pairs per expert on average) take [`moe_layer_tiled`].
#[allow(clippy::too_many_arguments)]
pub fn moe_layer(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    tokens: usize,
    top_k: usize,
    ws: &mut MoeWorkspace,
    out: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    if moe_tiled_preferred(&gpu.tuning(), w, tokens, top_k) {
        return moe_layer_tiled(gpu, w, x, topk_ids, topk_weights, tokens, top_k, ws, out);
    }
    let (_, hidden, inter) = w.dims()?;
    let cfg = MoeConfig::auto(hidden, inter, tokens);
    moe_layer_with(
        gpu,
        w,
        x,
        topk_ids,
        topk_weights,
        tokens,
        top_k,
        ws,
        out,
        cfg,
    )
}

/// [`moe_layer`] with explicit block sizes.
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_with(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    tokens: usize,
    top_k: usize,
    ws: &mut MoeWorkspace,
    out: &mut CudaSlice<bf16>,
    cfg: MoeConfig,
) -> Result<(), CudaError> {
    cfg.check()?;
    let Some(p) = check_layer(w, x, topk_ids, topk_weights, tokens, top_k, ws, out)? else {
        return Ok(());
    };
    let (experts, hidden, _) = w.dims()?;
    if tokens == 1 && gpu.tuning().moe_direct {
        return moe_layer_one_token(gpu, w, x, topk_ids, topk_weights, top_k, ws, out, cfg);
    }
    let route = Route {
        ids: Some(topk_ids),
        pairs: p as i32,
        experts: experts as i32,
        slots: experts.min(p) as u32,
    };
    // 1. grouped gate/up + SwiGLU: input row of pair q is token q / top_k; counts invalid ids
    let bad = Some(&mut ws.bad);
    grouped(
        gpu,
        &w.gate_up,
        x,
        &mut ws.act,
        &route,
        top_k as i32,
        true,
        (
            cfg.gate_up_warps,
            cfg.gate_up_row_tiles,
            1,
            cfg.pairs_per_pass,
        ),
        bad,
    )?;
    // 2. grouped down: input row of pair q is q itself
    grouped(
        gpu,
        &w.down,
        &ws.act,
        &mut ws.down_out,
        &route,
        1,
        false,
        (
            cfg.down_warps,
            cfg.down_row_tiles,
            cfg.down_group,
            cfg.pairs_per_pass,
        ),
        None,
    )?;
    // 3. weighted combine
    combine(
        gpu,
        ws,
        topk_ids,
        topk_weights,
        (tokens, top_k, hidden, experts),
        out,
    )
}

/// The checks every MoE layer call makes: the workspace holds the pairs, the experts fit the
/// kernels' tables, the buffers have their lengths. Returns the pair count, or None where
/// there are none (nothing to do).
#[allow(clippy::too_many_arguments)]
fn check_layer(
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    tokens: usize,
    top_k: usize,
    ws: &MoeWorkspace,
    out: &CudaSlice<bf16>,
) -> Result<Option<usize>, CudaError> {
    let (experts, hidden, _inter) = w.dims()?;
    let p = tokens * top_k;
    if p > ws.max_pairs {
        return Err(CudaError::Mismatch {
            what: "moe_layer",
            reason: format!(
                "{tokens} tokens x top {top_k} exceed the workspace ({} pairs)",
                ws.max_pairs
            ),
        });
    }
    if experts > MOE_MAX_EXPERTS || p > i32::MAX as usize {
        return Err(CudaError::Shape {
            what: "moe_layer".into(),
            reason: format!("{experts} experts (at most {MOE_MAX_EXPERTS}), {p} pairs"),
        });
    }
    check_len("moe_layer: x", x.len(), tokens * hidden)?;
    check_len("moe_layer: topk_ids", topk_ids.len(), p)?;
    check_len("moe_layer: topk_weights", topk_weights.len(), p)?;
    check_len("moe_layer: out", out.len(), tokens * hidden)?;
    Ok((p > 0).then_some(p))
}

/// `out[t] = sum_j w[t, j] * down_out[t * top_k + j]` over the pairs with a valid id, in j
/// order (`moe_combine`).
fn combine(
    gpu: &GpuContext,
    ws: &MoeWorkspace,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    (tokens, top_k, hidden, experts): (usize, usize, usize, usize),
    out: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let f = gpu.function("moe_combine")?;
    let (t_i, k_i, h_i, e_i) = (tokens as i32, top_k as i32, hidden as i32, experts as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&ws.down_out)
        .arg(topk_weights)
        .arg(topk_ids)
        .arg(out)
        .arg(&t_i)
        .arg(&k_i)
        .arg(&h_i)
        .arg(&e_i);
    // SAFETY: down_out holds p*hidden, out tokens*hidden elements (check_layer).
    unsafe { b.launch(LaunchConfig::for_num_elems((tokens * hidden) as u32)) }
        .map_err(drv("launch moe_combine"))?;
    Ok(())
}

/// Pairs per tile of the tiled grouped kernels (`*_mm_moe_*_t4`: four 8-token mma tiles); the
/// largest batches take tiles of twice as many ([`moe_tile_pairs`]).
pub const MOE_TILE_PAIRS: usize = 32;

/// Average pairs per expert from which the tiled path takes tiles of `2 * MOE_TILE_PAIRS`
/// (`*_t8` kernels: each decoded weight feeds twice as many mma).
pub const MOE_TILE64_MIN_PAIRS: usize = 64;

/// Pairs per tile for `pairs` pairs over `experts` experts: [`MOE_TILE_PAIRS`], or twice that
/// from [`MOE_TILE64_MIN_PAIRS`] pairs per expert on average.
pub fn moe_tile_pairs(pairs: usize, experts: usize) -> usize {
    if pairs >= MOE_TILE64_MIN_PAIRS * experts.max(1) {
        2 * MOE_TILE_PAIRS
    } else {
        MOE_TILE_PAIRS
    }
}

/// Average (token, expert) pairs per expert from which [`moe_layer`] takes the tiled path
/// (`Tuning::moe_tiled_min_pairs`).
pub const MOE_TILED_MIN_PAIRS: usize = 8;

/// Most tiles `pairs` pairs over `experts` experts can make: each expert's pairs fill whole
/// tiles but its last.
fn max_tiles(pairs: usize, experts: usize) -> usize {
    pairs.div_ceil(MOE_TILE_PAIRS) + experts.min(pairs)
}

/// Dynamic shared memory of `moe_route_tiles` for `experts` experts: two ints and 32 u16
/// per expert.
fn route_smem(experts: usize) -> u32 {
    (experts * (2 * 4 + 32 * 2)) as u32
}

/// Whether the tiled grouped kernels take these experts: K of both products a multiple of
/// the 128-element chunk (hidden and inter), at most [`MOE_MAX_EXPERTS`] experts.
pub fn moe_tiled_supported(w: &MoeWeights) -> bool {
    match w.dims() {
        Ok((experts, hidden, inter)) => {
            hidden % K_CHUNK == 0
                && inter % K_CHUNK == 0
                && hidden > 0
                && inter > 0
                && experts <= MOE_MAX_EXPERTS
                && w.gate_up.format == w.down.format
        }
        Err(_) => false,
    }
}

/// Whether [`moe_layer`] takes the tiled path under `tuning`: `moe_tiled` on, supported, and
/// at least `moe_tiled_min_pairs` pairs per expert on average.
pub fn moe_tiled_preferred(tuning: &Tuning, w: &MoeWeights, tokens: usize, top_k: usize) -> bool {
    moe_tiled_batch(tuning, tokens, top_k, w.gate_up.experts) && moe_tiled_supported(w)
}

/// Whether a batch of `tokens` tokens over `experts` experts (top `top_k`) is one for the tiled
/// grouped kernels under `tuning` (FP4 [`moe_layer_tiled`] and BF16
/// [`super::moe_bf16_tiled`]): `moe_tiled` on, more than one token, at least
/// `moe_tiled_min_pairs` pairs per expert on average, and few enough tiles for one launch.
pub fn moe_tiled_batch(tuning: &Tuning, tokens: usize, top_k: usize, experts: usize) -> bool {
    let pairs = tokens * top_k;
    tuning.moe_tiled
        && tokens > 1
        && experts > 0
        && pairs >= tuning.moe_tiled_min_pairs as usize * experts
        && max_tiles(pairs, experts) <= MAX_GRID_Z
}

/// The tile table of the tiled grouped kernels for up to `max_pairs` pairs over `experts`
/// experts, on the device: the pairs sorted by expert and cut into tiles of 32 or 64
/// (`moe_route_tiles`, [`MoeRoute::build`]).
pub struct MoeRoute {
    max_pairs: usize,
    experts: usize,
    /// Pairs per tile of the last build (32 or 64).
    tile_pairs: usize,
    /// Pairs of the last build (0: none yet): the launches over the table must take exactly
    /// these, since its entries index their rows.
    built: usize,
    /// Pair indices, grouped by expert (experts in order, pairs in order inside each).
    sorted: CudaSlice<i32>,
    /// The tile count, then (expert, first index into `sorted`, pairs) per tile.
    route: CudaSlice<i32>,
}

impl MoeRoute {
    /// Allocates a table for `max_pairs` pairs over `experts` (at most [`MOE_MAX_EXPERTS`]).
    pub fn new(gpu: &GpuContext, max_pairs: usize, experts: usize) -> Result<Self, CudaError> {
        if experts == 0 || experts > MOE_MAX_EXPERTS {
            return Err(CudaError::Shape {
                what: "MoeRoute".into(),
                reason: format!("{experts} experts (1..={MOE_MAX_EXPERTS})"),
            });
        }
        let s = gpu.stream();
        let zi = |len: usize| {
            s.alloc_zeros::<i32>(len.max(1))
                .map_err(drv("alloc MoE route"))
        };
        Ok(MoeRoute {
            max_pairs,
            experts,
            tile_pairs: MOE_TILE_PAIRS,
            built: 0,
            sorted: zi(max_pairs)?,
            route: zi(1 + 3 * max_tiles(max_pairs, experts))?,
        })
    }

    /// Experts of the table.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Pairs per tile of the last build.
    pub fn tile_pairs(&self) -> usize {
        self.tile_pairs
    }

    /// Queues the table of the first `pairs` router ids (`ids[q]`: pair q's expert; ids
    /// outside `[0, experts)` are left out, and counted into `bad[0]` where given) in tiles of
    /// `tile_pairs` (32 or 64, [`moe_tile_pairs`]). Returns the launches' tile bound.
    pub fn build(
        &mut self,
        gpu: &GpuContext,
        ids: &CudaSlice<i32>,
        (pairs, tile_pairs): (usize, usize),
        bad: Option<&mut CudaSlice<i32>>,
    ) -> Result<usize, CudaError> {
        let tiles = max_tiles(pairs, self.experts);
        if pairs == 0
            || pairs > self.max_pairs
            || tiles > MAX_GRID_Z
            || pairs > i32::MAX as usize
            || !matches!(tile_pairs, 32 | 64)
        {
            return Err(CudaError::Shape {
                what: "MoeRoute::build".into(),
                reason: format!(
                    "{pairs} pairs in tiles of {tile_pairs} (1..={} pairs for this table, at \
                     most {MAX_GRID_Z} tiles of {MOE_TILE_PAIRS}; tiles of 32 or 64)",
                    self.max_pairs
                ),
            });
        }
        check_len("MoeRoute::build: ids", ids.len(), pairs)?;
        if let Some(b) = &bad {
            check_len("MoeRoute::build: bad", b.len(), 1)?;
        }
        let f = gpu.function("moe_route_tiles")?;
        let smem = route_smem(self.experts);
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(drv("moe_route_tiles dynamic shared memory limit"))?;
        let (p_i, e_i, bm_i) = (pairs as i32, self.experts as i32, tile_pairs as i32);
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(ids)
            .arg(&p_i)
            .arg(&e_i)
            .arg(&bm_i)
            .arg(&mut self.sorted)
            .arg(&mut self.route);
        arg_or_null(&mut b, bad.map(|b| &*b));
        let launch = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: ids holds `pairs` entries, sorted max_pairs >= pairs and route
        // 1 + 3 * max_tiles(max_pairs, E) >= 1 + 3 * (the tiles any routing of `pairs` makes);
        // bad one entry or null; the shared memory is route_smem(E).
        unsafe { b.launch(launch) }.map_err(drv("launch moe_route_tiles"))?;
        self.tile_pairs = tile_pairs;
        self.built = pairs;
        Ok(tiles)
    }

    /// The sorted pairs, the table and the tile bound for a launch over `pairs` pairs (the
    /// tiled launches), or an error naming `what` unless the last build was of exactly
    /// `pairs` pairs (the table's entries index rows of the launch's buffers).
    pub(crate) fn tables(
        &self,
        what: &'static str,
        pairs: usize,
    ) -> Result<(&CudaSlice<i32>, &CudaSlice<i32>, usize), CudaError> {
        if self.built != pairs {
            return Err(CudaError::Mismatch {
                what,
                reason: format!(
                    "{pairs} pairs, but the route table was built for {}",
                    self.built
                ),
            });
        }
        Ok((&self.sorted, &self.route, max_tiles(pairs, self.experts)))
    }
}

/// The largest grid.z of a launch (the tiled kernels' tiles).
const MAX_GRID_Z: usize = 65_535;

/// [`moe_layer`] through the tiled grouped kernels (prefill-sized batches): one launch sorts
/// the pairs by expert into tiles of 32 or 64 ([`moe_tile_pairs`]; `moe_route_tiles`, a
/// stable counting sort on the device), then gate/up + SwiGLU and down each run one block per
/// (256 weight rows, tile) that streams the expert's K chunks through shared memory once for
/// all the tile's pairs (fp4_tiled.cu), then the weighted combine. Four launches, no host
/// synchronization, deterministic. Needs [`moe_tiled_supported`].
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_tiled(
    gpu: &GpuContext,
    w: &MoeWeights,
    x: &CudaSlice<bf16>,
    topk_ids: &CudaSlice<i32>,
    topk_weights: &CudaSlice<f32>,
    tokens: usize,
    top_k: usize,
    ws: &mut MoeWorkspace,
    out: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let tile_pairs = moe_tile_pairs(tokens * top_k, w.gate_up.experts);
    let io = (x, topk_ids, topk_weights);
    moe_layer_tiled_with(gpu, w, io, (tokens, top_k), ws, out, tile_pairs)
}

/// [`moe_layer_tiled`] with tiles of `tile_pairs` (32 or 64) pairs; `(x, topk_ids,
/// topk_weights)` and `(tokens, top_k)` as there.
pub fn moe_layer_tiled_with(
    gpu: &GpuContext,
    w: &MoeWeights,
    (x, topk_ids, topk_weights): (&CudaSlice<bf16>, &CudaSlice<i32>, &CudaSlice<f32>),
    (tokens, top_k): (usize, usize),
    ws: &mut MoeWorkspace,
    out: &mut CudaSlice<bf16>,
    tile_pairs: usize,
) -> Result<(), CudaError> {
    if !moe_tiled_supported(w) {
        return Err(CudaError::Shape {
            what: "moe_layer_tiled".into(),
            reason: format!(
                "gate_up [{}, {}], down [{}, {}] x {} experts: needs hidden and inter \
                 multiples of {K_CHUNK}, one format, at most {MOE_MAX_EXPERTS} experts",
                w.gate_up.n, w.gate_up.k, w.down.n, w.down.k, w.gate_up.experts
            ),
        });
    }
    let Some(p) = check_layer(w, x, topk_ids, topk_weights, tokens, top_k, ws, out)? else {
        return Ok(());
    };
    let (experts, hidden, _) = w.dims()?;
    // 1. the tile table (and the count of invalid ids)
    ws.route
        .build(gpu, topk_ids, (p, tile_pairs), Some(&mut ws.bad))?;
    // 2. gate/up + SwiGLU: pair q reads token q / top_k, writes act row q
    let rt = &ws.route;
    moe_tiled_product(gpu, &w.gate_up, x, &mut ws.act, (rt, p), top_k, true)?;
    // 3. down: pair q reads act row q, writes down_out row q
    moe_tiled_product(gpu, &w.down, &ws.act, &mut ws.down_out, (rt, p), 1, false)?;
    // 4. weighted combine
    combine(
        gpu,
        ws,
        topk_ids,
        topk_weights,
        (tokens, top_k, hidden, experts),
        out,
    )
}

pub(super) struct Route<'a> {
    /// None: the kernel takes the top-k from logits instead (one-token kernels only).
    pub(super) ids: Option<&'a CudaSlice<i32>>,
    pub(super) pairs: i32,
    pub(super) experts: i32,
    pub(super) slots: u32,
}

/// The grouped kernel of fp4_gemm.cu for a format, epilogue, load group and token tiles per pass.
/// The SwiGLU kernels run one chunk per group (with two they spill registers), so only the
/// plain kernels come in two group sizes.
fn grouped_kernel_name(format: Fp4Format, swiglu: bool, group: u32, tn: u32) -> &'static str {
    match (format, swiglu, group, tn) {
        (Fp4Format::Nvfp4, false, 1, 2) => "fp4_moe_nv_g1",
        (Fp4Format::Nvfp4, false, _, 2) => "fp4_moe_nv_g2",
        (Fp4Format::Nvfp4, false, 1, _) => "fp4_moe_nv_g1_p8",
        (Fp4Format::Nvfp4, false, _, _) => "fp4_moe_nv_g2_p8",
        (Fp4Format::Nvfp4, true, _, 2) => "fp4_moe_nv_g1_swiglu",
        (Fp4Format::Nvfp4, true, _, _) => "fp4_moe_nv_g1_swiglu_p8",
        (Fp4Format::Mxfp4, false, 1, 2) => "fp4_moe_mx_g1",
        (Fp4Format::Mxfp4, false, _, 2) => "fp4_moe_mx_g2",
        (Fp4Format::Mxfp4, false, 1, _) => "fp4_moe_mx_g1_p8",
        (Fp4Format::Mxfp4, false, _, _) => "fp4_moe_mx_g2_p8",
        (Fp4Format::Mxfp4, true, _, 2) => "fp4_moe_mx_g1_swiglu",
        (Fp4Format::Mxfp4, true, _, _) => "fp4_moe_mx_g1_swiglu_p8",
    }
}

#[allow(clippy::too_many_arguments)]
fn grouped(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    r: &Route,
    in_div: i32,
    swiglu: bool,
    (warps, row_tiles, group, pairs_per_pass): (u32, u32, u32, u32),
    bad: Option<&mut CudaSlice<i32>>,
) -> Result<(), CudaError> {
    // 16 (or 8) pairs per pass over an expert's weights: two (one) 8-token mma tiles.
    let tn = if pairs_per_pass == 8 { 1u32 } else { 2 };
    let chunks = w.k.div_ceil(K_CHUNK) as u32;
    // A group needs at least its own number of chunks.
    let group = if swiglu || chunks < 2 { 1 } else { group };
    // SwiGLU: two row tiles per block, gate rows and the matching up rows.
    let cfg = Fp4GemmConfig {
        m_tiles: if swiglu { 2 } else { 1 },
        warps: warps.min(chunks / group).max(1),
        group,
    };
    let rows = if swiglu { w.n / 2 } else { w.n };
    let name = grouped_kernel_name(w.format, swiglu, group, tn);
    let f = gpu.function(name)?;
    let tiles = rows.div_ceil(16) as u32;
    let launch = LaunchConfig {
        grid_dim: (tiles.div_ceil(row_tiles.max(1)), r.slots, 1),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(cfg, tn),
    };
    // x has P / in_div rows of k elements, y one row per pair (of n / 2 elements with SwiGLU,
    // else n); ids holds P entries.
    launch_moe_kernel(
        gpu,
        &f,
        launch,
        w,
        x,
        y,
        r,
        in_div,
        bad,
        MoeTail::Grouped,
        "launch grouped FP4 GEMM",
    )
}

/// The arguments a `fp4_moe_*` kernel takes after the common ones.
pub(super) enum MoeTail<'a> {
    /// Grouped kernels: none.
    Grouped,
    /// One-token kernels (MOE_T1_KERNEL): the router's logits, or null with top-k ids; and
    /// the down projection whose chosen experts' weights each block asks L2 for once done
    /// (`Tuning::moe_down_prefetch`), or none.
    OneToken(Option<&'a CudaSlice<f32>>, Option<&'a GpuFp4Weight>),
}

/// Launches one of fp4_gemm.cu's `fp4_moe_*` kernels (grouped, or one-token direct with the
/// logits argument after the others). The caller guarantees the buffer sizes its comment states.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_moe_kernel(
    gpu: &GpuContext,
    f: &cudarc::driver::CudaFunction,
    launch: LaunchConfig,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    r: &Route,
    in_div: i32,
    bad: Option<&mut CudaSlice<i32>>,
    tail: MoeTail<'_>,
    what: &'static str,
) -> Result<(), CudaError> {
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let mut b = gpu.stream().launch_builder(f);
    w.push_args(&mut b).arg(x).arg(y).arg(&n_i).arg(&k_i);
    arg_or_null(&mut b, r.ids);
    b.arg(&r.pairs).arg(&r.experts).arg(&in_div);
    match bad {
        Some(bad) => b.arg(bad),
        // A null pointer tells the kernel not to count invalid ids.
        None => b.arg(&NULL_PTR),
    };
    b.arg(&w.post);
    if let MoeTail::OneToken(logits, next) = tail {
        arg_or_null(&mut b, logits);
        arg_or_null(&mut b, next.map(|d| &d.packed));
        arg_or_null(&mut b, next.map(|d| &d.scales));
    }
    // SAFETY: argument types and order match fp4_moe_* (grouped and *_t1); the buffer sizes
    // are the caller's guarantee.
    unsafe { b.launch(launch) }.map_err(drv(what))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every grouped kernel the launcher can name is instantiated in fp4_gemm.cu (a name that is
    /// not would only fail at launch, on a GPU).
    #[test]
    fn grouped_kernel_names_are_instantiated() {
        let src = super::super::compile::FP4_GEMM_SRC.1;
        for format in [Fp4Format::Nvfp4, Fp4Format::Mxfp4] {
            for swiglu in [false, true] {
                for group in [1, 2] {
                    for tn in [1, 2] {
                        let name = grouped_kernel_name(format, swiglu, group, tn);
                        assert!(
                            src.contains(&format!("({name}, ")),
                            "{name} is not instantiated"
                        );
                    }
                }
            }
        }
    }

    /// The automatic shape: 8 pairs per pass and several row tiles only from 8 to 32 tokens,
    /// and always within the launcher's limits.
    #[test]
    fn auto_config_is_valid() {
        for tokens in [1usize, 2, 7, 8, 16, 32, 33, 512] {
            for (hidden, inter) in [(2048usize, 768usize), (4096, 1408), (160, 96)] {
                let c = MoeConfig::auto(hidden, inter, tokens);
                assert!(c.check().is_ok(), "{tokens} tokens: {c:?}");
                let few = (8..=32).contains(&tokens);
                assert_eq!(c.pairs_per_pass == 8, few, "{tokens} tokens: {c:?}");
                assert_eq!(c.down_row_tiles > 1, few, "{tokens} tokens: {c:?}");
            }
        }
    }

    #[test]
    fn tile_bound_covers_every_routing() {
        // moe_route_tiles writes one table entry per tile of 32 pairs of an expert; the
        // workspace and the grid are sized by max_tiles, so no routing may make more.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for experts in [1usize, 3, 8, 128, 1024] {
            for pairs in [1usize, 31, 32, 33, 500, 4096, 16384] {
                for skew in 0..4u32 {
                    let mut counts = vec![0usize; experts];
                    for _ in 0..pairs {
                        // skew 0: uniform; higher: most pairs on the first experts
                        let r = (next() % 1_000_000) as f64 / 1e6;
                        let e = (r.powi(1 + 2 * skew as i32) * experts as f64) as usize;
                        counts[e.min(experts - 1)] += 1;
                    }
                    let tiles: usize = counts.iter().map(|c| c.div_ceil(MOE_TILE_PAIRS)).sum();
                    assert!(
                        tiles <= max_tiles(pairs, experts),
                        "{experts} experts, {pairs} pairs: {tiles} tiles"
                    );
                }
            }
        }
        // Every pair alone on its own expert: one tile each, the bound is tight there.
        assert_eq!(max_tiles(8, 128), 1 + 8);
        assert_eq!(route_smem(128), 128 * 72);
    }
}
