#!/usr/bin/env bash
# A soak of one quiverd (by hand; figures in the README): mixed load for a long time, with
# memory, errors and shed load recorded.
#
#   benches/soak.sh [--minutes M] [--entities N] [--memory-mb MB] [--out DIR]
#
# quiverd (release, temp data dir, port 50081, metrics on 50082) gets N entities x 50 float
# features, then, for M minutes (default 30), all at once:
#   - one-entity lookups in an open loop at 80% of the closed-loop maximum (concurrency 64),
#     measured for 10 s while the three loads below already run (measured alone, the maximum
#     is more than the server can give the lookups beside them, and the open loop would only
#     build a backlog);
#   - a writer: 2,000 entities x 50 features over the streaming write every few seconds;
#   - a slow client: 500-entity lookups (about 200 KB answers) through a proxy that passes the
#     answers at 64 KiB/s, so the server must hold them while they trickle out;
#   - a connection flood: 1,000 silent TCP connections every 6 s, each left open 12 s (past the
#     10 s first-bytes timeout).
# Every 10 s it samples quiverd's RSS; at the end it reads the server's request counts by code
# (quiver_grpc_requests_total) and prints: RSS over time (first and last 5 minutes, max), the
# budget, requests by code, shed load, and the load generators' own results.
set -euo pipefail

MINUTES=30
ENTITIES=200000
MEMORY_MB=1024
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --entities) ENTITIES="$2"; shift 2 ;;
    --memory-mb) MEMORY_MB="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/quiver-soak.XXXXXX)"
OUT="${OUT:-$WORK}"
mkdir -p "$OUT"
PORT=50081
METRICS=50082
SLOW_PORT=50083
ADDR="http://127.0.0.1:$PORT"
SECONDS_TOTAL=$((MINUTES * 60))

echo "building (release)..."
(cd "$ROOT" && cargo build -j2 --release -q -p quiver-server -p quiver-bench)
QUIVERD="$ROOT/target/release/quiverd"
BENCH="$ROOT/target/release/quiver-bench"
HELPERS="$ROOT/benches/soak_helpers.py"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${QUIVER_PID:-}" ] && kill "$QUIVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK/data"
}
trap cleanup EXIT

ulimit -n 65536 2>/dev/null || true
"$QUIVERD" --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS" \
  --memory-budget-mb "$MEMORY_MB" >"$OUT/quiverd.log" 2>&1 &
QUIVER_PID=$!
for _ in $(seq 100); do
  grep -q "serving" "$OUT/quiverd.log" 2>/dev/null && break
  sleep 0.1
done

echo "loading $ENTITIES entities x 50 features..."
"$BENCH" setup --addr "$ADDR" --features 50 >/dev/null
"$BENCH" --json ingest --addr "$ADDR" --entities "$ENTITIES" --features 50 --rows-per-request 200 --streams 2 \
  | tee "$OUT/load.json"

# Every load but the lookups runs for the measurement as well as the soak.
LOAD_SECONDS=$((SECONDS_TOTAL + 20))

# RSS every 10 s.
(
  start=$(date +%s)
  while kill -0 "$QUIVER_PID" 2>/dev/null; do
    rss=$(awk '/VmRSS/ { print $2 }' "/proc/$QUIVER_PID/status" 2>/dev/null || echo 0)
    echo "$(( $(date +%s) - start )) $rss" >>"$OUT/rss.txt"
    sleep 10
  done
) &
PIDS+=($!)

# The slow client's proxy.
python3 "$HELPERS" throttle "$SLOW_PORT" "$PORT" 65536 &
PIDS+=($!)
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $SLOW_PORT), timeout=1)" 2>/dev/null && break
  sleep 0.1
done

"$BENCH" --json online --addr "http://127.0.0.1:$SLOW_PORT" --entities "$ENTITIES" --features 50 --batch 500 \
  --concurrency 4 --connections 1 --warmup 0 --duration "$LOAD_SECONDS" >"$OUT/slow.json" 2>"$OUT/slow.err" &
