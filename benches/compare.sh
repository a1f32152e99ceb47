#!/usr/bin/env bash
# Side by side: Quiver against Redis on the same online requests, in one run, with one client
# harness (quiver-bench), alternating the two systems at each step.
#
#   benches/compare.sh [--entities N] [--features F] [--duration S] [--out DIR]
#
# It installs redis-server (Debian) if missing, starts its own Redis (loopback, port 6390, no
# persistence) and its own quiverd (temp data dir, port 50071), loads the same N entities x F
# float features into both, checks that both answer the same on a sample, then measures:
#   1. one-entity F-feature lookups (Redis HMGET) at concurrency 1, 16, 64 (closed loop);
#   2. batches of 100 entities (Redis: a pipeline of 100 HMGETs) at concurrency 16;
#   3. Quiver open loop at 80% of its closed-loop maximum at concurrency 64 (p99 target);
#   4. ingest over the streaming write with sync durability;
#   6. (Quiver only) what served-feature logging costs the online path: closed-loop lookups
#      (batch 1 and 100, concurrency 16) with the group logging 0%, 1% and 100% of entities,
#      with the answers logged and dropped in each run (from quiverd's metrics);
#   5. a point-in-time join of a 1,000,000-row spine over 100,000 entities x 100 hourly events x
#      10 features against DuckDB's ASOF JOIN (pip duckdb) on the same data as Parquet, every
#      output row compared (benches/join_compare.py); and the same join into a pyarrow Table
#      through the Python SDK over Arrow Flight and over the protobuf stream, against DuckDB's
#      ASOF JOIN fetched as Arrow; the same spine with windowed sums (aggregate features, 7 and
#      1 days) against DuckDB's window query, every row compared (benches/agg_join_compare.py);
#      then 10M values written from a pandas DataFrame through the SDK over Flight and over
#      WriteFeaturesStream (benches/python_ingest.py).
# Each online and ingest step also records the server's CPU time per request (or value), read
# from /proc/PID/stat over the measured window (quiver-bench --server-pid), and the memory each
# server holds the online set in (quiverd RSS; Redis used_memory and RSS). After Quiver's ingest
# the script waits for quiverd's background flushes and compactions to finish (Redis has none)
# so they are not charged to the lookups.
# Results: a table on stdout (and DIR/results.md) and every raw JSON line in DIR/results.jsonl.
#   --only online|join   runs one part; --join-entities/--join-events/--join-spine size the join.
#   --memory-mb M        quiverd's memory budget (default 4096; e.g. Redis's used_memory).
set -euo pipefail

ENTITIES=1000000
FEATURES=50
DURATION=10
OUT=""
ONLY=all
JOIN_ENTITIES=100000
JOIN_EVENTS=100
JOIN_SPINE=1000000
# Quiver's memory budget (hot tier 7/16, block cache 3/16, memtables 2/16; see the README's
# Limits); Redis holds the whole data set in memory, so give Quiver a comparable amount. Both
# figures are printed.
MEMORY_MB="${QUIVER_MEMORY_MB:-4096}"
while [ $# -gt 0 ]; do
  case "$1" in
    --entities) ENTITIES="$2"; shift 2 ;;
    --features) FEATURES="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --join-entities) JOIN_ENTITIES="$2"; shift 2 ;;
    --join-events) JOIN_EVENTS="$2"; shift 2 ;;
    --join-spine) JOIN_SPINE="$2"; shift 2 ;;
    --memory-mb) MEMORY_MB="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/quiver-compare.XXXXXX)"
OUT="${OUT:-$WORK}"
mkdir -p "$OUT"
REDIS_PORT=6390
QUIVER_PORT=50071
ADDR="http://127.0.0.1:$QUIVER_PORT"
REDIS="redis://127.0.0.1:$REDIS_PORT"

if ! command -v redis-server >/dev/null; then
  echo "installing redis-server..."
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
fi

