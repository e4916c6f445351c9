#!/usr/bin/env python3
"""Where the quantized MoE model's divergence comes from (issue 9; analysis, not a converter step).

A float64 numpy forward of the embedded Qwen3-MoE model (models/mimo-tiny-moe), run on the
BF16 weights and on a converted NVFP4 checkpoint (compressed-tensors layout), over held-out
slices of calibration/heldout/valid.txt in non-overlapping 512-token windows. It prints, per
slice, the mean KL to the BF16 model and the top-1 agreement of:
  - the quantized model as it is;
  - the quantized model with each layer's experts chosen as the BF16 model chose them ("oracle
    routing"; the routing weights stay the quantized model's): how much of the divergence is
    routing flips;
  - with --correct: the quantized model with its BF16 routers and lm_head refitted by least
    squares on the default calibration set (each kept layer's inputs in the quantized model
    mapped to its BF16 outputs in the BF16 model), a candidate calibration step.
It also prints the share of (token, layer) pairs whose expert set differs from BF16's. With
--per-layer it prints instead, on slice 1, the KL and top-1 of the BF16 model with only one
layer's attention or only one layer's experts taken from the quantized checkpoint.

Usage: python3 bench/moe_error_analysis.py CONVERTED_DIR [--correct | --per-layer] (needs
numpy and tokenizers). The forward reproduces `mimo-run compare` within the windowing difference (NVFP4
GPTQ --act-order --damp 0.1, slice 1: KL 0.0101 / top-1 93.51 % here, 0.0102 / 93.64 % there).
"""
import json
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "models", "mimo-tiny-moe")
FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def load(path):
    """Every BF16 / F32 / U8 / F8_E4M3 tensor of a safetensors file (FP8 as raw bytes)."""
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = data[8 + n + a:8 + n + b]
        if v["dtype"] == "BF16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif v["dtype"] == "F32":
            arr = np.frombuffer(raw, np.float32)
        elif v["dtype"] in ("U8", "F8_E4M3"):
            arr = np.frombuffer(raw, np.uint8)
        else:
            continue
        out[name] = arr.reshape(v["shape"])
    return out


def e4m3(b):
    b = b.astype(np.int32)
    e, m = (b >> 3) & 0xF, b & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.where(b & 0x80, -v, v)


def dequantize(q, base):
    """compressed-tensors NVFP4: low nibble first, value * E4M3 block scale / global scale."""
    p = q[base + ".weight_packed"]
    v = np.stack([FP4[p & 0xF], FP4[p >> 4]], -1).reshape(p.shape[0], -1)
    scale = np.repeat(e4m3(q[base + ".weight_scale"]), 16, axis=1)
    return v * scale / q[base + ".weight_global_scale"][0]


ref = load(os.path.join(MODEL, "model.safetensors"))
cfg = json.load(open(os.path.join(MODEL, "config.json")))
L, H, KV, D = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim"))
E, TOPK, EPS = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
THETA = cfg.get("rope_theta", 10000.0)


def weights(qdir):
    q = load(os.path.join(qdir, "model.safetensors")) if qdir else {}
    w = {}
    for name, a in ref.items():
        base = name[:-len(".weight")]
        w[name] = dequantize(q, base) if base + ".weight_packed" in q else a.astype(np.float64)
    return w


def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * w


def rope(x, pos):
    f = np.outer(pos, 1.0 / THETA ** (np.arange(0, D, 2) / D))
    c, s = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
    return x * c[:, None, :] + rot * s[:, None, :]


def forward(w, ids, route=None, hook=None):
    """Logits, the kept layers' inputs (each router's, then the lm_head's) and the experts chosen.
    `hook(kind, layer, ...)`, where given, sees ("attn", l, x, probs, o): the attention input, each
    head's probabilities [H][T][T] and output [T][H*D]; and ("expert", l, e, x, h): an expert's
    routed inputs and SwiGLU output."""
    T = len(ids)
    h = w["model.embed_tokens.weight"][ids].astype(np.float64)
    pos, mask = np.arange(T), np.triu(np.full((T, T), -np.inf), 1)
    kept_in, routes = [], []
    for l in range(L):
        p = f"model.layers.{l}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rms((x @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D), w[p + "self_attn.q_norm.weight"])
        k = rms((x @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KV, D), w[p + "self_attn.k_norm.weight"])
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KV, D)
        q, k = rope(q, pos), rope(k, pos)
        o, probs = np.empty((T, H, D)), []
        for hh in range(H):
            kh = hh // (H // KV)
            s = q[:, hh] @ k[:, kh].T / np.sqrt(D) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            probs.append(s / s.sum(-1, keepdims=True))
            o[:, hh] = probs[-1] @ v[:, kh]
        if hook:
            hook("attn", l, x, probs, o.reshape(T, H * D))
        h = h + o.reshape(T, H * D) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        kept_in.append(x)
        pr = x @ w[p + "mlp.gate.weight"].T
        pr = np.exp(pr - pr.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        top = np.argsort(-pr, -1, kind="stable")[:, :TOPK] if route is None else route[l]
        routes.append(top)
        wt = np.take_along_axis(pr, top, -1)
        wt /= wt.sum(-1, keepdims=True)  # norm_topk_prob
        out = np.zeros_like(h)
        for e in range(E):
            sel = np.nonzero((top == e).any(-1))[0]
            if len(sel) == 0:
                continue
            pe = f"{p}mlp.experts.{e}."
            g, u = x[sel] @ w[pe + "gate_proj.weight"].T, x[sel] @ w[pe + "up_proj.weight"].T
            if hook:
                hook("expert", l, e, x[sel], g / (1 + np.exp(-g)) * u)
            y = (g / (1 + np.exp(-g)) * u) @ w[pe + "down_proj.weight"].T
            out[sel] += ((wt[sel] * (top[sel] == e)).sum(-1))[:, None] * y
        h = h + out
    x = rms(h, w["model.norm.weight"])
    kept_in.append(x)
    return x @ w["lm_head.weight"].T, kept_in, routes


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


tok = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))


