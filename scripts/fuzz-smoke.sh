#!/usr/bin/env bash
# Fuzz the checkpoint readers for a bounded time (issue 10).
#   scripts/fuzz-smoke.sh                 CI smoke run: every target for FUZZ_SECONDS (default 15) s
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh the `just fuzz` run
#   scripts/fuzz-smoke.sh TARGET...       only these targets
# Targets (fuzz/fuzz_targets/): safetensors_header, checkpoint_folder, model_config, fp4_checkpoint.
# The corpus (fuzz/corpus/<target>, ignored by git) is seeded from the real fixture files under
# tests/bad-inputs/ and models/. cargo-fuzz needs a nightly compiler; on stable we set
# RUSTC_BOOTSTRAP=1. When cargo-fuzz is missing or cannot build here the script prints a SKIP line
# and exits 0; a crash exits 1 and names the reproducer under fuzz/artifacts/<target>/ (copy it to
# fuzz/regressions/<target>/ and add a regression test; regressions seed every later run).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${FUZZ_SECONDS:-15}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(safetensors_header checkpoint_folder model_config fp4_checkpoint)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "SKIP: fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)"
  exit 0
fi
export RUSTC_BOOTSTRAP=1
# The first sanitizer build compiles every dependency again (38 min on 2 busy cores here; cache
# fuzz/target in CI); FUZZ_BUILD_TIMEOUT bounds it.
BUILD_TIMEOUT="${FUZZ_BUILD_TIMEOUT:-900}"
if ! (cd fuzz && timeout "$BUILD_TIMEOUT" cargo fuzz build -O --debug-assertions >/tmp/fuzz-build.$$.log 2>&1) ; then
  echo "SKIP: fuzz: cargo-fuzz could not build the targets within ${BUILD_TIMEOUT}s (needs RUSTC_BOOTSTRAP=1 or nightly, a C/C++ toolchain, and a warm fuzz/target); last lines:"
  tail -5 /tmp/fuzz-build.$$.log | sed 's/^/  /'
  rm -f /tmp/fuzz-build.$$.log
  exit 0
fi
rm -f /tmp/fuzz-build.$$.log

# Seeds: real safetensors files, configs, and folder inputs (config \n--\n index \n--\n shard).
seed() {
  local t=$1
  local dir=fuzz/corpus/$t
  mkdir -p "$dir"
  local i=0
  case $t in
    safetensors_header)
      for f in fuzz/regressions/$t/* tests/bad-inputs/good/*/model.safetensors tests/bad-inputs/source/*/*.safetensors \
               tests/bad-inputs/fp4/*/model.safetensors; do
        [ -f "$f" ] && cp "$f" "$dir/seed-$((i++))"
      done ;;
    model_config)
      for f in fuzz/regressions/$t/* tests/bad-inputs/good/*/config.json models/*/config.json tests/bad-inputs/fp4/*/config.json; do
        [ -f "$f" ] && cp "$f" "$dir/seed-$((i++))"
      done ;;
    checkpoint_folder|fp4_checkpoint)
      for f in fuzz/regressions/$t/*; do [ -f "$f" ] && cp "$f" "$dir/seed-$((i++))"; done
      for d in tests/bad-inputs/good/* tests/bad-inputs/fp4/* tests/bad-inputs/source/*; do
        [ -f "$d/config.json" ] || continue
        local shard=$d/model.safetensors index=""
        [ -f "$d/model.safetensors.index.json" ] && index=$d/model.safetensors.index.json && shard=$d/model-00001-of-00001.safetensors
        [ -f "$shard" ] || continue
        { cat "$d/config.json"; printf '\n--\n'; [ -n "$index" ] && cat "$index"; printf '\n--\n'; cat "$shard"; } > "$dir/seed-$((i++))"
      done ;;
  esac
}

status=0
for t in "${TARGETS[@]}"; do
  seed "$t"
  rm -rf "fuzz/artifacts/$t"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s ($(ls "fuzz/corpus/$t" | wc -l) corpus files)"
  if ! (cd fuzz && cargo fuzz run -O --debug-assertions "$t" "corpus/$t" -- \
          -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
          -print_final_stats=1 2>&1 | grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|stat::peak_rss|==[0-9]+==|SUMMARY|.*panicked|artifact_prefix|Test unit written)" ); then
    :
  fi
  if ls fuzz/artifacts/"$t"/crash-* fuzz/artifacts/"$t"/oom-* fuzz/artifacts/"$t"/timeout-* >/dev/null 2>&1; then
    echo "FAIL: fuzz: $t found inputs that crash, hang or exhaust memory:"
    ls fuzz/artifacts/"$t"/ | sed "s|^|  fuzz/artifacts/$t/|"
    status=1
  fi
done
exit $status
