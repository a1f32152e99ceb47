#!/usr/bin/env bash
# The rate of a slot move (server/CLUSTER.md §5): a sharded region of two quiverd nodes and its
# own etcd, on this machine. Node a owns every slot and is loaded with ENTITIES x FEATURES x
# EVENTS versions; node b joins with none, and each round moves another quarter of the slots
# (1,024: a quarter of the data) from a to b, run by `quiver cluster move`, while nothing else
# runs (ROUNDS at most 3). It prints each move's phases with their times, then per move: versions copied
# and caught up, seconds, versions per second, the fenced window (from the fence to the
# switch: the moving slots' writes are refused meanwhile), and both servers' CPU seconds.
#
#   benches/move.sh [--entities N] [--features F] [--events E] [--rounds R]
#
# Needs release builds (cargo build --release -p quiver-server -p quiver-tools -p quiver-bench)
# and etcd on the PATH (Debian: etcd-server). Loopback only: ports 23791/23801 (etcd), 51011-2.
set -euo pipefail
ENTITIES=200000 FEATURES=10 EVENTS=5 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES=$2; shift 2 ;;
    --features) FEATURES=$2; shift 2 ;;
    --events) EVENTS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/target/release
W=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
etcd --data-dir "$W/etcd" --listen-client-urls http://127.0.0.1:23791 \
  --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 >"$W/etcd.log" 2>&1 &
PIDS+=($!)
start() { # node port
  "$R/quiverd" --data-dir "$W/$1" --listen 127.0.0.1:$2 --metrics-listen 127.0.0.1:0 \
    --etcd http://127.0.0.1:23791 --node-id "$1" --cluster mv >"$W/$1.log" 2>&1 &
  PIDS+=($!)
}
live() { "$R/quiver" --addr http://127.0.0.1:51011 --json cluster status 2>/dev/null | grep -o '"live":true' | wc -l || true; }
start a 51011
for _ in $(seq 100); do [ "$(live)" = 1 ] && break; sleep 0.2; done
"$R/quiver" --addr http://127.0.0.1:51011 cluster init >/dev/null
start b 51012
for _ in $(seq 100); do [ "$(live)" = 2 ] && break; sleep 0.2; done
A=${PIDS[1]} B=${PIDS[2]}
for port in 51011 51012; do "$R/quiver-bench" setup --addr http://127.0.0.1:$port --features "$FEATURES" >/dev/null; done
"$R/quiver-bench" --server-pid "$A" ingest --addr http://127.0.0.1:51011 --entities "$ENTITIES" \
  --features "$FEATURES" --events "$EVENTS" --durability async
cpu() { # clock ticks of utime+stime of both servers
  echo $(( $(awk '{print $14 + $15}' /proc/$A/stat) + $(awk '{print $14 + $15}' /proc/$B/stat) ))
}
OUT=$W/moves.txt
[ "$ROUNDS" -le 3 ] || { echo "--rounds is at most 3" >&2; exit 2; }
for round in $(seq "$ROUNDS"); do
  first=$(( (round - 1) * 1024 )) to=b
  before=$(cpu)
  "$R/quiver" --addr http://127.0.0.1:51011 --json cluster move --slots $first..$((first + 1023)) --to $to |
    while IFS= read -r line; do echo "$(date +%s.%N) $line"; done | sed "s/^/$round $to /" | tee -a "$OUT"
  echo "$round $to cpu $(( $(cpu) - before ))" | tee -a "$OUT"
done
python3 - "$OUT" "$(getconf CLK_TCK)" <<'PY'
import json, sys
moves, tck = {}, int(sys.argv[2])
for line in open(sys.argv[1]):
    rnd, to, rest = line.split(" ", 2)
    m = moves.setdefault((rnd, to), {"phases": {}, "last": None, "cpu": 0})
    if rest.startswith("cpu "):
        m["cpu"] = int(rest.split()[1]) / tck
        continue
    t, js = rest.split(" ", 1)
    p = json.loads(js)
    m["phases"].setdefault(p["phase"], float(t))
    m["last"] = (float(t), p)
for (rnd, to), m in moves.items():
    ph, (t_end, p) = m["phases"], m["last"]
    t0 = min(ph.values())
    n = p["versions_copied"] + p["versions_caught_up"]
    fenced = t_end - ph["fence"] if "fence" in ph else float("nan")
    print(f"round {rnd} to {to}: {p['versions_copied']:,} copied + {p['versions_caught_up']:,} caught up in "
          f"{t_end - t0:.2f} s = {n / (t_end - t0):,.0f} versions/s; copy {ph.get('catch-up', t_end) - t0:.2f} s; "
          f"fenced {fenced * 1000:.0f} ms; servers' CPU {m['cpu']:.2f} s")
PY
