//! The BF16 expert kernels of the MoE baseline (moe.cu): the grouped GEMV, which reads each
//! present expert once for all its (token, expert) pairs, and the one-token kernel, where every
//! pair has an expert of its own. Both route themselves from the router's top-k ids on the
//! device. Prefill-sized batches take the tiled tensor-core kernel instead (`moe_bf16_tiled`,
//! over a [`MoeRoute`] table).

use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::gemm::check_len;
use super::moe::{MoeRoute, MOE_MAX_EXPERTS};
use super::moe_one_token::MOE_ONE_TOKEN_MAX_TOPK;
use super::tiled::{bf16_moe_smem, moe_tiled_launch};

/// Largest expert width whose SwiGLU rows [`moe_bf16_grouped`] stages in shared memory (8 rows
/// of bf16: 32 KiB at 2048, within the default 48 KiB); wider experts form SwiGLU per pair of
/// weight rows.
const GROUPED_STAGE_K: usize = 2048;

/// The experts of one BF16 expert launch: their stacked weights and shape.
#[derive(Clone, Copy)]
pub struct Bf16Experts<'a> {
    /// `[experts, n, k]` BF16 weights, row-major.
    pub w: &'a CudaSlice<bf16>,
    /// Output features of one expert.
    pub n: usize,
    /// Input features of one expert.
    pub k: usize,
    /// Experts in `w`.
    pub experts: usize,
}

/// The (token, expert) pairs of one BF16 expert launch and where their inputs come from.
#[derive(Clone, Copy)]
pub struct Bf16Pairs<'a> {
    /// The router's expert id of each pair (ids outside `[0, experts)` leave their output row
    /// unwritten).
    pub ids: &'a CudaSlice<i32>,
    /// Number of pairs.
    pub pairs: usize,
    /// Pair `p` reads input row `p / in_div` (the router's top-k for gate/up, 1 for down).
    pub in_div: usize,
    /// Each input row is a `[gate | up]` row of `2k` and `silu(gate) * up` (rounded to bf16) is
    /// the pair's input.
    pub swiglu_in: bool,
}

/// The buffer lengths every pairs launcher needs (`names`: w, x, y, ids): `w` exactly the
/// `[experts, n, k]` stack; at least the input rows of every pair (`[gate | up]` rows of `2k`
/// with `swiglu_in`), `pairs` output rows and `pairs` ids.
fn check_buffers(
    names: [&'static str; 4],
    e: Bf16Experts<'_>,
    p: Bf16Pairs<'_>,
    x_len: usize,
    y_len: usize,
) -> Result<(), CudaError> {
    let in_w = if p.swiglu_in { 2 * e.k } else { e.k };
    let x_need = p.pairs.div_ceil(p.in_div) * in_w;
    let y_need = p.pairs * e.n;
    check_len(names[0], e.w.len(), e.experts * e.n * e.k)?;
    check_len(names[1], x_len.min(x_need), x_need)?;
    check_len(names[2], y_len.min(y_need), y_need)?;
    check_len(names[3], p.ids.len().min(p.pairs), p.pairs)
}

/// Grouped BF16 expert GEMV: `y[p] = w[ids[p]] · x[p / in_div]` for every pair `p < pairs`
/// ([`Bf16Experts`], [`Bf16Pairs`]), f32 accumulation. One block row per present expert takes
/// that expert's pairs 8 at a time, so each expert is read once for all of them (batches,
/// prefill).
pub fn moe_bf16_grouped(
    gpu: &GpuContext,
    e: Bf16Experts<'_>,
    p: Bf16Pairs<'_>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let Bf16Experts { w, n, k, experts } = e;
    let Bf16Pairs {
        ids,
        pairs,
        in_div,
        swiglu_in,
    } = p;
    if n == 0
        || k == 0
        || k % 8 != 0
        || in_div == 0
        || pairs == 0
        || experts == 0
        || experts > MOE_MAX_EXPERTS
        || n.div_ceil(16) > 65_535
        || experts
            .checked_mul(n)
            .and_then(|v| v.checked_mul(k))
            .is_none()
        || pairs > i32::MAX as usize
    {
        return Err(CudaError::Shape {
            what: "moe_bf16_grouped".into(),
            reason: format!(
                "{pairs} pairs of {experts} [{n}, {k}] experts (input row p / {in_div}; k a \
                 multiple of 8, at most {MOE_MAX_EXPERTS} experts)"
            ),
        });
    }
    check_buffers(
        [
            "moe_bf16_grouped: w",
            "moe_bf16_grouped: x",
            "moe_bf16_grouped: y",
            "moe_bf16_grouped: ids",
        ],
        e,
        p,
        x.len(),
        y.len(),
    )?;
    // The SwiGLU rows of a group of 8 pairs staged in shared memory where they fit.
    let stage = swiglu_in && k <= GROUPED_STAGE_K;
    let (n_i, k_i, p_i, e_i, d_i, s_i, st_i) = (
        n as i32,
        k as i32,
        pairs as i32,
        experts as i32,
        in_div as i32,
        i32::from(swiglu_in),
        i32::from(stage),
    );
    let f = gpu.function("moe_bf16")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(w)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(ids)
        .arg(&p_i)
        .arg(&e_i)
        .arg(&d_i)
        .arg(&s_i)
        .arg(&st_i);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(16) as u32, experts.min(pairs) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: if stage { (8 * k * 2) as u32 } else { 0 },
    };
    // SAFETY: w holds experts * n * k, x the input rows of every pair, y pairs * n, ids pairs
    // (checked above); k is a multiple of 8; the kernel reads ids within [0, pairs), skips ids
    // outside [0, experts) and its present-expert table holds MOE_MAX_EXPERTS.
    unsafe { b.launch(cfg) }.map_err(drv("launch moe_bf16"))?;
    Ok(())
}

