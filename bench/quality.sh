#!/usr/bin/env bash
# Quality table for calibrated quantization (issue 9): NVFP4 and MXFP4 x rtn/mse/gptq on
# models/mimo-tiny-moe, compared with the BF16 model on a fixed held-out slice (the first
# SLICE_BYTES bytes of calibration/heldout/valid.txt, never used for calibration).
# Calibration: the embedded default recipe (calibration/default.json). Writes
# bench/results/quality.json. Needs: cargo build --release --bin mimo-quant --bin mimo-run.
set -euo pipefail
cd "$(dirname "$0")/.."
Q=target/release/mimo-quant
R=target/release/mimo-run
M=${MODEL:-models/mimo-tiny-moe}
SLICE_BYTES=${SLICE_BYTES:-20480}
WORK=${WORK:-$(mktemp -d)}
SLICE=$WORK/heldout-slice.txt
head -c "$SLICE_BYTES" calibration/heldout/valid.txt > "$SLICE"
ROWS=()
for fmt in nvfp4 mxfp4; do
  for method in rtn mse gptq; do
    out=$WORK/$fmt-$method
    /usr/bin/time -v "$Q" convert "$M" -o "$out" --format "$fmt" --method "$method" --force -q --json \
      > "$WORK/$fmt-$method.convert.json" 2> "$WORK/$fmt-$method.time"
    rss_kb=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$WORK/$fmt-$method.time")
    wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$WORK/$fmt-$method.time")
    "$R" compare --reference "$M" --candidate "$out" "$SLICE" --json > "$WORK/$fmt-$method.cmp.json"
    ROWS+=("$(python3 - "$fmt" "$method" "$WORK/$fmt-$method.convert.json" "$WORK/$fmt-$method.cmp.json" "$rss_kb" "$wall" <<'PY'
import json, sys
fmt, method, man, cmp, rss_kb, wall = sys.argv[1:]
m = json.load(open(man)); c = json.load(open(cmp))["result"]
cal = m.get("calibration") or {}
cov = cal.get("expert_coverage") or {}
print(json.dumps({
  "format": fmt, "method": method,
  "ppl_bf16": c["reference"]["ppl"], "ppl": c["candidate"]["ppl"],
  "mean_kl": c["mean_kl"], "top1_agreement": c["top1_agreement"],
  "calibration_seconds": cal.get("seconds"), "calibration_tokens": cal.get("tokens"),
  "convert_wall": wall, "convert_peak_rss_mb": int(rss_kb) / 1024,
  "experts_under_threshold": sum(1 for e in cov.get("experts", []) if e["all_token_fallback"]),
  "peak_gpu_memory": None,
}))
PY
)")
    echo "${ROWS[-1]}"
  done
done
python3 - "$SLICE_BYTES" "${ROWS[@]}" > bench/results/quality.json <<'PY'
import json, sys
rows = [json.loads(r) for r in sys.argv[2:]]
print(json.dumps({
  "model": "models/mimo-tiny-moe",
  "heldout": f"first {sys.argv[1]} bytes of calibration/heldout/valid.txt (not used for calibration)",
  "calibration": "embedded default recipe (calibration/default.json: 315 samples, seq_len 256, seed 1234)",
  "backend": "cpu (2 cores); no GPU used, peak_gpu_memory null",
  "rows": rows,
}, indent=2))
PY
echo "wrote bench/results/quality.json"
