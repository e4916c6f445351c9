#!/usr/bin/env python3
"""Held-out perplexity and greedy samples of a checkpoint folder, computed by transformers on the CPU.

    python3 training/eval_heldout.py [model dir, default models/mimo-tiny-moe] [--out FILE.json]

Perplexity: the held-out split calibration/heldout/valid.txt is tokenized with the model's own
tokenizer (documents joined by <|endoftext|>, exactly as training/tokenize_corpus.py does), cut into
non-overlapping windows of 513 tokens, and every token after the first of each window is scored
(65,536 tokens). Weights are upcast to FP32 for the reference number.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
VALID = REPO / "calibration" / "heldout" / "valid.txt"
DOC_SEP = "<|endoftext|>"
SEQ = 512
PROMPTS = ["The Python tutorial", "A list is", "To be, or not to be,", "KING HENRY. Now, lords,",
           "Perl is a language", "def fibonacci(n):"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=str(REPO / "models" / "mimo-tiny-moe"))
    ap.add_argument("--out")
    ap.add_argument("--max-new", type=int, default=48)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    eos = tok.convert_tokens_to_ids(DOC_SEP)
    ids: list[int] = []
    kinds: list[int] = []  # per token: 0 documentation (Python, Perl), 1 verse/drama (Shakespeare)
    for doc in VALID.read_text(encoding="utf-8").split(f"\n{DOC_SEP}\n"):
        doc_ids = tok(doc.strip("\n"), add_special_tokens=False)["input_ids"] + [eos]
        ids += doc_ids
        kinds += [1 if doc.lstrip().startswith("THE TEMPEST") else 0] * len(doc_ids)
    data = torch.tensor(ids)
    kind_t = torch.tensor(kinds)
    by_kind = torch.zeros(2, dtype=torch.float64)
    n_kind = torch.zeros(2, dtype=torch.float64)
    n_win = (data.numel() - 1) // SEQ
    t0 = time.time()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_win, 8):
            starts = torch.arange(i, min(i + 8, n_win)) * SEQ
            x = data[starts[:, None] + torch.arange(SEQ + 1)[None, :]]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                  reduction="none").double()
            k = kind_t[starts[:, None] + torch.arange(1, SEQ + 1)[None, :]].reshape(-1)
            by_kind.index_add_(0, k, nll)
            n_kind.index_add_(0, k, torch.ones_like(nll))
            total += nll.sum().item()
            count += x[:, 1:].numel()
    loss = total / count
    print(f"held-out: {count} tokens scored, loss {loss:.4f}, perplexity {math.exp(loss):.3f} "
          f"({time.time() - t0:.0f}s)", flush=True)
    per_kind = {}
    for i, name in enumerate(["documentation", "shakespeare"]):
        kl = (by_kind[i] / n_kind[i]).item()
        per_kind[name] = {"tokens": int(n_kind[i]), "loss": kl, "ppl": math.exp(kl)}
        print(f"  {name}: {int(n_kind[i])} tokens, loss {kl:.4f}, perplexity {math.exp(kl):.3f}")

    samples = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=args.max_new)
        text = tok.decode(out[0, enc["input_ids"].size(1):], skip_special_tokens=False)
        samples.append({"prompt": prompt, "completion": text})
        print(f"--- {prompt!r} -> {text!r}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": args.model, "valid_tokens_scored": count, "valid_loss_fp32": loss,
            "valid_ppl_fp32": math.exp(loss), "by_source": per_kind,
            "samples_greedy_fp32": samples,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
