#!/usr/bin/env bash
# End-to-end check of the converter through the built binary, as a user runs it: for every fixture
# architecture, write the fixture, plan it, convert it to each FP4 layout, inspect and verify the
# result against the source. Exits non-zero on the first failure. (The same paths are covered by
# `cargo test -p mimo-quant --test convert`; this script is the shell-level smoke test.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mimo-quant
BIN=target/release/mimo-quant
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for arch in llama mistral qwen2 qwen3 mimo mixtral qwen2_moe qwen3_moe deepseek_v3; do
  "$BIN" fixture --arch "$arch" "$WORK/$arch" > /dev/null
  "$BIN" plan "$WORK/$arch" --quiet > /dev/null
  for opts in "--format nvfp4" "--format mxfp4" "--format nvfp4 --layout modelopt"; do
    out="$WORK/$arch-$(echo "$opts" | tr -d ' -')"
    # shellcheck disable=SC2086
    "$BIN" convert "$WORK/$arch" -o "$out" $opts --quiet
    "$BIN" inspect "$out" > /dev/null
    "$BIN" verify "$out" --source "$WORK/$arch" > /dev/null
    echo "ok: $arch $opts"
  done
done
