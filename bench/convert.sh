#!/usr/bin/env bash
# Converter benchmark: throughput (GB/s of BF16 input) and peak RSS of RTN NVFP4 conversion on
# synthetic Llama-shaped BF16 checkpoints of about 2 GB and 8 GB (the sizes in BENCH_SIZES).
#
# Writes bench/results/convert-cpu.json (machine, date, commit, command, numbers). The source
# checkpoints are generated once into BENCH_DIR (default target/bench-convert) and reused; the
# source is in the page cache when converted (it was just written or read), so the numbers are
# warm-cache numbers. Peak RSS is /usr/bin/time's "Maximum resident set size".
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${BENCH_SIZES:-2 8}"
WORK="${BENCH_DIR:-target/bench-convert}"
RESULT="${BENCH_RESULT:-bench/results/convert-cpu.json}"
cargo build --release -p mimo-quant
BIN=target/release/mimo-quant
mkdir -p "$WORK" "$(dirname "$RESULT")"
rows=()
for gb in $SIZES; do
  src="$WORK/synthetic-${gb}gb"
  if [ ! -f "$src/config.json" ]; then
    "$BIN" fixture --synthetic-gb "$gb" --max-shard-size 5GB "$src"
  fi
  # Warm the page cache the same way for every size.
  cat "$src"/*.safetensors > /dev/null
  out="$WORK/out-${gb}gb"
  rm -rf "$out"
  cmd="$BIN convert $src -o $out --format nvfp4 --json --quiet"
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  /usr/bin/time -v $cmd > "$WORK/summary-${gb}gb.json" 2> "$WORK/time-${gb}gb.txt"
  user=$(awk -F': ' '/User time/ {print $2}' "$WORK/time-${gb}gb.txt")
  sys=$(awk -F': ' '/System time/ {print $2}' "$WORK/time-${gb}gb.txt")
  cpu_s=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
  load=$(cut -d' ' -f1 /proc/loadavg)
  rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time-${gb}gb.txt")
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/time-${gb}gb.txt")
  bytes_in=$(grep -m1 '"bytes_in"' "$WORK/summary-${gb}gb.json" | tr -dc '0-9')
  bytes_out=$(grep -m1 '"bytes_out"' "$WORK/summary-${gb}gb.json" | tr -dc '0-9')
  secs=$(grep -m1 '"seconds"' "$WORK/summary-${gb}gb.json" | sed 's/.*: *//; s/,//')
  gbps=$(awk -v b="$bytes_in" -v s="$secs" 'BEGIN { printf "%.3f", b / 1e9 / s }')
  rss_mb=$(awk -v k="$rss_kb" 'BEGIN { printf "%.1f", k / 1024 }')
  gb_per_cpu_s=$(awk -v b="$bytes_in" -v c="$cpu_s" 'BEGIN { printf "%.3f", b / 1e9 / c }')
  echo "size ~${gb} GB: ${bytes_in} bytes in, ${bytes_out} out, ${secs} s, ${gbps} GB/s, ${cpu_s} CPU s (${gb_per_cpu_s} GB per CPU-second), peak RSS ${rss_mb} MiB (wall ${wall}, load ${load_before} -> ${load})"
  rows+=("    {\"target_gb\": $gb, \"bytes_in\": $bytes_in, \"bytes_out\": $bytes_out, \"seconds\": $secs, \"input_gb_per_s\": $gbps, \"cpu_seconds\": $cpu_s, \"input_gb_per_cpu_second\": $gb_per_cpu_s, \"peak_rss_mib\": $rss_mb, \"loadavg_1min_before_after\": [$load_before, $load], \"command\": \"$cmd\"}")
  rm -rf "$out"
done
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
{
  echo "{"
  echo "  \"benchmark\": \"convert (RTN NVFP4, compressed-tensors layout, synthetic Llama-shaped BF16)\","
  echo "  \"machine\": {\"cpu\": \"$cpu\", \"cores\": $(nproc), \"memory_gib\": $(awk '/MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo)},"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
  echo "  \"script\": \"bench/convert.sh\","
  echo "  \"page_cache\": \"warm (source read once before each run)\","
  echo "  \"results\": ["
  for i in "${!rows[@]}"; do
    if [ "$i" -lt $((${#rows[@]} - 1)) ]; then echo "${rows[$i]},"; else echo "${rows[$i]}"; fi
  done
  echo "  ]"
  echo "}"
} > "$RESULT"
echo "wrote $RESULT"
