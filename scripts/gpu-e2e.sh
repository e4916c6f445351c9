#!/usr/bin/env bash
# Device-machine run of the whole GPU path (issues 7 and 8): kernel tests + memcheck, GPU runtime
# tests, then the end-to-end random-weight benchmarks. Binaries are built on the dev machine and carried:
#   cargo test --release -p mimo-kernels --test cuda_fp4 --no-run
#   cargo test --release -p mimo-runtime --test cuda_model --no-run
#   cargo build --release -p mimo-runtime --bin mimo-run
# Usage (device): OUT=dir KTEST=target/release/deps/cuda_fp4-* RTEST=target/release/deps/cuda_model-* bash scripts/gpu-e2e.sh
set -uo pipefail
OUT=${OUT:-out/gpu-e2e}
mkdir -p "$OUT"
export MIMO_REQUIRE_GPU=1 PATH=$PATH:/usr/local/cuda/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"

echo "== kernel tests"; "$KTEST" --test-threads=1 > "$OUT/ktests.log" 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" "$OUT/ktests.log"
echo "== runtime GPU tests"; "$RTEST" --test-threads=1 > "$OUT/rtests.log" 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" "$OUT/rtests.log"
echo "== memcheck (kernels)"
timeout "${MEMCHECK_TIMEOUT:-150}" compute-sanitizer --tool memcheck --error-exitcode 99 "$KTEST" --test-threads=1 > "$OUT/memcheck.log" 2>&1
echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/memcheck.log"
echo "== generate on cuda"
target/release/mimo-run generate --device cuda -m models/mimo-tiny-moe --max-tokens 32 "KING HENRY. Now, lords," 2>&1 | tail -4
for cfg in qwen3-30b-a3b mimo-7b; do
  echo "== bench $cfg"
  target/release/mimo-run bench --device cuda --config bench/configs/$cfg.json --random-weights --fp4-head \
    --steps 128 --out "$OUT/e2e-$cfg.json" > "$OUT/bench-$cfg.txt" 2>&1
  echo "rc $?"; tail -n 25 "$OUT/bench-$cfg.txt"
done
