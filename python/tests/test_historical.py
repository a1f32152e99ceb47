"""Point-in-time joins through the SDK, checked against pandas' merge_asof on the same data."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import start_quiverd, wait_for_requests_in_flight

import quiver
from quiver import _core
from quiver.v1 import feature_service_pb2_grpc as fs_grpc

BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
TTL = timedelta(hours=2)  # user_stats' ttl in conftest.REGISTRY


def write_events(client: quiver.Client, uid: str, seed: int) -> pd.DataFrame:
    """Random events for 40 entities over 12 hours, a tenth of them corrected by a second write
    at the same event time. Returns every write in write order (the last write of an
    (entity, event time) is the one the store serves)."""
    rng = random.Random(seed)
    writes = []
    for e in range(40):
        for _ in range(rng.randint(0, 25)):
            t = BASE + timedelta(seconds=rng.randint(0, 12 * 3600))
            writes.append({"user_id": f"{uid}-{e}", "event_timestamp": t, "spend": rng.uniform(-100, 100)})
    corrections = [dict(w, spend=w["spend"] + 1000.0) for w in rng.sample(writes, len(writes) // 10)]
    client.write(writes, "user_stats")
    client.write(corrections, "user_stats")
    return pd.DataFrame(writes + corrections)


def spine(uid: str, seed: int, n: int) -> pd.DataFrame:
    rng = random.Random(seed + 1)
    rows = []
    for i in range(n):
        e = rng.randint(0, 44)  # 40..44 were never written
        t = BASE + timedelta(seconds=rng.randint(-3600, 15 * 3600))
        if i % 50 == 0 and rows:
            t = rows[-1]["event_timestamp"]  # some repeated times
        rows.append({"user_id": f"{uid}-{e}", "event_timestamp": t, "label": i % 3, "row": i})
    return pd.DataFrame(rows)


def expected_spend(events: pd.DataFrame, spine_df: pd.DataFrame) -> list[float | None]:
    """merge_asof: the latest event at or before each spine time within the TTL (both bounds
    inclusive), the last write winning among writes of one event time."""
    latest = events.drop_duplicates(["user_id", "event_timestamp"], keep="last").sort_values("event_timestamp")
    s = spine_df.sort_values("event_timestamp", kind="stable")
    merged = pd.merge_asof(
        s,
        latest[["user_id", "event_timestamp", "spend"]],
        on="event_timestamp",
        by="user_id",
        direction="backward",
        tolerance=pd.Timedelta(TTL),
        allow_exact_matches=True,
    )
    merged.index = s.index
    out = merged.sort_index()["spend"]
    return [None if pd.isna(v) else float(v) for v in out]


def test_join_matches_merge_asof_and_keeps_spine_order_and_columns(client: quiver.Client, uid: str) -> None:
    events = write_events(client, uid, seed=7)
    spine_df = spine(uid, 7, 3000)
    job = client.get_historical_features(spine_df, ["user_stats:spend", "user_stats:clicks"], with_status=True)
    out = job.to_df()
    assert list(out.columns[:4]) == ["user_id", "event_timestamp", "label", "row"]
    assert list(out["row"]) == list(range(3000))
    assert list(out["label"]) == list(spine_df["label"])
    got = [None if pd.isna(v) else float(v) for v in out["spend"]]
    want = expected_spend(events, spine_df)
    mismatches = [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not mismatches, mismatches[:5]
    assert sum(w is not None for w in want) > 500  # the data exercises both sides
    # Statuses line up with values; clicks was never written: NOT_FOUND without use_defaults.
    assert set(out.loc[out["spend"].isna(), "spend__status"]) <= {"NOT_FOUND", "STALE"}
    assert set(out.loc[out["spend"].notna(), "spend__status"]) == {"PRESENT"}
    assert set(out["clicks__status"]) == {"NOT_FOUND"}

    with_defaults = client.get_historical_features(spine_df.head(10), ["user_stats:clicks"], use_defaults=True).to_df()
    assert list(with_defaults["clicks"]) == [0] * 10


def test_results_as_arrow_polars_parquet_and_batches_across_spine_requests(
    client: quiver.Client, uid: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = write_events(client, uid, seed=11)
    spine_df = spine(uid, 11, 2500)
    want = expected_spend(events, spine_df)
    monkeypatch.setattr(_core, "SPINE_ROWS_PER_REQUEST", 1000)
    sent: list[int] = []
    chunks = _core.spine_chunks

    def counted(entity_df: object) -> Iterator[pa.Table]:
        for chunk in chunks(entity_df):
            sent.append(chunk.num_rows)
            yield chunk

    monkeypatch.setattr(_core, "spine_chunks", counted)
    job = client.get_historical_features(spine_df, ["user_stats:spend"])
    batches = list(job.iter_batches())
    assert sum(b.num_rows for b in batches) == 2500
    assert sent == [1000, 1000, 500]  # one join request each
    table = job.to_arrow()
    assert table.column("spend").to_pylist() == want
    assert table.schema.field("spend").type == pa.float64()
    assert pl.from_arrow(table).equals(job.to_polars())
    rows = job.to_parquet(tmp_path / "train.parquet")
    assert rows == 2500
    assert pq.read_table(tmp_path / "train.parquet").column("spend").to_pylist() == want

    # A spine given as pieces (larger than memory): the same answers.
    pieces = (spine_df.iloc[i : i + 700] for i in range(0, 2500, 700))
    streamed = client.get_historical_features(pieces, ["user_stats:spend"]).to_arrow()
    assert streamed.column("spend").to_pylist() == want
    assert streamed.column("row").to_pylist() == list(range(2500))
    reader = pa.Table.from_pandas(spine_df, preserve_index=False).to_reader(max_chunksize=600)
    assert client.get_historical_features(reader, ["user_stats:spend"]).to_arrow().column("spend").to_pylist() == want


def test_known_at_and_strict_availability(client: quiver.Client, uid: str) -> None:
    user = f"{uid}-k"
    t = BASE + timedelta(hours=1)
    first = client.write([{"user_id": user, "event_timestamp": t, "spend": 1.0}], "user_stats")
    client.write([{"user_id": user, "event_timestamp": t, "spend": 2.0}], "user_stats")
    spine_df = pd.DataFrame({"user_id": [user], "event_timestamp": [t + timedelta(minutes=1)]})
    assert client.get_historical_features(spine_df, ["user_stats:spend"]).to_df()["spend"][0] == 2.0
    pinned = client.get_historical_features(spine_df, ["user_stats:spend"], known_at=first.system_time).to_df()
    assert pinned["spend"][0] == 1.0
    # Both writes happened long after the row's time (a backfill): online could not have
    # served them then.
    strict = client.get_historical_features(spine_df, ["user_stats:spend"], strict_availability=True, with_status=True).to_df()
    assert pd.isna(strict["spend"][0]) and strict["spend__status"][0] == "NOT_FOUND"


def test_empty_spine_and_bad_spines(client: quiver.Client, uid: str) -> None:
    empty = pd.DataFrame({"user_id": pd.Series([], dtype=object), "event_timestamp": pd.Series([], dtype="datetime64[us, UTC]")})
    out = client.get_historical_features(empty, ["user_stats:spend"]).to_arrow()
    assert out.num_rows == 0 and out.column_names == ["user_id", "event_timestamp", "spend"]
    with pytest.raises(quiver.QuiverInvalidArgument, match="missing timestamp column 'ts2'"):
        client.get_historical_features(
            pd.DataFrame({"user_id": ["a"], "ts": [BASE]}), ["user_stats:spend"], timestamp_column="ts2"
        ).to_df()
    with pytest.raises(quiver.QuiverInvalidArgument, match="below a microsecond"):
        bad = pd.DataFrame({"user_id": ["a"], "event_timestamp": [pd.Timestamp("2026-01-01T00:00:00.000000001Z")]})
        client.get_historical_features(bad, ["user_stats:spend"]).to_df()
    with pytest.raises(quiver.QuiverInvalidArgument, match="missing join key column 'user_id'"):
        client.get_historical_features(pd.DataFrame({"uid": ["a"], "event_timestamp": [BASE]}), ["user_stats:spend"]).to_df()
    with pytest.raises(quiver.QuiverInvalidArgument, match="already taken"):
        client.get_historical_features(
            pd.DataFrame({"user_id": ["a"], "event_timestamp": [BASE], "spend": [1]}), ["user_stats:spend"]
        ).to_df()
    # Unpinned naive timestamps are UTC, numpy datetime64 too.
    naive = pd.DataFrame({"user_id": [f"{uid}-z"], "event_timestamp": np.array(["2026-01-01T00:00:00"], dtype="datetime64[s]")})
    assert client.get_historical_features(naive, ["user_stats:spend"]).to_arrow().num_rows == 1


def count_shed_waits(monkeypatch: pytest.MonkeyPatch, on_wait: Callable[[], None] | None = None) -> list[float]:
    """The retry waits the SDK takes after sheds from now on (``on_wait`` called at each)."""
    waits: list[float] = []
    delay = _core.ShedRetry.delay

    def counted(self: _core.ShedRetry, e: Exception) -> float | None:
        d = delay(self, e)
        if d is not None:
            waits.append(d)
            if on_wait is not None:
                on_wait()
        return d

    monkeypatch.setattr(_core.ShedRetry, "delay", counted)
    return waits


def run_concurrently(
    client: quiver.Client, s: pd.DataFrame, n: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[pa.Table], list[float]]:
    """n joins of spine s at once on one client; also the retry waits the SDK took."""
    from concurrent.futures import ThreadPoolExecutor

    waits = count_shed_waits(monkeypatch)
    with ThreadPoolExecutor(n) as pool:
        tables = list(pool.map(lambda _: client.get_historical_features(s, ["user_stats:spend"]).to_arrow(), range(n)))
    return tables, waits


def test_small_joins_run_side_by_side(client: quiver.Client, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A join reserves memory for its answers by its size (rows x features), not the whole join
    share, so small joins are admitted together rather than shed."""
    events = write_events(client, uid, seed=12)
    s = spine(uid, seed=12, n=2_000)
    tables, waits = run_concurrently(client, s, 6, monkeypatch)
    assert waits == [], "small joins were shed"
    assert all(t.equals(tables[0]) for t in tables)
    assert tables[0].column("spend").to_pylist() == expected_spend(events, s)


