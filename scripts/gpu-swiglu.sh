#!/usr/bin/env bash
# Device call for the dense SwiGLU epilogue (Tuning::dense_swiglu): kernel and runtime GPU tests,
# memcheck of the new kernel test, then the MiMo-7B end-to-end bench (its tuning ablation flips
# dense_swiglu in the same process). Usage (device): OUT=dir bash scripts/gpu-swiglu.sh
OUT=${OUT:-out/gpu-swiglu}
source "$(dirname "$0")/gpu-lib.sh"
gpu_ktests
echo "== memcheck (kernels: swiglu)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 "$KT" --test-threads=1 swiglu \
  > "$OUT/kmemcheck.log" 2>&1
echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/kmemcheck.log"
gpu_rtests
CONFIGS=${CONFIGS:-mimo-7b} gpu_e2e
