#!/usr/bin/env bash
# One command to see virtstream work: installs and starts the local
# environment (libvirtd with the test driver, nats-server, the tansu
# Kafka-protocol broker), builds the agent, runs it against
# test+unix:///default with both sinks, drives a domain through its
# lifecycle with virsh, and prints the messages as they land in JetStream
# and in Kafka.
# Needs root (apt-get, libvirtd) and a Rust toolchain (rustup).
#
# Interactive: keeps the agent running and toggles the demo domain every
# few seconds until Ctrl-C. Non-interactive (CI, pipes): runs once.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local-env.sh toolchain
bash deploy/local-env.sh start
cargo build --release --locked
BIN=target/release/virtstream

WORK=$(mktemp -d /tmp/virtstream-demo.XXXXXX)
NATS_PORT=${NATS_PORT:-4222}
KAFKA_PORT=${KAFKA_PORT:-9092}
METRICS=${METRICS:-127.0.0.1:9477}
URI=test+unix:///default
cleanup() {
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
  [ -n "${NATS:-}" ] && kill "$NATS" 2>/dev/null || true
  [ -n "${KAFKA:-}" ] && kill "$KAFKA" 2>/dev/null || true
  [ -n "${HOLD:-}" ] && kill "$HOLD" 2>/dev/null || true
  virsh -q -c "$URI" destroy demo-vm >/dev/null 2>&1 || true
  virsh -q -c "$URI" undefine demo-vm >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

nats-server -js -sd "$WORK/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS=$!
TANSU=$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine memory://tansu/ >"$WORK/kafka.log" 2>&1 &
KAFKA=$!
# The test driver keeps its domains only while a connection is open.
virsh -q -c "$URI" event --all --loop >/dev/null 2>&1 &
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
[kafka]
brokers = ["127.0.0.1:$KAFKA_PORT"]
partitions = 3
replication = 1
readback_idle = "1s"
[metrics]
listen = "$METRICS"
TOML
echo "== config ($WORK/agent.toml), as the agent sees it:"
$BIN check-config --config "$WORK/agent.toml"

$BIN run --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 1 300); do
  curl -fs "http://$METRICS/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "== /readyz"
curl -s "http://$METRICS/readyz"

cat >"$WORK/demo-vm.xml" <<XML
<domain type='test'><name>demo-vm</name><memory>65536</memory><vcpu>2</vcpu><os><type>hvm</type></os></domain>
XML
V="virsh -q -c $URI"
echo "== driving demo-vm: define, start, suspend, resume, destroy, undefine"
$V define "$WORK/demo-vm.xml" >/dev/null
$V start demo-vm >/dev/null
$V suspend demo-vm >/dev/null
$V resume demo-vm >/dev/null
$V destroy demo-vm >/dev/null
$V undefine demo-vm >/dev/null
sleep 1

show() {
  $BIN replay --config "$WORK/agent.toml" --bus nats --from-stream-seq "$1" |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    print("stream_seq=%-4s host_seq=%-4s seq=%-3s %-10s %-9s %-14s %-9s -> %-8s persistent=%s" % (
        m["stream_seq"], m["host_seq"], m["seq"], m["origin"], m["event"], m["detail"],
        m["domain"]["name"] or "(host)", m["state_after"]["state"], m["persistent"]))
    last = m["stream_seq"]
' 
}
echo "== messages in JetStream stream VIRT_EVENTS (decoded from Avro):"
show 1
echo "== one message in full:"
$BIN replay --config "$WORK/agent.toml" --bus nats --from-stream-seq 2 | head -1
echo "== the same messages in Kafka topic virt.domain.events.v1 (keyed by domain UUID):"
$BIN replay --config "$WORK/agent.toml" --bus kafka |
  python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    print("partition=%s offset=%-3s host_seq=%-4s seq=%-3s %-10s %-9s %-14s %-9s -> %s" % (
        m["partition"], m["offset"], m["host_seq"], m["seq"], m["origin"], m["event"], m["detail"],
        m["domain"]["name"] or "(host)", m["state_after"]["state"]))
'

echo "== fleet state rebuilt from the bus (virtstream state --bus nats):"
$BIN state --config "$WORK/agent.toml" --bus nats --format table
echo "== continuity (virtstream audit --bus kafka):"
$BIN audit --config "$WORK/agent.toml" --bus kafka || true

if [ -t 0 ] && [ -z "${CI:-}" ]; then
  echo "== agent running; toggling demo-vm every 3 s (Ctrl-C to stop)"
  $V define "$WORK/demo-vm.xml" >/dev/null
  SEQ=$(( $($BIN replay --config "$WORK/agent.toml" --bus nats | wc -l) + 1 ))
  while true; do
    if [ "$($V domstate demo-vm)" = "running" ]; then $V destroy demo-vm >/dev/null; else $V start demo-vm >/dev/null; fi
    sleep 3
    OUT=$(show "$SEQ")
    if [ -n "$OUT" ]; then echo "$OUT"; SEQ=$(( SEQ + $(echo "$OUT" | wc -l) )); fi
  done
fi
echo "== metrics (excerpt):"
curl -s "http://$METRICS/metrics" | grep -E "^virtstream_(libvirt_events_received|sink_published|journal_backlog_entries|libvirt_connected)" || true
