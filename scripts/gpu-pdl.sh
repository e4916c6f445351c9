#!/usr/bin/env bash
# Device calls for the PDL preamble work (issues 7, 8). PART=a: kernel and runtime GPU tests,
# then the kernel benchmark (--no-sweep: fused, fused + PDL chain, dequant+cuBLAS, FP8, MoE);
# PART=b: end-to-end random-weight benchmarks (batch-1 ablation includes pdl).
# Usage (device): OUT=dir PART=a|b bash scripts/gpu-pdl.sh
OUT=${OUT:-out/gpu-pdl}
source "$(dirname "$0")/gpu-lib.sh"
if [ "${PART:-a}" = a ]; then
  gpu_ktests
  gpu_rtests
  gpu_kbench --no-sweep
else
  gpu_e2e
fi
