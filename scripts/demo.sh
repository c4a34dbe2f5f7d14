#!/usr/bin/env bash
# Builds the `xception` binary and runs it on the committed photos.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 1; }
cargo build --release --locked -p xception-cli
X="$XCEPTION_BIN"

echo "== the architecture, from its description =="
"$X" info --model xception
"$X" info --model xception65 --input-size 513 --output-stride 16 --no-top | tail -12

echo "== a timm-layout checkpoint through convert, classify and embed =="
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Until the model zoo lands, the checkpoint holds deterministic weights (the same the timm
# conformance tests use), so the classes printed are not meaningful; the pipeline is.
cargo run --release --locked -q -p xception --example write_deterministic -- legacy_xception "$work/legacy_xception_timm.safetensors"
"$X" convert "$work/legacy_xception_timm.safetensors" --out "$work/legacy_xception.safetensors"
"$X" classify --weights "$work/legacy_xception.safetensors" --top 3 fixtures/images/chelsea.jpg fixtures/images/coffee.png
"$X" embed --weights "$work/legacy_xception.safetensors" --out "$work/embeddings.npy" fixtures/images/*.png
