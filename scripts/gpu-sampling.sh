#!/usr/bin/env bash
# One device call for the nucleus-sampling work (issue 8): runtime GPU tests, memcheck of the
# nucleus tests, generate timings on the embedded model, the Qwen3-30B-A3B random-weight bench.
# Usage (device): OUT=dir bash scripts/gpu-sampling.sh
OUT=${OUT:-out/gpu-sampling}
MIMO_REQUIRE_FP8=${MIMO_REQUIRE_FP8:-0}
source "$(dirname "$0")/gpu-lib.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
gpu_rtests "per step"
gpu_rmemcheck nucleus top_p
echo "== generate"
for a in "--temperature 0" "--temperature 1" "--temperature 1 --top-p 0.9" "--temperature 0.6 --top-p 0.95"; do
  n=$(echo $a | tr -d ' -'); timeout 60 target/release/mimo-run generate --device cuda -m models/mimo-tiny-moe --max-tokens 200 $a --json "Once upon a time there was" > $OUT/gen-$n.json 2> $OUT/gen-$n.err; echo "$a rc $?"; python3 -c "
import json,sys; d=json.load(open('$OUT/gen-$n.json')); print({k:v for k,v in d.items() if k!='text'})" 2>&1 | head -3
done
CONFIGS=qwen3-30b-a3b gpu_e2e
