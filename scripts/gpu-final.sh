#!/usr/bin/env bash
# Final device call of a session: kernel and runtime GPU tests on the final code, then the kernel
# benchmark (--no-sweep). Usage (device): OUT=dir bash scripts/gpu-final.sh
OUT=${OUT:-out/gpu-final}
source "$(dirname "$0")/gpu-lib.sh"
gpu_ktests
gpu_rtests "1100-token context, warp_attention true"
gpu_kbench --no-sweep