/// Most input features `moe_bf16_pairs` takes with `swiglu_in` (its SwiGLU row is staged in
/// shared memory).
pub const MOE_BF16_PAIRS_MAX_SWIGLU_K: usize = 4096;
/// Most rows one block of `moe_bf16_pairs` owns (its shared-memory partials).
const PAIRS_MAX_ROWS: usize = 32;

/// Whether [`moe_bf16_pairs`] takes `[n, k]` experts (`swiglu_in`: a `[gate | up]` input of `2k`).
pub fn moe_bf16_pairs_supported(n: usize, k: usize, swiglu_in: bool) -> bool {
    n > 0
        && k > 0
        && k % 8 == 0
        && (!swiglu_in || k <= MOE_BF16_PAIRS_MAX_SWIGLU_K)
        && n.checked_mul(k).is_some_and(|v| v <= i32::MAX as usize)
}

/// One-token BF16 experts: `y[p] = w[ids[p]] · x[p / in_div]` for every pair `p < pairs`
/// ([`Bf16Experts`], [`Bf16Pairs`]), f32 accumulation, the SwiGLU input formed once per block.
/// One pass over each pair's expert, so meant for one token, where every pair has an expert of
/// its own (batches take the grouped kernel that reads each expert once).
pub fn moe_bf16_pairs(
    gpu: &GpuContext,
    e: Bf16Experts<'_>,
    p: Bf16Pairs<'_>,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    check_pairs(e, p)?;
    check_buffers(
        [
            "moe_bf16_pairs: w",
            "moe_bf16_pairs: x",
            "moe_bf16_pairs: y",
            "moe_bf16_pairs: ids",
        ],
        e,
        p,
        x.len(),
        y.len(),
    )?;
    let name = if p.swiglu_in {
        "moe_bf16_pairs_sw"
    } else {
        "moe_bf16_pairs"
    };
    let f = gpu.function(name)?;
    let (cfg, ints) = pairs_launch(gpu, e, p);
    let mut b = gpu.stream().launch_builder(&f);
    push_pairs_head(&mut b, e, x, y, &ints);
    b.arg(p.ids).arg(&ints[3]).arg(&ints[4]);
    // SAFETY: w holds experts * n * k, x the input rows of every pair, y pairs * n, ids pairs
    // (checked above); k is a multiple of 8 (and within the staged SwiGLU row); the kernel reads
    // ids within [0, pairs) and skips ids outside [0, experts).
    unsafe { b.launch(cfg) }.map_err(drv("launch moe_bf16_pairs"))?;
    Ok(())
}

/// The router's output for [`moe_bf16_pairs_from_logits`]: its logits in, the top-k ids and
/// routing weights out.
pub struct Bf16LogitsRoute<'a> {
    /// `[experts]` logits of the token.
    pub logits: &'a CudaSlice<f32>,
    /// Renormalise the chosen weights over the top-k (`norm_topk_prob`).
    pub renorm: bool,
    /// Receives the `top_k` expert ids in rank order (ties to the lower index).
    pub ids: &'a mut CudaSlice<i32>,
    /// Receives their routing weights.
    pub weights: &'a mut CudaSlice<f32>,
}

