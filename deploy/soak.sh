#!/usr/bin/env bash
# The chaos soak (tests/soak.rs): randomized lifecycle load on a private
# libvirtd, one fault per run, on NATS and Kafka, checked against libvirt
# by an independent reader. Prints one `soak: …` line per run and a table
# per (fault, bus) at the end; exits 1 when any run failed.
#
#   deploy/soak.sh                      # every (fault, bus) cell once (what CI runs)
#   deploy/soak.sh --minutes 60         # random seeds over all cells until time is up
#   deploy/soak.sh --cells kill9-late:nats,broker-stop --minutes 10
#   deploy/soak.sh --seed 123 --cells kill9-late:kafka   # replay one seed
#
# Needs root (a private libvirtd in its own mount namespace) and the
# environment of `bash deploy/local-env.sh install` (nats-server, tansu, the
# reader's Python packages). Logs of every run go to $SOAK_LOG_DIR
# (default: a new temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=""
cells=""
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1 (--minutes N, --cells LIST, --seed N)" >&2; exit 64 ;;
  esac
done

FAULTS="kill9-late kill9-backlog broker-stop libvirtd-restart queue-overflow journal-full"
ALL=""
for f in $FAULTS; do ALL+="$f:nats $f:kafka "; done
# Expand --cells (a fault alone means both buses) into fault:bus items.
if [ -n "$cells" ]; then
  list=""
  for c in ${cells//,/ }; do
    case "$c" in
      *:*) list+="$c " ;;
      *) list+="$c:nats $c:kafka " ;;
    esac
  done
else
  list=$ALL
fi

LOG_DIR=${SOAK_LOG_DIR:-$(mktemp -d /tmp/virtstream-soak.XXXXXX)}
mkdir -p "$LOG_DIR"
RESULTS="$LOG_DIR/results.txt"
: >"$RESULTS"
echo "soak.sh: logs in $LOG_DIR"

cargo test --locked --test soak --no-run --quiet

run() { # run CELLS [SEED]
  local log="$LOG_DIR/run-$(date +%s%N).log" rc=0
  env SOAK_CELLS="$1" ${2:+SOAK_SEED="$2"} cargo test --locked --test soak --quiet -- --nocapture --test-threads=1 \
    >"$log" 2>&1 || rc=$?
  grep '^soak: fault=' "$log" | tee -a "$RESULTS" || true
  if [ $rc -ne 0 ]; then
    grep -E '^  ' "$log" | grep -v -E '^ +[0-9]+: |^ +at ' | head -n 40 || true
    echo "   (full log: $log)"
  fi
  return 0
}

if [ -z "$minutes" ]; then
  # Every selected cell once, in one test run.
  run "$(echo $list | tr ' ' ',')" "$seed"
else
  end=$(( $(date +%s) + minutes * 60 ))
  set -- $list
  cells_arr=("$@")
  i=0
  while [ "$(date +%s)" -lt "$end" ]; do
    cell=${cells_arr[$(( i % ${#cells_arr[@]} ))]}
    s=${seed:-$(( (RANDOM << 15 | RANDOM) % 1000000000 ))}
    run "$cell" "$s"
    i=$((i + 1))
  done
fi

echo
echo "== soak table ($(grep -c . "$RESULTS" || true) runs)"
printf "%-17s %-5s %5s %8s %11s %10s %7s %11s %11s %11s %6s  %s\n" FAULT BUS RUNS DOMAINS WRONG_LAST DUPLICATES LOSSES GAP_MARKERS STATE_WRONG AUDIT_WRONG FAILED FAILING_SEEDS
awk '
  {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    k = v["fault"] " " v["bus"]
    runs[k]++; dom[k] += v["domains"]; wrong[k] += v["wrong_last_words"]
    dup[k] += v["duplicates"]; loss[k] += v["losses"]; gaps[k] += v["gap_markers"]
    st[k] += v["state_wrong"]; au[k] += v["audit_wrong"]
    if (v["result"] != "ok") { bad[k]++; seeds[k] = seeds[k] " " v["seed"] }
    split("", v)
  }
  END {
    for (k in runs) {
      split(k, fb, " ")
      printf "%-17s %-5s %5d %8d %11d %10d %7d %11d %11d %11d %6d %s\n", fb[1], fb[2], runs[k], dom[k], wrong[k], dup[k], loss[k], gaps[k], st[k], au[k], bad[k], seeds[k]
    }
  }' "$RESULTS" | sort

runs=$(grep -c . "$RESULTS" || true)
if [ -z "$minutes" ] && [ "$runs" -ne "$(echo $list | wc -w)" ]; then
  echo "soak.sh: $runs results for $(echo $list | wc -w) cells (a run ended early; see $LOG_DIR)" >&2
  exit 1
fi
if [ "$runs" -gt 0 ] && ! grep -v 'result=ok' "$RESULTS" | grep -q .; then
  exit 0
fi
exit 1
