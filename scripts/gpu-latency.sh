#!/usr/bin/env bash
# Device call for the decode-latency work of the runtime's kernels (issue 8): kernel and runtime
# GPU tests, batch-1 decode of the two shapes with --stage-costs and the tuning ablation, the
# MoE kernel bench, memcheck of the decode tests. Usage (device): RES=$OUT bash
# scripts/gpu-latency.sh (logs packed into $RES/logs.tgz, JSON reports copied to $RES).
RES=${RES:-out/gpu-latency}
OUT=/tmp/mimo-gpu-out
source "$(dirname "$0")/gpu-lib.sh"
pack() { mkdir -p "$RES"; cp "$OUT"/*.json "$RES"/ 2>/dev/null; tar czf "$RES/logs.tgz" -C "$OUT" .; }
e2e() {
  echo "== bench $1"
  timeout 200 target/release/mimo-run bench --device cuda --config "bench/configs/$1.json" \
    --random-weights --fp4-head --formats nvfp4 --batches 1 --steps 128 --stage-costs \
    --out "$OUT/e2e-$1.json" > "$OUT/bench-$1.txt" 2>&1
  echo "rc $?"; grep -E "batch 1 with|without|decode batch" "$OUT/bench-$1.txt" | head -40
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gpu_ktests; gpu_rtests; pack
e2e qwen3-30b-a3b; pack
echo "== kernel bench (moe only)"
timeout 120 target/release/mimo-bench-kernels --moe-only --no-sweep --out "$OUT/kernels-moe.json" \
  > "$OUT/kbench.md" 2> "$OUT/kbench.err"
echo "rc $?"; grep -E "moe " "$OUT/kbench.err"; pack
e2e mimo-7b; pack
gpu_rmemcheck greedy_tokens_equal attention_over_several decode_over_a_long fp4_fixtures; pack