/// One token's BF16 gate/up experts routed from the router's logits: every block takes the
/// softmax and top-k itself (the router's own selection code, so the same ids and weights bit
/// for bit), computes `y[p] = w[id_p] · x` for its pair `p < top_k`, and one block writes the
/// ids and weights to `route` for the down projection and the combine after it. The router
/// then ends with its logits: no last block gathering them and no launch waiting for that
/// (`Tuning::expert_topk`, as the FP4 experts do).
pub fn moe_bf16_pairs_from_logits(
    gpu: &GpuContext,
    e: Bf16Experts<'_>,
    route: Bf16LogitsRoute<'_>,
    top_k: usize,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    // The pairs as the ids route would give them: one token, top_k pairs reading its row, the
    // ids buffer (written here) as long as theirs.
    let shape = Bf16Pairs {
        ids: &*route.ids,
        pairs: top_k,
        in_div: top_k,
        swiglu_in: false,
    };
    check_pairs(e, shape)?;
    if !moe_bf16_logits_route_supported(e.experts, top_k) {
        return Err(CudaError::Shape {
            what: "moe_bf16_pairs_from_logits".into(),
            reason: format!(
                "top-{top_k} of {} experts: at most top-{MOE_ONE_TOKEN_MAX_TOPK} of \
                 {MOE_MAX_EXPERTS}",
                e.experts
            ),
        });
    }
    check_buffers(
        [
            "moe_bf16_pairs_from_logits: w",
            "moe_bf16_pairs_from_logits: x",
            "moe_bf16_pairs_from_logits: y",
            "moe_bf16_pairs_from_logits: ids",
        ],
        e,
        shape,
        x.len(),
        y.len(),
    )?;
    check_len(
        "moe_bf16_pairs_from_logits: logits",
        route.logits.len(),
        e.experts,
    )?;
    check_len(
        "moe_bf16_pairs_from_logits: weights",
        route.weights.len().min(top_k),
        top_k,
    )?;
    let f = gpu.function("moe_bf16_pairs_topk")?;
    let (cfg, ints) = pairs_launch(gpu, e, shape);
    let renorm = i32::from(route.renorm);
    let mut b = gpu.stream().launch_builder(&f);
    push_pairs_head(&mut b, e, x, y, &ints);
    b.arg(&ints[3])
        .arg(&ints[4])
        .arg(route.logits)
        .arg(&renorm)
        .arg(route.ids)
        .arg(route.weights);
    // SAFETY: w holds experts * n * k, x one row of k, y top_k * n, logits one per expert (at
    // most MOE_ROUTER_MAX_EXPERTS, the kernel's shared table), ids and weights top_k (<= 16, its
    // selection slots) entries (checked above); k is a multiple of 8; chosen ids outside
    // [0, experts) (none for finite logits) leave their rows unwritten.
    unsafe { b.launch(cfg) }.map_err(drv("launch moe_bf16_pairs_topk"))?;
    Ok(())
}

/// Whether [`moe_bf16_pairs_from_logits`] takes a router of `experts` logits and its top-`top_k`
/// (the kernel's shared selection slots and probability table: [`MOE_ONE_TOKEN_MAX_TOPK`],
/// [`MOE_MAX_EXPERTS`]).
pub fn moe_bf16_logits_route_supported(experts: usize, top_k: usize) -> bool {
    top_k <= MOE_ONE_TOKEN_MAX_TOPK && experts <= MOE_MAX_EXPERTS
}

/// Refuses what the one-token kernels cannot take (see [`moe_bf16_pairs_supported`]).
fn check_pairs(e: Bf16Experts<'_>, s: Bf16Pairs<'_>) -> Result<(), CudaError> {
    let (n, k) = (e.n, e.k);
    if !moe_bf16_pairs_supported(n, k, s.swiglu_in)
        || s.in_div == 0
        || s.pairs == 0
        || s.pairs > 65_535
        || e.experts > i32::MAX as usize
    {
        return Err(CudaError::Shape {
            what: "moe_bf16_pairs".into(),
            reason: format!(
                "{} pairs of {} [{n}, {k}] experts (input row p / {}; k a multiple of 8{})",
                s.pairs,
                e.experts,
                s.in_div,
                if s.swiglu_in {
                    format!(", at most {MOE_BF16_PAIRS_MAX_SWIGLU_K} with SwiGLU")
                } else {
                    String::new()
                }
            ),
        });
    }
    Ok(())
}

/// The arguments every `moe_bf16_pairs*` kernel takes first: w, x, y, n, k, rows per block
/// (`ints` from [`pairs_launch`]).
fn push_pairs_head<'a>(
    b: &mut LaunchArgs<'a>,
    e: Bf16Experts<'a>,
    x: &'a CudaSlice<bf16>,
    y: &'a mut CudaSlice<bf16>,
    ints: &'a [i32; 5],
) {
    b.arg(e.w)
        .arg(x)
        .arg(y)
        .arg(&ints[0])
        .arg(&ints[1])
        .arg(&ints[2]);
}

