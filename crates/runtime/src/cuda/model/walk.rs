//! Layer-at-a-time execution on the GPU for calibration ([`crate::walk::LayerWalk`]): the
//! hidden states of one sequence go up, one decoder layer runs over them as a prefill (its keys
//! and values in a one-sequence cache), every Linear's input is read back and shown to the
//! observer (or, between `begin_device_sums` and `take_device_sums`, summed on the device: Gram
//! matrices by cuBLAS, routed experts' rows gathered on the device), and the residual stream
//! comes back down. Quantized weights replace a layer's BF16
//! rows in place (dequantized and rounded to BF16), so that the next layer is calibrated on the
//! quantized layer's outputs.
//!
//! Differences from the CPU walk, which runs in f32: the Linear inputs the observer sees are the
//! BF16 activations the GPU kernels multiply (what an engine serving the model computes), and a
//! replaced weight is its dequantized FP4 values rounded to BF16 (relative error at most 2^-9
//! per element, far below the FP4 step). Routing is the GPU router's.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::{Experts, Ffn, GateUp, GpuModel, Moe, Pend, Qkv, Ws};
use crate::arch::Names;
use crate::cuda::error::{drv, GpuError};
use crate::cuda::ops::MAX_CONTEXT;
use crate::cuda::weights::{linear_to_bf16, GpuLinear};
use crate::linear::{Linear, Weight};
use crate::model::{LinearObserver, ReplaceError, Site};
use crate::walk::{SiteSums, WalkError};

/// Reads the first `len` values of `buf` back to the host (synchronises the stream).
fn read<T: cudarc::driver::DeviceRepr>(
    model: &GpuModel,
    buf: &CudaSlice<T>,
    len: usize,
    what: &'static str,
) -> Result<Vec<T>, GpuError> {
    if len > buf.len() {
        return Err(GpuError::Unsupported(format!(
            "{what}: {len} values asked of a buffer of {}",
            buf.len()
        )));
    }
    model
        .gpu
        .ctx
        .stream()
        .clone_dtoh(&buf.slice(0..len))
        .map_err(drv(what))
}

/// [`read`] of bf16 values, as f32.
fn read_f32(
    model: &GpuModel,
    buf: &CudaSlice<bf16>,
    len: usize,
    what: &'static str,
) -> Result<Vec<f32>, GpuError> {
    Ok(read(model, buf, len, what)?
        .iter()
        .map(|v| v.to_f32())
        .collect())
}

/// SiLU(gate) * up of one pair row (`[gate | up]`, `inter` each), rounded to BF16 as the grouped
/// down kernel forms its input (`swiglu2` in ops.cu).
fn swiglu_row(row: &[bf16], inter: usize, out: &mut Vec<f32>) {
    let (g, u) = row.split_at(inter);
    out.extend(g.iter().zip(u).map(|(g, u)| {
        let g = g.to_f32();
        bf16::from_f32(g / (1.0 + (-g).exp()) * u.to_f32()).to_f32()
    }));
}

/// Per expert of a MoE layer, from the router's choices `ids` (`[m, top_k]`): the tokens routed
/// to it (ascending, as the CPU forward visits them) and their pair indices.
fn routing(ids: &[i32], m: usize, top_k: usize, experts: usize) -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut per = vec![(Vec::new(), Vec::new()); experts];
    for t in 0..m {
        for j in 0..top_k {
            if let Some(e) = usize::try_from(ids[t * top_k + j])
                .ok()
                .filter(|&e| e < experts)
            {
                per[e].0.push(t);
                per[e].1.push(t * top_k + j);
            }
        }
    }
    per
}

