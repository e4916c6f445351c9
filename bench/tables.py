#!/usr/bin/env python3
"""Markdown tables of bench/README.md from the committed GPU results.

    python3 bench/tables.py kernels bench/results/kernels-h100.json
    python3 bench/tables.py e2e bench/results/e2e-h100.json
"""
import json
import sys

PATHS = {"fp4_fused": "fused", "fp4_fused_tuned": "fused, tuned", "fp4_dequant_cublas": "dequant+cuBLAS",
         "fp4_fp8_cublaslt": "FP8 cuBLASLt", "fp4_tiled": "tiled", "fp4_bulk": "bulk",
         "fp4_wgmma": "wgmma"}
# The launches a decode graph chains by programmatic dependent launch, by path.
PDL_PATHS = {"fp4_fused_pdl": "fused", "fp4_bulk_pdl": "bulk", "fp4_tiled_pdl": "tiled",
             "fp4_wgmma_pdl": "wgmma"}


def kernels(path):
    d = json.load(open(path))
    rows = d["rows"]
    dense = [r for r in rows if r.get("group") == "dense"]
    keys = []
    for r in dense:
        key = (r["k"], r["n"], r["m"])
        if key not in keys:
            keys.append(key)
    print("| K x N | M | cuBLAS BF16 us | NVFP4 us | path | weight TB/s | % copy | x cuBLAS "
          "| MXFP4 us | path | % copy | x cuBLAS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n, m in keys:
        same = [r for r in dense if (r["k"], r["n"], r["m"]) == (k, n, m)]
        cub = [r for r in same if r["kernel"] == "cublas_bf16"]
        cells = [f"{k} x {n}", str(m), f"{cub[0]['us']:.1f}" if cub else "-"]
        for fmt in ("nvfp4", "mxfp4"):
            cand = [r for r in same if r["format"] == fmt and r["kernel"] in PATHS]
            if not cand:
                cells += ["-"] * (5 if fmt == "nvfp4" else 4)
                continue
            b = min(cand, key=lambda r: r["us"])
            x = f"{b['speedup_vs_cublas']:.2f}" if b.get("speedup_vs_cublas") else "-"
            if fmt == "nvfp4":
                cells += [f"{b['us']:.1f}", PATHS[b["kernel"]], f"{b['weight_tbps']:.2f}",
                          f"{100 * b['copy_share']:.0f}%", x]
            else:
                cells += [f"{b['us']:.1f}", PATHS[b["kernel"]], f"{100 * b['copy_share']:.0f}%", x]
        print("| " + " | ".join(cells) + " |")
    print()
    pdl = [r for r in dense if r["kernel"] in PDL_PATHS]
    if pdl:
        print("| K x N | M | format | fused us (% copy, x cuBLAS) | best PDL chain us (% copy, x cuBLAS) | path |")
        print("|---|---|---|---|---|---|")
        c = lambda q: (f"{q['us']:.1f} ({100 * q['copy_share']:.0f}%, {q['speedup_vs_cublas']:.2f}x)"
                       if q.get("speedup_vs_cublas") else f"{q['us']:.1f}")
        for k, n, m in keys:
            for fmt in ("nvfp4", "mxfp4"):
                key = (k, n, m, fmt)
                chained = [r for r in pdl if (r["k"], r["n"], r["m"], r["format"]) == key]
                if not chained:
                    continue
                b = min(chained, key=lambda r: r["us"])
                f = [q for q in dense if q["kernel"] == "fp4_fused" and (q["k"], q["n"], q["m"], q["format"]) == key]
                print(f"| {k} x {n} | {m} | {fmt} | {c(f[0]) if f else '-'} | {c(b)} | {PDL_PATHS[b['kernel']]} |")
        print()
    fp8 = [r for r in dense if r["kernel"] in ("fp4_dequant_cublas", "fp4_fp8_cublaslt", "fp4_fp8_cublaslt_fastacc",
                                               "fp8_cublaslt_gemm_only") and r["m"] >= 64]
    if fp8:
        print("| K x N | M | format | dequant+cuBLAS us | FP8 path us (x cuBLAS) | FP8 fast-accum us (x cuBLAS) "
              "| FP8 GEMM only us (x cuBLAS) | FP8 TFLOP/s |")
        print("|---|---|---|---|---|---|---|---|")
        for k, n, m in keys:
            for fmt in ("nvfp4", "mxfp4"):
                by = {r["kernel"]: r for r in fp8 if (r["k"], r["n"], r["m"], r["format"]) == (k, n, m, fmt)}
                if "fp4_fp8_cublaslt" not in by:
                    continue
                c = lambda kn: f"{by[kn]['us']:.1f} ({by[kn]['speedup_vs_cublas']:.2f})" if kn in by else "-"
                dq = by.get("fp4_dequant_cublas")
                print(f"| {k} x {n} | {m} | {fmt} | {dq['us']:.1f} | " if dq else f"| {k} x {n} | {m} | {fmt} | - | ",
                      end="")
                print(f"{c('fp4_fp8_cublaslt')} | {c('fp4_fp8_cublaslt_fastacc')} | {c('fp8_cublaslt_gemm_only')} "
                      f"| {by['fp4_fp8_cublaslt']['tflops']:.0f} |")
        print()
    print("| MoE layer (Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, width 768) | tokens | config "
          "| us | expert bytes read | weight TB/s | % copy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("group") == "moe" and r["kernel"] in ("fp4_moe_layer", "fp4_moe_layer_pdl"):
            cfg = "auto" if r["kernel"] == "fp4_moe_layer" else "auto, PDL chain"
            print(f"| {r['format']} | {r['m']} | {cfg} | {r['us']:.1f} | {r['weight_bytes'] / 1e6:.1f} MB "
                  f"| {r['weight_tbps']:.2f} | {100 * r['copy_share']:.0f}% |")


def e2e(path):
    d = json.load(open(path))
    # Batch 16 gets a column only where a record has it (records before 2026-11-26 23:56Z do not).
    b16 = any(x["batch"] == 16 for s in d["shapes"].values() for run in s["runs"] for x in run["decode"])
    print("| shape | weights (lm_head) | GiB | prefill tok/s | decode b1 tok/s | ms/step "
          "| share of b1 bandwidth limit | b8 tok/s |" + (" b16 tok/s |" if b16 else "") + " b32 tok/s |")
    print("|---|---|---|---|---|---|---|---|" + ("---|" if b16 else "") + "---|")
    abl = []
    for name, s in d["shapes"].items():
        for run in s["runs"]:
            heads = sorted({x["lm_head"] for x in run["decode"]}, key=lambda h: h != "bf16")
            for head in heads:
                dec = {x["batch"]: x for x in run["decode"] if x["lm_head"] == head}
                b1 = dec.get(1)
                label = run["weights"] if run["weights"] == "bf16" else f"{run['weights']} ({head} head)"
                pre = f"{run['prefill_tokens_per_s']:,.0f}" if head == "bf16" else ""
                share = f"{100 * b1['share_of_bandwidth_limit']:.0f}%" if b1 and b1.get("share_of_bandwidth_limit") else "-"
                cells = [name, label, f"{run['weight_gib']:.1f}", pre,
                         f"{b1['tokens_per_s']:,.0f}" if b1 else "-", f"{b1['ms_per_step']:.2f}" if b1 else "-",
                         share,
                         f"{dec[8]['tokens_per_s']:,.0f}" if 8 in dec else "-"]
                if b16:
                    cells.append(f"{dec[16]['tokens_per_s']:,.0f}" if 16 in dec else "-")
                cells.append(f"{dec[32]['tokens_per_s']:,.0f}" if 32 in dec else "-")
                print("| " + " | ".join(cells) + " |")
                if b1 and b1.get("tuning_ablation"):
                    abl.append((name, label, b1["tokens_per_s"], b1["tuning_ablation"]))
    print()
    pre = [(name, run) for name, s in d["shapes"].items() for run in s["runs"] if run.get("prefill_ablation")]
    if pre:
        print("| shape | weights | prefill tok/s (defaults) | " + " | ".join(
            "flipped: " + n for n, _ in pre[-1][1]["prefill_ablation"]) + " |")
        print("|---|---|---|" + "---|" * len(pre[-1][1]["prefill_ablation"]))
        for name, run in pre:
            vals = {n: v for n, v in run["prefill_ablation"]}
            cells = [f"{vals[n]:,.0f}" if n in vals else "-" for n, _ in pre[-1][1]["prefill_ablation"]]
            print(f"| {name} | {run['weights']} | {run['prefill_tokens_per_s']:,.0f} | " + " | ".join(cells) + " |")
        print()
    stages = [(name, run["weights"], x) for name, s in d["shapes"].items() for run in s["runs"]
              for x in run["decode"] if x.get("stage_costs")]
    if stages:
        cols = [c["stage"] for c in stages[0][2]["stage_costs"]]
        print("| shape | weights (lm_head) | step us per layer | " + " | ".join(cols) + " |")
        print("|---|---|---|" + "---|" * len(cols))
        for name, w, x in stages:
            layers = d["shapes"][name]["layers"]
            per = 1e3 * x["ms_per_step"] / layers
            label = w if w == "bf16" else f"{w} ({x['lm_head']} head)"
            print(f"| {name} | {label} | {per:.1f} | " + " | ".join(
                f"{c['us_per_layer']:.1f}" for c in x["stage_costs"]) + " |")
        print()
    # Every variant any run flipped, in first-seen order; "-" where a run (an older record's
    # shape) did not have it.
    names = []
    for _, _, _, rows in abl:
        names += [n for n, _ in rows if n not in names]
    print("| shape | weights (lm_head) | defaults tok/s | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for name, label, base, rows in abl:
        vals = dict(rows)
        cells = [f"{vals[n]:.0f}" if n in vals else "-" for n in names]
        print(f"| {name} | {label} | {base:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    {"kernels": kernels, "e2e": e2e}[sys.argv[1]](sys.argv[2])