@pytest.mark.parametrize("use_flight", [True, False], ids=["flight", "grpc"])
def test_a_join_shed_for_load_is_sent_again_after_the_advice(
    tmp_path: Path, registry_file: Path, monkeypatch: pytest.MonkeyPatch, use_flight: bool
) -> None:
    """A join the server sheds for load (RESOURCE_EXHAUSTED with retry advice) is sent again by
    the SDK after the advice, and answers as if it had never been shed. Deterministic: a server
    that runs one data request at a time has its slot held by an open write stream (a stream
    counts until it ends) while the join is sent, and the stream ends at the SDK's first wait."""
    daemon = start_quiverd(tmp_path / "data", "--max-concurrent-requests", "1", metrics_listen="127.0.0.1:0")
    try:
        with quiver.Client(daemon.address, use_flight=use_flight) as q:
            q.apply(registry_file)
            events = write_events(q, "u", seed=11)
            s = spine("u", seed=11, n=20_000)
            release = threading.Event()

            def idle_stream() -> Iterator[object]:
                release.wait(60)
                return
                yield

            with grpc.insecure_channel(daemon.address) as channel:
                held = fs_grpc.FeatureServiceStub(channel).WriteFeaturesStream.future(idle_stream())
                try:
                    wait_for_requests_in_flight(daemon, 1)
                    waits = count_shed_waits(monkeypatch, on_wait=release.set)
                    out = q.get_historical_features(s, ["user_stats:spend"]).to_arrow()
                finally:
                    release.set()
                assert held.result(timeout=30).requests == 0
            assert waits, "the join was not shed while the server's one request slot was held"
            assert out.column("spend").to_pylist() == expected_spend(events, s)
    finally:
        daemon.stop()
