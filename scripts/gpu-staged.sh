#!/usr/bin/env bash
# Device call for the staged one-token MoE down projection (Tuning::moe_stage_down): kernel GPU
# tests (with the bit-identity test against the plain kernel) and memcheck of that test, runtime
# GPU tests, the kernel benchmark (--no-sweep; MoE rows with and without staging), then the
# Qwen3-30B-A3B end-to-end bench (its tuning ablation flips moe_stage_down in the same process).
# Usage (device): OUT=dir bash scripts/gpu-staged.sh
OUT=${OUT:-out/gpu-staged}
source "$(dirname "$0")/gpu-lib.sh"
gpu_ktests
echo "== memcheck (kernels: moe)"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 "$KT" --test-threads=1 moe \
  > "$OUT/kmemcheck.log" 2>&1
echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/kmemcheck.log"
gpu_rtests
gpu_kbench --no-sweep
grep -E "  moe " "$OUT/kbench.err" | head -20
CONFIGS=${CONFIGS:-qwen3-30b-a3b} gpu_e2e
