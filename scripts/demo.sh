#!/usr/bin/env bash
# The README's first command: convert the embedded default model (models/mimo-tiny-moe, a Qwen3-MoE we
# trained ourselves) to NVFP4 and MXFP4, generate from the BF16 original and the FP4 result, and measure
# what FP4 costs on held-out text. Everything is written under out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/mimo-tiny-moe}
PROMPT=${PROMPT:-"KING HENRY. Now, lords,"}
OUTDIR=${OUTDIR:-out}

cargo build --release --quiet --bin mimo-quant --bin mimo-run
QUANT=target/release/mimo-quant
RUN=target/release/mimo-run
mkdir -p "$OUTDIR"

echo "== convert $MODEL"
"$QUANT" convert "$MODEL" -o "$OUTDIR/mimo-tiny-moe-nvfp4" --format nvfp4 --force
"$QUANT" convert "$MODEL" -o "$OUTDIR/mimo-tiny-moe-mxfp4" --format mxfp4 --force

echo "== verify"
"$QUANT" verify "$OUTDIR/mimo-tiny-moe-nvfp4" --source "$MODEL"

for m in "$MODEL" "$OUTDIR/mimo-tiny-moe-nvfp4" "$OUTDIR/mimo-tiny-moe-mxfp4"; do
  echo "== generate ($m)"
  "$RUN" generate -m "$m" --max-tokens 48 "$PROMPT"
  echo
done

# A slice of the held-out split (never used for training or calibration) keeps this under a minute.
head -c 12000 calibration/heldout/valid.txt > "$OUTDIR/heldout-slice.txt"
for f in nvfp4 mxfp4; do
  echo "== compare BF16 vs $f on $OUTDIR/heldout-slice.txt"
  "$RUN" compare --reference "$MODEL" --candidate "$OUTDIR/mimo-tiny-moe-$f" "$OUTDIR/heldout-slice.txt"
done
