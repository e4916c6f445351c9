#!/usr/bin/env bash
# _wide lm_head kernels (no carveout), MoE spread, batch-8 spread: A/B inside one call.
export RES=$OUT OUT=/tmp/o; source scripts/gpu-lib.sh; mkdir -p $OUT/j $RES
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ
echo "== wide test"; timeout 100 "$KT" --test-threads=1 wide fp4_gemm_matches > $OUT/kt.log 2>&1; echo "rc $?"; grep -E "test result|FAILED|panicked" $OUT/kt.log
run() { # label, shape, batches, env...
  local label=$1 cfg=$2 b=$3; shift 3
  env "$@" timeout 150 target/release/mimo-run bench --device cuda --config "bench/configs/$cfg.json" \
    --random-weights --fp4-head --formats nvfp4 --batches $b --steps 128 \
    --out "$OUT/j/$cfg-$label.json" > "$OUT/b-$cfg-$label.txt" 2>&1
  local rc=$?
  echo "$label $cfg b$b rc=$rc $* $(python3 -c "
import json,sys
d=json.load(open('$OUT/j/$cfg-$label.json'))
r=d['runs'][0]['decode']
print(' '.join('%s:%.1f'%(x['lm_head'],x['tokens_per_s']) for x in r))" 2>/dev/null)" | tee -a $RES/summary.txt
}
for rep in 1 2; do
  run def$rep mimo-7b 1 X=1
  run nowide$rep mimo-7b 1 MIMO_WIDE_KERNEL=0
  run b8def$rep mimo-7b 8 X=1
  run b8s$rep mimo-7b 8 MIMO_SPREAD_MAXM=8
done
run qdef1 qwen3-30b-a3b 1 X=1
run qnowide1 qwen3-30b-a3b 1 MIMO_WIDE_KERNEL=0
run qmoe1 qwen3-30b-a3b 1 MIMO_SPREAD_MOE=1
run qdef2 qwen3-30b-a3b 1 X=1
run qmoe2 qwen3-30b-a3b 1 MIMO_SPREAD_MOE=1
for wv in 1 0; do
  echo "== kernels lm_head MIMO_WIDE_KERNEL=$wv"
  MIMO_WIDE_KERNEL=$wv timeout 100 target/release/mimo-bench-kernels --no-sweep --ms 1 \
    --shapes 2048:151936,4096:151680 --out "$RES/kernels-wide$wv.json" > "$OUT/kw$wv.md" 2> "$OUT/kw$wv.err"; echo "rc $?"
  grep -E "fused\+PDL" "$OUT/kw$wv.err" | head
done
tar czf $RES/logs.tgz -C $OUT .
