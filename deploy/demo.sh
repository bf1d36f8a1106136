#!/usr/bin/env bash
# One command to see virtstream work. Needs root (apt-get, libvirtd) and a
# Rust toolchain (rustup).
#
# NATS first: installs only what that needs (libvirtd with the test
# driver, nats-server, the packages the agent's build needs), builds the
# agent, runs it against test+unix:///default with a NATS and a Kafka
# sink, drives a domain through its lifecycle with virsh, and prints the
# messages as they land in JetStream.
#
# Kafka when its broker is there: tansu, the Kafka-protocol test broker,
# is not packaged in Debian and is built once with `cargo install` (about
# 16 minutes, then cached in ~/.cargo/bin). When it is missing, the demo
# starts that build in the background at low priority, logging to
# /var/tmp/virtstream-tansu-build.log. Meanwhile the agent keeps the Kafka
# sink's messages in its journal; once tansu runs they are delivered and
# printed as read from Kafka.
#
#   deploy/demo.sh              # NATS now, Kafka as soon as tansu is built
#   deploy/demo.sh --kafka      # the same, and wait for the Kafka part
#   deploy/demo.sh --no-kafka   # NATS only; tansu is not built
#   (or DEMO_KAFKA=background|wait|off)
#
# Interactive: keeps the agent running and toggles the demo domain every
# few seconds until Ctrl-C, and shows the Kafka part when tansu is ready.
# Non-interactive (CI, pipes): runs once; the Kafka part only when tansu
# is already built or with --kafka.
# The tansu build is an installation step: it goes on when the demo ends
# (stop it with the kill command the demo prints; a stopped build resumes
# where it stopped on the next run).
#
# Other settings: NATS_PORT (4222), KAFKA_PORT (9092), METRICS
# (127.0.0.1:9477), LIBVIRT_URI (test+unix:///default; another libvirtd's
# test driver, e.g. one from deploy/libvirt-host.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${DEMO_KAFKA:-background}
for arg in "$@"; do
  case "$arg" in
    --kafka) MODE="wait" ;;
    --no-kafka) MODE="off" ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "usage: $0 [--kafka | --no-kafka]" >&2; exit 64 ;;
  esac
done
case "$MODE" in
  background | wait | off) ;;
  *) echo "demo.sh: DEMO_KAFKA must be background, wait or off (not '$MODE')" >&2; exit 64 ;;
esac

START=$SECONDS
say() { # a step, with the time since the demo started
  local t=$((SECONDS - START))
  printf '== [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*"
}

bash deploy/local-env.sh toolchain
say "installing and starting what the NATS part needs (libvirtd, nats-server, build packages)"
bash deploy/local-env.sh start-base
say "building the agent (release build; a few minutes the first time)"
cargo build --release --locked
BIN=${CARGO_TARGET_DIR:-target}/release/virtstream

# The background tansu build: its log, and its process (a session of its
# own, so Ctrl-C here does not stop it) while it runs.
TANSU_BUILD=${TANSU_BUILD_DIR:-/var/tmp/virtstream-tansu-build}
TANSU_LOG=$TANSU_BUILD.log
TANSU_PIDFILE=$TANSU_BUILD.pid
tansu_path() { bash deploy/local-env.sh tansu-path 2>/dev/null || true; }
build_pid() { # the running build's pid (= its process group), if any
  local p
  p=$(cat "$TANSU_PIDFILE" 2>/dev/null) || return 0
  if tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -q install-tansu; then echo "$p"; fi
}
build_progress() {
  echo "$(grep -c '^ *Compiling' "$TANSU_LOG" 2>/dev/null || true) crates compiled so far"
}
BUILD_STARTED=
start_tansu_build() {
  local pid
  BUILD_STARTED=1
  pid=$(build_pid)
  if [ -z "$pid" ]; then
    local nice=(nice -n 19)
    [ "$MODE" = wait ] && nice=()
    # shellcheck disable=SC2016 # $$ and $1 are the inner shell's
    setsid "${nice[@]}" bash -c 'echo $$ >"$1"; exec bash deploy/local-env.sh install-tansu' \
      sh "$TANSU_PIDFILE" >"$TANSU_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 50); do
      pid=$(build_pid)
      [ -n "$pid" ] && break
      sleep 0.1
    done
    say "building tansu (the Kafka test broker; about 16 minutes, once) in the background${nice[*]:+ at low priority}"
  else
    say "tansu is already being built in the background ($(build_progress))"
  fi
  echo "   log:  tail -f $TANSU_LOG"
  echo "   stop: kill -- -$pid   (it goes on after the demo ends; the next run resumes a stopped build)"
}

# Started after the agent's build, not beside it: on two cores they would
# share the CPU, and the agent's build is what the NATS part waits for.
TANSU=$(tansu_path)
if [ -z "$TANSU" ] && [ "$MODE" != off ]; then
  start_tansu_build
