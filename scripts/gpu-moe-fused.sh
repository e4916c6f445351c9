#!/usr/bin/env bash
# Device call for the one-launch MoE kernel and the stage-cost diagnostic (issues 7, 8): kernel
# GPU tests (the fused kernel against the f64 reference), batch-1 decode of the Qwen3-30B-A3B
# shape with the tuning ablation and --stage-costs, the MoE kernel bench, runtime GPU tests
# (FP4 MoE fixtures decoded with the fused kernel), memcheck of the MoE kernel tests, then the
# MiMo-7B shape. Usage (device): RES=$OUT bash scripts/gpu-moe-fused.sh (logs in a work
# folder, packed into $RES/logs.tgz).
RES=${RES:-out/gpu-moe-fused}
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
gpu_ktests
e2e qwen3-30b-a3b; pack
echo "== kernel bench (moe only)"
timeout 120 target/release/mimo-bench-kernels --moe-only --no-sweep --out "$OUT/kernels-moe.json" \
  > "$OUT/kbench.md" 2> "$OUT/kbench.err"
echo "rc $?"; grep -E "moe " "$OUT/kbench.err"; pack
echo "== runtime GPU tests (FP4 fixtures, random-weight bench, greedy)"
timeout 200 "$RT" --test-threads=1 --nocapture fp4_fixtures random_weight_bench greedy_tokens \
  > "$OUT/rtests.log" 2>&1
echo "rc $?"; grep -E "test result|FAILED|panicked" "$OUT/rtests.log" | head -20; pack
echo "== memcheck (kernels: moe)"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 99 "$KT" --test-threads=1 moe \
  > "$OUT/kmemcheck.log" 2>&1
echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/kmemcheck.log"; pack
e2e mimo-7b; pack
