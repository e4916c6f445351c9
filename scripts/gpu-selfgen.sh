#!/usr/bin/env bash
# Device calls for self-generated calibration text (`--calib self`, issue 9) and the checks of
# the code it touched. STEP=tests: the kernel GPU tests (and memcheck of the stage-chain probe's
# test), the runtime GPU tests (GPU generation moved into the cuda module) and the calibration
# GPU tests (crates/quantize/tests/calib_gpu.rs, with the GPU's own continuations). STEP=time:
# `mimo-quant calibrate --calib self` timed on the GPU and the CPU, on the embedded model and on
# a synthetic 2 GB checkpoint (random weights: the text is noise, the time is what counts), and
# the quality row of the GPU-written, GPU-calibrated conversion (bench/quality.sh, comparisons
# on the CPU runtime as in the committed table).
# Binaries: cargo build --release --bin mimo-quant --bin mimo-run and the three test binaries
# (`cargo test --release -p mimo-quant --test calib_gpu --no-run`; KT, RT as in gpu-lib.sh).
source scripts/gpu-lib.sh
CT=${CT:-target/release/deps/calib_gpu-312e951ec191f48a}
Q=target/release/mimo-quant
M=models/mimo-tiny-moe
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | tee "$OUT/nproc.txt"
if [ "${STEP:-tests}" = tests ]; then
  KTESTS_TIMEOUT=240 gpu_ktests
  echo "== memcheck (kernel tests: stage_probe)"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 "$KT" --test-threads=1 stage_probe \
    > "$OUT/kmemcheck.log" 2>&1; echo "rc $?"; grep -E "ERROR SUMMARY|test result" "$OUT/kmemcheck.log"
  gpu_rtests
  echo "== calibration GPU tests"
  timeout 200 "$CT" --test-threads=1 > "$OUT/ctests.log" 2>&1; echo "rc $?"
  grep -E "test result|FAILED|panicked" "$OUT/ctests.log" | head -20
else
  for dev in cuda cpu; do
    gpu_calibrate "calibrate-self-$dev" 120 "$M" --calib self --device "$dev"
  done
  echo "== synthetic Llama-shaped checkpoint of about 2 GB (random weights)"
  S=${SYNTH:-/tmp/synth-2gb}
  "$Q" fixture --synthetic-gb 2 "$S" > /dev/null && cp "$M"/tokenizer.json "$M"/tokenizer_config.json "$S"/
  for spec in default self; do
    gpu_calibrate "synth-calibrate-$spec" 150 "$S" --calib $spec --device cuda
  done
  echo "== quality row (text written and calibration walked on the GPU)"
  cp bench/results/quality.json "$OUT/quality.json"
  ONLY=${ONLY:-'nvfp4-gptq-ao-self-gpu'} RESULTS="$OUT/quality.json" timeout 200 bash bench/quality.sh \
    > "$OUT/quality.log" 2>&1; echo "rc $?"; grep -E '"name"' "$OUT/quality.log" | cut -c1-400
fi
pack
