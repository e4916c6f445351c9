#!/usr/bin/env python3
"""Estimate of what activation-aware channel scaling (AWQ, Lin et al. 2023) could add to the
NVFP4 quantizers on the embedded model (issue 9; not a converter option).

AWQ multiplies input channel j of a Linear by s_j = mean|x_j|^alpha before quantizing and folds
1/s_j into what produces x (here the RMSNorm weight before q/k/v, exact up to bf16 rounding), so
channels with large activations lose less relative precision. This script measures, on layer 0's
q/k/v (its input is the normalised embedding, so no forward pass is needed), the
activation-weighted loss tr((W - W_hat) H (W - W_hat)^T) of numpy NVFP4 quantizers with and
without the scaling: round-to-nearest with the compressed-tensors scale rules, and GPTQ (columns
in order, damping 0.1 x mean diag H, each 16-column block's scales from its error-updated
weights). H and the channel means come from the first half of the default calibration set's
tokens; the loss is taken on the second half. Given converted checkpoints, their own q/k/v loss
is printed too (the converter's GPTQ against this script's).

Usage: python3 bench/awq_estimate.py [CONVERTED_DIR ...] (needs numpy and tokenizers; reads
models/mimo-tiny-moe and calibration/mimo-calib.jsonl).
"""
import json, os, sys

import numpy as np
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from st_numpy import deq, load  # noqa: E402 (bench/st_numpy.py)

ref = load(ROOT + '/models/mimo-tiny-moe/model.safetensors')
cfg = json.load(open(ROOT + '/models/mimo-tiny-moe/config.json'))
tok = Tokenizer.from_file(ROOT + '/models/mimo-tiny-moe/tokenizer.json')
ids = []
for line in open(ROOT + '/calibration/mimo-calib.jsonl'):
    ids += tok.encode(json.loads(line)['text']).ids
x = ref['model.embed_tokens.weight'][1][np.array(ids)].astype(np.float64)
x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.get('rms_norm_eps', 1e-6))
X = x * ref['model.layers.0.input_layernorm.weight'][1]
half = len(X) // 2
Hf, He = X[:half].T @ X[:half], X[half:].T @ X[half:]
names = [f'model.layers.0.self_attn.{p}' for p in ('q_proj', 'k_proj', 'v_proj')]
W = np.concatenate([ref[n + '.weight'][1] for n in names]).astype(np.float64)
print(f'{len(ids)} tokens; q/k/v {W.shape[0]} x {W.shape[1]}')

# E4M3 values (positive, finite) for rounding block scales.
_b = np.arange(0x7F, dtype=np.int64)
_e, _m = _b >> 3, _b & 7
E4M3 = np.where(_e == 0, _m / 8 * 2.0 ** -6, (1 + _m / 8) * 2.0 ** (_e - 7))
GRID = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def round_e4m3(v):
    i = np.clip(np.searchsorted(E4M3, v), 1, len(E4M3) - 1)
    lo, hi = E4M3[i - 1], E4M3[i]
    return np.where(v - lo <= hi - v, lo, hi)


def round_fp4(v):
    a = np.abs(v)
    i = np.argmin(np.abs(a[..., None] - GRID), axis=-1)
    return np.sign(v) * GRID[i]


def block_scales(cols, gs):
    """E4M3 block scale (times 1/gs: the multiplier) of each row for a [rows, 16] block."""
    s = round_e4m3(np.abs(cols).max(1) / 6 * gs)
    return np.where(s > 0, s, 1.0) / gs


def rtn(w):
    gs = 448 * 6 / np.abs(w).max()
    out = np.empty_like(w)
    for j in range(0, w.shape[1], 16):
        s = block_scales(w[:, j:j + 16], gs)[:, None]
        out[:, j:j + 16] = round_fp4(w[:, j:j + 16] / s) * s
    return out


def gptq(w, h, damp=0.1):
    gs = 448 * 6 / np.abs(w).max()
    w = w.copy()
    k = w.shape[1]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    out = np.empty_like(w)
    for j0 in range(0, k, 16):
        s = block_scales(w[:, j0:j0 + 16], gs)
        for j in range(j0, j0 + 16):
            q = round_fp4(w[:, j] / s) * s
            out[:, j] = q
            err = (w[:, j] - q) / u[j, j]
            w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return out


def loss(w_hat):
    d = W - w_hat
    return np.einsum('rj,jk,rk->', d, He, d)


mean_abs = np.abs(X[:half]).mean(0)
base = {'rtn': loss(rtn(W)), 'gptq': loss(gptq(W, Hf))}
print(f"no scaling: rtn {base['rtn']:.1f}, gptq {base['gptq']:.1f}")
for alpha in (0.25, 0.5, 0.75, 1.0):
    s = mean_abs ** alpha
    s = s / np.sqrt(s.max() * s.min())
    ws = W * s[None, :]
    hs = Hf / np.outer(s, s)
    l_rtn = loss(rtn(ws) / s[None, :])
    l_gptq = loss(gptq(ws, hs) / s[None, :])
    print(f'alpha {alpha:.2f}: rtn {l_rtn:.1f} ({100 * (l_rtn / base["rtn"] - 1):+.1f} %), '
          f'gptq {l_gptq:.1f} ({100 * (l_gptq / base["gptq"] - 1):+.1f} %)')
for d in sys.argv[1:]:
    q = load(os.path.join(d, 'model.safetensors'))
    print(f'{d}: q/k/v loss {loss(np.concatenate([deq(q, n) for n in names])):.1f}')
