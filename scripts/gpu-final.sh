#!/usr/bin/env bash
# Final device call(s) of a session (issues 7, 8, 9). Steps (STEPS, default all, in this order):
#   tests    kernel, runtime and calibration GPU tests
#   e2e      the end-to-end random-weight benchmark of both shapes (BF16 and NVFP4, batches
#            1/8/32, FP4 head too, batch-1 stage costs and tuning ablation)
#   kbench   the kernel benchmark without the sweep
#   memcheck compute-sanitizer memcheck of the decode tests
# Usage (device): RES=$OUT STEPS="tests e2e" bash scripts/gpu-final.sh (JSON reports copied to
# $RES, logs packed into $RES/logs.tgz).
RES=${RES:-out/gpu-final}
OUT=/tmp/mimo-gpu-out
STEPS=${STEPS:-tests e2e kbench memcheck}
source "$(dirname "$0")/gpu-lib.sh"
CT=${CT:-target/release/deps/calib_gpu-fd49abe85922894d}
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if has tests; then
  gpu_ktests; gpu_rtests "1100-token context, warp_attention true"
  echo "== calibration GPU tests"; timeout 120 "$CT" --test-threads=1 > "$OUT/ctests.log" 2>&1
  echo "rc $?"; grep -E "test result|FAILED|panicked" "$OUT/ctests.log"; pack
fi
if has e2e; then
  for cfg in qwen3-30b-a3b mimo-7b; do
    echo "== bench $cfg"
    timeout 240 target/release/mimo-run bench --device cuda --config "bench/configs/$cfg.json" \
      --random-weights --fp4-head --steps 128 --stage-costs --out "$OUT/e2e-$cfg.json" \
      > "$OUT/bench-$cfg.txt" 2>&1
    echo "rc $?"; grep -E "decode batch|prefill 512|without|batch 1 with" "$OUT/bench-$cfg.txt" | head -60
    pack
  done
fi
if has kbench; then gpu_kbench --no-sweep; pack; fi
if has memcheck; then gpu_rmemcheck greedy_tokens_equal attention_over_several fp4_fixtures nucleus; pack; fi