/// Every expert's gate/up outputs on every token `[m, E * 2I]` (one GEMM over the stacked BF16
/// experts), for the all-token down inputs.
fn all_token_gate_up(
    model: &GpuModel,
    moe: &Moe,
    h: &CudaSlice<bf16>,
    m: usize,
) -> Result<CudaSlice<bf16>, GpuError> {
    let Experts::Bf16 { gate_up, .. } = &moe.experts else {
        return Err(GpuError::Unsupported(
            "calibration on the GPU needs BF16 experts".into(),
        ));
    };
    let n = moe.n_experts * 2 * moe.inter;
    let hd = model.config.hidden_size;
    let mut all = model
        .gpu
        .ctx
        .stream()
        .alloc_zeros::<bf16>(m * n)
        .map_err(drv("alloc all-token expert outputs"))?;
    mimo_kernels::cuda::bf16_gemm(&model.gpu.blas, gate_up, h, m, n, hd, &mut all)?;
    Ok(all)
}

/// What a calibration pass does with each Linear's input.
pub(super) enum Tap<'a> {
    /// Reads it back and shows it to a host observer.
    Host(&'a mut dyn LinearObserver),
    /// Adds it to sums kept on the device.
    Device(&'a mut DeviceSums),
}

/// One site's sums on the device.
struct DevAcc {
    k: usize,
    rows: u64,
    /// `sum x x^T`, `[k, k]` f32.
    gram: CudaSlice<f32>,
    /// Bits of the largest |x|.
    amax: CudaSlice<u32>,
}

/// Statistics summed on the device over a layer's calibration pass: per site the Gram matrix
/// (cuBLAS, bf16 inputs, f32 sums: the Hessian, and on its diagonal the second moments), the
/// largest |x| and the row count. Routed experts' rows are gathered on the device from the
/// routing (read back: `m * top_k` ids per sequence).
pub(crate) struct DeviceSums {
    all_token_experts: bool,
    /// Whether the whole Gram matrices go back to the host (else only their diagonals).
    hessian: bool,
    sites: std::collections::BTreeMap<Site, DevAcc>,
}

impl DeviceSums {
    /// Adds the first `m` rows of `x` (`k` wide) to `site`'s sums.
    fn add(
        &mut self,
        model: &GpuModel,
        site: Site,
        x: &CudaSlice<bf16>,
        m: usize,
        k: usize,
    ) -> Result<(), GpuError> {
        if m == 0 {
            return Ok(());
        }
        let s = model.gpu.ctx.stream();
        let acc = match self.sites.entry(site) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(DevAcc {
                k,
                rows: 0,
                gram: s
                    .alloc_zeros::<f32>(k * k)
                    .map_err(drv("alloc calibration sums"))?,
                amax: s
                    .alloc_zeros::<u32>(1)
                    .map_err(drv("alloc calibration sums"))?,
            }),
        };
        if acc.k != k {
            return Err(GpuError::Unsupported(format!(
                "{site:?}: inputs of {k} features after {}",
                acc.k
            )));
        }
        if m * k > x.len() {
            return Err(GpuError::Unsupported(format!(
                "{site:?}: {m} rows of {k} from a buffer of {}",
                x.len()
            )));
        }
        let g = &model.gpu;
        mimo_kernels::cuda::bf16_gram_accumulate(
            &g.ctx,
            &g.blas,
            &x.slice(0..m * k),
            m,
            k,
            &mut acc.gram,
        )?;
        g.ops.calib_amax(&g.ctx, x, m * k, &mut acc.amax)?;
        acc.rows += m as u64;
        Ok(())
    }

    /// Routed experts' inputs: per expert its tokens' rows of `h` (gate/up) and the SwiGLU of
    /// its pairs' rows of `pgu` (down), gathered on the device; with all-token experts also
    /// every expert's down input on every token.
    #[allow(clippy::too_many_arguments)]
    fn experts(
        &mut self,
        model: &GpuModel,
        li: usize,
        moe: &Moe,
        h: &CudaSlice<bf16>,
        ids: &CudaSlice<i32>,
        pgu: &CudaSlice<bf16>,
        m: usize,
    ) -> Result<(), GpuError> {
        let hd = model.config.hidden_size;
        let (ne, k, inter) = (moe.n_experts, moe.top_k, moe.inter);
        let (g, s) = (&model.gpu, model.gpu.ctx.stream());
        let mut scratch = s
            .alloc_zeros::<bf16>(m * hd.max(inter))
            .map_err(drv("alloc calibration scratch"))?;
        if self.all_token_experts {
            let all = all_token_gate_up(model, moe, h, m)?;
            let rows: Vec<i32> = (0..m as i32).collect();
            let idx = s.clone_htod(&rows).map_err(drv("upload rows"))?;
            let n = ne * 2 * inter;
            for e in 0..ne {
                g.ops.calib_gather(
                    &g.ctx,
                    &all,
                    &idx.slice(0..m),
                    m,
                    inter,
                    n,
                    e * 2 * inter,
                    true,
                    &mut scratch,
                )?;
                self.add(model, Site::ExpertDownAllTokens(li, e), &scratch, m, inter)?;
            }
        }
        let ids = read(model, ids, m * k, "read the routing")?;
        let per = routing(&ids, m, k, ne);
        // One upload of every expert's token and pair rows.
        let mut flat: Vec<i32> = Vec::with_capacity(4 * m * k);
        let mut spans = Vec::with_capacity(ne);
        for (toks, pairs) in &per {
            let at = flat.len();
            flat.extend(toks.iter().map(|&t| t as i32));
            flat.extend(pairs.iter().map(|&p| p as i32));
            spans.push((at, toks.len()));
        }
        if flat.is_empty() {
            return Ok(());
        }
        let idx = s.clone_htod(&flat).map_err(drv("upload routed rows"))?;
        for (e, &(at, n)) in spans.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let toks = idx.slice(at..at + n);
            g.ops
                .calib_gather(&g.ctx, h, &toks, n, hd, hd, 0, false, &mut scratch)?;
            self.add(model, Site::ExpertGateUp(li, e), &scratch, n, hd)?;
            let pairs = idx.slice(at + n..at + 2 * n);
            g.ops.calib_gather(
                &g.ctx,
                pgu,
                &pairs,
                n,
                inter,
                2 * inter,
                0,
                true,
                &mut scratch,
            )?;
            self.add(model, Site::ExpertDown(li, e), &scratch, n, inter)?;
        }
        Ok(())
    }
}

