#!/usr/bin/env bash
# Sets up the Python environment of the interop harness (tests/interop): a virtual environment
# with every package of tests/interop/requirements.lock.txt, installed with --no-deps, kept in a
# cache folder and reused while the lock file and the Python version stay the same.
#
#   scripts/interop-setup.sh        # prints the environment's folder on stdout
#
# Exit status: 0 ready (folder on stdout); 3 the packages cannot be installed on this machine
# at all (no Python >= 3.11 with venv, PyPI unreachable, or too little disk): the reason is the
# one line on stdout; anything else is a real failure (e.g. a pinned wheel PyPI does not have).
# Cache folder: $MIMO_INTEROP_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/mimo-quant-interop.
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=tests/interop/requirements.lock.txt
CACHE=${MIMO_INTEROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mimo-quant-interop}
PY=${MIMO_INTEROP_PYTHON:-python3}
NEED_GIB=6 # measured: the environment takes 4.3 GiB, plus room for pip's unpacking

skip() { echo "$1"; exit 3; }
log() { echo "interop-setup: $*" >&2; }

command -v "$PY" >/dev/null 2>&1 || skip "no $PY on this machine"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || skip "$PY does not run"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  skip "$PY is $pyver; compressed-tensors 0.20.0 needs Python >= 3.11"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || skip "$PY has no venv/ensurepip module"

key=$( (cat "$LOCK"; echo "python $pyver") | sha256sum | cut -c1-16)
VENV=$CACHE/venv-$key
if [ -f "$VENV/.ready" ]; then
  log "reusing $VENV"
  echo "$VENV"
  exit 0
fi

mkdir -p "$CACHE"
free_kib=$(df -Pk "$CACHE" | awk 'NR==2 {print $4}')
[ "$free_kib" -ge $((NEED_GIB * 1024 * 1024)) ] ||
  skip "only $((free_kib / 1024 / 1024)) GiB free under $CACHE; the environment needs ${NEED_GIB} GiB"

# A partial environment (an interrupted run) is rebuilt from scratch.
rm -rf "$VENV"
log "creating $VENV (Python $pyver)"
"$PY" -m venv "$VENV" >&2 || skip "$PY -m venv failed"
t0=$(date +%s)
# Three pip processes side by side (torch; the nvidia libraries; the rest): with --no-deps their
# package sets are disjoint, and downloading one while another unpacks saves about a third of
# the cold time on a 2-core machine.
parts=$(mktemp -d)
grep -E '^torch==' "$LOCK" >"$parts/a.txt"
grep -E '^nvidia-' "$LOCK" >"$parts/b.txt"
grep -vE '^(torch==|nvidia-|#|$)' "$LOCK" >"$parts/c.txt"
pids=()
for p in a b c; do
  "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir --no-deps \
    --only-binary=:all: -r "$parts/$p.txt" >"$parts/$p.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in 0 1 2; do
  wait "${pids[$i]}" || failed=1
done
if [ $failed -ne 0 ]; then
  tail -n 5 "$parts"/*.log >&2
  rm -rf "$parts"
  # Tell "PyPI cannot be reached" (skip) from "the lock asks for something PyPI lacks" (fail).
  probe=$(mktemp -d)
  if ! "$VENV/bin/python" -m pip download --disable-pip-version-check --no-cache-dir --no-deps \
    -q -d "$probe" iniconfig==2.3.1 >/dev/null 2>&1; then
    rm -rf "$probe" "$VENV"
    skip "PyPI cannot be reached from this machine (pip download of a small pinned wheel failed)"
  fi
  rm -rf "$probe" "$VENV"
  log "pip install failed although PyPI answers: the pinned set is wrong for this machine"
  exit 1
fi
rm -rf "$parts"
"$VENV/bin/python" -c 'import torch, transformers, compressed_tensors, safetensors, numpy, pytest' >&2 || {
  log "the environment was installed but does not import"
  exit 1
}
touch "$VENV/.ready"
log "installed in $(($(date +%s) - t0)) s, $(du -sh "$VENV" | cut -f1)"
# Environments of older lock files are not needed any more.
for old in "$CACHE"/venv-*; do
  [ "$old" = "$VENV" ] || rm -rf "$old"
done
echo "$VENV"
