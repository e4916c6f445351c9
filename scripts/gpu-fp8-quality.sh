#!/usr/bin/env bash
# What the FP8 prefill path costs in agreement with BF16 on real text: the embedded model converted
# (RTN NVFP4 / MXFP4, GPTQ NVFP4 as in bench/quality.sh), then `mimo-run compare` on the GPU over
# the two held-out slices of bench/quality.sh, with MIMO_FP8_PREFILL=0 and =1 in turn (ctx 512:
# every window is a 512-row prefill, so the FP4 attention projections take the FP8 path when on).
# Usage (device): OUT=dir bash scripts/gpu-fp8-quality.sh   (binaries built on the dev machine)
set -euo pipefail
Q=${Q:-target/release/mimo-quant}
R=${R:-target/release/mimo-run}
M=${MODEL:-models/mimo-tiny-moe}
OUT=${OUT:-out/fp8-quality}
WORK=$(mktemp -d)
mkdir -p "$OUT"
head -c 20480 calibration/heldout/valid.txt > "$WORK/slice1.txt"
head -c $((40960 + 20480)) calibration/heldout/valid.txt | tail -c 20480 > "$WORK/slice2.txt"
rows=()
for v in "nvfp4-rtn|nvfp4|--method rtn" "mxfp4-rtn|mxfp4|--method rtn" \
         "nvfp4-gptq-ao|nvfp4|--method gptq --act-order --damp 0.1"; do
  IFS='|' read -r name fmt args <<< "$v"
  # shellcheck disable=SC2086
  "$Q" convert "$M" -o "$WORK/$name" --format "$fmt" $args --force -q --json > /dev/null
  for fp8 in 0 1; do
    for s in 1 2; do
      MIMO_FP8_PREFILL=$fp8 "$R" compare --device cuda --reference "$M" --candidate "$WORK/$name" \
        "$WORK/slice$s.txt" --json > "$WORK/$name.$fp8.$s.json"
      rows+=("$(python3 -c '
import json, sys
name, fp8, s, path = sys.argv[1:]
c = json.load(open(path))["result"]
print(json.dumps({"variant": name, "fp8_prefill": fp8 == "1", "slice": int(s),
  "ppl_bf16": c["reference"]["ppl"], "ppl": c["candidate"]["ppl"], "mean_kl": c["mean_kl"],
  "top1_agreement": c["top1_agreement"]}))' "$name" "$fp8" "$s" "$WORK/$name.$fp8.$s.json")")
      echo "${rows[-1]}"
    done
  done
done
printf '%s\n' "${rows[@]}" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
json.dump({"rows": rows}, open(sys.argv[1], "w"), indent=1)' "$OUT/fp8-quality.json"