SLOW=$!
python3 "$HELPERS" flood "$PORT" 1000 6 "$LOAD_SECONDS" >"$OUT/flood.txt" 2>&1 &
FLOOD=$!
(
  end=$(( $(date +%s) + LOAD_SECONDS ))
  while [ "$(date +%s)" -lt "$end" ]; do
    "$BENCH" --json ingest --addr "$ADDR" --entities 2000 --features 50 --rows-per-request 100 --streams 1 \
      >>"$OUT/writes.jsonl" 2>>"$OUT/writes.err" || echo '{"failed": true}' >>"$OUT/writes.jsonl"
    sleep 3
  done
) &
WRITER=$!
PIDS+=("$WRITER")

echo "measuring the closed-loop maximum beside the other loads (concurrency 64, 10 s)..."
MAX=$("$BENCH" --json online --addr "$ADDR" --entities "$ENTITIES" --features 50 --batch 1 --concurrency 64 \
  --duration 10 | tee "$OUT/max.json" | python3 -c "import json,sys; print(json.load(sys.stdin)['requests_per_s'])")
RATE=$(python3 -c "print(round($MAX * 0.8))")
echo "max $MAX req/s; soaking at $RATE req/s for $MINUTES minutes"

"$BENCH" --json online --addr "$ADDR" --entities "$ENTITIES" --features 50 --batch 1 --concurrency 64 \
  --connections 4 --warmup 0 --duration "$SECONDS_TOTAL" --rate "$RATE" >"$OUT/open.json" 2>"$OUT/open.err" &
OPEN=$!

wait "$OPEN" || true
wait "$SLOW" || true
wait "$FLOOD" || true
wait "$WRITER" || true
curl -s "http://127.0.0.1:$METRICS/metrics" >"$OUT/metrics.txt"

python3 - "$OUT" "$MEMORY_MB" <<'EOF'
import json, sys
out, budget = sys.argv[1], int(sys.argv[2])
rss = [tuple(map(int, l.split())) for l in open(f"{out}/rss.txt") if l.strip()]
mib = lambda kb: kb / 1024
end = rss[-1][0]
first = [r for t, r in rss if 60 <= t <= 360]
last = [r for t, r in rss if t >= end - 300]
print(f"RSS (MiB, budget {budget}): minutes 1-6 {mib(min(first)):.0f}-{mib(max(first)):.0f}, "
      f"last 5 minutes {mib(min(last)):.0f}-{mib(max(last)):.0f}, max {mib(max(r for _, r in rss)):.0f}")
codes = {}
for l in open(f"{out}/metrics.txt"):
    if l.startswith("quiver_grpc_requests_total{"):
        labels, v = l.rsplit(" ", 1)
        code = labels.split('code="')[1].split('"')[0]
        codes[code] = codes.get(code, 0) + int(float(v))
    for name in ("quiver_requests_shed_total", "quiver_connections_silent_closed_total",
                 "quiver_connections_refused_total", "quiver_requests_rate_limited_total"):
        if l.startswith(name + " "):
            print(f"{name} {l.split()[1]}")
print("server requests by code:", json.dumps(codes, sort_keys=True))
for name in ("open", "slow"):
    try:
        r = json.load(open(f"{out}/{name}.json"))
        print(f"{name}: {r['requests']} requests, {r['errors']} errors ({r['first_error']}), "
              f"{r['requests_per_s']:.0f} req/s, p50 {r['latency_us']['p50']} µs, p99 {r['latency_us']['p99']} µs, "
              f"p99.9 {r['latency_us']['p999']} µs, max {r['latency_us']['max']} µs")
    except Exception as e:
        print(f"{name}: no result ({e})")
writes = [json.loads(l) for l in open(f"{out}/writes.jsonl") if l.strip()]
ok = [w for w in writes if not w.get("failed")]
print(f"writes: {len(ok)} ingest rounds ok, {len(writes) - len(ok)} failed, "
      f"{sum(w['values'] for w in ok)} values")
print(open(f"{out}/flood.txt").read().strip())
EOF
echo "raw results in $OUT"
