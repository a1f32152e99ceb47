#!/usr/bin/env bash
# The cost of forwarding (server/CLUSTER.md §4): a sharded region of two quiverd nodes and its
# own etcd, on this machine, measured two ways in alternating rounds:
#   plain:  every lookup sent to node a, which forwards the entities node b owns (one hop);
#   routed: the routing client (quiver-bench --route) sends each entity to its owner (no hop).
# It prints one JSON line per run, prefixed with "ROUND BATCH MODE", then the medians: requests
# per second, p50 and p99 latency (µs), and both servers' CPU time per request (µs, summed from
# /proc/PID/stat over the measured window).
#
#   benches/hop.sh [--entities N] [--features F] [--rounds R] [--duration S]
#
# Needs release builds (cargo build --release -p quiver-server -p quiver-tools -p quiver-bench)
# and etcd on the PATH (Debian: etcd-server). Loopback only: ports 23790/23800 (etcd), 51001-2.
set -euo pipefail
ENTITIES=100000 FEATURES=50 ROUNDS=3 DURATION=8
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES=$2; shift 2 ;;
    --features) FEATURES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/target/release
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
etcd --data-dir "$W/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 >"$W/etcd.log" 2>&1 &
PIDS+=($!)
for node in a b; do
  port=$([ $node = a ] && echo 51001 || echo 51002)
  "$R/quiverd" --data-dir "$W/$node" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
    --etcd http://127.0.0.1:23790 --node-id $node --cluster hop >"$W/$node.log" 2>&1 &
  PIDS+=($!)
done
A=${PIDS[1]} B=${PIDS[2]}
for _ in $(seq 100); do
  live=$("$R/quiver" --addr http://127.0.0.1:51001 --json cluster status 2>/dev/null | grep -o '"live":true' | wc -l || true)
  [ "$live" = 2 ] && break
  sleep 0.2
done
"$R/quiver" --addr http://127.0.0.1:51001 cluster init >/dev/null
for port in 51001 51002; do "$R/quiver-bench" setup --addr http://127.0.0.1:$port --features "$FEATURES" >/dev/null; done
"$R/quiver-bench" --server-pid "$A,$B" ingest --addr http://127.0.0.1:51001 --entities "$ENTITIES" \
  --features "$FEATURES" --durability async
OUT=$W/runs.txt
for round in $(seq "$ROUNDS"); do
  for batch in 1 100; do
    for mode in plain routed; do
      extra=()
      [ $mode = routed ] && extra=(--route)
      "$R/quiver-bench" --json --server-pid "$A,$B" online --addr http://127.0.0.1:51001 "${extra[@]}" \
        --entities "$ENTITIES" --features "$FEATURES" --batch $batch --concurrency 16 \
        --duration "$DURATION" --warmup 2 | sed "s/^/$round $batch $mode /" | tee -a "$OUT"
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    rnd, batch, mode, js = line.split(" ", 3)
    r = json.loads(js)
    runs.setdefault((int(batch), mode), []).append(r)
med = lambda rs, f: statistics.median(f(r) for r in rs)
for (batch, mode), rs in sorted(runs.items()):
    print(f"batch {batch:3} {mode:6}: {med(rs, lambda r: r['requests_per_s']):8.0f} req/s  "
          f"p50 {med(rs, lambda r: r['latency_us']['p50']):6.0f} µs  p99 {med(rs, lambda r: r['latency_us']['p99']):6.0f} µs  "
          f"server CPU {med(rs, lambda r: r['server_cpu_us_per_request']):7.1f} µs/request")
PY
