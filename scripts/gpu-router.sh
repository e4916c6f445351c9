#!/usr/bin/env bash
# Device call for the cluster router (issue 8): runtime GPU tests, batch-1 decode of the
# Qwen3-30B-A3B shape with --stage-costs and the tuning ablation (cluster_router among the
# switches), memcheck of the decode tests. Usage (device): RES=$OUT bash scripts/gpu-router.sh
RES=${RES:-out/gpu-router}
OUT=/tmp/mimo-gpu-out
source "$(dirname "$0")/gpu-lib.sh"
pack() { mkdir -p "$RES"; cp "$OUT"/*.json "$RES"/ 2>/dev/null; tar czf "$RES/logs.tgz" -C "$OUT" .; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gpu_rtests; pack
echo "== bench qwen3-30b-a3b"
timeout 200 target/release/mimo-run bench --device cuda --config bench/configs/qwen3-30b-a3b.json \
  --random-weights --fp4-head --formats nvfp4 --batches 1 --steps 128 --stage-costs \
  --out "$OUT/e2e-qwen3-30b-a3b.json" > "$OUT/bench-qwen3-30b-a3b.txt" 2>&1
echo "rc $?"; grep -E "batch 1 with|without|decode batch|prefill" "$OUT/bench-qwen3-30b-a3b.txt" | head -40; pack
gpu_rmemcheck greedy_tokens_equal fp4_fixtures; pack
