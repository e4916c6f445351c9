//! One decoder layer queued on the device (`layer_pass`): q/k/v, attention over the KV cache,
//! the output projection, then the dense MLP or the MoE block (router and top-k, grouped or
//! one-token experts, shared expert), with the residual adds and RMSNorms in between
//! (`add_norm`, or folded into the products at batch 1: fold.rs).

use cudarc::driver::CudaSlice;
use half::bf16;
use mimo_kernels::cuda::{
    moe_bf16_grouped, moe_bf16_logits_route_supported, moe_bf16_pairs, moe_bf16_pairs_from_logits,
    moe_bf16_pairs_supported, moe_bf16_tiled, moe_bf16_tiled_supported, moe_down_norm_out,
    moe_fold_parts, moe_layer, moe_one_token_gate_up, moe_tile_pairs, moe_tiled_batch, Bf16Experts,
    Bf16LogitsRoute, Bf16Pairs, L2Ranges, NormIn, NormOut, OneTokenRoute,
};

use super::{split_partials, walk, zeros, Experts, Ffn, GateUp, GpuModel, Pend, Qkv, Stage, Ws};
use crate::cuda::error::GpuError;
use crate::cuda::ops::{
    decode_split_len, prefill_attention_on_mma, AttnArgs, RouterIn, Rows, MAX_FUSED_ROUTER_HIDDEN,
    SPLIT_LEN,
};
use crate::cuda::weights::{Gpu, GpuLinear};
use crate::model::Site;

/// What one-token decode attention asks L2 to fetch (`Tuning::attn_prefetch_mib`, `budget`
/// bytes): the output projection's weight where it fits whole, then, with what is left, the
/// first rows of a dense FFN's fused FP4 gate/up.
fn attention_prefetch(gpu: &Gpu, layer: &super::Layer, budget: usize) -> L2Ranges {
    let mut r = L2Ranges::none();
    if budget == 0 {
        return r;
    }
    let used = layer.o.push_l2(gpu, &mut r, budget);
    if let Ffn::Dense(mlp) = &layer.ffn {
        if let GateUp::Fused(gu) = &mlp.gate_up {
            gu.push_l2_gated_head(gpu, &mut r, budget - used);
        }
    }
    r
}

