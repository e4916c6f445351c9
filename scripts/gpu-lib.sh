#!/usr/bin/env bash
# Shared steps of the device-call scripts (sourced, not run): GPU test binaries built on the dev
# machine with `cargo test --release -p mimo-kernels --test cuda_fp4 --no-run` and `-p
# mimo-runtime --test cuda_model --no-run` (their hashed names below; override KT / RT), the
# release binaries under target/release, and one function per step. Each step logs to $OUT and
# prints its exit status and the lines that matter.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 MIMO_REQUIRE_FP8=${MIMO_REQUIRE_FP8:-1} PATH=$PATH:/usr/local/cuda/bin
# NVRTC's PTX kept across the processes of one call (docs/cuda-backend-notes.md): only the first
# process compiles the kernels (a minute or more each time otherwise). Entries carried in .ptxc/
# (an ignored folder: `carry` it) are used too; `pack` returns the cache as ptxc.tgz.
export MIMO_PTX_CACHE=${MIMO_PTX_CACHE:-/tmp/mimo-ptx-cache}
mkdir -p "$MIMO_PTX_CACHE" && cp .ptxc/*.ptx "$MIMO_PTX_CACHE"/ 2>/dev/null
KT=${KT:-target/release/deps/cuda_fp4-6770ebd525ef6e39}
RT=${RT:-target/release/deps/cuda_model-d54b45c8f52ca578}

# Kernel GPU tests.
gpu_ktests() {
  echo "== kernel tests"; timeout ${KTESTS_TIMEOUT:-300} "$KT" --test-threads=1 > "$OUT/ktests.log" 2>&1; echo "rc $?"
  grep -E "test result|FAILED|panicked" "$OUT/ktests.log"
}

# Runtime GPU tests; $1: an extra pattern of output lines to show.
gpu_rtests() {
  echo "== runtime GPU tests"; timeout 200 "$RT" --test-threads=1 --nocapture > "$OUT/rtests.log" 2>&1
  echo "rc $?"; grep -E "test result|FAILED|panicked${1:+|$1}" "$OUT/rtests.log" | head -20
}

# compute-sanitizer memcheck of the runtime tests matching the arguments.
gpu_rmemcheck() {
  echo "== memcheck (runtime: $*)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 "$RT" --test-threads=1 "$@" \
    > "$OUT/rmemcheck.log" 2>&1
  echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/rmemcheck.log"
}

# The kernel benchmark; arguments go to mimo-bench-kernels (e.g. --no-sweep).
gpu_kbench() {
  echo "== kernel bench"
  timeout 330 target/release/mimo-bench-kernels "$@" --out "$OUT/kernels.json" > "$OUT/kbench.md" \
    2> "$OUT/kbench.err"
  echo "rc $?"; tail -n 2 "$OUT/kbench.err"
  grep -E "fused\+PDL|moe .* tokens=1|  fused (nvfp4|mxfp4) k=4096 n=14336 m=1 " "$OUT/kbench.err" | head -20
}

# The end-to-end random-weight benchmark of each shape in $CONFIGS.
gpu_e2e() {
  for cfg in ${CONFIGS:-qwen3-30b-a3b mimo-7b}; do
    echo "== bench $cfg"
    timeout 270 target/release/mimo-run bench --device cuda --config "bench/configs/$cfg.json" \
      --random-weights --fp4-head --steps 128 --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
    echo "rc $?"; grep -E "batch 1 with|sampling|decode batch|prefill 512" "$OUT/bench-$cfg.txt" | head -30
  done
}

# One timed `mimo-quant calibrate` (Q, the binary; default target/release/mimo-quant): $1 names
# the report ($OUT/$1.json, its /usr/bin/time -v in $OUT/$1.time), $2 is the time limit in
# seconds, the rest goes to `calibrate` (`--json` added). Prints its exit status, the summary's
# top-level fields and the wall time and peak RSS.
gpu_calibrate() {
  local name=$1 limit=$2; shift 2
  echo "== calibrate $*"
  /usr/bin/time -v timeout "$limit" "${Q:-target/release/mimo-quant}" calibrate "$@" --json \
    > "$OUT/$name.json" 2> "$OUT/$name.time"; echo "rc $?"
  grep -E '^  "(backend|device|seconds|peak_rss_bytes|gpu_memory_bytes|tokens|sequences)"' "$OUT/$name.json"
  grep -E "Elapsed|Maximum resident" "$OUT/$name.time"
}

# Copies the JSON reports under $OUT to $RES and packs every log of $OUT into $RES/logs.tgz and
# the PTX cache into $RES/ptxc.tgz (what comes back from the device: a few files, not every log;
# unpack ptxc.tgz into .ptxc/ to carry it to the next call).
pack() {
  mkdir -p "$RES"; cp "$OUT"/*.json "$RES"/ 2>/dev/null; tar czf "$RES/logs.tgz" -C "$OUT" .
  tar czf "$RES/ptxc.tgz" -C "$MIMO_PTX_CACHE" . 2>/dev/null
}

# Batch-1 NVFP4 decode of shape $1 (bench/configs/$1.json), BF16 and FP4 heads, with the tuning
# ablation and --stage-costs; further arguments go to mimo-run bench.
gpu_e2e_b1() {
  local cfg=$1; shift
  echo "== bench $cfg (batch 1)"
  timeout 200 target/release/mimo-run bench --device cuda --config "bench/configs/$cfg.json" \
    --random-weights --fp4-head --formats nvfp4 --batches 1 --steps 128 --stage-costs "$@" \
    --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
  echo "rc $?"; grep -E "batch 1 with|without|decode batch" "$OUT/bench-$cfg.txt" | head -40
}
