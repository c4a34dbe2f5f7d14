# Shared by the scripts: the build cache lives outside the clone so fresh clones (and CI) reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xception/target}"
XCEPTION_BIN="$CARGO_TARGET_DIR/release/xception"
