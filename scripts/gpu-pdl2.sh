#!/usr/bin/env bash
# Device call for the PDL preambles of attention and the MoE down projection (issues 7, 8):
# kernel and runtime GPU tests, memcheck of the greedy/PDL and nucleus tests, then the
# end-to-end random-weight benchmarks (batch-1 ablation includes pdl=on). Binaries built on the
# dev machine and carried. Usage (device): OUT=dir bash scripts/gpu-pdl2.sh
set -uo pipefail
OUT=${OUT:-out/gpu-pdl2}; mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 MIMO_REQUIRE_FP8=1 PATH=$PATH:/usr/local/cuda/bin
KT=target/release/deps/cuda_fp4-8cc1857849cbce18
RT=target/release/deps/cuda_model-9475c9e045f5deaa
echo "== kernel tests"; timeout 150 $KT --test-threads=1 > $OUT/ktests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked" $OUT/ktests.log
echo "== runtime GPU tests"; timeout 150 $RT --test-threads=1 --nocapture > $OUT/rtests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked|programmatic" $OUT/rtests.log | head
echo "== memcheck (greedy with PDL, nucleus)"; timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 $RT --test-threads=1 greedy_tokens_equal nucleus top_p > $OUT/rmemcheck.log 2>&1; echo rc $?; grep -E "ERROR SUMMARY|test result" $OUT/rmemcheck.log
for cfg in ${CONFIGS:-qwen3-30b-a3b mimo-7b}; do
  echo "== bench $cfg"
  timeout 200 target/release/mimo-run bench --device cuda --config bench/configs/$cfg.json --random-weights --fp4-head \
    --steps 128 --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
  echo "rc $?"; grep -E "batch 1 with|decode batch  1" "$OUT/bench-$cfg.txt" | head -30
done
