#!/usr/bin/env bash
# A private libvirt host: virtlogd + libvirtd in their own mount namespace,
# with their own /run/libvirt, /var/lib/libvirt, /etc/libvirt,
# /var/log/libvirt and /var/cache/libvirt bind-mounted from DIR, so they
# never touch the system daemon (its sockets, domains, pid files, logs).
# Used by the soak (a libvirtd restart and thousands of domains must not
# disturb other tests) and by the two-host migration tests (its own
# host_uuid): start two, then
#   virsh -c 'qemu:///system?socket=A/run/libvirt-sock' migrate --live NAME \
#     'qemu:///system?socket=B/run/libvirt-sock' --migrateuri tcp://127.0.0.1
#
#   deploy/libvirt-host.sh start DIR   # start; prints the two client URIs
#   deploy/libvirt-host.sh stop DIR    # kill both daemons (SIGKILL, wait)
#   deploy/libvirt-host.sh restart DIR # libvirtd only: kill, start again
#   deploy/libvirt-host.sh stop-libvirtd DIR # libvirtd only (start brings it back)
#   deploy/libvirt-host.sh status DIR
#
# Clients reach it with
#   test+unix:///default?socket=DIR/run/libvirt-sock
#   qemu:///system?socket=DIR/run/libvirt-sock
# Needs root (mount namespaces, libvirtd). DIR must not be under one of
# the five directories above.
set -euo pipefail

usage() { echo "usage: $0 start|stop|restart|stop-libvirtd|status DIR" >&2; exit 64; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "libvirt-host.sh: needs root (mount namespace, libvirtd)" >&2
  exit 1
fi

# host dir -> the path it is mounted over inside the namespace
MOUNTS=(run:/run/libvirt lib:/var/lib/libvirt etc:/etc/libvirt log:/var/log/libvirt cache:/var/cache/libvirt)

pid_of() { # the daemon's pid from its pid file, if that process is still it
  local f="$DIR/$1.pid" p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  # A reused pid is not ours: the daemon was started with -p "$f".
  if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$f"; then echo "$p"; fi
}

prepare() {
  # The qemu driver refuses to start without its user and groups.
  bash "$(dirname "$0")/local-env.sh" users
  for m in "${MOUNTS[@]}"; do
    mkdir -p "$DIR/${m%%:*}" "${m#*:}"
  done
  chmod 0755 "$DIR/run"
  if [ ! -f "$DIR/etc/libvirtd.conf" ]; then
    # Its own host UUID: libvirt refuses a migration between hosts with
    # the same one.
    cat >"$DIR/etc/libvirtd.conf" <<EOF
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  fi
  # The system's client config (default URIs) inside the namespace too.
  for f in libvirt.conf libvirt-admin.conf; do
    if [ -f "/etc/libvirt/$f" ] && [ ! -f "$DIR/etc/$f" ]; then
      cp "/etc/libvirt/$f" "$DIR/etc/$f"
    fi
  done
}

# Runs "$@" inside a new mount namespace with the private directories.
in_namespace() {
  local binds=""
  for m in "${MOUNTS[@]}"; do
    binds+="mount --bind '$DIR/${m%%:*}' '${m#*:}' && "
  done
  unshare -m --propagation private sh -c "${binds}exec \"\$@\"" sh "$@"
}

wait_socket() {
  local i
  for i in $(seq 1 300); do
    if timeout 5 virsh -c "test+unix:///default?socket=$DIR/run/libvirt-sock" \
      uri >/dev/null 2>&1; then
      return 0
    fi
    if [ -z "$(pid_of libvirtd)" ] && [ "$i" -gt 20 ]; then break; fi
    sleep 0.1
  done
  echo "libvirt-host.sh: libvirtd in $DIR did not answer; its log:" >&2
  tail -n 30 "$DIR/log/libvirtd.log" >&2 2>/dev/null || true
  return 1
}

start_libvirtd() {
  in_namespace libvirtd --daemon -p "$DIR/libvirtd.pid"
  wait_socket
}

start() {
  prepare
  if [ -z "$(pid_of virtlogd)" ]; then
    in_namespace virtlogd --daemon -p "$DIR/virtlogd.pid"
  fi
  if [ -z "$(pid_of libvirtd)" ]; then
    start_libvirtd
  fi
  echo "test+unix:///default?socket=$DIR/run/libvirt-sock"
  echo "qemu:///system?socket=$DIR/run/libvirt-sock"
}

kill_daemon() {
  local p i
  p=$(pid_of "$1")
  [ -n "$p" ] || return 0
  kill -9 "$p" 2>/dev/null || true
  for i in $(seq 1 200); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.05
  done
  rm -f "$DIR/$1.pid"
}

case "$cmd" in
  start) start ;;
  stop) kill_daemon libvirtd; kill_daemon virtlogd ;;
  restart) kill_daemon libvirtd; start_libvirtd ;;
  stop-libvirtd) kill_daemon libvirtd ;;
  status)
    p=$(pid_of libvirtd); echo "libvirtd: ${p:-not running}"
    p=$(pid_of virtlogd); echo "virtlogd: ${p:-not running}"
    ;;
  *) usage ;;
esac
