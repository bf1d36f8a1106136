#!/usr/bin/env bash
# Sets up everything the test suite needs (Debian packages, libvirtd with
# the test driver and QEMU/TCG, nats-server, tansu, stunnel, helm,
# kubernetes-validate, cargo-fuzz) and runs the whole suite: formatting,
# lints, unit and property tests, the end-to-end tests against real
# servers (TLS and authentication included), the chaos soak (every fault on
# both buses, deploy/soak.sh), the deployment checks (Helm
# chart, rendered manifests, container packages, systemd unit, example
# configs), and a short fuzzing run of the message decoders. Needs root (apt-get, libvirtd) and a Rust toolchain
# (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local-env.sh toolchain
bash deploy/local-env.sh start

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
# --all-targets leaves out test = false targets (the soak): lint it too.
cargo clippy --locked --test soak -- -D warnings
echo "== cargo test"
# Test binaries run one after another (the libvirtd-restart test restarts
# the shared daemon); tests inside a binary run in parallel.
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cargo test --locked 2>&1 | tee "$LOG"
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"

echo "== chaos soak (every fault x bus cell once, on a private libvirtd; docs/testing.md)"
# Not part of plain `cargo test` (test = false in Cargo.toml): its own step.
bash deploy/soak.sh

echo "== Helm chart and Kubernetes manifests (helm lint/template, offline schema validation, check-config of the rendered config)"
# The debug binary cargo test built is enough for check-config.
cargo build --locked --bin virtstream --quiet
VIRTSTREAM_BIN=target/debug/virtstream bash deploy/check-manifests.sh

echo "== cargo fuzz (message decoders and consumer state machines, ${FUZZ_SECONDS:=60} s)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
# cargo fuzz passes nightly-only flags (-Zsanitizer=address); the one
# stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
RUSTC_BOOTSTRAP=1 cargo fuzz run decode --fuzz-dir tests/fuzz -- \
  -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1 | tail -n 25
