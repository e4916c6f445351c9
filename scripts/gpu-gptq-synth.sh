#!/usr/bin/env bash
# Device call: GPTQ at real layer widths. A GPTQ conversion of a synthetic Llama-shaped 2 GB
# checkpoint (14 layers, hidden 2048, intermediate 8192, random weights) with
# bench/calib-small.json, calibrated on the GPU; GPTQ of one matrix at k = 2048, 4096, 8192 on the
# host's cores (examples/factor_bench: cargo build --release -p mimo-quant --example
# factor_bench); the same conversion calibrated on the CPU.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
Q=target/release/mimo-quant
M=models/mimo-tiny-moe
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
S=/tmp/synth-2gb
"$Q" fixture --synthetic-gb 2 "$S" > /dev/null && cp "$M"/tokenizer.json "$M"/tokenizer_config.json "$S"/
convert() {
  echo "== synthetic: convert --method gptq, calibration on $1"
  /usr/bin/time -v timeout "$2" "$Q" convert "$S" -o "/tmp/synth-gptq-$1" --method gptq \
    --calib bench/calib-small.json --calib-device "$1" --force -q --json \
    > "$OUT/synth-gptq-$1.json" 2> "$OUT/synth-gptq-$1.time"
  echo "rc $?"; grep -E "Elapsed|Maximum resident" "$OUT/synth-gptq-$1.time"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); c=d.get('calibration',{}); print({k: c.get(k) for k in ('backend','seconds','tokens','gpu_memory_bytes','peak_rss_bytes')}); print({k: d.get(k) for k in ('seconds','input_gb_per_s')})" "$OUT/synth-gptq-$1.json" 2>&1 | tail -2
}
convert cuda 200
for kn in "2048 8192" "4096 2048" "8192 2048"; do
  timeout 100 target/release/examples/factor_bench $kn | tee -a "$OUT/factor.txt"
done
convert cpu 180
