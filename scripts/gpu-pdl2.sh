#!/usr/bin/env bash
# Device call for the PDL preambles of attention and the MoE down projection (issues 7, 8):
# kernel and runtime GPU tests, memcheck of the greedy/PDL and nucleus tests, then the
# end-to-end random-weight benchmarks (batch-1 ablation includes pdl). Usage (device): OUT=dir
# bash scripts/gpu-pdl2.sh
OUT=${OUT:-out/gpu-pdl2}
source "$(dirname "$0")/gpu-lib.sh"
gpu_ktests
gpu_rtests programmatic
gpu_rmemcheck greedy_tokens_equal nucleus top_p
gpu_e2e
