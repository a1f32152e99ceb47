#!/usr/bin/env bash
# Replication throughput and lag under bulk ingest: two regions, each a release quiverd on
# loopback, peering with each other. It ingests N entities x F float features into region 1
# (streaming writes, sync), then times how long region 2 takes to hold all of it (its
# replication status shows region 1 caught up, with the cursor at region 1's last batch).
#
#   benches/replication.sh [--entities N] [--features F] [--durability sync|async]
#
# It prints region 1's ingest rate, the time from the end of the ingest until region 2 caught
# up, and the replicated rate over the whole run (values / (ingest time + catch-up time)).
set -euo pipefail

ENTITIES=200000
FEATURES=50
DURABILITY=sync
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES="$2"; shift 2 ;;
    --features) FEATURES="$2"; shift 2 ;;
    --durability) DURABILITY="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/quiver-repl.XXXXXX)"
echo "building (release)..."
(cd "$ROOT" && cargo build -j2 --release -q -p quiver-server -p quiver-bench -p quiver-tools)
QUIVERD="$ROOT/target/release/quiverd"
QUIVER="$ROOT/target/release/quiver"
BENCH="$ROOT/target/release/quiver-bench"
P1=50081
P2=50082
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
start() { # region port peer-region peer-port
  "$QUIVERD" --data-dir "$WORK/r$1" --listen "127.0.0.1:$2" --metrics-listen off --memory-budget-mb 1024 \
    --region "$1" --peer "$3=127.0.0.1:$4" >"$WORK/r$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do
    if grep -q "listening" "$WORK/r$1.log"; then return; fi
    sleep 0.1
  done
  echo "quiverd did not start:" >&2
  cat "$WORK/r$1.log" >&2
  exit 1
}
start 1 $P1 2 $P2
start 2 $P2 1 $P1
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $ENTITIES entities x $FEATURES features, $DURABILITY"
"$BENCH" setup --addr "http://127.0.0.1:$P1" --features "$FEATURES" >/dev/null
# The registry replicates: wait for it in region 2 before timing.
for _ in $(seq 100); do
  if "$QUIVER" --addr "http://127.0.0.1:$P2" replication status | grep -q " 1 .*streaming .* yes "; then break; fi
  sleep 0.1
done
start_ns=$(date +%s%N)
"$BENCH" ingest --addr "http://127.0.0.1:$P1" --entities "$ENTITIES" --features "$FEATURES" --durability "$DURABILITY"
ingested_ns=$(date +%s%N)
last=$("$QUIVER" --addr "http://127.0.0.1:$P1" replication status | sed -n 's/.*last sequence \([0-9]*\);.*/\1/p')
while true; do
  line=$("$QUIVER" --addr "http://127.0.0.1:$P2" replication status | awk '$1 == 1')
  cursor=$(echo "$line" | awk '{print $4}')
  caught=$(echo "$line" | awk '{print $7}')
  if [ "$caught" = yes ] && [ "$cursor" -ge "$last" ]; then break; fi
  sleep 0.01
done
done_ns=$(date +%s%N)
values=$((ENTITIES * FEATURES))
python3 - "$values" "$start_ns" "$ingested_ns" "$done_ns" <<'PY'
import sys
values, start, ingested, done = int(sys.argv[1]), *map(int, sys.argv[2:])
ingest_s, catch_s = (ingested - start) / 1e9, (done - ingested) / 1e9
print(f"region 1 ingested {values} values in {ingest_s:.2f} s ({values / ingest_s:,.0f} values/s)")
print(f"region 2 caught up {catch_s:.3f} s after the ingest ended; "
      f"replicated {values / (ingest_s + catch_s):,.0f} values/s over the run")
PY
"$QUIVER" --addr "http://127.0.0.1:$P2" replication status
