"""Golden NVFP4 / MXFP4 outputs from compressed-tensors itself, for tests/ct_golden.rs.

Run (needs torch and compressed-tensors; made with compressed-tensors 0.20.0, torch 2.15, CPU):
    python3 crates/kernels/tests/golden/gen_compressed_tensors.py

It quantizes small matrices the way llm-compressor's min-max observer feeds compressed-tensors
(amin/amax in the weight's own dtype -> generate_gparam -> calculate_qparams ->
quantize_and_pack_fp4; scales cast / compress_mx_scale), and writes one file per case:
    u32 n, u32 k, u32 dtype (0 = f32, 1 = bf16), u32 format (0 = nvfp4, 1 = mxfp4),
    f32 global_scale (1.0 for mxfp4), then the weight bytes (n*k elements, little endian),
    the packed bytes (n*k/2) and the scale bytes (n*k/block).
"""

import os
import struct

import torch
import compressed_tensors
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def weights(seed, n, k, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    # Outliers, an all-zero block, a tiny block, values on rounding ties after scaling.
    w[0, 5] = 0.9
    w[1, :32] = 0.0
    w[2, :32] = torch.randn(32, generator=g) * 1e-9
    w[3, :16] = torch.tensor([6, 3, -1.5, 0.75, 0.25, -0.25, 1.25, 1.75,
                              2.5, 3.5, 5, 5.1, -6, 0.5, 4, -0.01]) * 0.1
    w[4] = w[4] * 30.0
    return w.to(dtype)


def write(name, w, fmt, gs, packed, scales):
    n, k = w.shape
    dt = 1 if w.dtype == torch.bfloat16 else 0
    raw = w.contiguous().view(torch.uint16 if dt else torch.uint32).numpy().tobytes()
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(struct.pack("<IIIIf", n, k, dt, fmt, gs))
        f.write(raw)
        f.write(packed.contiguous().numpy().tobytes())
        f.write(scales.contiguous().numpy().tobytes())


def nvfp4(w):
    args = NVFP4A16["weights"]
    n, k = w.shape
    gs = generate_gparam(w.amin(), w.amax())
    g = w.unflatten(-1, (k // 16, 16))
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
    packed = quantize_and_pack_fp4(w, scale, global_scale=gs, zero_point=None, group_size=16)
    return float(gs.item()), packed, scale.to(torch.float8_e4m3fn).view(torch.uint8)


def mxfp4(w):
    args = MXFP4A16["weights"]
    n, k = w.shape
    g = w.unflatten(-1, (k // 32, 32))
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args)
    packed = quantize_and_pack_fp4(w, scale, global_scale=None, zero_point=None, group_size=32)
    return 1.0, packed, compress_mx_scale(scale, torch.uint8)


def main():
    print("compressed-tensors", compressed_tensors.__version__, "torch", torch.__version__)
    for seed, (n, k) in [(1, (8, 64)), (2, (6, 128))]:
        for dtype, dname in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
            w = weights(seed, n, k, dtype)
            write(f"ct_nvfp4_{dname}_{seed}.bin", w, 0, *nvfp4(w))
            write(f"ct_mxfp4_{dname}_{seed}.bin", w, 1, *mxfp4(w))


if __name__ == "__main__":
    main()
