#!/usr/bin/env bash
# Final device call of a session: kernel and runtime GPU tests on the final code, then the kernel
# benchmark (--no-sweep). Binaries built on the dev machine and carried.
# Usage (device): OUT=dir bash scripts/gpu-final.sh
set -uo pipefail
OUT=${OUT:-out/gpu-final}; mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 MIMO_REQUIRE_FP8=1 PATH=$PATH:/usr/local/cuda/bin
KT=target/release/deps/cuda_fp4-8cc1857849cbce18
RT=target/release/deps/cuda_model-9475c9e045f5deaa
echo "== kernel tests"; timeout 150 $KT --test-threads=1 > $OUT/ktests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked" $OUT/ktests.log
echo "== runtime GPU tests"; timeout 150 $RT --test-threads=1 --nocapture > $OUT/rtests.log 2>&1; echo rc $?; grep -E "test result|FAILED|panicked|1100-token context, warp_attention true" $OUT/rtests.log | head
echo "== kernel bench"; timeout 200 target/release/mimo-bench-kernels --no-sweep --out $OUT/kernels.json > $OUT/kbench.md 2> $OUT/kbench.err; echo rc $?
grep -E "moe|fused\+PDL nvfp4 k=4096 n=14336 m=1:" $OUT/kbench.err | head