echo "building (release)..."
(cd "$ROOT" && cargo build -j2 --release -q -p quiver-server -p quiver-bench -p quiver-tools)
QUIVERD="$ROOT/target/release/quiverd"
QUIVER="$ROOT/target/release/quiver"
# The join's Python side (DuckDB, and the Python SDK for the Arrow runs) lives in a venv.
PY="$ROOT/target/bench-venv/bin/python"
if [ "$ONLY" != online ]; then
  if ! "$PY" -c "import duckdb, numpy" 2>/dev/null; then
    echo "making a venv with duckdb (pip)..."
    python3 -m venv "$ROOT/target/bench-venv"
    "$PY" -m pip install --quiet --disable-pip-version-check duckdb numpy
  fi
  "$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$ROOT/python"
  "$PY" -m pip install --quiet --disable-pip-version-check "$ROOT/python"
fi
BENCH="$ROOT/target/release/quiver-bench"

cleanup() {
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  [ -n "${QUIVER_PID:-}" ] && kill "$QUIVER_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  # The data (1.6 GB a run) goes; the results stay.
  rm -rf "$WORK/quiver" "$WORK/join" "$WORK/dump.rdb"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --dir "$WORK" --loglevel warning >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
METRICS="127.0.0.1:50072"
"$QUIVERD" --data-dir "$WORK/quiver" --listen "127.0.0.1:$QUIVER_PORT" --metrics-listen "$METRICS" \
  --memory-budget-mb "$MEMORY_MB" \
  >"$WORK/quiverd.log" 2>&1 &
QUIVER_PID=$!
for _ in $(seq 100); do
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && grep -q "listening" "$WORK/quiverd.log"; then break; fi
  sleep 0.1
done

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
run() { "$BENCH" --json "$@" | tee -a "$RESULTS"; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_mib() { echo $(( $(awk '/VmRSS/ {print $2}' "/proc/$1/status") / 1024 )); }
# Waits (at most 300 s) until quiverd uses under 3% of a core for 2 s: its flushes and
# compactions after an ingest are done.
settle() {
  local start=$SECONDS a b
  for _ in $(seq 150); do
    a=$(cpu_ticks "$QUIVER_PID"); sleep 2; b=$(cpu_ticks "$QUIVER_PID")
    [ $((b - a)) -le 6 ] && break
  done
  echo "quiverd settled after ingest in $((SECONDS - start)) s"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $ENTITIES entities x $FEATURES features"
if [ "$ONLY" != join ]; then
"$BENCH" setup --addr "$ADDR" --features "$FEATURES" >/dev/null
run ingest --server-pid "$QUIVER_PID" --addr "$ADDR" --entities "$ENTITIES" --features "$FEATURES" --durability sync >/dev/null
settle
run ingest --server-pid "$REDIS_PID" --redis "$REDIS" --entities "$ENTITIES" --features "$FEATURES" >/dev/null
"$BENCH" check --addr "$ADDR" --redis "$REDIS" --entities "$ENTITIES" --features "$FEATURES" --sample 500
REDIS_USED=$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
HOT_BYTES=$("$QUIVER" --addr "$ADDR" admin stats 2>/dev/null | awk '/hot tier/ && /bytes/ {for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) v=$i} END {print v+0}')
echo "{\"mode\":\"memory\",\"values\":$((ENTITIES * FEATURES)),\"quiver_rss_mib\":$(rss_mib "$QUIVER_PID"),\"quiver_budget_mib\":$MEMORY_MB,\"redis_used_memory_mib\":$((REDIS_USED / 1048576)),\"redis_rss_mib\":$(rss_mib "$REDIS_PID"),\"quiver_hot_tier_bytes\":$HOT_BYTES,\"redis_used_memory_bytes\":$REDIS_USED}" | tee -a "$RESULTS"
echo "data dir $(du -sh "$WORK/quiver" | cut -f1)"

for c in 1 16 64; do
  for t in "--server-pid $QUIVER_PID --addr $ADDR" "--server-pid $REDIS_PID --redis $REDIS"; do
    # shellcheck disable=SC2086
    run online $t --entities "$ENTITIES" --features "$FEATURES" --batch 1 --concurrency "$c" \
      --duration "$DURATION" >/dev/null
  done
done
for t in "--server-pid $QUIVER_PID --addr $ADDR" "--server-pid $REDIS_PID --redis $REDIS"; do
  # shellcheck disable=SC2086
  run online $t --entities "$ENTITIES" --features "$FEATURES" --batch 100 --concurrency 16 \
    --duration "$DURATION" >/dev/null
done
MAX=$(python3 -c "
import json,sys
rows=[json.loads(l) for l in open('$RESULTS') if l.strip()]
r=[x for x in rows if x.get('target')=='quiver' and x.get('mode')=='closed' and x['batch']==1 and x['concurrency']==64]
print(r[-1]['requests_per_s'])")
RATE=$(python3 -c "print(round($MAX*0.8))")
run online --server-pid "$QUIVER_PID" --addr "$ADDR" --entities "$ENTITIES" --features "$FEATURES" --batch 1 \
  --concurrency 64 --duration "$DURATION" --rate "$RATE" >/dev/null

# Served-feature logging: the group re-applied with each sample rate (a new version over the same
# data), the same lookups, and the log's counters read around each run.
metric() { curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 == m {print $2 + 0}'; }
for rate in 0 0.01 1; do
  "$BENCH" setup --addr "$ADDR" --features "$FEATURES" --log-sample-rate "$rate" >/dev/null
  for b in 1 100; do
    logged0=$(metric quiver_served_log_answers_total); dropped0=$(metric quiver_served_log_dropped_total)
    line=$("$BENCH" --json online --server-pid "$QUIVER_PID" --addr "$ADDR" --entities "$ENTITIES" \
      --features "$FEATURES" --batch "$b" --concurrency 16 --duration "$DURATION")
    sleep 1
    logged=$(( $(metric quiver_served_log_answers_total) - logged0 ))
    dropped=$(( $(metric quiver_served_log_dropped_total) - dropped0 ))
    echo "$line" | sed "s/\"mode\":\"closed\"/\"mode\":\"logging\",\"log_sample_rate\":$rate,\"logged\":$logged,\"dropped\":$dropped/" \
      | tee -a "$RESULTS" >/dev/null
  done
done
"$BENCH" setup --addr "$ADDR" --features "$FEATURES" --log-sample-rate 0 >/dev/null
fi

if [ "$ONLY" != online ]; then
  echo "join: $JOIN_ENTITIES entities x $JOIN_EVENTS events x 10 features, spine of $JOIN_SPINE rows"
  "$BENCH" setup --addr "$ADDR" --group jb --features 10 >/dev/null
  "$BENCH" --json ingest --addr "$ADDR" --group jb --entities "$JOIN_ENTITIES" --events "$JOIN_EVENTS" \
    --features 10 --durability async | sed 's/"mode":"ingest"/"mode":"join-ingest"/' >>"$RESULTS"
  "$QUIVER" --addr "$ADDR" admin compact --full >/dev/null
  # As after the online ingest: the join starts once compactions are done, as DuckDB's does
  # on an idle machine.
  settle
  "$PY" "$ROOT/benches/join_compare.py" --addr "$ADDR" --quiver "$QUIVER" --entities "$JOIN_ENTITIES" \
    --events "$JOIN_EVENTS" --features 10 --spine "$JOIN_SPINE" --work "$WORK/join" --results "$RESULTS" \
    --server-pid "$QUIVER_PID" >/dev/null
  # The same spine with windowed sums (7 and 1 days) against DuckDB's window query.
  "$PY" "$ROOT/benches/agg_join_compare.py" --addr "$ADDR" --quiver "$QUIVER" --features 10 \
    --spine "$JOIN_SPINE" --work "$WORK/join" --results "$RESULTS" --server-pid "$QUIVER_PID" >/dev/null
  # Ingest from a DataFrame through the SDK: Flight against the protobuf stream.
  "$PY" "$ROOT/benches/python_ingest.py" --addr "$ADDR" --server-pid "$QUIVER_PID" --results "$RESULTS" >/dev/null
fi

python3 "$ROOT/benches/report.py" "$RESULTS" | tee "$OUT/results.md"
echo "raw results: $RESULTS"
