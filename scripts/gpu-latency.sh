#!/usr/bin/env bash
# Device call for the decode-latency work of the runtime's kernels (issue 8): kernel and runtime
# GPU tests, batch-1 decode of the two shapes with --stage-costs and the tuning ablation, the
# MoE kernel bench, memcheck of the decode tests. Usage (device): RES=$OUT bash
# scripts/gpu-latency.sh (logs packed into $RES/logs.tgz, JSON reports copied to $RES).
RES=${RES:-out/gpu-latency}
OUT=/tmp/mimo-gpu-out
source "$(dirname "$0")/gpu-lib.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gpu_ktests; gpu_rtests; pack
gpu_e2e_b1 qwen3-30b-a3b; pack
echo "== kernel bench (moe only)"
timeout 120 target/release/mimo-bench-kernels --moe-only --no-sweep --out "$OUT/kernels-moe.json" \
  > "$OUT/kbench.md" 2> "$OUT/kbench.err"
echo "rc $?"; grep -E "moe " "$OUT/kbench.err"; pack
gpu_e2e_b1 mimo-7b; pack
gpu_rmemcheck greedy_tokens_equal attention_over_several decode_over_a_long fp4_fixtures; pack
