"""Shared helpers of the interop harness: where the converted checkpoints are, loading
safetensors, bit-exact comparison, and the per-test metrics that end up in summary.json.

Everything here is plumbing. The numerics under test come from the reference libraries
(compressed-tensors, transformers) and from OUR code through the dump tool
(tests/interop/dequant-dump, which calls mimo_runtime/mimo_kernels); nothing is reimplemented
here except where a test says so and why.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

WORK = Path(os.environ.get("MIMO_INTEROP_WORK", "target/interop"))
SOURCE = Path(os.environ.get("MIMO_INTEROP_SOURCE", "models/mimo-tiny-moe"))
MIMO_RUN = os.environ.get("MIMO_RUN", "target/debug/mimo-run")

# Converted folders (written by scripts/interop.sh with `mimo-quant convert`).
CT_NVFP4 = WORK / "ct-nvfp4"
CT_MXFP4 = WORK / "ct-mxfp4"
MODELOPT = WORK / "modelopt-nvfp4"


def ours(name: str) -> Path:
    """Our dequantization of the folder `name` (dequant-dump output)."""
    return WORK / "ours" / f"{name}.safetensors"


def load_all(folder_or_file: Path) -> dict:
    """Every tensor of a folder's *.safetensors files (or of one file), by name."""
    files = [folder_or_file] if folder_or_file.is_file() else sorted(folder_or_file.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def config(folder: Path) -> dict:
    with open(folder / "config.json") as f:
        return json.load(f)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, as an integer tensor of the same width."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def bit_diff(name: str, expected: torch.Tensor, got: torch.Tensor) -> dict | None:
    """None when `got` equals `expected` bit for bit; otherwise what differs (count, first
    index, both values, max abs difference), for the failure message and FINDINGS.md."""
    assert expected.shape == got.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(expected.shape)}"
    assert expected.dtype == got.dtype, f"{name}: dtype {got.dtype} != expected {expected.dtype}"
    ne = bits(expected) != bits(got)
    n = int(ne.sum())
    if n == 0:
        return None
    idx = ne.flatten().nonzero()[0].item()
    e, g = expected.flatten()[idx], got.flatten()[idx]
    d = {"tensor": name, "differing": n, "of": expected.numel(), "first_index": idx}
    if expected.is_floating_point() and expected.element_size() > 1:
        d.update(expected_value=float(e), got_value=float(g),
                 max_abs_diff=float((expected.float() - got.float()).abs().max()))
    else:
        d.update(expected_value=int(bits(e.reshape(1))[0]), got_value=int(bits(g.reshape(1))[0]))
    return d


def modules_with(tensors: dict, suffix: str) -> list:
    return sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
