#!/usr/bin/env bash
# System packages the build needs (Debian): the HDF5 C library (Keras files, through the
# hdf5-metno binding) and cmake + nasm (libjpeg-turbo, built from the turbojpeg crate's source).
set -euo pipefail
need=()
for p in libhdf5-dev pkg-config cmake nasm; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >&2
fi
command -v cargo >/dev/null || { echo "cargo is required (rustup)" >&2; exit 1; }
