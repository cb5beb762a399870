#!/usr/bin/env bash
# Builds every example plugin to plugins/dist/<name>.wasm.
# Needs the guest target once: rustup target add wasm32-wasip2
set -euo pipefail
cd "$(dirname "$0")"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "the wasm32-wasip2 target is missing: run \`rustup target add wasm32-wasip2\`" >&2
    exit 1
fi

# Guests get their own target directory so they never contend with the gateway build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/api-notify/target-guests}"
cargo build --release --target wasm32-wasip2 --quiet

mkdir -p dist
for crate in standard-webhooks json-envelope header-mapper template; do
    cp "${CARGO_TARGET_DIR}/wasm32-wasip2/release/${crate//-/_}.wasm" "dist/${crate}.wasm"
done
echo "built: $(ls dist/*.wasm | tr '\n' ' ')"
