#!/usr/bin/env python3
"""Estimate of what "norm tweaking" could buy on the embedded model (issue 9, not a converter option).

Norm tweaking rescales an RMSNorm's weight after quantization so that the quantized Linear
layers reading it reproduce the BF16 outputs better: with u = gamma' / gamma, the q/k/v
outputs become Q diag(u) x, and the u minimising sum_r (w_r - u * q_r)^T H (w_r - u * q_r)
solves (H * Q^T Q) u = (H * Q^T W) 1 (elementwise products with H = X^T X). This script
measures how much of layer 0's q/k/v loss the optimal u removes, for a converted NVFP4
checkpoint: layer 0's input is the embedding, so X needs no forward pass. u is fitted on the
first half of the default calibration set's tokens and evaluated on the second.

Usage: python3 bench/norm_tweak_estimate.py CONVERTED_DIR (needs numpy and tokenizers; reads
models/mimo-tiny-moe and calibration/mimo-calib.jsonl; compressed-tensors NVFP4 layout).
"""
import json, os, struct, sys

import numpy as np
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from st_numpy import deq, load  # noqa: E402 (bench/st_numpy.py)


ref=load(ROOT + '/models/mimo-tiny-moe/model.safetensors'); q=load(os.path.join(sys.argv[1], 'model.safetensors'))
cfg=json.load(open(ROOT + '/models/mimo-tiny-moe/config.json'))
tok=Tokenizer.from_file(ROOT + '/models/mimo-tiny-moe/tokenizer.json')
texts=[json.loads(l)['text'] for l in open(ROOT + '/calibration/mimo-calib.jsonl')]
ids=[]
for t in texts: ids+=tok.encode(t).ids
ids=np.array(ids)
print('tokens',len(ids))
emb=ref['model.embed_tokens.weight'][1]
eps=cfg.get('rms_norm_eps',1e-6)
x=emb[ids]
xh=x/np.sqrt((x*x).mean(-1,keepdims=True)+eps)
g=ref['model.layers.0.input_layernorm.weight'][1]
X=xh*g
half=len(X)//2
Ht=X[:half].T@X[:half]; He=X[half:].T@X[half:]
names=[f'model.layers.0.self_attn.{p}' for p in ('q_proj','k_proj','v_proj')]
W=np.concatenate([ref[n+'.weight'][1] for n in names]); Q=np.concatenate([deq(q,n) for n in names])
print('rel weight err', np.linalg.norm(W-Q)/np.linalg.norm(W))


def loss(u,H):
    D=W-Q*u; return np.einsum('rj,jk,rk->',D,H,D)
M=Ht*(Q.T@Q); b=(Ht*(Q.T@W)).sum(1)
u=np.linalg.solve(M,b)
print('u range',u.min(),u.max(), 'mean', u.mean())
for nm,H in (('fit half',Ht),('other half',He)):
    l0=loss(np.ones_like(u),H); l1=loss(u,H); print(nm,'loss u=1',l0,'u*',l1,'reduction %.1f%%'%(100*(1-l1/l0)))
# compare: scalar-only correction
s=(b.sum())/(M.sum()); print('scalar',s, 'reduction', 100*(1-loss(np.full_like(u,s),He)/loss(np.ones_like(u),He)))
