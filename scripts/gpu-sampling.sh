#!/usr/bin/env bash
# One device call for the nucleus-sampling work (issue 8): runtime GPU tests, memcheck of the
# nucleus tests, generate timings on the embedded model, the Qwen3-30B-A3B random-weight bench.
# Binaries built on the dev machine and carried. Usage (device): OUT=dir bash scripts/gpu-sampling.sh
set -uo pipefail
OUT=${OUT:-out/gpu-sampling}; mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 PATH=$PATH:/usr/local/cuda/bin
T=target/release/deps/cuda_model-9475c9e045f5deaa
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
echo "== runtime GPU tests"; timeout 200 $T --test-threads=1 --nocapture > $OUT/rtests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked|per step" $OUT/rtests.log | head -20
echo "== memcheck nucleus"; timeout 100 compute-sanitizer --tool memcheck --error-exitcode 99 $T --test-threads=1 nucleus top_p > $OUT/rmemcheck.log 2>&1; echo rc $?; grep -E "ERROR SUMMARY|test result" $OUT/rmemcheck.log
echo "== generate"
for a in "--temperature 0" "--temperature 1" "--temperature 1 --top-p 0.9" "--temperature 0.6 --top-p 0.95"; do
  n=$(echo $a | tr -d ' -'); timeout 60 target/release/mimo-run generate --device cuda -m models/mimo-tiny-moe --max-tokens 200 $a --json "Once upon a time there was" > $OUT/gen-$n.json 2> $OUT/gen-$n.err; echo "$a rc $?"; python3 -c "
import json,sys; d=json.load(open('$OUT/gen-$n.json')); print({k:v for k,v in d.items() if k!='text'})" 2>&1 | head -3
done
echo "== bench qwen3"; timeout 250 target/release/mimo-run bench --device cuda --config bench/configs/qwen3-30b-a3b.json --random-weights --fp4-head --steps 128 --out $OUT/e2e-qwen3-30b-a3b.json > $OUT/bench-qwen3.txt 2>&1; echo rc $?; grep -vE "^\s*$" $OUT/bench-qwen3.txt | tail -n 25
