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

With the Python SDK importable (compare.sh installs it in its venv), three more runs join into an
in-memory pyarrow Table, each round: the SDK over Arrow Flight, the SDK over the protobuf stream
(GetHistoricalFeatures), and DuckDB's ASOF JOIN fetched as Arrow; the Flight answers are compared
with DuckDB's row by row. With --server-pid, quiverd's CPU time per join is recorded too.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb
import numpy as np


def arrow_of(result):
    """A DuckDB result as a pyarrow Table (to_arrow_table in DuckDB 2, fetch_arrow_table before)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def server_cpu(pid):
    """quiverd's user + system CPU seconds so far (0 without a pid)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    p.add_argument("--server-pid", type=int, default=0, help="quiverd's pid, for its CPU time per join")
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
    asof = f"""SELECT s.rid, s.user_id, s.ts, {sel}
                 FROM read_parquet('{spine_pq}') s
                 ASOF LEFT JOIN read_parquet('{events_pq}') e
                   ON s.user_id = e.user_id AND s.ts >= e.event_time"""
    try:
        import pyarrow.parquet as pq

        import quiver

        sdk = True
    except ImportError:
        sdk = False
    refs = [f"{a.group}:{f}" for f in feats]

    def sdk_join(use_flight):
        with quiver.Client(a.addr, use_flight=use_flight) as q:
            spine = pq.read_table(spine_pq)
            return q.get_historical_features(spine, refs, timestamp_column="ts").to_arrow()

    runs = {
        # Quiver's CLI: read the spine, join on the server, write Parquet.
        "quiver": lambda: subprocess.run(args, check=True, stdout=subprocess.DEVNULL),
        # DuckDB: the same, with ASOF JOIN over the events' Parquet file.
        "duckdb": lambda: duckdb.connect().execute(f"COPY ({asof}) TO '{duck_out}' (FORMAT parquet)"),
    }
    if sdk:
        runs["quiver-sdk-flight"] = lambda: sdk_join(True)
        runs["quiver-sdk-grpc"] = lambda: sdk_join(False)
        runs["duckdb-arrow"] = lambda: arrow_of(duckdb.connect().execute(asof))
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    last = {}
    for _ in range(a.rounds):
        for name, run in runs.items():
            c0 = server_cpu(a.server_pid)
            t = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(server_cpu(a.server_pid) - c0)
    for target in runs:
        secs = statistics.median(times[target])
        r = {"mode": "join", "target": target, "rows": a.spine, "seconds": secs,
             "rows_per_s": a.spine / secs, "rounds": [round(x, 3) for x in times[target]]}
        if a.server_pid and target.startswith("quiver"):
            r["server_cpu_s"] = statistics.median(cpu[target])
        results.append(r)
    if sdk:
        # The Flight answers against DuckDB's, row by row (DuckDB's in rid order).
        flight = last["quiver-sdk-flight"]
        duck = last["duckdb-arrow"].sort_by("rid")
        differ = 0
        for f in feats:
            qa, da = flight.column(f).to_numpy(zero_copy_only=False), duck.column(f).to_numpy(zero_copy_only=False)
            same = (qa == da) | (np.isnan(qa) & np.isnan(da))
            differ = max(differ, int((~same).sum()))
        results.append({"mode": "join-check", "target": "quiver-sdk-flight", "rows": flight.num_rows,
                        "mismatches": differ, "rows_with_values": flight.num_rows - flight.column(feats[0]).null_count})

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
    flight_bad = [r for r in results if r.get("target") == "quiver-sdk-flight" and r.get("mode") == "join-check" and r["mismatches"]]
    if rows != a.spine or mismatches or flight_bad:
        print(f"join answers differ: {mismatches} of {rows} rows", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
