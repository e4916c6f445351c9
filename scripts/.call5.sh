#!/usr/bin/env bash
export RES=$OUT OUT=/tmp/o KT=target/ab/cuda_fp4 RT=target/ab/cuda_model
source scripts/gpu-lib.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
KTESTS_TIMEOUT=420 gpu_ktests
gpu_rtests
echo "== kernel bench"; timeout 330 target/ab/mimo-bench-kernels --no-sweep --out $OUT/kernels.json > $OUT/kbench.md 2> $OUT/kbench.err; echo "rc $?"; tail -n 2 $OUT/kbench.err
for cfg in qwen3-30b-a3b mimo-7b; do
  echo "== bench $cfg"
  timeout 270 target/ab/mimo-run bench --device cuda --config bench/configs/$cfg.json --random-weights --fp4-head --steps 128 --out $OUT/e2e-$cfg.json > $OUT/bench-$cfg.txt 2>&1
  echo "rc $?"; grep -E "decode batch|prefill 512" $OUT/bench-$cfg.txt | head -12
done
pack
