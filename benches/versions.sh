#!/usr/bin/env bash
# Group versions: what a backfill and shadow reads cost, in one run on one machine.
#   1. A file backfill into a staged version (`quiver backfill --from`, synced batches with
#      idempotency keys and a progress record) against `quiver ingest` of the same file into
#      the serving version, rows/s; then `quiver backfill --copy-from` (inside the engine),
#      cells/s.
#   2. Online lookups of the serving version (quiver-bench, closed loop) with no shadow, with
#      --shadow-sample-rate 0.01 and with 1 (every lookup shadowed): requests/s and quiverd's
#      CPU per request (/proc/PID/stat), one quiverd per setting over the same data.
# Usage: benches/versions.sh [--rows N] [--entities N] [--features N] [--duration S] [--out DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ROWS=1000000
ENTITIES=100000
FEATURES=50
DURATION=10
OUT="$ROOT/target/bench-versions"
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS="$2"; shift 2 ;;
    --entities) ENTITIES="$2"; shift 2 ;;
    --features) FEATURES="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 1 ;;
  esac
done
mkdir -p "$OUT"
WORK="$(mktemp -d)"
PORT=50081
ADDR="127.0.0.1:$PORT"
echo "building (release)..."
(cd "$ROOT" && cargo build -j2 --release -q -p quiver-server -p quiver-bench -p quiver-tools)
QUIVERD="$ROOT/target/release/quiverd"
QUIVER="$ROOT/target/release/quiver"
BENCH="$ROOT/target/release/quiver-bench"
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
start() { # data dir, extra flags...
  local dir="$1"; shift
  "$QUIVERD" --data-dir "$dir" --listen "$ADDR" --memory-budget-mb 2048 "$@" >"$dir.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do grep -q "listening" "$dir.log" 2>/dev/null && break; sleep 0.1; done
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"

# 1. Backfill.
python3 - "$WORK/rows.csv" "$ROWS" <<'EOF'
import sys
path, rows = sys.argv[1], int(sys.argv[2])
users = max(rows // 100, 1)
with open(path, "w") as f:
    f.write("user_id,event_time,clicks,spend\n")
    t0 = 1_767_225_600_000_000
    for i in range(rows):
        u, e = i % users, i // users
        f.write(f"u{u:07d},{t0 + e * 3_600_000_000},{i},{i / 4}\n")
EOF
registry() { cat <<EOF
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]
[[feature_groups]]
name = "user_stats"
entity_type = "user"
code_hash = "$1"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "spend"
type = "float64"
EOF
}
start "$WORK/backfill"
registry a >"$WORK/v1.toml"; registry b >"$WORK/v2.toml"; registry c >"$WORK/v3.toml"
"$QUIVER" --addr "http://$ADDR" apply "$WORK/v1.toml" >/dev/null
"$QUIVER" --addr "http://$ADDR" apply "$WORK/v2.toml" >/dev/null
"$QUIVER" --addr "http://$ADDR" apply "$WORK/v3.toml" >/dev/null
t=$(date +%s.%N)
"$QUIVER" --addr "http://$ADDR" ingest "$WORK/rows.csv" --group user_stats >/dev/null
ingest_s=$(python3 -c "import time; print(time.time() - $t)")
t=$(date +%s.%N)
"$QUIVER" --addr "http://$ADDR" backfill --group user_stats@2 --from "$WORK/rows.csv" --progress-file "$WORK/p.json" >/dev/null
backfill_s=$(python3 -c "import time; print(time.time() - $t)")
t=$(date +%s.%N)
"$QUIVER" --addr "http://$ADDR" backfill --group user_stats@3 --copy-from 1 --progress-file "$WORK/c.json" >/dev/null
copy_s=$(python3 -c "import time; print(time.time() - $t)")
stop
python3 - "$ROWS" "$ingest_s" "$backfill_s" "$copy_s" <<'EOF' | tee -a "$RESULTS"
import json, sys
rows, i, b, c = int(sys.argv[1]), *map(float, sys.argv[2:])
print(json.dumps({"mode": "backfill", "rows": rows, "values": 2 * rows,
    "ingest_rows_per_s": round(rows / i), "backfill_rows_per_s": round(rows / b),
    "backfill_vs_ingest": round(i / b, 2), "copy_cells_per_s": round(2 * rows / c),
    "ingest_s": round(i, 1), "backfill_s": round(b, 1), "copy_s": round(c, 1)}))
EOF

# 2. Shadow reads: the same data in each run; v2 shares v1's data (a description change), so
#    every shadowed cell is compared and matches.
for rate in none 0.01 1; do
  dir="$WORK/shadow-$rate"
  flags=()
  [ "$rate" != none ] && flags=(--shadow bench@2 --shadow-sample-rate "$rate")
  start "$dir" "${flags[@]}"
  "$BENCH" setup --addr "http://$ADDR" --features "$FEATURES" >/dev/null
  "$BENCH" ingest --addr "http://$ADDR" --entities "$ENTITIES" --features "$FEATURES" --durability async >/dev/null
  python3 - "$FEATURES" >"$dir.toml" <<'EOF'
import sys
n = int(sys.argv[1])
print('[[entity_types]]\nname = "bench_user"\njoin_keys = [{ name = "user_id", type = "string" }]')
print('[[feature_groups]]\nname = "bench"\nentity_type = "bench_user"\ndescription = "v2"')
for f in range(n):
    print(f'[[feature_groups.features]]\nname = "f{f}"\ntype = "float64"')
EOF
  "$QUIVER" --addr "http://$ADDR" apply "$dir.toml" >/dev/null
  for b in 1 100; do
    line=$("$BENCH" --json online --server-pid "$PID" --addr "http://$ADDR" --entities "$ENTITIES" \
      --features "$FEATURES" --batch "$b" --concurrency 16 --duration "$DURATION")
    shadow=$( ("$QUIVER" --addr "http://$ADDR" --json monitor --group bench 2>/dev/null || true) | python3 -c "
import json,sys
g=json.load(sys.stdin)['groups'][0].get('shadow') or {}
print(json.dumps({'shadow_lookups': g.get('lookups', 0), 'shadow_dropped': g.get('dropped', 0),
  'shadow_cells': sum(f['compared'] for f in g.get('features', []))}))")
    python3 -c "
import json,sys
r=json.loads(sys.argv[1]); r.update(json.loads(sys.argv[2])); r['shadow_rate']=sys.argv[3]
print(json.dumps(r))" "$line" "$shadow" "$rate" | tee -a "$RESULTS"
  done
  stop
done
echo "results in $RESULTS"
