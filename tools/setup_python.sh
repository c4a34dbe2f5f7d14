#!/usr/bin/env bash
# Creates (once) the Python environment of the reference tools, outside the repository.
# torch from PyPI pulls CUDA wheels (about 5.5 GB): it is kept in the user's cache, not in the clone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
env_dir=${XCEPTION_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/xception/pyenv}
if [ ! -x "$env_dir/bin/python" ]; then
  python3 -m venv "$env_dir"
fi
stamp="$env_dir/.requirements"
if ! cmp -s "$here/requirements.txt" "$stamp"; then
  "$env_dir/bin/pip" install -q -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$stamp"
fi
echo "$env_dir/bin/python"
