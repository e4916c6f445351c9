#!/usr/bin/env python3
"""Prints the traced decode step of a `mimo-run bench` JSON made with MIMO_TRACE=1 (the
`timeline` of each batch-1 run): every span of launches FIRST..LAST, and each launch's time
on the critical path (from its wait's first return to the next launch's).

usage: bench/timeline.py FILE [FIRST LAST]   (launch numbers; default: a middle layer's worth)
"""
import json
import sys


def main():
    path = sys.argv[1]
    d = json.load(open(path))
    for run in d["runs"]:
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
            release = {}
            for s in tl:
                if not is_mark(s) and s["launch"] not in release:
                    release[s["launch"]] = s["first_end_us"]
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


if __name__ == "__main__":
    main()
