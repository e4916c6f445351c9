#!/usr/bin/env bash
# Device call for the BF16 decode GEMV (Tuning::bf16_gemv, 2026-11-26): kernel and runtime GPU
# tests, the kernel benchmark on the decode token counts of the MoE and dense shapes (our GEMV
# against cuBLAS, rows-per-block sweep at one token), and the end-to-end BF16 / NVFP4 decode of
# both model shapes with the tuning ablation (bf16_gemv flipped) and stage costs.
# Usage (device): RES=$OUT bash scripts/gpu-bf16.sh
RES=${RES:-out/gpu-bf16}
OUT=/tmp/mimo-gpu-out
source "$(dirname "$0")/gpu-lib.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STEPS=${STEPS:-tests kbench e2e}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then gpu_ktests; gpu_rtests; pack; fi
if has kbench; then
  echo "== kernel bench (decode token counts)"
  timeout 240 target/release/mimo-bench-kernels --no-sweep --ms 1,4,8 \
    --shapes 2048:5120,4096:2048,2048:1536,768:2048,4096:14336,14336:4096,2048:151936 \
    --out "$OUT/kernels-bf16-gemv.json" > "$OUT/kbench.md" 2> "$OUT/kbench.err"
  echo "rc $?"; grep -E "cublas k|bf16_gemv(_pdl)? k" "$OUT/kbench.err" | head -60; pack
fi
if has e2e; then
  for cfg in ${CONFIGS:-qwen3-30b-a3b mimo-7b}; do
    echo "== bench $cfg"
    timeout 200 target/release/mimo-run bench --device cuda --config "bench/configs/$cfg.json" \
      --random-weights --fp4-head --batches ${BATCHES:-1,8} --steps 128 --stage-costs \
      --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
    echo "rc $?"; grep -E "decode batch|without|batch 1 with" "$OUT/bench-$cfg.txt" | head -50
    pack
  done
fi
