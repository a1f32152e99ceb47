#!/usr/bin/env python3
"""Turns quiver-bench JSON lines into a side-by-side table with Quiver/Redis ratios.

Usage: benches/report.py results.jsonl
"""
import json
import sys


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| step | Quiver | Redis (online) or DuckDB (join) | Quiver / other |")
    print("|---|---|---|---|")
    ingest = {r["target"]: r for r in rows if r.get("mode") == "ingest"}
    if ingest:
        q, r = ingest.get("quiver"), ingest.get("redis")
        qv = q["values_per_s"] if q else None
        rv = r["values_per_s"] if r else None
        ratio = f"{qv / rv:.2f}" if qv and rv else "-"
        print(f"| ingest values/s (Quiver sync, Redis pipelined HSET) | {qv or 0:,.0f} | {rv or 0:,.0f} | {ratio} |")
        qc = q.get("server_cpu_us_per_value") if q else None
        rc = r.get("server_cpu_us_per_value") if r else None
        if qc and rc:
            print(f"| ingest, server CPU per value | {qc:.2f} µs | {rc:.2f} µs | {qc / rc:.2f}x the CPU |")
    for m in rows:
        if m.get("mode") == "memory":
            n = m["values"]
            qb = m["quiver_rss_mib"] * 1048576 / n
            rb = m["redis_used_memory_bytes"] / n
            hot = m.get("quiver_hot_tier_bytes") or 0
            print(
                f"| memory holding {n:,} values | RSS {m['quiver_rss_mib']:,} MiB (budget {m['quiver_budget_mib']:,} MiB; "
                f"hot tier {hot / 1048576:,.0f} MiB, {hot / n:.1f} B/value) | used_memory {m['redis_used_memory_mib']:,} MiB "
                f"(RSS {m['redis_rss_mib']:,} MiB) | {qb / rb:.2f}x ({qb:.1f} vs {rb:.1f} B/value) |"
            )
    closed = [r for r in rows if r.get("mode") == "closed"]
    keys = []
    for r in closed:
        k = (r["batch"], r["concurrency"])
        if k not in keys:
            keys.append(k)
    for batch, conc in keys:
        by = {r["target"]: r for r in closed if (r["batch"], r["concurrency"]) == (batch, conc)}
        q, r = by.get("quiver"), by.get("redis")
        unit = "values/s" if batch > 1 else "req/s"
        field = "values_per_s" if batch > 1 else "requests_per_s"

        def cell(x):
            if not x:
                return "-"
            lat = x["latency_us"]
            return f"{x[field]:,.0f} {unit} (p50 {lat['p50']} µs, p99 {lat['p99']} µs)"

        ratio = f"{q[field] / r[field]:.2f}" if q and r and r[field] else "-"
        print(f"| batch {batch}, concurrency {conc} | {cell(q)} | {cell(r)} | {ratio} |")
        qc = q.get("server_cpu_us_per_request") if q else None
        rc = r.get("server_cpu_us_per_request") if r else None
        if qc and rc:
            print(f"| same, server CPU per request | {qc:.1f} µs | {rc:.1f} µs | {qc / rc:.2f}x the CPU |")
    join = {r["target"]: r for r in rows if r.get("mode") == "join"}
    if join:
        q, d = join.get("quiver"), join.get("duckdb")
        ratio = f"{q['rows_per_s'] / d['rows_per_s']:.2f}" if q and d else "-"
        cell = lambda x: f"{x['rows_per_s']:,.0f} rows/s ({x['seconds']:.1f} s)" if x else "-"
        runs = len(q.get("rounds", [])) if q else 0
        median = f", median of {runs} alternating runs" if runs > 1 else ""
        print(f"| point-in-time join, {q['rows'] if q else 0:,} spine rows{median} (vs DuckDB ASOF JOIN) | {cell(q)} | {cell(d)} | {ratio} |")
        da = join.get("duckdb-arrow")
        for target, how in (("quiver-sdk-flight", "Arrow Flight"), ("quiver-sdk-grpc", "protobuf stream")):
            x = join.get(target)
            if x:
                ratio = f"{x['rows_per_s'] / da['rows_per_s']:.2f}" if da else "-"
                cpu = f", server CPU {x['server_cpu_s']:.1f} s" if x.get("server_cpu_s") is not None else ""
                print(f"| same join into a pyarrow Table, Python SDK over {how} (vs DuckDB to Arrow) | {cell(x)}{cpu} | {cell(da)} | {ratio} |")
    agg = {r["target"]: r for r in rows if r.get("mode") == "agg-join"}
    if agg:
        q, d = agg.get("quiver"), agg.get("duckdb")
        ratio = f"{q['rows_per_s'] / d['rows_per_s']:.2f}" if q and d else "-"
        cell = lambda x: f"{x['rows_per_s']:,.0f} rows/s ({x['seconds']:.1f} s)" if x else "-"
        cpu = f", server CPU {q['server_cpu_s']:.1f} s" if q and q.get("server_cpu_s") is not None else ""
        print(f"| the same spine with 10 windowed sums (7 d, 1 d) (vs DuckDB window query) | {cell(q)}{cpu} | {cell(d)} | {ratio} |")
    for r in rows:
        if r.get("mode") == "agg-join-check":
            print(f"| windowed sums compared | {r['rows']:,} rows, {r['mismatches']} differ | | |")
        if r.get("mode") == "join-check":
            via = " (SDK over Flight)" if r.get("target") == "quiver-sdk-flight" else ""
            print(f"| join answers compared{via} | {r['rows']:,} rows, {r['mismatches']} differ | | |")
        if r.get("mode") == "join-ingest":
            print(f"| join data ingest (async) | {r['values_per_s']:,.0f} values/s | | |")
    sdk = {r["target"]: r for r in rows if r.get("mode") == "sdk-ingest"}
    if sdk:
        f, g = sdk.get("flight"), sdk.get("grpc-stream")
        cell = lambda x: (
            f"{x['values_per_s']:,.0f} values/s" + (f", server CPU {x['server_cpu_us_per_value']:.2f} µs/value" if x.get("server_cpu_us_per_value") else "")
            if x else "-"
        )
        ratio = f"{f['values_per_s'] / g['values_per_s']:.2f}" if f and g else "-"
        n = (f or g)["values"]
        print(f"| ingest of {n:,} values from a pandas DataFrame: Python SDK over Arrow Flight (vs over WriteFeaturesStream) | {cell(f)} | {cell(g)} | {ratio} |")
    logging = [r for r in rows if r.get("mode") == "logging"]
    for batch in sorted({r["batch"] for r in logging}):
        runs = sorted((r for r in logging if r["batch"] == batch), key=lambda r: r["log_sample_rate"])
        base = next((r for r in runs if r["log_sample_rate"] == 0), None)
        field = "values_per_s" if batch > 1 else "requests_per_s"
        unit = "values/s" if batch > 1 else "req/s"
        cells = []
        for r in runs:
            ratio = f", {r[field] / base[field]:.2f}x" if base and base[field] and r is not base else ""
            cpu = r.get("server_cpu_us_per_request")
            cpu = f", CPU {cpu:.1f} µs/req" if cpu else ""
            logged = f", {r['logged']:,} logged, {r['dropped']:,} dropped" if r["log_sample_rate"] else ""
            cells.append(f"{r['log_sample_rate']:.0%}: {r[field]:,.0f} {unit} (p99 {r['latency_us']['p99']} µs{cpu}{ratio}{logged})")
        print(f"| served-feature logging, batch {batch}, concurrency {r['concurrency']} | {'; '.join(cells)} | - | - |")
    for r in rows:
        if r.get("mode") == "open":
            lat = r["latency_us"]
            cpu = r.get("server_cpu_us_per_request")
            cpu = f", server CPU {cpu:.1f} µs/request" if cpu else ""
            print(
                f"| open loop {r['rate']:,.0f} req/s (80% of max), concurrency {r['concurrency']} "
                f"| p50 {lat['p50']} µs, p99 {lat['p99']} µs, p99.9 {lat['p999']} µs{cpu} | - | - |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