impl GpuModel {
    /// Queues decoder layer `li` over the rows of `ws`, whose normalized input is in `ws.h`
    /// (the residual stream in `ws.x`); returns what the residual stream still has to add.
    /// `tap` (calibration, never inside a graph) sees every Linear's input: read back for a host
    /// observer, or summed on the device.
    pub(super) fn layer_pass(
        &self,
        ws: &mut Ws,
        li: usize,
        decode: bool,
        mut tap: Option<&mut walk::Tap<'_>>,
    ) -> Result<Pend, GpuError> {
        let c = &self.config;
        let gpu = &*self.gpu;
        let g = &gpu.ctx;
        let ops = &gpu.ops;
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| GpuError::Unsupported("no KV cache allocated".into()))?;
        let (hd, d, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let m = ws.m;
        let eps = c.rms_norm_eps as f32;
        let split_len = if decode {
            decode_split_len(g.tuning(), m, nkv, d, nh / nkv.max(1))
        } else {
            SPLIT_LEN
        };
        let splits = cache.capacity.div_ceil(split_len);
        let layer = &self.layers[li];
        if let Some(t) = tap.as_deref_mut() {
            t.site(self, Site::Qkv(li), &ws.h, m, hd)?;
        }
        // Attention. Folded norms: after the first layer the input is the previous down
        // projection's unnormalised row, scaled here.
        let fold = tap.is_none() && self.folds(m);
        let fold_in = match li.checked_sub(1).map(|p| &self.layers[p].ffn) {
            Some(Ffn::Dense(prev)) if fold => Some(self.fold_input(&ws.fold_parts, &prev.down)?),
            Some(Ffn::Moe(_)) if fold => Some(NormIn {
                parts: &ws.fold_parts,
                nparts: moe_fold_parts(hd),
                len: hd,
                eps,
            }),
            _ => None,
        };
        // Dense layers also fold their post-attention norm (o_proj producer, gate/up consumer).
        let dense_fold = fold && matches!(layer.ffn, Ffn::Dense(_));
        if self.runs(Stage::Qkv) {
            // One product into `buf`, with the folded input norm where there is one.
            let product = |l: &GpuLinear, buf: &mut CudaSlice<bf16>| match fold_in {
                Some(input) => l.forward_norm_in(gpu, &ws.h, input, buf),
                None => l.forward(gpu, &ws.h, m, buf),
            };
            let b = &mut ws.qkv;
            match &layer.qkv {
                Qkv::Fused(l) => product(l, qkv_buf(&mut b.fused)?)?,
                Qkv::QKv(lq, lkv) => {
                    // FP4 q and BF16 k|v: one launch (Tuning::bf16_tail) where it applies.
                    let one = match fold_in {
                        Some(input) if g.tuning().bf16_tail => {
                            let (q, kv) = (qkv_buf(&mut b.q)?, qkv_buf(&mut b.kv)?);
                            lq.forward_norm_in_with(lkv, gpu, &ws.h, input, q, kv)?
                        }
                        _ => false,
                    };
                    if !one {
                        product(lq, qkv_buf(&mut b.q)?)?;
                        product(lkv, qkv_buf(&mut b.kv)?)?;
                    }
                }
                Qkv::Split(lq, lk, lv) => {
                    product(lq, qkv_buf(&mut b.q)?)?;
                    product(lk, qkv_buf(&mut b.k)?)?;
                    product(lv, qkv_buf(&mut b.v)?)?;
                }
            }
        }
        let a = AttnArgs {
            n_heads: nh as i32,
            n_kv: nkv as i32,
            d: d as i32,
            rot_dim: self.rot_dim as i32,
            capacity: cache.capacity as i32,
            layers: self.layers.len() as i32,
            layer: li as i32,
            window: layer.window as i32,
            split_len: split_len as i32,
            max_splits: splits as i32,
            fused_new: i32::from(decode),
            eps,
            attn_factor: self.attn_factor,
            scale: 1.0 / (d as f32).sqrt(),
        };
        self.mark("qkv")?;
        let rows = |buf, off, stride| qkv_rows(buf, off * d, stride * d);
        let b = &ws.qkv;
        let (q, k, v) = match &layer.qkv {
            Qkv::Fused(_) => (
                rows(&b.fused, 0, nh + 2 * nkv)?,
                rows(&b.fused, nh, nh + 2 * nkv)?,
                rows(&b.fused, nh + nkv, nh + 2 * nkv)?,
            ),
            Qkv::QKv(..) => (
                rows(&b.q, 0, nh)?,
                rows(&b.kv, 0, 2 * nkv)?,
                rows(&b.kv, nkv, 2 * nkv)?,
            ),
            Qkv::Split(..) => (rows(&b.q, 0, nh)?, rows(&b.k, 0, nkv)?, rows(&b.v, 0, nkv)?),
        };
        let [qb, kb, vb] = &layer.biases;
        if !decode {
            ops.kv_write(
                g,
                &k,
                &v,
                kb.as_ref(),
                vb.as_ref(),
                layer.k_norm.as_ref(),
                &self.inv_freq,
                &ws.pos,
                &ws.seq,
                &cache.k,
                &cache.v,
                a,
                m,
            )?;
            self.mark("kv_write")?;
        }
        if self.runs(Stage::Attention) {
            let l2 = if decode && m == 1 {
                attention_prefetch(gpu, layer, (g.tuning().attn_prefetch_mib as usize) << 20)
            } else {
                L2Ranges::none()
            };
            if !decode && !prefill_attention_on_mma(g.tuning(), d) {
                // The per-head prefill kernel's split partials (new_ws leaves them out of
                // workspaces that cannot need them under the tuning they were made with).
                let parts = split_partials(m, nh, cache.capacity);
                if ws.part_o.len() < parts * d {
                    ws.part_ml = zeros(gpu, parts * 2)?;
                    ws.part_o = zeros(gpu, parts * d)?;
                }
            }
            ops.attention(
                g,
                &q,
                &k,
                &v,
                [qb.as_ref(), kb.as_ref(), vb.as_ref()],
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                &self.inv_freq,
                &ws.pos,
                &ws.seq,
                &cache.k,
                &cache.v,
                &mut ws.part_ml,
                &mut ws.part_o,
                &mut ws.attn_cnt,
                &mut ws.attn,
                a,
                &l2,
                m,
            )?;
        }
        self.mark("attention")?;
        if let Some(t) = tap.as_deref_mut() {
            t.site(self, Site::O(li), &ws.attn, m, nh * d)?;
        }
        // MoE layers without a shared expert: the post-attention add + RMSNorm runs inside
        // the router kernel, and the attention output waits in attn_delta for the next norm.
        let fuse = tap.is_none()
            && gpu.ctx.tuning().norm_router
            && hd <= MAX_FUSED_ROUTER_HIDDEN
            && matches!(&layer.ffn, Ffn::Moe(moe) if moe.shared.is_none());
        if self.runs(Stage::OProj) {
            if dense_fold {
                let out = NormOut {
                    resid: &mut ws.x,
                    weight: &layer.post_norm,
                    h: &mut ws.h,
                    parts: &mut ws.fold_parts,
                };
                layer.o.forward_norm_out(gpu, &ws.attn, out)?;
            } else {
                let o_out = if fuse {
                    &mut ws.attn_delta
                } else {
                    &mut ws.delta
                };
                layer.o.forward(gpu, &ws.attn, m, o_out)?;
            }
        }
        self.mark("o_proj")?;
        if !fuse && !dense_fold {
            if self.runs(Stage::PostNorm) {
                self.add_norm(ws, Pend::DELTA, &layer.post_norm, false)?;
            }
            self.mark("norm")?;
        }
        // Feed-forward.
        let pend = match &layer.ffn {
            _ if !self.runs(Stage::Ffn) => Pend::default(),
            Ffn::Dense(mlp) => {
                let bufs = ws
                    .dense
                    .as_mut()
                    .ok_or_else(|| GpuError::Unsupported("dense buffers".into()))?;
                if fold {
                    let GateUp::Fused(gu) = &mlp.gate_up else {
                        return Err(GpuError::Unsupported("folded norm: split gate/up".into()));
                    };
                    let input = self.fold_input(&ws.fold_parts, &layer.o)?;
                    gu.forward_swiglu_norm_in(gpu, &ws.h, input, &mut bufs.act)?;
                    self.mark("mlp")?;
                    // The down projection folds the next layer's input norm; the last layer's
                    // output goes to the final norm as usual.
                    match self.layers.get(li + 1) {
                        Some(next) => {
                            let out = NormOut {
                                resid: &mut ws.x,
                                weight: &next.in_norm,
                                h: &mut ws.h,
                                parts: &mut ws.fold_parts,
                            };
                            mlp.down.forward_norm_out(gpu, &bufs.act, out)?;
                            Pend::default()
                        }
                        None => {
                            mlp.down.forward(gpu, &bufs.act, m, &mut ws.delta)?;
                            Pend::DELTA
                        }
                    }
                } else {
                    mlp.forward(gpu, &ws.h, m, bufs, &mut ws.delta)?;
                    self.mark("mlp")?;
                    if let Some(t) = tap.as_deref_mut() {
                        t.site(self, Site::GateUp(li), &ws.h, m, hd)?;
                        t.site(self, Site::Down(li), &bufs.act, m, mlp.inter)?;
                    }
                    Pend::DELTA
                }
            }
            Ffn::Moe(moe) => {
                let mb = ws
                    .moe
                    .as_mut()
                    .ok_or_else(|| GpuError::Unsupported("MoE buffers".into()))?;
                let input = if fuse {
                    RouterIn::Fused {
                        x: &ws.x,
                        d1: Some(&ws.attn_delta),
                        norm: &layer.post_norm,
                        eps,
                        h: &mut ws.h,
                    }
                } else {
                    RouterIn::Rows(&ws.h)
                };
                // The folded one-token path (FP4 experts, not the last layer) and the one-token
                // BF16 experts may take the top-k inside the expert kernels
                // (Tuning::expert_topk).
                let folded = fold
                    && li + 1 < self.layers.len()
                    && matches!(moe.experts, Experts::Fp4(_))
                    && mb.fp4.is_some();
                let bf16 = matches!(moe.experts, Experts::Bf16 { .. })
                    && mb.pair_gu.is_some()
                    && mb.pair_dn.is_some();
                let tiled = bf16
                    && tap.is_none()
                    && mb.route.is_some()
                    && moe_tiled_batch(&g.tuning(), m, moe.top_k, moe.n_experts)
                    && moe_bf16_tiled_supported(2 * moe.inter, hd, true)
                    && moe_bf16_tiled_supported(hd, moe.inter, false);
                // One token: every pair has its own expert, so one pass per pair
                // (moe_bf16_pairs); else the grouped kernel, which reads each expert once for
                // all its pairs.
                let direct = bf16
                    && !tiled
                    && m == 1
                    && g.tuning().moe_direct
                    && moe_bf16_pairs_supported(2 * moe.inter, hd, false)
                    && moe_bf16_pairs_supported(hd, moe.inter, true);
                let direct_topk =
                    direct && moe_bf16_logits_route_supported(moe.n_experts, moe.top_k);
                let expert_topk = (folded || direct_topk) && g.tuning().expert_topk;
                if self.runs(Stage::Router) {
                    ops.router_topk(
                        g,
                        input,
                        &moe.router,
                        &mut mb.logits,
                        &mut mb.counters,
                        &mut mb.ids,
                        &mut mb.weights,
                        m,
                        hd,
                        moe.n_experts,
                        moe.top_k,
                        moe.renorm,
                        !expert_topk,
                    )?;
                }
                self.mark("router")?;
                if let Some(t) = tap.as_deref_mut() {
                    t.site(self, Site::MoeInput(li), &ws.h, m, hd)?;
                }
                let p = m * moe.top_k;
                let mut out = Pend {
                    attn: fuse,
                    ..Pend::default()
                };
                match (&moe.experts, &mut mb.fp4, &mut mb.pair_gu, &mut mb.pair_dn) {
                    (Experts::Bf16 { gate_up, down }, _, Some(pgu), Some(pdn)) if tiled => {
                        // Prefill-sized batches: the pairs sorted into tiles of one expert,
                        // each expert's rows read once per tile on the tensor cores; gate/up
                        // forms SwiGLU in its epilogue (pgu then holds [pairs][inter]).
                        let route = mb
                            .route
                            .as_mut()
                            .ok_or_else(|| GpuError::Unsupported("MoE route table".into()))?;
                        let tile = moe_tile_pairs(p, moe.n_experts);
                        route.build(g, &mb.ids, (p, tile), None)?;
                        let experts = |w, n, k| Bf16Experts {
                            w,
                            n,
                            k,
                            experts: moe.n_experts,
                        };
                        let gu = experts(gate_up, 2 * moe.inter, hd);
                        moe_bf16_tiled(g, gu, route, p, moe.top_k, true, &ws.h, pgu)?;
                        self.mark("experts")?;
                        let dn = experts(down, hd, moe.inter);
                        moe_bf16_tiled(g, dn, route, p, 1, false, pgu, pdn)?;
                        self.mark("experts")?;
                        out.pairs = true;
                    }
                    (Experts::Fp4(w), Some(fws), _, _) if folded => {
                        // The next layer's input norm folded into the down + combine kernel,
                        // which also adds a pending attention output (fused router) first.
                        let route = if expert_topk {
                            OneTokenRoute::Logits {
                                logits: &mb.logits,
                                renorm: moe.renorm,
                            }
                        } else {
                            OneTokenRoute::TopK {
                                ids: &mb.ids,
                                weights: &mb.weights,
                            }
                        };
                        moe_one_token_gate_up(g, w, &ws.h, route, moe.top_k, fws)?;
                        self.mark("experts")?;
                        let out_norm = NormOut {
                            resid: &mut ws.x,
                            weight: &self.layers[li + 1].in_norm,
                            h: &mut ws.h,
                            parts: &mut ws.fold_parts,
                        };
                        let pending = fuse.then_some(&ws.attn_delta);
                        moe_down_norm_out(g, w, route, moe.top_k, fws, pending, out_norm)?;
                        self.mark("experts")?;
                        out = Pend::default();
                    }
                    (Experts::Fp4(w), Some(fws), _, _) => {
                        if tap.is_some() {
                            return Err(GpuError::Unsupported(
                                "observing FP4 experts (calibration needs a BF16 model)".into(),
                            ));
                        }
                        moe_layer(
                            g,
                            w,
                            &ws.h,
                            &mb.ids,
                            &mb.weights,
                            m,
                            moe.top_k,
                            fws,
                            &mut ws.delta,
                        )?;
                        self.mark("experts")?;
                        out.delta = true;
                    }
                    (Experts::Bf16 { gate_up, down }, _, Some(pgu), Some(pdn)) => {
                        if expert_topk {
                            // The router wrote only its logits: this launch takes the top-k
                            // and writes the ids and weights the down launch and the
                            // combine read.
                            let gu_experts = Bf16Experts {
                                w: gate_up,
                                n: 2 * moe.inter,
                                k: hd,
                                experts: moe.n_experts,
                            };
                            let route = Bf16LogitsRoute {
                                logits: &mb.logits,
                                renorm: moe.renorm,
                                ids: &mut mb.ids,
                                weights: &mut mb.weights,
                            };
                            moe_bf16_pairs_from_logits(
                                g, gu_experts, route, moe.top_k, &ws.h, pgu,
                            )?;
                            self.mark("experts")?;
                        }
                        let ids = &mb.ids;
                        let experts = |w: &CudaSlice<bf16>,
                                       x: &CudaSlice<bf16>,
                                       y: &mut CudaSlice<bf16>,
                                       (n, k, in_div, swiglu_in): (usize, usize, usize, bool)|
                         -> Result<(), GpuError> {
                            let e = Bf16Experts {
                                w,
                                n,
                                k,
                                experts: moe.n_experts,
                            };
                            let pairs = Bf16Pairs {
                                ids,
                                pairs: p,
                                in_div,
                                swiglu_in,
                            };
                            if direct {
                                moe_bf16_pairs(g, e, pairs, x, y)?;
                            } else {
                                moe_bf16_grouped(g, e, pairs, x, y)?;
                            }
                            Ok(())
                        };
                        if !expert_topk {
                            experts(gate_up, &ws.h, pgu, (2 * moe.inter, hd, moe.top_k, false))?;
                            self.mark("experts")?;
                        }
                        experts(down, pgu, pdn, (hd, moe.inter, 1, true))?;
                        self.mark("experts")?;
                        out.pairs = true;
                        if let Some(t) = tap.as_deref_mut() {
                            t.experts(self, li, moe, &ws.h, &mb.ids, pgu, m)?;
                        }
                    }
                    _ => return Err(GpuError::Unsupported("MoE buffers".into())),
                }
                if let (Some((mlp, gate)), Some((sb, sout, sgate))) = (&moe.shared, &mut mb.shared)
                {
                    mlp.forward(gpu, &ws.h, m, sb, sout)?;
                    self.mark("shared_expert")?;
                    if let Some(t) = tap {
                        t.site(self, Site::SharedGateUp(li), &ws.h, m, hd)?;
                        t.site(self, Site::SharedDown(li), &sb.act, m, mlp.inter)?;
                    }
                    gate.forward(gpu, &ws.h, m, sgate)?;
                    self.mark("shared_expert")?;
                    out.shared = true;
                }
                out
            }
        };
        Ok(pend)
    }

