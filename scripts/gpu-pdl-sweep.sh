#!/usr/bin/env bash
# Device call: the kernel benchmark with its block-shape sweep, which at one token also times
# every shape as a PDL chain (fp4_fused_pdl_* rows, fp4_fused_pdl_tuned). Usage (device):
# OUT=dir bash scripts/gpu-pdl-sweep.sh
OUT=${OUT:-out/gpu-pdl-sweep}
source "$(dirname "$0")/gpu-lib.sh"
echo "== kernel bench (sweep)"
timeout 540 target/release/mimo-bench-kernels --out "$OUT/kernels.json" > "$OUT/kbench.md" \
  2> "$OUT/kbench.err"
echo "rc $?"; tail -n 2 "$OUT/kbench.err"
grep -E "best PDL chain|fused\+PDL .* m=1:" "$OUT/kbench.err"
