#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, libvirtd with
# the test driver and QEMU/TCG, nats-server) and runs the whole suite:
# formatting, lints, unit tests and the end-to-end tests against real
# servers. Needs root (apt-get, libvirtd) and a Rust toolchain (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local-env.sh toolchain
bash deploy/local-env.sh start

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
# Test binaries run one after another (the libvirtd-restart test restarts
# the shared daemon); tests inside a binary run in parallel.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cargo test --locked 2>&1 | tee "$LOG"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"