def windows(text, n=512):
    ids = np.array(tok.encode(text).ids)
    return [ids[s:s + n] for s in range(0, len(ids), n) if len(ids[s:s + n]) >= 32]


KEPT = [f"model.layers.{l}.mlp.gate.weight" for l in range(L)] + ["lm_head.weight"]


def corrected(wb, wq):
    """Routers and lm_head refitted: W' = W C^T (X~^T X~ + 1e-3 tr/n I)^-1, C = X~^T X."""
    calib = "".join(json.loads(l)["text"] for l in open(os.path.join(ROOT, "calibration", "mimo-calib.jsonl")))
    hs = [np.zeros((cfg["hidden_size"],) * 2) for _ in KEPT]
    cs = [np.zeros_like(a) for a in hs]
    for ids in windows(calib):
        _, xb, _ = forward(wb, ids)
        _, xq, _ = forward(wq, ids)
        for i in range(len(KEPT)):
            hs[i] += xq[i].T @ xq[i]
            cs[i] += xq[i].T @ xb[i]
    out = dict(wq)
    for i, name in enumerate(KEPT):
        a = np.linalg.solve(hs[i] + 1e-3 * np.trace(hs[i]) / len(hs[i]) * np.eye(len(hs[i])), cs[i])
        out[name] = wb[name] @ a.T
    return out


def per_layer(wb, wq):
    raw = open(os.path.join(ROOT, "calibration", "heldout", "valid.txt"), "rb").read()
    wins = windows(raw[:20480].decode("utf-8", "ignore"))
    refs = [log_softmax(forward(wb, ids)[0]) for ids in wins]
    for part in ("self_attn", "experts"):
        for l in range(L):
            w = dict(wb)
            for name in wq:
                if name.startswith(f"model.layers.{l}.") and f".{part}." in name:
                    w[name] = wq[name]
            kl = top1 = n = 0
            for ids, a in zip(wins, refs):
                lq = forward(w, ids)[0]
                b = log_softmax(lq)
                kl += (np.exp(a) * (a - b)).sum()
                top1 += (a.argmax(-1) == lq.argmax(-1)).sum()
                n += len(ids)
            print(f"slice 1: only layer {l}'s {part} quantized: KL {kl / n:.4f}, top-1 {100 * top1 / n:.2f} %")


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: moe_error_analysis.py CONVERTED_DIR [--correct | --per-layer]")
    wb, wq = weights(None), weights(sys.argv[1])
    if "--per-layer" in sys.argv:
        per_layer(wb, wq)
        return
    variants = [("quantized", wq, False), ("quantized, oracle routing", wq, True)]
    if "--correct" in sys.argv:
        variants.append(("quantized, routers + lm_head refitted", corrected(wb, wq), False))
    raw = open(os.path.join(ROOT, "calibration", "heldout", "valid.txt"), "rb").read()
    for sname, text in (("slice 1", raw[:20480]), ("slice 2", raw[40960:61440])):
        text = text.decode("utf-8", "ignore")
        for vname, w, oracle in variants:
            kl = top1 = n = flips = 0
            for ids in windows(text):
                lb, _, rb = forward(wb, ids)
                lq, _, rq = forward(w, ids, route=rb if oracle else None)
                a, b = log_softmax(lb), log_softmax(lq)
                kl += (np.exp(a) * (a - b)).sum()
                top1 += (lb.argmax(-1) == lq.argmax(-1)).sum()
                n += len(ids)
                flips += sum((np.sort(rb[l], -1) != np.sort(rq[l], -1)).any(-1).sum() for l in range(L))
            print(f"{sname}: {vname}: KL {kl / n:.4f}, top-1 {100 * top1 / n:.2f} %, "
                  f"expert sets differing from BF16's {100 * flips / (n * L):.2f} % of (token, layer)")


if __name__ == "__main__":
    main()
