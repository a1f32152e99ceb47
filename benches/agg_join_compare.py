#!/usr/bin/env python3
"""Windowed aggregates in a point-in-time join: Quiver against DuckDB's window query on the same
data (called by compare.sh after join_compare.py, on the data set it describes).

Quiver: the group's aggregate features (`f<k>_sum`: 7-day sums of f0..f4, 1-day sums of f5..f9)
are declared by applying the group again with them (promoted; the written features keep their
data), and `quiver join` computes them for every spine row in its sort-merge pass.
DuckDB: the same sums over the events' Parquet file, as one window query over the events and
the spine rows together, partitioned by user and ordered by time, with a RANGE frame of the
window less 1 µs (so the frame is (t - window, t], ties at t included, as Quiver's window).
An empty window sums to 0 in Quiver and to NULL in DuckDB (coalesced to 0). Both read the spine
from Parquet and write their answer to Parquet, in alternating rounds (median reported), and
every output row is compared. The values are multiples of 0.5 below 500,000, so both sums are
exact whatever the order of addition. Results are appended as JSON lines.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb

from join_compare import server_cpu  # same directory: run as a script

DAY_US = 86_400_000_000


def windows(features):
    """(name, source, days) of each aggregate: 7-day sums of the first half, 1-day of the rest."""
    return [(f"f{k}_sum", f"f{k}", 7 if k < features // 2 else 1) for k in range(features)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--quiver", required=True, help="path of the quiver CLI")
    p.add_argument("--group", default="jb")
    p.add_argument("--entity-type", default="bench_user")
    p.add_argument("--features", type=int, default=10)
    p.add_argument("--spine", type=int, default=1_000_000)
    p.add_argument("--work", required=True, help="join_compare.py's work directory (its Parquet files)")
    p.add_argument("--results", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-pid", type=int, default=0)
    a = p.parse_args()
    events_pq = os.path.join(a.work, "events.parquet")
    spine_pq = os.path.join(a.work, "spine.parquet")
    quiver_out = os.path.join(a.work, "quiver_agg_join.parquet")
    duck_out = os.path.join(a.work, "duckdb_agg_join.parquet")
    aggs = windows(a.features)

    # The group as quiver-bench registered it, with the aggregates added.
    toml = [
        "[[entity_types]]",
        f'name = "{a.entity_type}"',
        'join_keys = [{ name = "user_id", type = "string" }]',
        "[[feature_groups]]",
        f'name = "{a.group}"',
        f'entity_type = "{a.entity_type}"',
    ]
    for k in range(a.features):
        toml += ["[[feature_groups.features]]", f'name = "f{k}"', 'type = "float64"']
    for name, source, days in aggs:
        toml += ["[[feature_groups.features]]", f'name = "{name}"', f'source = "{source}"', 'agg = "sum"', f'window = "{days}d"']
    registry = os.path.join(a.work, "agg_registry.toml")
    with open(registry, "w") as f:
        f.write("\n".join(toml) + "\n")
    subprocess.run([a.quiver, "--addr", a.addr, "apply", registry, "--promote"], check=True, stdout=subprocess.DEVNULL)

    args = [a.quiver, "--addr", a.addr, "--json", "join", spine_pq, "-o", quiver_out, "--time-column", "ts"]
    for name, _, _ in aggs:
        args += ["--feature", f"{a.group}:{name}"]
    nulls = ", ".join(f"NULL::DOUBLE AS f{k}" for k in range(a.features))
    srcs = ", ".join(f"f{k}" for k in range(a.features))
    sums = ", ".join(
        f"coalesce(sum({src}) OVER (PARTITION BY user_id ORDER BY t RANGE BETWEEN "
        f"INTERVAL '{days * DAY_US - 1} microseconds' PRECEDING AND CURRENT ROW), 0) AS {name}"
        for name, src, days in aggs
    )
    query = f"""
        WITH u AS (
            SELECT user_id, event_time AS t, {srcs}, NULL::BIGINT AS rid FROM read_parquet('{events_pq}')
            UNION ALL
            SELECT user_id, ts AS t, {nulls}, rid FROM read_parquet('{spine_pq}')
        )
        SELECT rid, user_id, t AS ts, {sums} FROM u QUALIFY rid IS NOT NULL"""
    runs = {
        "quiver": lambda: subprocess.run(args, check=True, stdout=subprocess.DEVNULL),
        "duckdb": lambda: duckdb.connect().execute(f"COPY ({query}) TO '{duck_out}' (FORMAT parquet)"),
    }
    times = {k: [] for k in runs}
    cpu = []
    for _ in range(a.rounds):
        for name, run in runs.items():
            c0 = server_cpu(a.server_pid)
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
            if name == "quiver":
                cpu.append(server_cpu(a.server_pid) - c0)
    results = []
    for target in runs:
        secs = statistics.median(times[target])
        r = {"mode": "agg-join", "target": target, "rows": a.spine, "seconds": secs,
             "rows_per_s": a.spine / secs, "rounds": [round(x, 3) for x in times[target]]}
        if target == "quiver" and a.server_pid:
            r["server_cpu_s"] = statistics.median(cpu)
        results.append(r)
    diff = " OR ".join(f"q.{n} IS DISTINCT FROM d.{n}" for n, _, _ in aggs)
    rows, mismatches, nonzero = duckdb.connect().execute(
        f"""SELECT count(*), count(*) FILTER (WHERE {diff} OR q.user_id <> d.user_id),
                   count(*) FILTER (WHERE q.{aggs[0][0]} <> 0)
            FROM read_parquet('{quiver_out}', file_row_number = true) q
            JOIN read_parquet('{duck_out}') d ON q.file_row_number = d.rid"""
    ).fetchone()
    results.append({"mode": "agg-join-check", "rows": rows, "mismatches": mismatches, "rows_with_events": nonzero})
    with open(a.results, "a") as out:
        for r in results:
            out.write(json.dumps(r) + "\n")
    print(json.dumps(results))
    if rows != a.spine or mismatches:
        print(f"aggregate join answers differ: {mismatches} of {rows} rows", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
