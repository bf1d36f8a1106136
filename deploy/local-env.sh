#!/usr/bin/env bash
# Installs (Debian, apt) and starts the local environment virtstream runs and
# is tested against: libvirtd (test driver + QEMU under TCG) with virtlogd,
# the nats-server binary, and the tansu Kafka-protocol broker (built once
# with cargo: not in Debian), and stunnel (a TLS terminator the Kafka TLS
# tests put in front of tansu), and the Python packages of the soak's
# independent bus reader and of the source benchmark's baseline bridge
# (in a venv). Idempotent: running it twice is harmless.
#
#   deploy/local-env.sh install       # everything the tests need (needs root)
#   deploy/local-env.sh start         # install + virtlogd + libvirtd (needs root)
#   deploy/local-env.sh install-base  # only what building the agent and the NATS
#                                     # demo need: libvirtd, nats-server, build packages
#   deploy/local-env.sh start-base    # install-base + virtlogd + libvirtd (the demo)
#   deploy/local-env.sh install-tansu # only tansu (cargo install, ~16 min once);
#                                     # prints the build's progress
#   deploy/local-env.sh tansu-path    # the tansu binary; exit 1 when not installed
#   deploy/local-env.sh status        # what is running
#   deploy/local-env.sh toolchain     # fails with advice when cargo is missing
#   deploy/local-env.sh users         # the users, groups and directories libvirtd needs
#   deploy/local-env.sh oracle        # the Python venv only (soak reader, bench bridge)
#
# The brokers are not started here: tests start their own on random ports,
# and deploy/demo.sh starts them for the demo.
set -euo pipefail

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "local-env.sh: '$1' needs root (apt-get install and libvirtd as root)" >&2
    exit 1
  fi
}

# What building the agent and running it against libvirtd's test driver
# and nats-server need (the demo's NATS part): commands, then packages.
BASE_BINS=(nats-server libvirtd virtlogd virsh pkg-config curl python3 cc make perl)
BASE_PKGS=(nats-server libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev pkg-config curl python3 gcc libc6-dev make perl libssl-dev zlib1g-dev)
# What the tests add: QEMU for TCG domains, setpriv, stunnel (Kafka TLS
# tests), systemd-analyze (unit check), readelf (container packages check),
# Python's headers (libvirt-python, the source benchmark's bridge, is a C
# extension).
TEST_BINS=(qemu-system-x86_64 setpriv stunnel4 systemd-analyze readelf)
TEST_PKGS=(qemu-system-x86 util-linux stunnel4 systemd binutils python3-dev)

