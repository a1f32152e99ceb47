#!/usr/bin/env bash
# The per-node figures the README's capacity section is computed from: one quiverd on this
# machine, ENTITIES x FEATURES float64 features (one event each), measured with quiver-bench:
#   - ingest (sync): values per second and the server's CPU per value;
#   - memory: the hot tier's bytes per value and the process's RSS, once flushes settle;
#   - disk: the data directory's bytes per value after a full compaction;
#   - online lookups of all FEATURES features, batch 1 and batch 100, concurrency 16, in ROUNDS
#     alternating rounds: requests per second and the server's CPU per request (medians).
#
#   benches/capacity.sh [--entities N] [--features F] [--rounds R] [--duration S] [--memory-mb M]
#
# Needs release builds (cargo build --release -p quiver-server -p quiver-tools -p quiver-bench).
# Loopback only: port 51021.
set -euo pipefail
ENTITIES=200000 FEATURES=200 ROUNDS=3 DURATION=6 MEMORY_MB=4096
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES=$2; shift 2 ;;
    --features) FEATURES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --memory-mb) MEMORY_MB=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
R=$ROOT/target/release
W=$(mktemp -d)
ADDR=http://127.0.0.1:51021
"$R/quiverd" --data-dir "$W/q" --listen 127.0.0.1:51021 --metrics-listen 127.0.0.1:0 \
  --memory-budget-mb "$MEMORY_MB" >"$W/quiverd.log" 2>&1 &
Q=$!
trap 'kill $Q 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
for _ in $(seq 100); do grep -q listening "$W/quiverd.log" && break; sleep 0.1; done
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
settle() { # until quiverd uses under 3% of a core for 2 s (at most 300 s)
  for _ in $(seq 150); do
    a=$(cpu_ticks $Q); sleep 2; b=$(cpu_ticks $Q)
    [ $((b - a)) -le 6 ] && break
  done
}
VALUES=$((ENTITIES * FEATURES))
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $ENTITIES entities x $FEATURES features"
"$R/quiver-bench" setup --addr $ADDR --features "$FEATURES" >/dev/null
"$R/quiver-bench" --server-pid $Q ingest --addr $ADDR --entities "$ENTITIES" --features "$FEATURES" --durability sync
settle
HOT=$("$R/quiver" --addr $ADDR admin stats | awk '/hot tier/ && /bytes/ {for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) v=$i} END {print v+0}')
RSS=$(awk '/VmRSS/ {print $2 * 1024}' /proc/$Q/status)
"$R/quiver" --addr $ADDR admin compact --full >/dev/null
settle
DISK=$(du -sb "$W/q" | cut -f1)
python3 -c "
v = $VALUES
print(f'memory: hot tier {$HOT / v:.1f} B/value, RSS {$RSS / v:.1f} B/value ({$RSS / 2**20:.0f} MiB, budget $MEMORY_MB MiB)')
print(f'disk after a full compaction: {$DISK / v:.1f} B/value ({$DISK / 2**20:.0f} MiB)')"
OUT=$W/online.txt
for round in $(seq "$ROUNDS"); do
  for batch in 1 100; do
    "$R/quiver-bench" --json --server-pid $Q online --addr $ADDR --entities "$ENTITIES" --features "$FEATURES" \
      --batch $batch --concurrency 16 --duration "$DURATION" --warmup 2 | sed "s/^/$batch /" | tee -a "$OUT"
  done
done
python3 - "$OUT" "$FEATURES" <<'PY'
import json, statistics, sys
runs, features = {}, int(sys.argv[2])
for line in open(sys.argv[1]):
    batch, js = line.split(" ", 1)
    runs.setdefault(int(batch), []).append(json.loads(js))
for batch, rs in sorted(runs.items()):
    med = lambda f: statistics.median(f(r) for r in rs)
    cpu = med(lambda r: r["server_cpu_us_per_request"])
    print(f"online, batch {batch} x {features} features: {med(lambda r: r['requests_per_s']):,.0f} req/s, "
          f"p50 {med(lambda r: r['latency_us']['p50']):,.0f} µs, p99 {med(lambda r: r['latency_us']['p99']):,.0f} µs, "
          f"server CPU {cpu:,.1f} µs/request ({cpu / batch / features * 1000:.0f} ns/value)")
PY
