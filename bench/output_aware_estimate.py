#!/usr/bin/env python3
"""Estimate of output-aware GPTQ Hessians on the embedded model (issue 9; not a converter option).

GPTQ weighs every token of a Linear's input alike (H = X^T X). Two places where the model itself
says some tokens matter more, measured here with a numpy NVFP4 GPTQ (columns in order, damping
0.1, block scales from the error-updated weights, fused sets sharing the tensor scale) on the BF16
model's own activations over the default calibration set:
  - an expert's gate_proj / up_proj rows: row r's error reaches the SwiGLU output through
    silu'(g_r) u_r (gate) and silu(g_r) (up), so row r gets its own Hessian
    sum_t a_tr x_t x_t^T with a_tr the square of that factor ("per-row");
  - v_proj: o_i = sum_j p_ij v_j, so its exact Hessian for the attention output is that of the
    attention-mixed inputs, sum_i xbar_i xbar_i^T with xbar_i = sum_j p_ij x_j, one per KV head.
Default mode, per layer (LAYERS=0,4): expert output error (squared, summed over the evaluation
tokens: every other routed token, the rest fit the Hessians) of gate/up quantized with the plain
and the per-row Hessians (down kept BF16), of down quantized alone, and of down with AWQ scaling
(input channel c scaled by mean|h_c|^alpha, the inverse folded into up_proj's rows).
--e2e: every Linear quantized (plain / per-row gate-up / mixed v / both), then KL and top-1
against BF16 on the two held-out slices of bench/quality.sh (takes ~6 minutes on 2 cores).

Usage: python3 bench/output_aware_estimate.py [--e2e] (needs numpy and tokenizers).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_error_analysis import D, E, H, KV, L, ROOT, forward, log_softmax, weights, windows  # noqa: E402

_b = np.arange(0x7F, dtype=np.int64)
E4M3 = np.where(_b >> 3 == 0, (_b & 7) / 8 * 2.0 ** -6, (1 + (_b & 7) / 8) * 2.0 ** ((_b >> 3) - 7))
GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
G = H // KV


def round_e4m3(v):
    i = np.clip(np.searchsorted(E4M3, v), 1, len(E4M3) - 1)
    lo, hi = E4M3[i - 1], E4M3[i]
    return np.where(v - lo <= hi - v, lo, hi)


def round_fp4(v):
    return np.sign(v) * GRID[np.argmin(np.abs(np.abs(v)[..., None] - GRID), axis=-1)]


def gptq(w, hs, gs=None, damp=0.1):
    """NVFP4 GPTQ of w [R, K] with one Hessian [K, K] or one per row [R, K, K]."""
    w = w.copy()
    R, K = w.shape
    gs = 448 * 6 / np.abs(w).max() if gs is None else gs
    hs = np.broadcast_to(hs, (R, K, K)) if hs.ndim == 2 else hs
    U = np.stack([np.linalg.cholesky(np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(K))).T
                  for h in hs])
    out = np.empty_like(w)
    for j0 in range(0, K, 16):
        s = round_e4m3(np.abs(w[:, j0:j0 + 16]).max(1) / 6 * gs)
        s = np.where(s > 0, s, 1.0) / gs
        for j in range(j0, j0 + 16):
            out[:, j] = round_fp4(w[:, j] / s) * s
            err = (w[:, j] - out[:, j]) / U[:, j, j]
            w[:, j + 1:] -= err[:, None] * U[:, j, j + 1:]
    return out


def silu(g):
    return g / (1 + np.exp(-g))


def dsilu(g):
    s = 1 / (1 + np.exp(-g))
    return s * (1 + g * (1 - s))


def per_row(X, a):
    return np.stack([(X * a[:, r:r + 1]).T @ X for r in range(a.shape[1])])


def collect(wb):
    """Per layer: X^T X of the attention input, mixed-input Hessians per KV head, o_proj's
    Hessian, each expert's routed inputs and its down_proj Hessian (BF16 model, default set)."""
    calib = "".join(json.loads(l)["text"] for l in open(os.path.join(ROOT, "calibration", "mimo-calib.jsonl")))
    st = [dict(hx=0, ho=0, hv=[0] * KV, x={e: [] for e in range(E)}, hd={e: 0 for e in range(E)})
          for _ in range(L)]

    def hook(kind, l, *a):
        S = st[l]
        if kind == "attn":
            x, probs, o = a
            S["hx"] = S["hx"] + x.T @ x
            S["ho"] = S["ho"] + o.T @ o
            for hh, pm in enumerate(probs):
                xm = pm @ x
                S["hv"][hh // G] = S["hv"][hh // G] + xm.T @ xm
        else:
            e, x, hid = a
            S["x"][e].append(x)
            S["hd"][e] = S["hd"][e] + hid.T @ hid
    for ids in windows(calib, 256):
        forward(wb, ids, hook=hook)
    return st


def per_layer(wb, st, layers):
    for l in layers:
        tot = {}
        for e in range(E):
            pe = f"model.layers.{l}.mlp.experts.{e}."
            wg, wu, wd = (wb[pe + n + "_proj.weight"] for n in ("gate", "up", "down"))
            gs = 448 * 6 / max(np.abs(wg).max(), np.abs(wu).max())
            X = np.concatenate(st[l]["x"][e])
            xf, xe = X[0::2], X[1::2]
            g, u = xf @ wg.T, xf @ wu.T
            hf, he = silu(g) * u, silu(xe @ wg.T) * (xe @ wu.T)
            yref = he @ wd.T

            def gu_err(qg, qu):
                return (((silu(xe @ qg.T) * (xe @ qu.T)) @ wd.T - yref) ** 2).sum()

            def d_err(qd):
                return ((he @ qd.T - yref) ** 2).sum()
            hp, hd = xf.T @ xf, hf.T @ hf
            r = {"gate/up, plain H": gu_err(gptq(wg, hp, gs), gptq(wu, hp, gs)),
                 "gate/up, per-row H": gu_err(gptq(wg, per_row(xf, (dsilu(g) * u) ** 2), gs),
                                              gptq(wu, per_row(xf, silu(g) ** 2), gs)),
                 "down, plain H": d_err(gptq(wd, hd))}
            ma = np.abs(hf).mean(0)
            for al in (0.25, 0.5, 0.75):
                sc = ma ** al
                sc = sc / np.sqrt(sc.max() * sc.min())
                r[f"down, AWQ alpha {al}"] = d_err(gptq(wd * sc, hd / np.outer(sc, sc)) / sc)
            for k_, v_ in r.items():
                tot[k_] = tot.get(k_, 0) + v_
        for k_, v_ in tot.items():
            base = tot["down, plain H"] if k_.startswith("down") else tot["gate/up, plain H"]
            print(f"layer {l}: {k_}: expert output error {v_:.1f} ({100 * (v_ / base - 1):+.1f} %)", flush=True)


def e2e(wb, st):
    variants = ("plain", "per-row gate/up", "mixed v", "both")
    qw = {v: dict(wb) for v in variants}
    for l in range(L):
        p, S = f"model.layers.{l}.", st[l]
        a = p + "self_attn."
        gs = 448 * 6 / max(np.abs(wb[a + n + "_proj.weight"]).max() for n in "qkv")
        qq, kq, vp = (gptq(wb[a + n + "_proj.weight"], S["hx"], gs) for n in "qkv")
        hv = np.concatenate([np.broadcast_to(S["hv"][kh], (D,) + S["hx"].shape) for kh in range(KV)])
        vm, oq = gptq(wb[a + "v_proj.weight"], hv, gs), gptq(wb[a + "o_proj.weight"], S["ho"])
        for v in variants:
            qw[v].update({a + "q_proj.weight": qq, a + "k_proj.weight": kq, a + "o_proj.weight": oq,
                          a + "v_proj.weight": vm if v in ("mixed v", "both") else vp})
        for e in range(E):
            pe = f"{p}mlp.experts.{e}."
            wg, wu, wd = (wb[pe + n + "_proj.weight"] for n in ("gate", "up", "down"))
            gs = 448 * 6 / max(np.abs(wg).max(), np.abs(wu).max())
            X = np.concatenate(S["x"][e])
            g, u = X @ wg.T, X @ wu.T
            plain = (gptq(wg, X.T @ X, gs), gptq(wu, X.T @ X, gs))
            rows = (gptq(wg, per_row(X, (dsilu(g) * u) ** 2), gs), gptq(wu, per_row(X, silu(g) ** 2), gs))
            dq = gptq(wd, S["hd"][e])
            for v in variants:
                gq, uq = rows if v in ("per-row gate/up", "both") else plain
                qw[v].update({pe + "gate_proj.weight": gq, pe + "up_proj.weight": uq, pe + "down_proj.weight": dq})
    raw = open(os.path.join(ROOT, "calibration", "heldout", "valid.txt"), "rb").read()
    for sname, text in (("slice 1", raw[:20480]), ("slice 2", raw[40960:61440])):
        ws = windows(text.decode("utf-8", "ignore"))
        refs = [forward(wb, ids)[0] for ids in ws]
        for v in variants:
            kl = top1 = n = 0
            for ids, lb in zip(ws, refs):
                lq = forward(qw[v], ids)[0]
                a_, b_ = log_softmax(lb), log_softmax(lq)
                kl += (np.exp(a_) * (a_ - b_)).sum()
                top1 += (lb.argmax(-1) == lq.argmax(-1)).sum()
                n += len(ids)
            print(f"{sname}: {v}: KL {kl / n:.5f}, top-1 {100 * top1 / n:.2f} %", flush=True)


def main():
    wb = weights(None)
    st = collect(wb)
    if "--e2e" in sys.argv:
        e2e(wb, st)
    else:
        per_layer(wb, st, [int(a) for a in os.environ.get("LAYERS", "0,4").split(",")])


if __name__ == "__main__":
    main()
