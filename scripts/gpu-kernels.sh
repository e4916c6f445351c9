#!/usr/bin/env bash
# Device-machine run of the CUDA kernels (issue 7): GPU tests, the benchmark, compute-sanitizer
# memcheck once (time-limited: MEMCHECK_TIMEOUT, default 200 s), and a SASS summary. Binaries are built on the dev machine and carried:
#   cargo build --release -p mimo-kernels --bins
#   cargo test --release -p mimo-kernels --no-run      # prints target/release/deps/cuda_fp4-*
# Usage (device): OUT=dir MIMO_COMMIT=<sha> bash scripts/gpu-kernels.sh [bench args...]
set -uo pipefail
OUT=${OUT:-out/gpu-kernels}
mkdir -p "$OUT"
TEST=$(ls -t target/release/deps/cuda_fp4-* | grep -v '\.d$' | head -n 1)
BENCH=target/release/mimo-bench-kernels
export MIMO_REQUIRE_GPU=1
export PATH=$PATH:/usr/local/cuda/bin
{ nvidia-smi; nvidia-smi -q | grep -iE 'clocks|MHz|Power Limit' | head -20; } > "$OUT/nvidia-smi.txt" 2>&1

echo "== tests"
"$TEST" --test-threads=1 > "$OUT/tests.log" 2>&1
echo "tests rc $?"; grep -E "^test |test result|panicked|relative error" "$OUT/tests.log" | tail -n 30

echo "== bench"
"$BENCH" --out "$OUT/kernels-h100.json" "$@" > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "bench rc $?"; tail -n 5 "$OUT/bench.err"; cat "$OUT/bench.md"

echo "== memcheck"
timeout ${MEMCHECK_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 99 "$TEST" --test-threads=1 > "$OUT/memcheck.log" 2>&1
echo "memcheck rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck.log"

echo "== sass"
{
  cat crates/kernels/cuda/common.cuh crates/kernels/cuda/fp4_gemm.cu > /tmp/fp4_full.cu; nvcc -cubin -gencode arch=compute_90a,code=sm_90a -Xptxas -v -o /tmp/fp4.cubin /tmp/fp4_full.cu 2>&1 | grep -E "Compiling|Used|spill"
  cuobjdump -sass /tmp/fp4.cubin > /tmp/fp4.sass
  for f in fp4_gemm_nv_m1_t1_g2 fp4_gemm_mx_m1_t1_g2 fp4_gemm_nv_m1_t2_g1 fp4_gemm_nv_m2_t2_g1 fp4_moe_nv_g1_swiglu fp4_moe_nv_g2; do
    awk "/Function : $f\$/{p=1;next} /Function :/{p=0} p" /tmp/fp4.sass > /tmp/one.sass
    echo "$f: $(wc -l < /tmp/one.sass) lines; LDG.128: $(grep -c 'LDG.E.*128' /tmp/one.sass)," \
      "HMMA: $(grep -c HMMA /tmp/one.sass), PRMT: $(grep -c PRMT /tmp/one.sass)," \
      "HFMA2.BF16: $(grep -c 'HFMA2.*BF16' /tmp/one.sass), LDL/STL: $(grep -cE 'LDL|STL' /tmp/one.sass)"
  done
  awk '/Function : fp4_gemm_nv_m1_t1_g2$/{p=1;next} /Function :/{p=0} p' /tmp/fp4.sass | grep -E '^ +/\*[0-9a-f]{4}\*/' | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn
  awk '/Function : fp4_gemm_nv_m1_t1_g2$/{p=1;next} /Function :/{p=0} p' /tmp/fp4.sass | head -n 700
} > "$OUT/sass.txt" 2>&1
head -n 8 "$OUT/sass.txt"

