#!/usr/bin/env python3
"""Ingest from a pandas DataFrame through the Python SDK: Arrow Flight (DoPut) against the
protobuf streaming write (WriteFeaturesStream, the requests built by the SDK), same data shape,
alternating rounds, medians reported, with quiverd's CPU time per value (called by compare.sh).

Each round writes ROWS entities x FEATURES float64 features (ROWS * FEATURES values) at a new
event time, so every run stores the same number of new cell versions. Results are appended as
JSON lines (mode "sdk-ingest").
"""

import argparse
import json
import statistics
import time

import numpy as np
import pandas as pd

import quiver
from quiver import _convert, client
from quiver.v1 import feature_service_pb2_grpc as fs_grpc

from join_compare import server_cpu  # same directory: run as a script


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--results", required=True)
    a = p.parse_args()
    feats = [f"f{k}" for k in range(a.features)]
    group = "sdk_ingest"
    with quiver.Client(a.addr) as q:
        q.apply(
            [
                quiver.EntityType("sdk_user", [quiver.JoinKey("user_id", "string")]),
                quiver.FeatureGroup(group, "sdk_user", [quiver.Feature(f, "float64") for f in feats]),
            ]
        )
    users = np.array([f"u{i}" for i in range(a.rows)], dtype=object)
    rng = np.random.default_rng(7)
    values = {f: rng.random(a.rows) for f in feats}

    def frame(round_no, variant):
        t = pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(hours=2 * round_no + variant)
        return pd.DataFrame({"user_id": users, "event_timestamp": t, **values})

    def flight(df):
        with quiver.Client(a.addr, use_flight=True) as q:
            return q.write(df, group, durability="async").values_written

    def stream(df):
        with quiver.Client(a.addr, use_flight=False) as q:
            g, join_keys = q._group_for_write(group)
            table = _convert.to_arrow_table(df, "df")
            reqs = client.write_requests(table, group, g, join_keys, "async", None, "event_timestamp", None)
            stub = fs_grpc.FeatureServiceStub(q._channel)
            return stub.WriteFeaturesStream(iter(reqs)).values_written

    runs = {"flight": flight, "grpc-stream": stream}
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for r in range(a.rounds):
        for v, (name, run) in enumerate(runs.items()):
            df = frame(r, v)
            c0 = server_cpu(a.server_pid)
            t = time.perf_counter()
            written = run(df)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(server_cpu(a.server_pid) - c0)
            assert written == a.rows * a.features, (name, written)
    out = []
    for name in runs:
        secs = statistics.median(times[name])
        n = a.rows * a.features
        r = {"mode": "sdk-ingest", "target": name, "values": n, "seconds": secs, "values_per_s": n / secs,
             "rounds": [round(x, 3) for x in times[name]]}
        if a.server_pid:
            r["server_cpu_us_per_value"] = statistics.median(cpu[name]) * 1e6 / n
        out.append(r)
    with open(a.results, "a") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
