#!/usr/bin/env bash
# Cold batch lookups: the SSD tier's io_uring backend against its pread backend, on a data set
# several times larger than quiverd's memory budget (hot tier + block cache), in one run.
#
#   benches/cold.sh [--entities N] [--features F] [--batch B] [--concurrency C] [--duration S]
#                   [--rounds R] [--memory-mb M] [--out DIR]
#
# It loads N entities x F float features into a quiverd (async writes, then a full compaction
# so every read goes to the bottom level), then restarts quiverd on that directory R times with
# each backend, alternating, and runs the same closed-loop batch lookups (B random entities x F
# features per request, C requests in flight) against each. Both backends read with O_DIRECT, so
# the page cache serves neither; the block cache (M/2 MiB) and the hot tier (M/8 MiB) are each
# restart's only caches. It prints the median of each backend and their ratio; every raw JSON
# line (tagged with "backend") goes to DIR/cold.jsonl.
set -euo pipefail

ENTITIES=1000000
FEATURES=50
BATCH=100
CONCURRENCY=16
DURATION=10
ROUNDS=3
MEMORY_MB=64
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES="$2"; shift 2 ;;
    --features) FEATURES="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --memory-mb) MEMORY_MB="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/quiver-cold.XXXXXX)"
OUT="${OUT:-$WORK}"
mkdir -p "$OUT"
PORT=50072
ADDR="http://127.0.0.1:$PORT"

echo "building (release)..."
(cd "$ROOT" && cargo build -j2 --release -q -p quiver-server -p quiver-bench -p quiver-tools)
QUIVERD="$ROOT/target/release/quiverd"
QUIVER="$ROOT/target/release/quiver"
BENCH="$ROOT/target/release/quiver-bench"

start() {
  "$QUIVERD" --data-dir "$WORK/quiver" --listen "127.0.0.1:$PORT" --metrics-listen off \
    --memory-budget-mb "$MEMORY_MB" --io-backend "$1" >"$WORK/quiverd.log" 2>&1 &
  QUIVER_PID=$!
  for _ in $(seq 600); do
    if grep -q "listening" "$WORK/quiverd.log"; then return; fi
    sleep 0.1
  done
  echo "quiverd did not start:" >&2
  cat "$WORK/quiverd.log" >&2
  exit 1
}
stop() {
  kill "$QUIVER_PID" 2>/dev/null || true
  wait "$QUIVER_PID" 2>/dev/null || true
  QUIVER_PID=""
}
trap '[ -n "${QUIVER_PID:-}" ] && kill "$QUIVER_PID" 2>/dev/null || true' EXIT

RESULTS="$OUT/cold.jsonl"
: >"$RESULTS"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $ENTITIES entities x $FEATURES features;" \
  "memory budget ${MEMORY_MB} MiB (block cache $((MEMORY_MB / 2)) MiB, hot tier $((MEMORY_MB / 8)) MiB)"
start auto
"$BENCH" setup --addr "$ADDR" --features "$FEATURES" >/dev/null
"$BENCH" ingest --addr "$ADDR" --entities "$ENTITIES" --features "$FEATURES" --durability async >/dev/null
"$QUIVER" --addr "$ADDR" admin compact --full >/dev/null
stop
echo "data directory: $(du -sh "$WORK/quiver" | cut -f1) on $(df --output=source "$WORK" | tail -1)"

for round in $(seq "$ROUNDS"); do
  for backend in io_uring pread; do
    start "$backend"
    "$BENCH" --json online --addr "$ADDR" --entities "$ENTITIES" --features "$FEATURES" --batch "$BATCH" \
      --concurrency "$CONCURRENCY" --duration "$DURATION" |
      sed "s/^{/{\"backend\":\"$backend\",\"round\":$round,/" >>"$RESULTS"
    "$QUIVER" --addr "$ADDR" admin stats | grep "ssd tier" | sed "s/^/  $backend round $round: /"
    stop
  done
done

python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {}
print("| backend | values/s per run | median values/s | median p50 / p99 µs |")
print("|---|---|---|---|")
for b in ("io_uring", "pread"):
    rs = [r for r in rows if r["backend"] == b]
    v = [r["values_per_s"] for r in rs]
    med[b] = statistics.median(v)
    p50 = statistics.median(r["latency_us"]["p50"] for r in rs)
    p99 = statistics.median(r["latency_us"]["p99"] for r in rs)
    print(f"| {b} | {', '.join(f'{x:,.0f}' for x in v)} | {med[b]:,.0f} | {p50:,.0f} / {p99:,.0f} |")
print(f"io_uring / pread: {med['io_uring'] / med['pread']:.2f}")
EOF
echo "raw results: $RESULTS"
