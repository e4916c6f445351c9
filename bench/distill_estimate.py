#!/usr/bin/env python3
"""Would end-to-end distillation close issue 9's top-1 gap? (an estimate, not a converter step)

Takes the embedded Qwen3-MoE model (models/mimo-tiny-moe) and an NVFP4 conversion of it
(compressed-tensors layout, e.g. `mimo-quant convert ... --method gptq --act-order --damp 0.1`),
and trains the quantized model against the BF16 model's next-token distribution (KL) on the
default calibration text (calibration/mimo-calib.jsonl, never the held-out file), keeping the
checkpoint's format exact in the forward pass:
  --mode scales   each block's scale, as a multiplier of its E4M3 code, learned through a
                  straight-through rounding to the E4M3 grid (the FP4 codes stay GPTQ's);
  --mode weights  latent codes (in FP4 units of the block scale) initialised from the
                  checkpoint's, rounded to FP4 in the forward pass (straight-through), scales
                  learned as in `scales` (quantization-aware training of codes and scales).
Every norm weight (kept BF16 in every layout) may be learned too (--norms), or alone
(--mode norms: a few thousand parameters instead of one per block). At the end it
rounds everything to the format and reports, on the two held-out slices of bench/README.md's
quality table (the first 20,480 bytes and bytes 40,961-61,440 of calibration/heldout/valid.txt,
non-overlapping 512-token windows, as bench/moe_error_analysis.py), the KL to the BF16 model and
the top-1 agreement before and after.

Usage: python3 bench/distill_estimate.py CONVERTED_DIR [--mode scales|weights] [--epochs N]
       [--lr X] [--norms] [--threads N] [--indomain | --calib-jsonl FILE]
       (needs torch, numpy and tokenizers)
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from tokenizers import Tokenizer

from moe_error_analysis import MODEL, ROOT, cfg, e4m3, load, tok

L, H, KV, D = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim"))
E, TOPK, EPS = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
THETA = cfg.get("rope_theta", 10000.0)
FP4 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                   dtype=torch.float64)
MIDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
GRID = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def round_fp4(x):
    """Nearest E2M1 value (ties away from zero; the converter's ties are to even, which only
    matters on exact midpoints)."""
    i = torch.bucketize(x.abs(), MIDS, right=True)
    return torch.sign(x) * GRID[i]


def round_e4m3(v):
    """Nearest positive E4M3 value (subnormals included, 448 at most)."""
    v = v.clamp(min=2.0 ** -9, max=448.0)
    e = torch.floor(torch.log2(v)).clamp(min=-6)
    step = torch.exp2(e - 3)
    return (torch.round(v / step) * step).clamp(max=448.0)


def ste(x, q):
    return x + (q - x).detach()


class QLinear(torch.nn.Module):
    """An NVFP4 Linear of the checkpoint: codes, E4M3 block scales and a global scale."""

    def __init__(self, q, base, mode):
        super().__init__()
        p = q[base + ".weight_packed"]
        codes = torch.from_numpy(np.stack([p & 0xF, p >> 4], -1).reshape(p.shape[0], -1).astype(np.int64))
        self.codes = FP4[codes].float()
        self.g = float(q[base + ".weight_global_scale"][0])
        s = torch.from_numpy(e4m3(q[base + ".weight_scale"])).float()
        self.s0 = s
        # The block scale in E4M3 units, learned in the log domain.
        self.log_s = torch.nn.Parameter(torch.zeros_like(s))
        self.mode = mode
        if mode == "weights":
            # Latent codes in FP4 units of the (learned) block scale, from the checkpoint's.
            self.delta = torch.nn.Parameter(torch.zeros_like(self.codes))

    def scales(self, hard=True):
        s = self.s0 * torch.exp(self.log_s)
        return ste(s, round_e4m3(s)) if hard else s

    def weight(self, hard=True):
        s = self.scales(hard).repeat_interleave(16, 1)
        if self.mode == "weights":
            c = self.codes + self.delta
            c = ste(c, round_fp4(c)) if hard else c
        else:
            c = self.codes
        return c * s / self.g

    def frozen(self):
        """The weight as a checkpoint would hold it after training (codes and scales rounded)."""
        with torch.no_grad():
            s = round_e4m3(self.s0 * torch.exp(self.log_s)).repeat_interleave(16, 1)
            c = round_fp4(self.codes + self.delta) if self.mode == "weights" else self.codes
            return c * s / self.g


def build(qdir, mode, norms):
    ref = load(os.path.join(MODEL, "model.safetensors"))
    q = load(os.path.join(qdir, "model.safetensors"))
    dense, quant, params = {}, {}, []
    for name, a in ref.items():
        base = name[:-len(".weight")]
        if base + ".weight_packed" in q:
            quant[name] = QLinear(q, base, mode)
            if mode != "norms":
                params += list(quant[name].parameters())
        else:
            t = torch.from_numpy(a.astype(np.float32).copy())
            if (norms or mode == "norms") and name.endswith("norm.weight"):
                t = torch.nn.Parameter(t)
                params.append(t)
            dense[name] = t
    bf16 = {n: torch.from_numpy(a.astype(np.float32).copy()) for n, a in ref.items()}
    return bf16, dense, quant, params


def rms(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def rope(x, T):
    f = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / THETA ** (torch.arange(0, D, 2) / D))
    c, s = torch.cos(torch.cat([f, f], -1)), torch.sin(torch.cat([f, f], -1))
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * c[:, None, :] + rot * s[:, None, :]


def forward(w, ids):
    """Logits [B][T][V] of token windows ids [B][T]; `w(name)` gives each weight."""
    B, T = ids.shape
    h = w("model.embed_tokens.weight")[ids]
    mask = torch.triu(torch.full((T, T), float("-inf")), 1)
    for l in range(L):
        h = layer(w, h, l, mask)
    return rms(h, w("model.norm.weight")) @ w("lm_head.weight").T


def layer(w, h, l, mask):
    """Decoder layer l on the residual stream h [B][T][hidden]."""
    B, T = h.shape[:2]
    p = f"model.layers.{l}."
    x = rms(h, w(p + "input_layernorm.weight"))
    q = rms((x @ w(p + "self_attn.q_proj.weight").T).view(B, T, H, D), w(p + "self_attn.q_norm.weight"))
    k = rms((x @ w(p + "self_attn.k_proj.weight").T).view(B, T, KV, D), w(p + "self_attn.k_norm.weight"))
    v = (x @ w(p + "self_attn.v_proj.weight").T).view(B, T, KV, D)
    q, k = rope(q, T), rope(k, T)
    k = k.repeat_interleave(H // KV, 2)
    v = v.repeat_interleave(H // KV, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5 + mask
    o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v).reshape(B, T, H * D)
    h = h + o @ w(p + "self_attn.o_proj.weight").T
    x = rms(h, w(p + "post_attention_layernorm.weight")).reshape(B * T, -1)
    pr = torch.softmax(x @ w(p + "mlp.gate.weight").T, -1)
    wt, top = torch.topk(pr, TOPK, -1)
    wt = wt / wt.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(E):
        rows, slot = torch.nonzero(top == e, as_tuple=True)
        if len(rows) == 0:
            continue
        pe = f"{p}mlp.experts.{e}."
        xe = x[rows]
        g, u = xe @ w(pe + "gate_proj.weight").T, xe @ w(pe + "up_proj.weight").T
        y = (torch.nn.functional.silu(g) * u) @ w(pe + "down_proj.weight").T
        out = out.index_add(0, rows, wt[rows, slot][:, None] * y)
    h = h + out.view(B, T, -1)
    return h


def windows(text, n):
    ids = tok.encode(text).ids
    return [torch.tensor(ids[s:s + n]) for s in range(0, len(ids) - n + 1, n)]


def evaluate(wb, wq, slices):
    out = []
    with torch.no_grad():
        for text in slices:
            kl = top1 = n = 0
            ids = tok.encode(text).ids
            for s0 in range(0, len(ids), 512):
                win = torch.tensor(ids[s0:s0 + 512])
                if len(win) < 32:
                    continue
                a = torch.log_softmax(forward(wb, win[None]), -1)[0]
                b = torch.log_softmax(forward(wq, win[None]), -1)[0]
                kl += (a.exp() * (a - b)).sum().item()
                top1 += (a.argmax(-1) == b.argmax(-1)).sum().item()
                n += len(win)
            out.append((kl / n, 100.0 * top1 / n))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("qdir")
    ap.add_argument("--mode", default="scales", choices=["scales", "weights", "norms"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--code-lr", type=float, default=2e-2,
                    help="learning rate of the latent codes (--mode weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--norms", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blockwise", action="store_true",
                    help="instead of the end-to-end KL, train each decoder layer in turn (layer 0 "
                    "first) to reproduce the BF16 layer's output on the BF16 stream from the "
                    "quantized stream (mean squared error of the residual stream after it), "
                    "--epochs passes per layer: the layer-at-a-time shape a converter could run")
    ap.add_argument("--calib-jsonl", default=None,
                    help="train on the texts of this jsonl file (e.g. the model's own text from "
                    "`mimo-quant calibrate --calib self --save-text FILE`) instead of the calibration set")
    ap.add_argument("--indomain", action="store_true",
                    help="train on bytes 61,441-143,360 of valid.txt (after both slices; the "
                    "quality table's in-domain first 80 KB) instead of the calibration set")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    bf16, dense, quant, params = build(a.qdir, a.mode, a.norms)
    wb = bf16.__getitem__

    def wq(name, hard=True):
        return quant[name].weight(hard) if name in quant else dense[name]

    def frozen(name):
        return quant[name].frozen() if name in quant else dense[name].detach()

    raw = open(os.path.join(ROOT, "calibration", "heldout", "valid.txt"), "rb").read()
    slices = [raw[:20480].decode("utf-8", "ignore"), raw[40960:61440].decode("utf-8", "ignore")]
    t0 = time.time()
    before = evaluate(wb, frozen, slices)
    print(f"before: slice 1 KL {before[0][0]:.4f} top-1 {before[0][1]:.2f} %, "
          f"slice 2 KL {before[1][0]:.4f} top-1 {before[1][1]:.2f} % ({time.time() - t0:.0f} s)", flush=True)
    if a.calib_jsonl:
        calib = "".join(json.loads(l)["text"] + "\n" for l in open(a.calib_jsonl))
    elif a.indomain:
        calib = raw[61440:61440 + 81920].decode("utf-8", "ignore")
    else:
        calib = "".join(json.loads(l)["text"] + "\n"
                        for l in open(os.path.join(ROOT, "calibration", "mimo-calib.jsonl")))
    wins = windows(calib, a.seq)
    if a.blockwise:
        return blockwise(a, wb, wq, frozen, quant, wins, slices, t0)
    with torch.no_grad():
        teacher = [torch.log_softmax(forward(wb, w[None]), -1)[0] for w in wins]
    print(f"{len(wins)} calibration windows of {a.seq} tokens", flush=True)
    codes = [p for qq in quant.values() for n, p in qq.named_parameters() if n == "delta"]
    rest = [p for p in params if all(p is not c for c in codes)]
    groups = [{"params": rest, "lr": a.lr}]
    if codes and a.mode == "weights":
        groups.append({"params": codes, "lr": a.code_lr})
    g = torch.Generator().manual_seed(a.seed)

    def kl_loss(idx):
        ids = torch.stack([wins[i] for i in idx])
        tgt = torch.stack([teacher[i] for i in idx])
        logp = torch.log_softmax(forward(wq, ids), -1)
        return (tgt.exp() * (tgt - logp)).sum(-1).mean()

    for ep, kl in enumerate(train(groups, len(wins), a, g, kl_loss)):
        r = evaluate(wb, frozen, slices)
        print(f"epoch {ep + 1}: calibration KL {kl:.4f}; held out, rounded: slice 1 KL "
              f"{r[0][0]:.4f} top-1 {r[0][1]:.2f} %, slice 2 KL {r[1][0]:.4f} top-1 {r[1][1]:.2f} % "
              f"({time.time() - t0:.0f} s)", flush=True)


def train(groups, n, a, g, loss_of):
    """Adam over the parameter groups with a cosine schedule, a.epochs passes over n items in
    shuffled batches of a.batch (order drawn from the generator g); loss_of(indices) gives a
    batch's loss. Yields each epoch's mean loss."""
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs * ((n + a.batch - 1) // a.batch))
    for _ in range(a.epochs):
        order = torch.randperm(n, generator=g)
        tot = 0.0
        for b0 in range(0, n, a.batch):
            idx = order[b0:b0 + a.batch]
            loss = loss_of(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        yield tot / n


def blockwise(a, wb, wq, frozen, quant, wins, slices, t0):
    """Layer-at-a-time reconstruction: layer l's quantized Linear parameters (codes and block
    scales, as --mode) are trained to map the quantized model's stream entering layer l to the
    BF16 model's stream leaving it (BF16 inputs through BF16 layer l), the later layers' inputs
    then computed through the trained (rounded) layers."""
    T = a.seq
    mask = torch.triu(torch.full((T, T), float("-inf")), 1)
    ids = torch.stack(wins)
    with torch.no_grad():
        hb = wb("model.embed_tokens.weight")[ids]
        hq = hb.clone()
    g = torch.Generator().manual_seed(a.seed)
    for l in range(L):
        p = f"model.layers.{l}."
        with torch.no_grad():
            target = torch.cat([layer(wb, hb[i:i + a.batch], l, mask) for i in range(0, len(wins), a.batch)])
        mine = [m for n, m in quant.items() if n.startswith(p)]
        codes = [m.delta for m in mine if a.mode == "weights"]
        groups = [{"params": [m.log_s for m in mine], "lr": a.lr}]
        if codes:
            groups.append({"params": codes, "lr": a.code_lr})
        for tot in train(groups, len(wins), a, g,
                         lambda idx: ((layer(wq, hq[idx], l, mask) - target[idx]) ** 2).mean()):
            pass  # the last epoch's mean loss stays in tot
        with torch.no_grad():
            hq = torch.cat([layer(frozen, hq[i:i + a.batch], l, mask) for i in range(0, len(wins), a.batch)])
            hb = target
            err = ((hq - hb) ** 2).mean().item()
        print(f"layer {l}: last epoch's loss {tot:.5f}, rounded stream error {err:.5f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    r = evaluate(wb, frozen, slices)
    print(f"blockwise: held out, rounded: slice 1 KL {r[0][0]:.4f} top-1 {r[0][1]:.2f} %, slice 2 KL "
          f"{r[1][0]:.4f} top-1 {r[1][1]:.2f} % ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
