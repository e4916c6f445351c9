#!/usr/bin/env python3
"""Draw training/train_log.csv as training/loss_curve.svg (train, dev and validation loss against
tokens seen). Standard library only.

    python3 training/plot_loss.py [train_log.csv] [loss_curve.svg]
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
W, H, ML, MR, MT, MB = 720, 420, 60, 20, 30, 50
SERIES = [("train_loss", "#1f77b4", "train (batch)"), ("dev_loss", "#2ca02c", "dev (2% of train split)"),
          ("valid_loss", "#d62728", "held-out validation (first 64 windows)")]


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "train_log.csv"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "loss_curve.svg"
    rows = list(csv.DictReader(src.open()))
    xs = [int(r["tokens"]) for r in rows]
    x_max = max(xs)
    y_min, y_max = 2.5, 9.0

    def px(x: float) -> float:
        return ML + (W - ML - MR) * x / x_max

    def py(y: float) -> float:
        y = min(max(y, y_min), y_max)
        return MT + (H - MT - MB) * (y_max - y) / (y_max - y_min)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{W / 2}" y="18" text-anchor="middle">mimo-tiny-moe training loss (nats/token)</text>']
    for y in range(3, 10):
        parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>'
                     f'<text x="{ML - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y}</text>')
    step = 5_000_000
    for t in range(0, x_max + 1, step):
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{MT}" y2="{H - MB}" stroke="#eee"/>'
                     f'<text x="{px(t):.1f}" y="{H - MB + 16}" text-anchor="middle">{t // 1_000_000}M</text>')
    parts.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">tokens seen</text>')
    for i, (key, color, label) in enumerate(SERIES):
        pts = [(int(r["tokens"]), float(r[key])) for r in rows if r[key] not in ("", None)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        ly = MT + 14 + 16 * i
        parts.append(f'<line x1="{W - 300}" x2="{W - 280}" y1="{ly}" y2="{ly}" stroke="{color}" '
                     f'stroke-width="2"/><text x="{W - 275}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>\n")
    dst.write_text("\n".join(parts))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
