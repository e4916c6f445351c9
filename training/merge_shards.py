#!/usr/bin/env python3
"""Join the sharded safetensors written by training/train.py into one model.safetensors and copy the
model folder into models/mimo-tiny-moe (tokenizer files there are kept).

    python3 training/merge_shards.py <folder with model.safetensors.index.json> [dest]

Tensors are copied byte for byte (same names, dtypes, shapes, data); the header metadata is
{"format": "pt"} as transformers writes it. The merged file is checked against the shards before
it replaces anything.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    src = Path(sys.argv[1])
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "models" / "mimo-tiny-moe"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(str(src / shard))
        overlap = tensors.keys() & part.keys()
        if overlap:
            sys.exit(f"error: {shard}: tensors present in two shards: {sorted(overlap)[:5]}")
        tensors.update(part)
    if set(tensors) != set(index["weight_map"]):
        sys.exit(f"error: {src}: shards do not hold exactly the tensors the index names")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "model.safetensors.tmp"
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(tmp), metadata={"format": "pt"})
    back = load_file(str(tmp))
    for k, v in tensors.items():
        if back[k].dtype != v.dtype or back[k].shape != v.shape or not torch.equal(back[k], v):
            sys.exit(f"error: merged tensor {k} differs from its shard")
    tmp.replace(dest / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(src / name, dest / name)
    total = sum(v.numel() for v in tensors.values())
    print(f"{len(tensors)} tensors, {total} parameters -> {dest / 'model.safetensors'} "
          f"({(dest / 'model.safetensors').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
