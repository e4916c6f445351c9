#!/usr/bin/env bash
# One device-machine call for issues 7 and 8: GPU tests (kernels, runtime), the kernel benchmark,
# the end-to-end random-weight benchmarks (with the batch-1 latency-feature ablation), and
# compute-sanitizer memcheck of the kernel tests last (time-limited). Binaries are built on the
# dev machine and carried (see scripts/gpu-e2e.sh and scripts/gpu-kernels.sh for the commands).
# Usage (device): OUT=dir KTEST=... RTEST=... bash scripts/gpu-all.sh
set -uo pipefail
OUT=${OUT:-out/gpu-all}
mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 PATH=$PATH:/usr/local/cuda/bin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
echo "== kernel tests"; timeout 200 "$KTEST" --test-threads=1 > "$OUT/ktests.log" 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" "$OUT/ktests.log"
echo "== runtime GPU tests"; timeout 200 "$RTEST" --test-threads=1 --nocapture > "$OUT/rtests.log" 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked|programmatic" "$OUT/rtests.log" | head -20
if [ "${SKIP_KBENCH:-0}" != 1 ]; then
  echo "== kernel bench"; timeout ${KBENCH_TIMEOUT:-240} target/release/mimo-bench-kernels ${KBENCH_ARGS:-} --out "$OUT/kernels.json" > "$OUT/kbench.md" 2> "$OUT/kbench.err"
  echo "rc $?"; tail -n 3 "$OUT/kbench.err"; grep -E "^\| (4096 x 14336|2048 x 151936|nvfp4|mxfp4) " "$OUT/kbench.md" | head -20
fi
for cfg in ${CONFIGS:-qwen3-30b-a3b mimo-7b}; do
  echo "== bench $cfg"
  timeout 240 target/release/mimo-run bench --device cuda --config bench/configs/$cfg.json --random-weights --fp4-head \
    --steps 128 --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
  echo "rc $?"; grep -vE "^\s*$" "$OUT/bench-$cfg.txt" | tail -n 30
done
if [ "${SKIP_MEMCHECK:-0}" != 1 ]; then
  echo "== memcheck (kernels)"
  timeout "${MEMCHECK_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 99 "$KTEST" --test-threads=1 > "$OUT/memcheck.log" 2>&1
  echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck.log"
  if [ -n "${RMEMCHECK:-}" ]; then
    echo "== memcheck (runtime: $RMEMCHECK)"
    timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 "$RTEST" --test-threads=1 $RMEMCHECK > "$OUT/rmemcheck.log" 2>&1
    echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/rmemcheck.log"
  fi
fi
