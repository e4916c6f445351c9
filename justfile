# mimo-quant task runner. Every recipe is a thin wrapper over cargo or a script, so the README's commands
# work without `just` too.

default:
    @just --list

# Convert the embedded default model to NVFP4 and MXFP4 and generate from BF16 and FP4 (the README demo).
demo:
    ./scripts/demo.sh

# The full CPU test suite (what CI runs after fmt and clippy).
test:
    ./scripts/test.sh

# What CI runs.
ci:
    ./.ci/run

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Release binaries (mimo-quant, mimo-run).
build:
    cargo build --release --bins

# Fuzz the safetensors/index/config readers and the FP4 checkpoint reader, 60 s per target
# (cargo-fuzz; RUSTC_BOOTSTRAP=1 on stable). CI runs the short smoke: ./scripts/fuzz-smoke.sh.
fuzz seconds="60":
    FUZZ_SECONDS={{seconds}} ./scripts/fuzz-smoke.sh

# Conversion throughput and peak RSS on ~2 GB and ~8 GB synthetic checkpoints (bench/results/convert-cpu.json).
bench-convert:
    ./bench/convert.sh
