#!/usr/bin/env python3
"""Train the embedded default model (models/mimo-tiny-moe): a small Qwen3-MoE
(transformers' Qwen3MoeForCausalLM, model_type qwen3_moe) on the pre-tokenized corpus.

Inputs (made by training/fetch_corpus.py and training/tokenize_corpus.py):
  .corpus/train_ids.bin   uint16 token ids of the training split
  .corpus/valid_ids.bin   uint16 token ids of the held-out split (calibration/heldout/valid.txt):
                          only evaluated (logged), never trained on, never used to pick anything
  models/mimo-tiny-moe/tokenizer.json (+ tokenizer_config.json) for the greedy samples

Outputs (--out): model/{config.json, model-0000N-of-00002.safetensors + index, generation_config.json},
train_log.csv (step, tokens, lr, train loss, aux loss, validation loss), train_log.json (run summary,
final validation perplexity computed by transformers on the reloaded BF16 model, greedy samples).

The number of optimizer steps is --steps when given (reproducible); otherwise it is derived from the
speed of the first steps so that training fits --time-budget seconds, capped at --max-epochs passes
over the data. Either way the step count used is logged, and rerunning with --steps N reproduces the run
(same seed, same data order) on the same software.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

REPO = Path(__file__).resolve().parent.parent

# Architecture. Every Linear in-dimension (256 for q/k/v/gate/router/lm_head, 256 for o_proj,
# 128 for the experts' down_proj) is a multiple of 32, so MXFP4 (block 32) and NVFP4 (block 16)
# blocks tile every row.
ARCH = dict(
    vocab_size=6144,
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    intermediate_size=512,  # unused: every layer is sparse (decoder_sparse_step 1, no mlp_only_layers)
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    use_sliding_window=False,
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=0,
)

SAMPLE_PROMPTS = [
    "The Python tutorial",
    "A list is",
    "To be, or not to be,",
    "KING HENRY. Now, lords,",
    "Perl is a language",
    "def fibonacci(n):",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(REPO / ".corpus"))
    p.add_argument("--tokenizer", default=str(REPO / "models" / "mimo-tiny-moe" / "tokenizer.json"))
    p.add_argument("--out", default=os.environ.get("OUT", str(REPO / "out" / "train")))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--attn-dropout", type=float, default=0.1, help="training only; saved config has 0")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = derive from --time-budget")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training when --steps 0")
    p.add_argument("--max-epochs", type=float, default=8.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="windows per periodic eval (final: all)")
    p.add_argument("--final-eval-windows", type=int, default=0, help="0 = the whole split (CPU tests)")
    p.add_argument("--experts-impl", default="auto", choices=["auto", "eager", "grouped_mm"])
    p.add_argument("--max-shard-size", default="12MB")
    p.add_argument("--cpu", action="store_true")
    return p.parse_args()


def load_ids(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))


DEV_CHUNK = 65536
DEV_EVERY = 50


def split_dev(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Carve a development slice out of the training split (every 50th chunk of 64k tokens, about
    2%): it is what the training curves are watched on when choosing hyper-parameters, so that the
    held-out validation split stays untouched by every decision."""
    chunks = list(torch.split(ids, DEV_CHUNK))
    dev = [c for i, c in enumerate(chunks) if i % DEV_EVERY == DEV_EVERY // 2]
    train = [c for i, c in enumerate(chunks) if i % DEV_EVERY != DEV_EVERY // 2]
    return torch.cat(train), torch.cat(dev) if dev else ids[-DEV_CHUNK:]


def batch_at(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return data[idx]


def lm_loss(model, x: torch.Tensor, aux_coef: float, want_aux: bool):
    out = model(input_ids=x[:, :-1], output_router_logits=want_aux, use_cache=False)
    logits = out.logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    aux = out.aux_loss if want_aux and out.aux_loss is not None else torch.zeros((), device=x.device)
    return loss, aux


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, device, max_windows: int | None,
             autocast: bool) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping windows of seq_len+1 tokens (every token after the
    first of each window is predicted once)."""
    model.eval()
    n_win = (data.numel() - 1) // seq_len
    if max_windows:
        n_win = min(n_win, max_windows)
    total, count = 0.0, 0
    for i in range(0, n_win, 16):
        starts = torch.arange(i, min(i + 16, n_win)) * seq_len
        x = batch_at(data, starts, seq_len).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def make_model(args, impl: str, device) -> Qwen3MoeForCausalLM:
    torch.manual_seed(args.seed)
    cfg = Qwen3MoeConfig(**ARCH, attention_dropout=args.attn_dropout,
                         router_aux_loss_coef=args.aux_coef, output_router_logits=False)
    cfg._experts_implementation = impl
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg).to(device)


def pick_experts_impl(args, device, train_ids) -> str:
    """Use transformers' grouped_mm experts path when it runs here and matches the eager path;
    the eager per-expert loop otherwise. Both compute the same function."""
    if args.experts_impl != "auto":
        return args.experts_impl
    if device.type != "cuda":
        return "eager"
    g = torch.Generator().manual_seed(0)
    x = batch_at(train_ids, torch.randint(0, train_ids.numel() - 600, (8,), generator=g), 256).to(device)
    results = {}
    for impl in ("eager", "grouped_mm"):
        try:
            m = make_model(args, impl, device)
            m.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                logits = m(input_ids=x[:, :-1], use_cache=False).logits.float()
            m.train()
            loss, _ = lm_loss(m, x, args.aux_coef, True)
            loss.backward()
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, aux = lm_loss(m, x, args.aux_coef, True)
                (loss + aux).backward()
            torch.cuda.synchronize()
            results[impl] = (logits, time.time() - t)
            del m
        except Exception as e:  # a missing kernel on this torch/transformers: keep eager
            print(f"experts impl {impl} unavailable: {type(e).__name__}: {e}", flush=True)
    if "grouped_mm" in results:
        ref, t_e = results["eager"]
        got, t_g = results["grouped_mm"]
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"experts impl check: grouped_mm vs eager rel diff {rel:.2e}, "
              f"3 steps {t_g:.3f}s vs {t_e:.3f}s", flush=True)
        if rel < 2e-2 and t_g < t_e:
            return "grouped_mm"
    return "eager"


@torch.no_grad()
def greedy_samples(model, tokenizer_path: str, device, max_new: int = 48) -> list[dict]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_path)
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, eos_token_id=0, pad_token_id=0)
        text = tok.decode(gen[0, ids.size(1):].tolist(), skip_special_tokens=False)
        out.append({"prompt": prompt, "completion": text})
        print(f"--- {prompt!r} -> {text!r}", flush=True)
    return out


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    autocast = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()

    all_train = load_ids(Path(args.data) / "train_ids.bin")
    train_ids, dev_ids = split_dev(all_train)
    valid_ids = load_ids(Path(args.data) / "valid_ids.bin")
    print(f"train tokens {train_ids.numel()}, dev tokens {dev_ids.numel()}, "
          f"valid tokens {valid_ids.numel()}, device {device}", flush=True)

    impl = pick_experts_impl(args, device, train_ids)
    model = make_model(args, impl, device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"experts impl {impl}; parameters {n_params} ({n_params * 2 / 1e6:.1f} MB in BF16)",
          flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    tokens_per_step = args.batch * args.seq_len
    max_steps = int(args.max_epochs * train_ids.numel() / tokens_per_step)
    total_steps = args.steps if args.steps > 0 else max_steps
    calib_steps = 20
    gen = torch.Generator().manual_seed(args.seed)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    log_rows = []
    csv_path = out / "train_log.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerow(["step", "tokens", "lr", "train_loss", "aux_loss", "dev_loss", "valid_loss",
                                "elapsed_s"])
    t_train = time.time()
    step = 0
    while step < total_steps:
        if args.steps == 0 and step == calib_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calib) / (calib_steps - 5)
            budget_steps = int(args.time_budget / per_step)
            total_steps = max(calib_steps + 1, min(max_steps, budget_steps))
            print(f"{per_step * 1000:.1f} ms/step -> {total_steps} steps "
                  f"({total_steps * tokens_per_step / train_ids.numel():.2f} epochs)", flush=True)
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.time()
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step)
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        x = batch_at(train_ids, starts, args.seq_len).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, aux = lm_loss(model, x, args.aux_coef, True)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        last = step == total_steps
        if step % 10 == 0 or last or step == 1:
            vloss, dloss = "", ""
            if step % args.eval_every == 0 or last:
                dloss = evaluate(model, dev_ids, args.seq_len, device, args.eval_windows, autocast)[0]
                vloss = evaluate(model, valid_ids, args.seq_len, device, args.eval_windows, autocast)[0]
            row = [step, step * tokens_per_step, lr_at(step - 1), loss.item(),
                   aux.item() * args.aux_coef, dloss, vloss, round(time.time() - t_train, 2)]
            log_rows.append(row)
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            if vloss != "" or step % 50 == 0:
                print(f"step {step}/{total_steps} loss {loss.item():.4f} aux {row[4]:.4f} "
                      f"dev {dloss} valid {vloss} lr {row[2]:.2e} t {row[7]}s", flush=True)
    train_s = time.time() - t_train

    # Ship BF16 weights; the saved config is the inference config (no dropout, no router logits).
    model.eval()
    model.config.attention_dropout = 0.0
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = args.aux_coef
    model.config._experts_implementation = None
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=0, pad_token_id=0,
                                               do_sample=False, max_new_tokens=128)
    # Sharded because the GPU machine hands back files of at most 16 MiB; training/merge_shards.py
    # joins the shards into the single model.safetensors that is committed.
    model.save_pretrained(out / "model", safe_serialization=True, max_shard_size=args.max_shard_size)
    cfg_path = out / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Also write the classic key spellings (Qwen3-30B-A3B's config.json) next to transformers 5's,
    # so readers written against either find them; values are identical.
    cfg.setdefault("num_experts", cfg.get("num_local_experts", ARCH["num_experts"]))
    cfg.setdefault("rope_theta", ARCH["rope_theta"])
    cfg.setdefault("rope_scaling", None)
    cfg.setdefault("torch_dtype", "bfloat16")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Final numbers come from the files as shipped: reload with transformers and evaluate on the
    # whole held-out split, once with BF16 weights upcast to FP32 (the reference) and once in BF16.
    del model
    ref = Qwen3MoeForCausalLM.from_pretrained(out / "model", dtype=torch.float32).to(device)
    ref.eval()
    final_windows = args.final_eval_windows or None
    vl_f32, n_tok = evaluate(ref, valid_ids, args.seq_len, device, final_windows, False)
    bf = Qwen3MoeForCausalLM.from_pretrained(out / "model", dtype=torch.bfloat16).to(device)
    bf.eval()
    vl_bf16, _ = evaluate(bf, valid_ids, args.seq_len, device, final_windows, False)
    del bf
    samples = greedy_samples(ref, args.tokenizer, device)
    summary = {
        "seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "experts_impl": impl, "parameters": n_params, "steps": total_steps,
        "tokens_per_step": tokens_per_step, "tokens_seen": total_steps * tokens_per_step,
        "train_tokens": int(train_ids.numel()), "dev_tokens": int(dev_ids.numel()),
        "epochs": total_steps * tokens_per_step / train_ids.numel(),
        "train_seconds": round(train_s, 1), "final_train_loss": log_rows[-1][3],
        "final_dev_loss_sampled": log_rows[-1][5], "final_valid_loss_sampled": log_rows[-1][6],
        "args": vars(args),
        "valid_tokens_scored": n_tok,
        "valid_loss_fp32": vl_f32, "valid_ppl_fp32": math.exp(vl_f32),
        "valid_loss_bf16": vl_bf16, "valid_ppl_bf16": math.exp(vl_bf16),
        "samples_greedy_fp32": samples,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("samples_greedy_fp32", "args")},
                     indent=1), flush=True)


if __name__ == "__main__":
    main()
