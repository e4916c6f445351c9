#!/usr/bin/env bash
# The interop harness (tests/interop, issue 5): converts the embedded model with mimo-quant into
# every layout we write, dumps our own dequantization, and checks the files with the reference
# libraries (compressed-tensors, transformers) and against mimo-run. CPU only.
#
#   scripts/interop.sh [extra pytest arguments]
#
# Exit status: pytest's (0 = every check passed). It prints "SKIP: ..." and exits 0 only when
# the Python packages cannot be installed on this machine at all (see interop-setup.sh).
# Writes $MIMO_INTEROP_WORK (default target/interop): the converted folders, our dequantization
# (ours/*.safetensors) and summary.json (every check's outcome and numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
t0=$(date +%s)

set +e
VENV=$(scripts/interop-setup.sh)
rc=$?
set -e
if [ $rc -eq 3 ]; then
  echo "SKIP: interop harness not run: $VENV"
  exit 0
fi
[ $rc -eq 0 ] || exit $rc
t_setup=$(($(date +%s) - t0))

WORK=${MIMO_INTEROP_WORK:-$ROOT/target/interop}
SOURCE=$ROOT/models/mimo-tiny-moe
cargo build -q -p mimo-quant -p mimo-runtime -p mimo-interop-dequant-dump --bins
BIN=$ROOT/target/debug

rm -rf "$WORK"
mkdir -p "$WORK/ours"
convert() { # name, extra args
  local name=$1
  shift
  "$BIN/mimo-quant" convert "$SOURCE" -o "$WORK/$name" --quiet "$@"
  "$BIN/mimo-interop-dequant-dump" "$WORK/$name" "$WORK/ours/$name.safetensors" >"$WORK/ours/$name.json"
}
convert ct-nvfp4 --format nvfp4 --layout compressed-tensors
convert ct-mxfp4 --format mxfp4 --layout compressed-tensors
convert modelopt-nvfp4 --format nvfp4 --layout modelopt
t_build=$(($(date +%s) - t0 - t_setup))

export MIMO_INTEROP_WORK=$WORK MIMO_INTEROP_SOURCE=$SOURCE MIMO_RUN=$BIN/mimo-run
export MIMO_INTEROP_SUMMARY=$WORK/summary.json
# Results must not depend on the core count; pin torch's threads to the machine's.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
set +e
"$VENV/bin/python" -m pytest tests/interop -q -p no:cacheprovider -rfEX "$@"
rc=$?
set -e
t_total=$(($(date +%s) - t0))
echo "interop: setup ${t_setup}s, build+convert ${t_build}s, total ${t_total}s; summary: $MIMO_INTEROP_SUMMARY"
exit $rc
