#!/usr/bin/env bash
# Runs every test of clip: unit tests, and integration tests against a real
# registry with real images (built on first use, see tests/fixtures).
# Run as root on Debian: the tests unpack images with device nodes and xattrs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo nextest run --workspace --lib --bins --tests --no-fail-fast "$@"
cargo test --workspace --doc
