#!/usr/bin/env python3
"""Point-in-time join, Quiver against DuckDB's ASOF JOIN on the same data (called by compare.sh).

The data set is defined by formulas that quiver-bench (benches/src/load.rs) and this script
share: entity i (user_id 'u<i>') has hourly events j with
    event_time = 1000000 + j * 3600000000 + (i % 3600) * 1000000   (µs)
    f<k>       = ((i * 31 + j * 17 + k) % 1000000) * 0.5
and spine row r asks for entity (r * 2654435761) % E at 1000000 + ((r * 40503) % (EVENTS * 3600)) * 1000000.
Quiver has the events already (quiver-bench ingest); DuckDB reads them from Parquet. Each side
reads the spine from Parquet and writes its answer to Parquet; both are timed end to end, in
alternating rounds (median reported), and every output row is compared. Results are appended as JSON lines.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--quiver", required=True, help="path of the quiver CLI")
    p.add_argument("--group", default="jb")
    p.add_argument("--entities", type=int, default=100_000)
    p.add_argument("--events", type=int, default=100)
    p.add_argument("--features", type=int, default=10)
    p.add_argument("--spine", type=int, default=1_000_000)
    p.add_argument("--work", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    events_pq = os.path.join(a.work, "events.parquet")
    spine_pq = os.path.join(a.work, "spine.parquet")
    quiver_out = os.path.join(a.work, "quiver_join.parquet")
    duck_out = os.path.join(a.work, "duckdb_join.parquet")
    feats = [f"f{k}" for k in range(a.features)]

    con = duckdb.connect()
    cols = ", ".join(f"(((i * 31 + j * 17 + {k}) % 1000000) * 0.5)::DOUBLE AS f{k}" for k in range(a.features))
    con.execute(
        f"""COPY (SELECT 'u' || i AS user_id,
                 make_timestamp((1000000 + j * 3600000000 + (i % 3600) * 1000000)::BIGINT) AS event_time, {cols}
               FROM range({a.entities}) t(i), range({a.events}) u(j))
            TO '{events_pq}' (FORMAT parquet)"""
    )
    con.execute(
        f"""COPY (SELECT r AS rid, 'u' || ((r * 2654435761) % {a.entities}) AS user_id,
                 make_timestamp((1000000 + ((r * 40503) % ({a.events} * 3600)) * 1000000)::BIGINT) AS ts
               FROM range({a.spine}) t(r))
            TO '{spine_pq}' (FORMAT parquet)"""
    )

    results = []

    # The two joins alternate for ROUNDS rounds; the median time of each is reported (the
    # machine is shared and noisy), and the last round's outputs are compared.
    args = [a.quiver, "--addr", a.addr, "--json", "join", spine_pq, "-o", quiver_out, "--time-column", "ts"]
    for f in feats:
        args += ["--feature", f"{a.group}:{f}"]
    sel = ", ".join(f"e.{f}" for f in feats)
    q_times, d_times = [], []
    for _ in range(a.rounds):
        # Quiver: read the spine, join on the server, write Parquet.
        t = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        q_times.append(time.perf_counter() - t)
        # DuckDB: the same, with ASOF JOIN over the events' Parquet file.
        t = time.perf_counter()
        duckdb.connect().execute(
            f"""COPY (SELECT s.rid, s.user_id, s.ts, {sel}
                     FROM read_parquet('{spine_pq}') s
                     ASOF LEFT JOIN read_parquet('{events_pq}') e
                       ON s.user_id = e.user_id AND s.ts >= e.event_time)
                TO '{duck_out}' (FORMAT parquet)"""
        )
        d_times.append(time.perf_counter() - t)
    for target, times in (("quiver", q_times), ("duckdb", d_times)):
        secs = statistics.median(times)
        results.append({"mode": "join", "target": target, "rows": a.spine, "seconds": secs,
                        "rows_per_s": a.spine / secs, "rounds": [round(x, 3) for x in times]})

    # Every row: Quiver's output is in spine order (file row number = rid).
    diff = " OR ".join(f"q.{f} IS DISTINCT FROM d.{f}" for f in feats)
    rows, mismatches, filled = con.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE {diff} OR q.user_id <> d.user_id),
                   count(q.{feats[0]})
            FROM read_parquet('{quiver_out}', file_row_number = true) q
            JOIN read_parquet('{duck_out}') d ON q.file_row_number = d.rid"""
    ).fetchone()
    results.append({"mode": "join-check", "rows": rows, "mismatches": mismatches, "rows_with_values": filled})
    with open(a.results, "a") as out:
        for r in results:
            out.write(json.dumps(r) + "\n")
    print(json.dumps(results))
    if rows != a.spine or mismatches:
        print(f"join answers differ: {mismatches} of {rows} rows", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