impl Tap<'_> {
    /// `site`'s input: the first `m` rows of `buf`, `k` wide.
    pub(super) fn site(
        &mut self,
        model: &GpuModel,
        site: Site,
        buf: &CudaSlice<bf16>,
        m: usize,
        k: usize,
    ) -> Result<(), GpuError> {
        match self {
            Tap::Host(obs) => {
                let x = read_f32(model, buf, m * k, "read a Linear's input")?;
                obs.observe(site, &x, m);
                Ok(())
            }
            Tap::Device(sums) => sums.add(model, site, buf, m, k),
        }
    }

    /// One MoE layer's expert inputs, from the device state after the BF16 grouped experts
    /// ran: `h` the MoE input `[m, hidden]`, `ids` the router's choices `[m, top_k]`, `pgu`
    /// each pair's gate/up output `[m * top_k, 2 * inter]`. Experts are visited in index order
    /// with their tokens ascending, as the CPU forward does.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn experts(
        &mut self,
        model: &GpuModel,
        li: usize,
        moe: &Moe,
        h: &CudaSlice<bf16>,
        ids: &CudaSlice<i32>,
        pgu: &CudaSlice<bf16>,
        m: usize,
    ) -> Result<(), GpuError> {
        let obs = match self {
            Tap::Device(sums) => return sums.experts(model, li, moe, h, ids, pgu, m),
            Tap::Host(obs) => obs,
        };
        let hd = model.config.hidden_size;
        let (ne, k, inter) = (moe.n_experts, moe.top_k, moe.inter);
        let x = read_f32(model, h, m * hd, "read the MoE input")?;
        let ids = read(model, ids, m * k, "read the routing")?;
        let pairs = read(
            model,
            pgu,
            m * k * 2 * inter,
            "read the expert gate/up outputs",
        )?;
        if obs.all_token_experts() {
            let n = ne * 2 * inter;
            let all = all_token_gate_up(model, moe, h, m)?;
            let all = read(model, &all, m * n, "read all-token expert outputs")?;
            for e in 0..ne {
                let mut act = Vec::with_capacity(m * inter);
                for t in 0..m {
                    let row = &all[t * n + e * 2 * inter..t * n + (e + 1) * 2 * inter];
                    swiglu_row(row, inter, &mut act);
                }
                obs.observe(Site::ExpertDownAllTokens(li, e), &act, m);
            }
        }
        for (e, (toks, pair_rows)) in routing(&ids, m, k, ne).into_iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let mut xe = Vec::with_capacity(toks.len() * hd);
            let mut act = Vec::with_capacity(toks.len() * inter);
            for (&t, &p) in toks.iter().zip(&pair_rows) {
                xe.extend_from_slice(&x[t * hd..(t + 1) * hd]);
                swiglu_row(&pairs[p * 2 * inter..(p + 1) * 2 * inter], inter, &mut act);
            }
            obs.routed(li, e, &toks, None);
            obs.observe(Site::ExpertGateUp(li, e), &xe, toks.len());
            obs.observe(Site::ExpertDown(li, e), &act, toks.len());
        }
        Ok(())
    }
}

