//! Grouped MoE layer on FP4 experts: routing table, grouped gate/up GEMM, SwiGLU, grouped down
//! GEMM and weighted combine, all queued on the stream from the router's device output.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::context::GpuContext;
use super::error::{drv, CudaError};
use super::gemm::{check_len, reduction_smem, Fp4GemmConfig, K_CHUNK};
use super::weights::GpuFp4Weight;
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
    max_pairs: usize,
    active_count: CudaSlice<i32>,
    active_expert: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    pair_list: CudaSlice<i32>,
    bad: CudaSlice<i32>,
    gate_up_out: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    down_out: CudaSlice<bf16>,
}

impl MoeWorkspace {
    /// Allocates scratch for `max_tokens` tokens routed to `top_k` experts each.
    pub fn new(
        gpu: &GpuContext,
        w: &MoeWeights,
        max_tokens: usize,
        top_k: usize,
    ) -> Result<Self, CudaError> {
        let (e, hidden, inter) = w.dims()?;
        let p = max_tokens * top_k;
        let s = gpu.stream();
        let z = |len: usize| {
            s.alloc_zeros::<i32>(len.max(1))
                .map_err(drv("alloc MoE table"))
        };
        let zb = |len: usize| {
            s.alloc_zeros::<bf16>(len.max(1))
                .map_err(drv("alloc MoE scratch"))
        };
        Ok(MoeWorkspace {
            max_pairs: p,
            active_count: z(1)?,
            active_expert: z(e)?,
            offsets: z(e + 1)?,
            pair_list: z(p)?,
            bad: z(1)?,
            gate_up_out: zb(p * 2 * inter)?,
            act: zb(p * inter)?,
            down_out: zb(p * hidden)?,
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

/// One MoE layer: `out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))` over the
/// `top_k` experts `e = topk_ids[t, j]`. Five launches, no host synchronization; results are
/// deterministic (fixed summation orders, no float atomics).
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
    let (experts, hidden, inter) = w.dims()?;
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
    if experts > 16 * 1024 || p > i32::MAX as usize {
        return Err(CudaError::Shape {
            what: "moe_layer".into(),
            reason: format!("{experts} experts, {p} pairs"),
        });
    }
    check_len("moe_layer: x", x.len(), tokens * hidden)?;
    check_len("moe_layer: topk_ids", topk_ids.len(), p)?;
    check_len("moe_layer: topk_weights", topk_weights.len(), p)?;
    check_len("moe_layer: out", out.len(), tokens * hidden)?;
    if p == 0 {
        return Ok(());
    }
    let s = gpu.stream();
    let (p_i, e_i) = (p as i32, experts as i32);

    // 1. routing table
    let f = gpu.function("moe_route")?;
    let mut b = s.launch_builder(&f);
    b.arg(topk_ids)
        .arg(&p_i)
        .arg(&e_i)
        .arg(&mut ws.active_count)
        .arg(&mut ws.active_expert)
        .arg(&mut ws.offsets)
        .arg(&mut ws.pair_list)
        .arg(&mut ws.bad);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (2 * experts * 4) as u32,
    };
    // SAFETY: argument list matches moe_route; tables sized for `experts` and `p` pairs.
    unsafe { b.launch(cfg) }.map_err(drv("launch moe_route"))?;

    // 2. grouped gate/up: input row of pair q is token q / top_k
    let slots = experts.min(p);
    let tables = ws_tables(ws);
    grouped(
        gpu,
        &w.gate_up,
        x,
        &mut ws.gate_up_out,
        slots,
        top_k as i32,
        tables,
    )?;

    // 3. SwiGLU
    let f = gpu.function("moe_silu_mul")?;
    let inter_i = inter as i32;
    let mut b = s.launch_builder(&f);
    b.arg(&ws.gate_up_out)
        .arg(&mut ws.act)
        .arg(&p_i)
        .arg(&inter_i);
    // SAFETY: gate_up_out holds p*2*inter and act p*inter elements (workspace sized for them).
    unsafe { b.launch(LaunchConfig::for_num_elems((p * inter) as u32)) }
        .map_err(drv("launch moe_silu_mul"))?;

    // 4. grouped down: input row of pair q is q itself
    let tables = ws_tables(ws);
    grouped(gpu, &w.down, &ws.act, &mut ws.down_out, slots, 1, tables)?;

    // 5. weighted combine
    let f = gpu.function("moe_combine")?;
    let (t_i, k_i, h_i) = (tokens as i32, top_k as i32, hidden as i32);
    let mut b = s.launch_builder(&f);
    b.arg(&ws.down_out)
        .arg(topk_weights)
        .arg(topk_ids)
        .arg(out)
        .arg(&t_i)
        .arg(&k_i)
        .arg(&h_i)
        .arg(&e_i);
    // SAFETY: down_out holds p*hidden, out tokens*hidden elements.
    unsafe { b.launch(LaunchConfig::for_num_elems((tokens * hidden) as u32)) }
        .map_err(drv("launch moe_combine"))?;
    Ok(())
}

/// Raw device pointers of the routing tables (the grouped kernel only reads them).
struct Tables {
    count: u64,
    active: u64,
    offsets: u64,
    pairs: u64,
}

fn ws_tables(ws: &MoeWorkspace) -> Tables {
    use cudarc::driver::DevicePtr;
    let s = ws.active_count.stream().clone();
    let (count, _a) = ws.active_count.device_ptr(&s);
    let (active, _b) = ws.active_expert.device_ptr(&s);
    let (offsets, _c) = ws.offsets.device_ptr(&s);
    let (pairs, _d) = ws.pair_list.device_ptr(&s);
    Tables {
        count,
        active,
        offsets,
        pairs,
    }
}

fn grouped(
    gpu: &GpuContext,
    w: &GpuFp4Weight,
    x: &CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
    slots: usize,
    in_div: i32,
    t: Tables,
) -> Result<(), CudaError> {
    // Up to 16 pairs per pass over an expert's weights: at batch 16 no expert has more.
    let tn = 2u32;
    let cfg = Fp4GemmConfig {
        m_tiles: 1,
        warps: (w.k.div_ceil(K_CHUNK) as u32).clamp(1, 8),
    };
    let name = match w.format {
        Fp4Format::Nvfp4 => "fp4_moe_nv_m1_t2",
        Fp4Format::Mxfp4 => "fp4_moe_mx_m1_t2",
    };
    let f = gpu.function(name)?;
    let launch = LaunchConfig {
        grid_dim: (w.n.div_ceil(16) as u32, slots as u32, 1),
        block_dim: (32 * cfg.warps, 1, 1),
        shared_mem_bytes: reduction_smem(cfg, tn),
    };
    let (n_i, k_i) = (w.n as i32, w.k as i32);
    let lut = gpu.scale_lut(w.format);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&w.packed)
        .arg(&w.scales)
        .arg(&w.global_scales)
        .arg(lut)
        .arg(x)
        .arg(y)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&t.count)
        .arg(&t.active)
        .arg(&t.offsets)
        .arg(&t.pairs)
        .arg(&in_div);
    // SAFETY: matches fp4_moe_*; x rows are < pairs / in_div, y has one row per pair, the
    // tables come from moe_route on the same stream.
    unsafe { b.launch(launch) }.map_err(drv("launch grouped FP4 GEMM"))?;
    Ok(())
}
