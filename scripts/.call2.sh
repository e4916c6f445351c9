#!/usr/bin/env bash
export RES=$OUT OUT=/tmp/o
source scripts/gpu-lib.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B="target/ab/mimo-run bench --device cuda --config bench/configs/qwen3-30b-a3b.json --random-weights --fp4-head --formats nvfp4 --batches 1 --steps 128"
echo "== stage costs"; timeout 280 $B --stage-costs --out $OUT/e2e-stages.json > $OUT/stages.txt 2>&1; echo "rc $?"
grep -E "tok/s|stage|without" $OUT/stages.txt | head -30
echo "== traced"; MIMO_TRACE=1 timeout 280 $B --out $OUT/e2e-trace.json > $OUT/trace.txt 2>&1; echo "rc $?"
grep -E "decode batch 1|tok/s" $OUT/trace.txt | head -6
python3 bench/timeline.py $OUT/e2e-trace.json 2>&1 | tail -25
pack
