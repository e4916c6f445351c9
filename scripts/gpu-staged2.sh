#!/usr/bin/env bash
# Second device call for the staged MoE down projection: both one-token MoE kernels ask for the
# largest shared-memory carveout. Kernel GPU tests, the kernel benchmark (--no-sweep), the
# Qwen3-30B-A3B end-to-end bench. Usage (device): OUT=dir bash scripts/gpu-staged2.sh
OUT=${OUT:-out/gpu-staged2}
source "$(dirname "$0")/gpu-lib.sh"
gpu_ktests
gpu_kbench --no-sweep
grep -E "  moe " "$OUT/kbench.err" | head -20
CONFIGS=${CONFIGS:-qwen3-30b-a3b} gpu_e2e