    /// Adds what is pending to the residual stream and normalises it into `ws.h` (or, for the
    /// final norm, the last `rows_out` rows into `ws.head_in`).
    pub(super) fn add_norm(
        &self,
        ws: &mut Ws,
        pend: Pend,
        w: &CudaSlice<f32>,
        last: bool,
    ) -> Result<(), GpuError> {
        let c = &self.config;
        let gpu = &*self.gpu;
        let m = ws.m;
        let moe = ws.moe.as_ref();
        let top_k_e = self.layers.iter().find_map(|l| match &l.ffn {
            Ffn::Moe(moe) => Some((moe.top_k, moe.n_experts)),
            Ffn::Dense(_) => None,
        });
        let pairs = match (pend.pairs, moe, top_k_e) {
            (true, Some(mb), Some((k, e))) => mb
                .pair_dn
                .as_ref()
                .map(|pdn| (pdn, &mb.weights, &mb.ids, k, e)),
            _ => None,
        };
        let (d2, g2) = match (pend.shared, moe.and_then(|mb| mb.shared.as_ref())) {
            (true, Some((_, sout, sgate))) => (Some(sout), Some(sgate)),
            _ => (None, None),
        };
        // A fused norm + router layer (never one with a shared expert) leaves its attention
        // output pending: it goes first (d1), the FFN output second (d2, gate 1), the order in
        // which the unfused path adds them.
        let (d1, d2, g2) = if pend.attn {
            (Some(&ws.attn_delta), pend.delta.then_some(&ws.delta), None)
        } else {
            (pend.delta.then_some(&ws.delta), d2, g2)
        };
        let (out, row_begin) = if last {
            (&mut ws.head_in, m - ws.rows_out)
        } else {
            (&mut ws.h, 0)
        };
        gpu.ops.add_rmsnorm(
            &gpu.ctx,
            &mut ws.x,
            d1,
            pairs,
            d2,
            g2,
            w,
            out,
            m,
            c.hidden_size,
            c.rms_norm_eps as f32,
            row_begin,
        )
    }
}

fn missing_qkv_buf() -> GpuError {
    GpuError::Unsupported("no q/k/v buffer for this layer's form".into())
}

/// Rows of one of q, k, v in a workspace buffer: element `off` of each `stride`-long row.
fn qkv_rows(b: &Option<CudaSlice<bf16>>, off: usize, stride: usize) -> Result<Rows<'_>, GpuError> {
    Ok(Rows {
        buf: b.as_ref().ok_or_else(missing_qkv_buf)?,
        off: off as i32,
        stride: stride as i32,
    })
}

/// The workspace's q/k/v buffer a layer's form writes (allocated for every form present).
fn qkv_buf(b: &mut Option<CudaSlice<bf16>>) -> Result<&mut CudaSlice<bf16>, GpuError> {
    b.as_mut().ok_or_else(missing_qkv_buf)
}