/// Where the rows of one Linear live on the device.
enum Slot {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Router,
    ExpertGate(usize),
    ExpertUp(usize),
    ExpertDown(usize),
    SharedGate,
    SharedUp,
    SharedDown,
    SharedExpertGate,
}

/// The BF16 matrix of a [`GpuLinear`] (FP4 ones cannot take replaced rows).
fn bf16_of<'a>(l: &'a mut GpuLinear, what: &str) -> Result<&'a mut CudaSlice<bf16>, GpuError> {
    match l {
        GpuLinear::Bf16 { w, .. } => Ok(w),
        GpuLinear::Fp4 { .. } => Err(GpuError::Unsupported(format!(
            "{what}: replacing the weight of an FP4 layer (calibration needs a BF16 model)"
        ))),
    }
}

impl GpuModel {
    /// From now on, [`GpuModel::forward_layer_observed`] sums every site's statistics on the
    /// device (the observer sees nothing) until [`GpuModel::take_device_sums`], which returns
    /// the whole Gram matrices where `hessian`, else only their diagonals.
    pub fn begin_device_sums(&mut self, all_token_experts: bool, hessian: bool) {
        self.device_sums = Some(DeviceSums {
            all_token_experts,
            hessian,
            sites: std::collections::BTreeMap::new(),
        });
    }

    /// Ends device summing: every site's sums (per-feature sums of squares, the Gram matrix in
    /// f64 where asked for, largest |x|, rows), in site order, and frees them on the device.
    pub fn take_device_sums(&mut self) -> Result<Vec<SiteSums>, GpuError> {
        let Some(sums) = self.device_sums.take() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(sums.sites.len());
        for (site, acc) in sums.sites {
            let gram = read(self, &acc.gram, acc.k * acc.k, "read calibration sums")?;
            let amax = read(self, &acc.amax, 1, "read calibration sums")?;
            out.push(SiteSums {
                site,
                k: acc.k,
                rows: acc.rows,
                amax: f32::from_bits(amax[0]),
                sum_sq: (0..acc.k).map(|i| f64::from(gram[i * acc.k + i])).collect(),
                gram: sums
                    .hessian
                    .then(|| gram.iter().map(|&v| f64::from(v)).collect()),
            });
        }
        Ok(out)
    }