/// Grid of a one-token launch (about four 8-warp blocks per SM over all pairs, in one wave) and
/// its integer arguments n, k, rows per block, experts, in_div.
fn pairs_launch(
    gpu: &GpuContext,
    e: Bf16Experts<'_>,
    s: Bf16Pairs<'_>,
) -> (LaunchConfig, [i32; 5]) {
    let target = (4 * gpu.sm_count() as usize / s.pairs).max(1);
    let rb = e.n.div_ceil(target).clamp(1, PAIRS_MAX_ROWS);
    let cfg = LaunchConfig {
        grid_dim: (e.n.div_ceil(rb) as u32, s.pairs as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let ints = [
        e.n as i32,
        e.k as i32,
        rb as i32,
        e.experts as i32,
        s.in_div as i32,
    ];
    (cfg, ints)
}

/// K elements per pipeline stage of the tiled BF16 grouped kernels (`BM_CH`, fp4_tiled.cu).
const TILED_CHUNK: usize = 64;

/// Whether [`moe_bf16_tiled`] takes experts of `[n, k]` (`gated`: the `[gate | up]` form, so
/// `n` even): K a multiple of 64 (whole chunks, aligned copies).
pub fn moe_bf16_tiled_supported(n: usize, k: usize, gated: bool) -> bool {
    n > 0 && k > 0 && k % TILED_CHUNK == 0 && (!gated || n % 2 == 0)
}

/// Tiled grouped BF16 expert product on the tensor cores (prefill-sized batches; the runtime
/// takes it where [`super::moe_tiled_batch`] holds): for the `pairs` pairs of a route table
/// ([`MoeRoute::build`] over the same ids), `y[q] = w[e_q] · x[q / in_div]`, or with `gated`
/// (`w` holds `[gate | up]` rows, `n = 2 * inter`) `y[q] = silu(gate) * up` of `n / 2`
/// columns, each product rounded to bf16 first. f32 accumulation over K in order; one block per
/// (256 weight rows, tile of 32 or 64 pairs of one expert: the table's), each K chunk of the
/// expert's rows read once for the tile (fp4_tiled.cu `bf16_mm_moe_*`). Pairs with an invalid
/// id are in no tile: their rows of `y` are left as they were. The table must have been built
/// for exactly `pairs` pairs. Deterministic.
#[allow(clippy::too_many_arguments)]
pub fn moe_bf16_tiled(
    gpu: &GpuContext,
    e: Bf16Experts<'_>,
    route: &MoeRoute,
    pairs: usize,
    in_div: usize,
    gated: bool,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<(), CudaError> {
    let Bf16Experts { w, n, k, experts } = e;
    if !moe_bf16_tiled_supported(n, k, gated)
        || in_div == 0
        || pairs == 0
        || experts != route.experts()
        || pairs > i32::MAX as usize
    {
        return Err(CudaError::Shape {
            what: "moe_bf16_tiled".into(),
            reason: format!(
                "{pairs} pairs of {experts} [{n}, {k}] experts{} (input row p / {in_div}; k a \
                 multiple of {TILED_CHUNK}; the route table has {} experts)",
                if gated { ", gated" } else { "" },
                route.experts()
            ),
        });
    }
    let out_cols = if gated { n / 2 } else { n };
    check_len("moe_bf16_tiled: w", w.len(), experts * n * k)?;
    let x_need = pairs.div_ceil(in_div) * k;
    check_len("moe_bf16_tiled: x", x.len().min(x_need), x_need)?;
    let y_need = pairs * out_cols;
    check_len("moe_bf16_tiled: y", y.len().min(y_need), y_need)?;
    let (sorted, table, tiles) = route.tables("moe_bf16_tiled", pairs)?;
    let bm = route.tile_pairs();
    let name = match (gated, bm) {
        (true, 32) => "bf16_mm_moe_sw_t4",
        (false, 32) => "bf16_mm_moe_t4",
        (true, _) => "bf16_mm_moe_sw_t8",
        (false, _) => "bf16_mm_moe_t8",
    };
    let (f, launch) = moe_tiled_launch(gpu, name, bf16_moe_smem(bm), n, gated, tiles)?;
    let (n_i, k_i, div_i) = (n as i32, k as i32, in_div as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(w)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(sorted)
        .arg(table)
        .arg(&div_i);
    // SAFETY: matches BM_MOE_KERNEL; w is the whole stack, x holds the input rows of every pair
    // and y `pairs` rows of the output width (checked above); the table was built for at most
    // `pairs` pairs over these experts (its tiles index only those rows).
    unsafe { b.launch(launch) }.map_err(drv("launch moe_bf16_tiled"))?;
    Ok(())
}