fi

WORK=$(mktemp -d /tmp/virtstream-demo.XXXXXX)
NATS_PORT=${NATS_PORT:-4222}
KAFKA_PORT=${KAFKA_PORT:-9092}
METRICS=${METRICS:-127.0.0.1:9477}
URI=${LIBVIRT_URI:-test+unix:///default}
# Without a controlling terminal (setsid): virsh then starts no polkit
# agent, which warns on every call where polkitd is not running.
V() { setsid -w virsh -q -c "$URI" "$@" </dev/null; }
cleanup() {
  if [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null; then wait "$AGENT" 2>/dev/null || true; fi
  for pid in "${NATS_PID:-}" "${KAFKA_PID:-}" "${HOLD:-}"; do
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then wait "$pid" 2>/dev/null || true; fi
  done
  V destroy demo-vm >/dev/null 2>&1 || true
  V undefine demo-vm >/dev/null 2>&1 || true
  rm -rf "$WORK"
  pid=$(build_pid)
  if [ -n "$pid" ]; then
    echo "== the tansu build goes on in the background ($(build_progress)): tail -f $TANSU_LOG;"
    echo "   stop it with: kill -- -$pid. Once it is done, deploy/demo.sh shows the Kafka part too."
  fi
}
trap cleanup EXIT

start_tansu() {
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$WORK/kafka.log" 2>&1 &
  KAFKA_PID=$!
}

nats-server -js -sd "$WORK/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
if [ -n "$TANSU" ] && [ "$MODE" != off ]; then
  start_tansu
fi
# The test driver keeps its domains only while a connection is open.
virsh -q -c "$URI" event --all --loop </dev/null >/dev/null 2>&1 &
HOLD=$!

cat >"$WORK/agent.toml" <<TOML
[host]
id = "demo-host"
[libvirt]
uri = "$URI"
[journal]
path = "$WORK/journal"
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
[metrics]
listen = "$METRICS"
TOML
if [ "$MODE" != off ]; then
  # Without a broker yet the sink reports itself failing and the journal
  # keeps its messages until tansu runs.
  cat >>"$WORK/agent.toml" <<TOML
[kafka]
brokers = ["127.0.0.1:$KAFKA_PORT"]
partitions = 3
replication = 1
readback_idle = "1s"
TOML
fi
say "config ($WORK/agent.toml), as the agent sees it:"
$BIN check-config --config "$WORK/agent.toml"

$BIN run --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
if [ "$MODE" != off ] && [ -z "${KAFKA_PID:-}" ]; then
  say "agent started (log $WORK/agent.log); it gives the absent Kafka broker up to 15 s to answer at start"
fi
readyz() { curl -s "http://$METRICS/readyz" 2>/dev/null || true; }
for _ in $(seq 1 600); do
  R=$(readyz)
  case "$R" in *"libvirt: connected"*"sink nats: ready"*) break ;; esac
  if ! kill -0 "$AGENT" 2>/dev/null; then
    echo "demo.sh: the agent exited; its log:" >&2
    cat "$WORK/agent.log" >&2
    exit 1
  fi
  sleep 0.1
done
say "/readyz"
readyz

cat >"$WORK/demo-vm.xml" <<XML
<domain type='test'><name>demo-vm</name><memory>65536</memory><vcpu>2</vcpu><os><type>hvm</type></os></domain>
XML
say "driving demo-vm: define, start, suspend, resume, destroy, undefine"
V define "$WORK/demo-vm.xml" >/dev/null
V start demo-vm >/dev/null
V suspend demo-vm >/dev/null
V resume demo-vm >/dev/null
V destroy demo-vm >/dev/null
V undefine demo-vm >/dev/null
sleep 1

show() {
  $BIN replay --config "$WORK/agent.toml" --bus nats --from-stream-seq "$1" |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    print("stream_seq=%-4s host_seq=%-4s seq=%-3s %-10s %-9s %-14s %-9s -> %-8s persistent=%s" % (
        m["stream_seq"], m["host_seq"], m["seq"], m["origin"], m["event"], m["detail"],
        m["domain"]["name"] or "(host)", m["state_after"]["state"], m["persistent"]))
'
}
say "messages in JetStream stream VIRT_EVENTS (decoded from Avro):"
show 1
say "one message in full:"
$BIN replay --config "$WORK/agent.toml" --bus nats --from-stream-seq 2 | head -1
say "fleet state rebuilt from the bus (virtstream state --bus nats):"
$BIN state --config "$WORK/agent.toml" --bus nats --format table
say "continuity (virtstream audit --bus nats):"
$BIN audit --config "$WORK/agent.toml" --bus nats || true

KAFKA_SHOWN=
# Starts tansu if needed, waits until the agent's Kafka sink has delivered
# its journal, and prints what Kafka holds.
kafka_part() {
  if [ -z "${KAFKA_PID:-}" ]; then
    TANSU=$(tansu_path)
    start_tansu
    say "tansu is built and running on 127.0.0.1:$KAFKA_PORT; the agent's Kafka sink connects and sends what it journaled meanwhile"
  fi
  local backlog=""
  for _ in $(seq 1 600); do
    backlog=$(curl -s "http://$METRICS/metrics" | awk '/^virtstream_sink_backlog\{sink="kafka"\}/ { print $2 }')
    case "$(readyz)" in *"sink kafka: ready"*) [ "$backlog" = 0 ] && break ;; esac
    sleep 0.1
  done
  if [ "$backlog" != 0 ]; then
    echo "demo.sh: the Kafka sink has not caught up within 60 s; /readyz and the agent's log (tansu's: $WORK/kafka.log):" >&2
    readyz >&2
    tail -n 20 "$WORK/agent.log" >&2
    return 0
  fi
  local out n
  out=$($BIN replay --config "$WORK/agent.toml" --bus kafka |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    print("partition=%s offset=%-3s host_seq=%-4s seq=%-3s %-10s %-9s %-14s %-9s -> %s" % (
        m["partition"], m["offset"], m["host_seq"], m["seq"], m["origin"], m["event"], m["detail"],
        m["domain"]["name"] or "(host)", m["state_after"]["state"]))
')
  n=$(printf '%s\n' "$out" | grep -c . || true)
  if [ "$n" -gt 30 ]; then
    say "the same messages in Kafka topic virt.domain.events.v1 (keyed by domain UUID; $n in all, the last 30):"
    printf '%s\n' "$out" | tail -n 30
  else
    say "the same messages in Kafka topic virt.domain.events.v1 (keyed by domain UUID):"
    printf '%s\n' "$out"
  fi
  say "continuity (virtstream audit --bus kafka):"
  $BIN audit --config "$WORK/agent.toml" --bus kafka || true
  KAFKA_SHOWN=1
}

build_failed() { # the build ended without a binary
  [ -n "$BUILD_STARTED" ] && [ -z "$(build_pid)" ] && [ -z "$(tansu_path)" ]
}
report_failed_build() {
  say "the tansu build ended without a broker (failed or stopped); the end of $TANSU_LOG:"
  tail -n 15 "$TANSU_LOG" || true
  echo "   deploy/local-env.sh install-tansu builds it in the foreground; deploy/demo.sh starts it again."
}

if [ "$MODE" != off ]; then
  if [ -n "${KAFKA_PID:-}" ]; then
    kafka_part
  elif [ "$MODE" = wait ]; then
    say "waiting for the tansu build (--kafka); Ctrl-C stops the demo, not the build"
    LAST=$SECONDS
    while [ -z "$(tansu_path)" ]; do
      if build_failed; then
        report_failed_build
        exit 1
      fi
      if [ $((SECONDS - LAST)) -ge 60 ]; then
        say "still building tansu: $(build_progress)"
        LAST=$SECONDS
      fi
      sleep 2
    done
    kafka_part
  elif [ -t 0 ] && [ -z "${CI:-}" ]; then
    say "Kafka part: here once tansu is built. Until then /readyz reports the Kafka sink failing and the journal keeps its messages."
  fi
fi

if [ -t 0 ] && [ -z "${CI:-}" ]; then
  say "agent running; toggling demo-vm every 3 s (Ctrl-C to stop)"
  V define "$WORK/demo-vm.xml" >/dev/null
  SEQ=$(($($BIN replay --config "$WORK/agent.toml" --bus nats | wc -l) + 1))
  FAIL_SHOWN=
  while true; do
    if [ "$(V domstate demo-vm)" = "running" ]; then V destroy demo-vm >/dev/null; else V start demo-vm >/dev/null; fi
    sleep 3
    OUT=$(show "$SEQ")
    if [ -n "$OUT" ]; then
      echo "$OUT"
      SEQ=$((SEQ + $(echo "$OUT" | wc -l)))
    fi
    if [ "$MODE" != off ] && [ -z "$KAFKA_SHOWN" ]; then
      if [ -n "$(tansu_path)" ]; then
        kafka_part
        say "agent running with both sinks; toggling demo-vm every 3 s (Ctrl-C to stop)"
      elif [ -z "$FAIL_SHOWN" ] && build_failed; then
        report_failed_build
        FAIL_SHOWN=1
      fi
    fi
  done
fi
if [ "$MODE" = background ] && [ -z "$KAFKA_SHOWN" ]; then
  say "Kafka part skipped: tansu is not built yet (the agent's Kafka sink is failing and the journal keeps its messages). deploy/demo.sh --kafka waits for the build and shows it."
fi
say "metrics (excerpt):"
curl -s "http://$METRICS/metrics" | grep -E "^virtstream_(libvirt_events_received|sink_published|sink_backlog|journal_backlog_entries|libvirt_connected)" || true