    /// Makes sure there is a one-sequence cache of at least `m` positions.
    fn walk_cache(&mut self, m: usize) -> Result<(), GpuError> {
        let ok = self.cache.as_ref().is_some_and(|c| c.capacity >= m);
        if !ok {
            // Rounded up so that the few sequence lengths of a calibration set share a cache.
            let cap = m.next_power_of_two().max(64).min(MAX_CONTEXT.max(m));
            self.alloc_cache(1, cap)?;
        }
        Ok(())
    }

    /// The final RMSNorm, in place, on hidden states `x` (`[m, hidden]`) leaving the last
    /// decoder layer: the lm_head's input, computed on the host (the CPU runtime's formula)
    /// with the device's norm weight.
    pub fn final_norm_rows(&self, x: &mut [f32]) -> Result<(), GpuError> {
        let last = self.config.num_layers.saturating_sub(1);
        crate::model::layer_input_rows(&self.config, last, x.len())?;
        let w = self
            .gpu
            .ctx
            .stream()
            .clone_dtoh(&self.final_norm)
            .map_err(drv("download the final norm weight"))?;
        crate::cpu::rms_norm(x, &w, self.config.rms_norm_eps);
        Ok(())
    }

    /// The hidden states `[m, hidden]` entering layer 0 for `tokens` (the device's BF16
    /// embedding rows as f32).
    pub fn embed_rows(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        super::check_tokens(tokens, self.config.vocab_size)?;
        let m = tokens.len();
        self.walk_cache(m)?;
        let mut ws = self.take_ws(m, 1)?;
        let r = self.embed_in(&mut ws, tokens);
        self.workspaces.insert((m, 1), ws);
        r
    }

    fn embed_in(&self, ws: &mut Ws, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        let c = &self.config;
        let s = self.gpu.ctx.stream();
        let tok: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        s.memcpy_htod(&tok, &mut ws.tok)
            .map_err(drv("upload tokens"))?;
        self.gpu.ops.embed_gather(
            &self.gpu.ctx,
            &self.embed,
            &ws.tok,
            &mut ws.x,
            ws.m,
            c.hidden_size,
            c.vocab_size,
            &mut ws.bad,
        )?;
        read(self, &ws.x, ws.m * c.hidden_size, "read embeddings")
    }

    /// Runs decoder layer `layer` on the hidden states `x` (`[m, hidden]`, one sequence at
    /// positions `0..m`) in place, showing every Linear's input to `obs` (the GPU half of
    /// [`crate::model::Model::forward_layer_observed`]; see the module docs for how it differs).
    pub fn forward_layer_observed(
        &mut self,
        layer: usize,
        x: &mut [f32],
        obs: &mut dyn LinearObserver,
    ) -> Result<(), GpuError> {
        let m = crate::model::layer_input_rows(&self.config, layer, x.len())?;
        self.walk_cache(m)?;
        let mut ws = self.take_ws(m, 1)?;
        let mut sums = self.device_sums.take();
        let mut tap = match sums.as_mut() {
            Some(d) => Tap::Device(d),
            None => Tap::Host(obs),
        };
        let r = self.layer_in(&mut ws, layer, x, &mut tap);
        self.device_sums = sums;
        self.workspaces.insert((m, 1), ws);
        r
    }

    fn layer_in(
        &self,
        ws: &mut Ws,
        li: usize,
        x: &mut [f32],
        tap: &mut Tap<'_>,
    ) -> Result<(), GpuError> {
        let s = self.gpu.ctx.stream();
        let m = ws.m;
        let pos: Vec<i32> = (0..m as i32).collect();
        s.memcpy_htod(x, &mut ws.x)
            .map_err(drv("upload hidden states"))?;
        s.memcpy_htod(&pos, &mut ws.pos)
            .map_err(drv("upload positions"))?;
        s.memcpy_htod(&vec![0i32; m], &mut ws.seq)
            .map_err(drv("upload sequence ids"))?;
        let layer = &self.layers[li];
        self.add_norm(ws, Pend::default(), &layer.in_norm, false)?;
        let pend = self.layer_pass(ws, li, false, Some(tap))?;
        // Folds the layer's outputs into the residual stream (the norm it also computes is not
        // used).
        self.add_norm(ws, pend, &layer.in_norm, false)?;
        s.memcpy_dtoh(&ws.x.slice(0..x.len()), x)
            .map_err(drv("read hidden states"))?;
        s.synchronize().map_err(drv("synchronize"))?;
        Ok(())
    }

