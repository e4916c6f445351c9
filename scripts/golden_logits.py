#!/usr/bin/env python3
"""Golden logits for the runtime parity test (crates/runtime/tests/golden.rs).

Runs Hugging Face transformers in float32 (eager attention) on the fixture checkpoints that the
test writes, and stores the logits of a fixed token sequence as tests/golden/<case>.json.

    pip install torch transformers safetensors
    MIMO_GOLDEN_FIXTURES=/tmp/golden-fixtures \
        cargo test -p mimo-runtime --test golden -- --ignored write_golden_fixtures
    python3 scripts/golden_logits.py /tmp/golden-fixtures tests/golden

MiMo is loaded as Qwen2 (MiMo is a Qwen2 body plus multi-token-prediction layers, which
generation ignores; transformers has no native `mimo` model type).
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

# Fixed prompt (fixture vocab is 256): 12 tokens.
TOKENS = [1, 17, 42, 99, 5, 200, 3, 128, 64, 7, 250, 11]


def load(case_dir):
    with open(os.path.join(case_dir, "config.json")) as f:
        cfg = json.load(f)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if cfg.get("model_type") == "mimo":
        config = Qwen2Config.from_pretrained(case_dir)
        return Qwen2ForCausalLM.from_pretrained(case_dir, config=config, **kw)
    config = AutoConfig.from_pretrained(case_dir)
    return AutoModelForCausalLM.from_pretrained(case_dir, config=config, **kw)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    fixtures, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    for case in sorted(os.listdir(fixtures)):
        case_dir = os.path.join(fixtures, case)
        if not os.path.isfile(os.path.join(case_dir, "config.json")):
            continue
        model = load(case_dir).eval()
        with torch.no_grad():
            logits = model(torch.tensor([TOKENS])).logits[0].float()
        rows = [[float(f"{x:.7g}") for x in row] for row in logits.tolist()]
        out = {
            "case": case,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "tokens": TOKENS,
            "logits": rows,
        }
        path = os.path.join(out_dir, f"{case}.json")
        with open(path, "w") as f:
            json.dump(out, f, separators=(",", ":"))
            f.write("\n")
        print(f"{case}: logits {tuple(logits.shape)} max|logit| {logits.abs().max():.4f} -> {path}")


if __name__ == "__main__":
    main()
