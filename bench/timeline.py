#!/usr/bin/env python3
"""Prints the traced decode step of a `mimo-run bench` JSON made with MIMO_TRACE=1 (the
`timeline` of each batch-1 run): every span of launches FIRST..LAST, and each launch's time
on the critical path (from its wait's first return to the next launch's).

usage: bench/timeline.py FILE [FIRST LAST]   (launch numbers; default: a middle layer's worth;
FILE: a `mimo-run bench` JSON or bench/results/e2e-h100-timeline.json)

After the spans, the median critical time of each launch of the repeating layer pattern over all
its repetitions (the pattern found from the launches' sites and block counts).
"""
import json
import statistics
import sys


def layer_medians(order, crit):
    """order: (site, blocks) per launch; crit: critical us per launch. Returns (period, rows)."""
    n = len(order)
    for p in range(2, 16):
        mid = range(n // 4, 3 * n // 4 - p)
        if mid and all(order[i] == order[i + p] for i in mid):
            break
    else:
        return None, []
    # Align on a repetition in the middle, then walk back to the first one.
    start = n // 4
    while start - p >= 0 and all(order[start - p + j] == order[start + j] for j in range(p)):
        start -= p
    rows = []
    for j in range(p):
        vals = [crit[i] for i in range(start + j, n - 1, p)
                if i + p < n and order[i] == order[start + j] and crit.get(i) is not None]
        rows.append((order[start + j], statistics.median(vals) if vals else float("nan"), len(vals)))
    return p, rows


def main():
    path = sys.argv[1]
    d = json.load(open(path))
    # A bench JSON, or a record holding several under `traced_runs` (e2e-h100-timeline.json).
    reports = list(d["traced_runs"].values()) if "traced_runs" in d else [d]
    for run in (r for rep in reports for r in rep["runs"]):
        for dec in run["decode"]:
            tl = dec.get("timeline")
            if not tl:
                continue
            launches = max(s["launch"] for s in tl) + 1
            first, last = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (launches // 2, launches // 2 + 13)
            print(f"## {run['weights']} (lm_head {dec['lm_head']}): {launches} launches, "
                  f"{dec['tokens_per_s']:.0f} tok/s traced")
            # A launch's release: the first return from its wait. Marks (records of
            # trace_mark, both times equal) are not waits; files written before the `mark`
            # field are told apart by their equal times.
            def is_mark(s):
                if "mark" in s:
                    return s["mark"]
                return s["first_begin_us"] == s["first_end_us"] and s["last_begin_us"] == s["last_end_us"]
            # Each launch's first wait span: its release time, site and blocks.
            first_wait = {}
            for s in tl:
                if not is_mark(s):
                    first_wait.setdefault(s["launch"], s)
            release = {L: s["first_end_us"] for L, s in first_wait.items()}
            print("| launch | site | blocks | SMs | arrive first-last us | wait returns first-last us | critical us |")
            print("|---|---|---|---|---|---|---|")
            for s in tl:
                L = s["launch"]
                if not first <= L <= last:
                    continue
                crit = ""
                if not is_mark(s) and release.get(L) == s["first_end_us"] and L + 1 in release:
                    crit = f"{release[L + 1] - release[L]:.2f}"
                site = s["site"] + (" (mark)" if is_mark(s) else "")
                print(f"| {L} | {site} | {s['blocks']} | {s['sms']} | "
                      f"{s['first_begin_us']:.2f}-{s['last_begin_us']:.2f} | "
                      f"{s['first_end_us']:.2f}-{s['last_end_us']:.2f} | {crit} |")
            order = [(first_wait[i]["site"], first_wait[i]["blocks"]) if i in first_wait else None
                     for i in range(launches)]
            crit_all = {L: release[L + 1] - release[L] for L in release if L + 1 in release}
            p, rows = layer_medians(order, crit_all)
            if p:
                print(f"\nlayer pattern of {p} launches, median critical us over its repetitions:")
                for (site, blocks), med, count in rows:
                    print(f"  {site:18s} {blocks:5d} blocks  {med:6.2f} us  ({count} layers)")
                print(f"  layer: {sum(m for _, m, _ in rows):.2f} us")
            print()


if __name__ == "__main__":
    main()