    /// Replaces the weight of the decoder-layer Linear `module` (checkpoint module name) with
    /// `weight` (same shape): its values, rounded to BF16, overwrite the Linear's rows in the
    /// device matrix that holds them (fused q/k/v and gate/up included). The bias is kept.
    pub fn replace_linear_weight(&mut self, module: &str, weight: Weight) -> Result<(), WalkError> {
        let c = &self.config;
        let names = Names::new(c.arch);
        let li = (0..self.layers.len())
            .find(|&l| {
                let norm = names.input_norm(l);
                module.starts_with(norm.trim_end_matches("input_layernorm.weight"))
            })
            .ok_or_else(|| ReplaceError::Unknown(module.to_string()))?;
        let mut slots = vec![
            (names.attn(li, "q_proj"), Slot::Q),
            (names.attn(li, "k_proj"), Slot::K),
            (names.attn(li, "v_proj"), Slot::V),
            (names.attn(li, "o_proj"), Slot::O),
        ];
        match &self.layers[li].ffn {
            Ffn::Dense(_) => {
                let [g, u, d] = names.mlp(li);
                slots.extend([(g, Slot::Gate), (u, Slot::Up), (d, Slot::Down)]);
            }
            Ffn::Moe(moe) => {
                slots.push((names.router(li), Slot::Router));
                for e in 0..moe.n_experts {
                    let [g, u, d] = names.expert(li, e);
                    slots.push((g, Slot::ExpertGate(e)));
                    slots.push((u, Slot::ExpertUp(e)));
                    slots.push((d, Slot::ExpertDown(e)));
                }
                if moe.shared.is_some() {
                    let [g, u, d] = names.shared_expert(li);
                    slots.push((g, Slot::SharedGate));
                    slots.push((u, Slot::SharedUp));
                    slots.push((d, Slot::SharedDown));
                    slots.push((names.shared_expert_gate(li), Slot::SharedExpertGate));
                }
            }
        }
        let (_, slot) = slots
            .into_iter()
            .find(|(n, _)| n == module)
            .ok_or_else(|| ReplaceError::Unknown(module.to_string()))?;
        let (hd, d) = (c.hidden_size, c.head_dim);
        let (qn, kvn) = (c.num_heads * d, c.num_kv_heads * d);
        let layer = &mut self.layers[li];
        // (matrix, first row, rows, row length)
        let (w, row0, n, k): (&mut CudaSlice<bf16>, usize, usize, usize) = match slot {
            Slot::Q | Slot::K | Slot::V => {
                let (row0, n) = match slot {
                    Slot::Q => (0, qn),
                    Slot::K => (qn, kvn),
                    _ => (qn + kvn, kvn),
                };
                match &mut layer.qkv {
                    Qkv::Fused(l) => (bf16_of(l, module)?, row0, n, hd),
                    Qkv::QKv(q, kv) => match slot {
                        Slot::Q => (bf16_of(q, module)?, 0, n, hd),
                        _ => (bf16_of(kv, module)?, row0 - qn, n, hd),
                    },
                    Qkv::Split(q, kk, v) => {
                        let l = match slot {
                            Slot::Q => q,
                            Slot::K => kk,
                            _ => v,
                        };
                        (bf16_of(l, module)?, 0, n, hd)
                    }
                }
            }
            Slot::O => (bf16_of(&mut layer.o, module)?, 0, hd, qn),
            Slot::Gate | Slot::Up | Slot::Down => match &mut layer.ffn {
                Ffn::Dense(mlp) => mlp_rows(mlp, &slot, module, hd)?,
                Ffn::Moe(_) => return Err(ReplaceError::Unknown(module.to_string()).into()),
            },
            Slot::Router
            | Slot::ExpertGate(_)
            | Slot::ExpertUp(_)
            | Slot::ExpertDown(_)
            | Slot::SharedGate
            | Slot::SharedUp
            | Slot::SharedDown
            | Slot::SharedExpertGate => {
                let Ffn::Moe(moe) = &mut layer.ffn else {
                    return Err(ReplaceError::Unknown(module.to_string()).into());
                };
                let i = moe.inter;
                match (slot, &mut moe.experts, &mut moe.shared) {
                    (Slot::Router, _, _) => (&mut moe.router, 0, moe.n_experts, hd),
                    (Slot::ExpertGate(e), Experts::Bf16 { gate_up, .. }, _) => {
                        (gate_up, e * 2 * i, i, hd)
                    }
                    (Slot::ExpertUp(e), Experts::Bf16 { gate_up, .. }, _) => {
                        (gate_up, e * 2 * i + i, i, hd)
                    }
                    (Slot::ExpertDown(e), Experts::Bf16 { down, .. }, _) => (down, e * hd, hd, i),
                    (Slot::SharedExpertGate, _, Some((_, gate))) => {
                        (bf16_of(gate, module)?, 0, 1, hd)
                    }
                    (s @ (Slot::SharedGate | Slot::SharedUp | Slot::SharedDown), _, Some((mlp, _))) => {
                        mlp_rows(mlp, &s, module, hd)?
                    }
                    (Slot::ExpertGate(_) | Slot::ExpertUp(_) | Slot::ExpertDown(_), Experts::Fp4(_), _) => {
                        return Err(GpuError::Unsupported(format!(
                            "{module}: replacing the weight of an FP4 expert (calibration needs a BF16 model)"
                        ))
                        .into())
                    }
                    _ => return Err(ReplaceError::Unknown(module.to_string()).into()),
                }
            }
        };
        let new = Linear { weight, bias: None };
        if (new.n(), new.k()) != (n, k) {
            return Err(ReplaceError::Shape {
                module: module.to_string(),
                expected: [n, k],
                got: [new.n(), new.k()],
            }
            .into());
        }
        let rows = linear_to_bf16(&new);
        if (row0 + n) * k > w.len() {
            return Err(GpuError::Unsupported(format!(
                "{module}: rows {row0}..{} of a matrix of {} values of width {k}",
                row0 + n,
                w.len()
            ))
            .into());
        }
        let s = self.gpu.ctx.stream().clone();
        let mut dst = w.slice_mut(row0 * k..(row0 + n) * k);
        s.memcpy_htod(&rows, &mut dst)
            .map_err(drv("upload a replaced weight"))?;
        s.synchronize().map_err(drv("synchronize"))?;
        Ok(())
    }
}

/// The rows of a dense SwiGLU MLP's gate, up or down projection.
fn mlp_rows<'a>(
    mlp: &'a mut super::Mlp,
    slot: &Slot,
    module: &str,
    hd: usize,
) -> Result<(&'a mut CudaSlice<bf16>, usize, usize, usize), GpuError> {
    let i = mlp.inter;
    Ok(match (slot, &mut mlp.gate_up) {
        (Slot::Down | Slot::SharedDown, _) => (bf16_of(&mut mlp.down, module)?, 0, hd, i),
        (Slot::Gate | Slot::SharedGate, GateUp::Fused(l)) => (bf16_of(l, module)?, 0, i, hd),
        (_, GateUp::Fused(l)) => (bf16_of(l, module)?, i, i, hd),
        (Slot::Gate | Slot::SharedGate, GateUp::Split(g, _)) => (bf16_of(g, module)?, 0, i, hd),
        (_, GateUp::Split(_, u)) => (bf16_of(u, module)?, 0, i, hd),
    })
}