# install_packages base|all
install_packages() {
  local bins=("${BASE_BINS[@]}") pkgs=("${BASE_PKGS[@]}") missing=()
  if [ "$1" = all ]; then
    bins+=("${TEST_BINS[@]}")
    pkgs+=("${TEST_PKGS[@]}")
  fi
  for bin in "${bins[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  if ! pkg-config --exists libvirt 2>/dev/null; then missing+=(libvirt-dev); fi
  # Python.h: libvirt-python (the bench bridge's venv) is a C extension.
  if [ "$1" = all ] && ! python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    missing+=(python3-dev)
  fi
  # librdkafka (built from source by the rdkafka crate) links OpenSSL and zlib.
  if ! pkg-config --exists openssl 2>/dev/null; then missing+=(libssl-dev); fi
  if ! pkg-config --exists zlib 2>/dev/null; then missing+=(zlib1g-dev); fi
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  need_root install
  echo "local-env.sh: installing (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # libvirt-daemon-system would start services through systemd, which is not
  # running in containers and CI; we start the daemons by hand below.
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

TANSU_VERSION=0.6.0

# The clients we did not write, pinned, in their own venv: the soak's
# independent bus reader (tests/oracle/read_events.py: the official NATS
# and Kafka clients and fastavro), the interop tests (fastavro's schema
# fingerprints, confluent-kafka's partitioner, the CloudEvents SDK)
# (Debian's python3 refuses pip installs into the system). The source
# benchmark's baseline bridge (benches/bridge/bridge.py) runs there too and
# adds libvirt-python, pinned to the installed libvirt (it is built against
# libvirt-dev with pkg-config and a C compiler; its releases follow
# libvirt's version numbers).
ORACLE_VENV=${VIRTSTREAM_ORACLE_VENV:-/opt/virtstream-oracle}
# confluent-kafka with its schema-registry client and Avro deserializer
# (the registry interop test decodes what the agent published with them).
ORACLE_PIP=(fastavro==1.13.1 nats-py==2.16.0 "confluent-kafka[avro,schemaregistry]==2.16.1" cloudevents==1.12.1)
oracle_pip() {
  local v
  v=$(pkg-config --modversion libvirt 2>/dev/null) || {
    echo "local-env.sh: libvirt-dev (pkg-config libvirt) is needed for libvirt-python" >&2
    exit 1
  }
  echo "${ORACLE_PIP[@]}" "libvirt-python==$v"
}

install_oracle() {
  local py="$ORACLE_VENV/bin/python3" deps pip
  deps=$(oracle_pip)
  read -r -a pip <<<"$deps"
  if [ -x "$py" ] && "$py" -c '
import sys, importlib.metadata as m
want = dict(a.split("==") for a in sys.argv[1:])
sys.exit(any(m.version(k.split("[")[0]) != v for k, v in want.items()))' "${pip[@]}" 2>/dev/null &&
    "$py" -c 'import confluent_kafka.schema_registry.avro' 2>/dev/null; then
    return 0
  fi
  echo "local-env.sh: installing the clients we did not write (soak reader, bench bridge, interop tests) (${pip[*]}) in $ORACLE_VENV"
  if ! python3 -m venv "$ORACLE_VENV" 2>/dev/null; then
    need_root install
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$ORACLE_VENV"
  fi
  "$py" -m pip install --quiet --disable-pip-version-check "${pip[@]}"
}

tansu_bin() {
  command -v tansu 2>/dev/null || {
    local b="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    [ -x "$b" ] && echo "$b"
  }
}

# tansu is a Kafka-protocol broker written in Rust (Apache-2.0). The
# crates.io release needs the dynostore feature for in-memory storage
# (memory://); the build takes ~16 minutes once and is then cached in
# ~/.cargo/bin. One build at a time: deploy/demo.sh runs it in the
# background and deploy/test.sh in the foreground, and the second waits for
# the first and then finds the binary. The build directory is kept until
# the install succeeds, so an interrupted build resumes where it stopped.
TANSU_BUILD_DIR=${TANSU_BUILD_DIR:-/var/tmp/virtstream-tansu-build}

# install_tansu [progress]: with progress, cargo prints each crate it compiles.
install_tansu() {
  if [ -n "$(tansu_bin)" ]; then
    return 0
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "local-env.sh: cargo is needed to build tansu (the test Kafka broker); install Rust with rustup" >&2
    exit 1
  fi
  local quiet=(--quiet)
  [ "${1:-}" = progress ] && quiet=()
  # A subshell, so that the lock is not inherited by the daemons started later.
  (
    if ! flock -n 9; then
      echo "local-env.sh: another tansu build is running (deploy/demo.sh starts one in the background, log $TANSU_BUILD_DIR.log); waiting for it"
      flock 9
    fi
    if [ -n "$(tansu_bin)" ]; then
      exit 0
    fi
    echo "local-env.sh: building tansu $TANSU_VERSION (Kafka-protocol test broker; ~16 min, once; in $TANSU_BUILD_DIR)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
      --target-dir "$TANSU_BUILD_DIR" "${quiet[@]}"
    rm -rf "$TANSU_BUILD_DIR"
    echo "local-env.sh: tansu installed: $(tansu_bin)"
  ) 9>"$TANSU_BUILD_DIR.lock"
}

ensure_users() {
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt >/dev/null || groupadd -r libvirt
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu
  mkdir -p /var/log/libvirt /var/lib/libvirt /var/cache/libvirt /var/run/libvirt
  # A /dev/kvm that only root can open makes libvirt's QEMU capability cache
  # "outdated" on every lookup (KVM seen when probing as root, unavailable to
  # the qemu user when checking): each define then re-probes QEMU for ~30 s.
  # Domains here are type='qemu' (TCG); this only keeps the cache valid.
  if [ -c /dev/kvm ]; then
    if chgrp kvm /dev/kvm 2>/dev/null; then chmod 0660 /dev/kvm 2>/dev/null || true; fi
  fi
}

libvirt_alive() {
  timeout 5 virsh -c test+unix:///default list --all >/dev/null 2>&1
}

start_daemons() {
  need_root start
  ensure_users
  if ! pgrep -x virtlogd >/dev/null; then
    virtlogd --daemon
  fi
  if ! pgrep -x libvirtd >/dev/null; then
    libvirtd --daemon
  fi
  for _ in $(seq 1 100); do
    if libvirt_alive; then
      echo "local-env.sh: libvirtd is up (test+unix:///default, qemu:///system)"
      return 0
    fi
    sleep 0.1
  done
  echo "local-env.sh: libvirtd did not answer on test+unix:///default within 10 s" >&2
  exit 1
}

case "${1:-start}" in
  toolchain)
    # Rust comes from rustup, not apt (Debian's is too old for the crates).
    if ! command -v cargo >/dev/null 2>&1; then
      echo "local-env.sh: cargo not found. Install Rust 1.85 or newer with rustup (https://rustup.rs), then re-run." >&2
      exit 1
    fi
    ;;
  install) install_packages all; install_tansu; install_oracle ;;
  install-base) install_packages base ;;
  install-tansu) install_tansu progress ;;
  tansu-path) tansu_bin || exit 1 ;;
  users) need_root users; ensure_users ;;
  oracle) install_oracle ;;
  start) install_packages all; install_tansu; install_oracle; start_daemons ;;
  start-base) install_packages base; start_daemons ;;
  status)
    pgrep -a virtlogd || echo "virtlogd: not running"
    pgrep -a libvirtd || echo "libvirtd: not running"
    command -v nats-server || echo "nats-server: not installed"
    tansu_bin || echo "tansu: not installed"
    [ -x "$ORACLE_VENV/bin/python3" ] && echo "$ORACLE_VENV/bin/python3" || echo "soak bus reader: not installed"
    ;;
  *) echo "usage: $0 install|start|install-base|start-base|install-tansu|tansu-path|status|toolchain|users|oracle" >&2; exit 64 ;;
esac
