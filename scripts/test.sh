#!/usr/bin/env bash
# The project's test command (the README's second command). CPU only; GPU tests skip themselves
# unless MIMO_REQUIRE_GPU=1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --all-targets
