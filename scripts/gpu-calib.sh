#!/usr/bin/env bash
# Device call for calibration on the GPU (issue 9): the runtime GPU tests (the decoder layer's
# launches moved into `layer_pass`, shared by the forward pass and the calibration walk), the
# GPU calibration tests (crates/quantize/tests/calib_gpu.rs), `mimo-quant calibrate --hessian`
# timed on the GPU and on this machine's CPU, and the quality rows of the GPU-calibrated
# conversions (bench/quality.sh, comparisons on the CPU runtime as in the committed table).
# Binaries: cargo build --release --bin mimo-quant --bin mimo-run, and the two test binaries
# (`cargo test --release -p mimo-quant --test calib_gpu --no-run`; RT as in gpu-lib.sh).
source scripts/gpu-lib.sh
CT=${CT:-target/release/deps/calib_gpu-fd49abe85922894d}
Q=target/release/mimo-quant
M=models/mimo-tiny-moe
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | tee "$OUT/nproc.txt"
gpu_rtests
echo "== calibration GPU tests"
timeout 240 "$CT" --test-threads=1 > "$OUT/ctests.log" 2>&1; echo "rc $?"
grep -E "test result|FAILED|panicked|differ|went to" "$OUT/ctests.log" | head -30
for dev in cuda cpu; do
  gpu_calibrate "calibrate-$dev" 120 "$M" --hessian --device "$dev"
done
echo "== synthetic Llama-shaped checkpoint of about 2 GB (random weights): bench/calib-small.json"
S=${SYNTH:-/tmp/synth-2gb}
"$Q" fixture --synthetic-gb 2 "$S" > /dev/null && cp "$M"/tokenizer.json "$M"/tokenizer_config.json "$S"/
for dev in cuda cpu; do
  gpu_calibrate "synth-calibrate-$dev" 150 "$S" --calib bench/calib-small.json --hessian --device "$dev"
done
echo "== synthetic: convert --method gptq, calibration on cuda"
/usr/bin/time -v timeout 200 "$Q" convert "$S" -o /tmp/synth-gptq --method gptq --calib bench/calib-small.json \
  --calib-device cuda --force -q --json > "$OUT/synth-gptq-cuda.json" 2> "$OUT/synth-gptq-cuda.time"
echo "rc $?"; grep -E "Elapsed|Maximum resident" "$OUT/synth-gptq-cuda.time"
python3 -c "import json,sys; c=json.load(open(sys.argv[1])).get('calibration',{}); print({k: c.get(k) for k in ('backend','seconds','tokens','gpu_memory_bytes','peak_rss_bytes')})" "$OUT/synth-gptq-cuda.json"
echo "== quality rows (GPU calibration)"
cp bench/results/quality.json "$OUT/quality.json"
ONLY=${ONLY:-'nvfp4-mse-gpu|nvfp4-gptq-gpu|nvfp4-gptq-ao-gpu|nvfp4-gptq-ao-asym-gpu|nvfp4-gptq-ao-wl-gpu|mxfp4-gptq-ao-gpu'} \
  RESULTS="$OUT/quality.json" timeout 300 bash bench/quality.sh > "$OUT/quality.log" 2>&1; echo "rc $?"
tail -n 3 "$OUT/quality.log"
