#!/usr/bin/env bash
# Device calls for the PDL preamble work (issues 7, 8). Binaries built on the dev machine and
# carried. PART=a: kernel and runtime GPU tests, then the kernel benchmark (--no-sweep: fused,
# fused + PDL chain, dequant+cuBLAS, FP8, MoE); PART=b: end-to-end random-weight benchmarks
# (batch-1 ablation includes pdl=on). Usage (device): OUT=dir PART=a|b bash scripts/gpu-pdl.sh
set -uo pipefail
OUT=${OUT:-out/gpu-pdl}; mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 MIMO_REQUIRE_FP8=1 PATH=$PATH:/usr/local/cuda/bin
KT=target/release/deps/cuda_fp4-8cc1857849cbce18
RT=target/release/deps/cuda_model-9475c9e045f5deaa
if [ "${PART:-a}" = a ]; then
  echo "== kernel tests"; timeout 150 $KT --test-threads=1 > $OUT/ktests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked" $OUT/ktests.log
  echo "== runtime GPU tests"; timeout 150 $RT --test-threads=1 > $OUT/rtests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked" $OUT/rtests.log
  echo "== kernel bench"; timeout 330 target/release/mimo-bench-kernels --no-sweep --out $OUT/kernels.json > $OUT/kbench.md 2> $OUT/kbench.err; echo rc $?
  tail -n 2 $OUT/kbench.err; grep -E "fused\+PDL|  fused (nvfp4|mxfp4) k=4096 n=14336" $OUT/kbench.err | head -40
else
  for cfg in ${CONFIGS:-qwen3-30b-a3b mimo-7b}; do
    echo "== bench $cfg"
    timeout 270 target/release/mimo-run bench --device cuda --config bench/configs/$cfg.json --random-weights --fp4-head \
      --steps 128 --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
    echo "rc $?"; grep -E "pdl|decode batch|sampling|prefill" "$OUT/bench-$cfg.txt" | head -30
  done
fi
