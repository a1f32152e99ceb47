"""Writes and online lookups against a real quiverd: values, statuses, event times, types."""

from __future__ import annotations

import math
import struct
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

import quiver

NOW = datetime.now(timezone.utc).replace(microsecond=0)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def test_write_then_online_values_statuses_and_event_times(client: quiver.Client, uid: str) -> None:
    fresh = NOW - timedelta(minutes=5)
    old = NOW - timedelta(hours=3)  # beyond the 2h TTL
    df = pd.DataFrame(
        {
            "user_id": [f"{uid}-a", f"{uid}-b"],
            "event_timestamp": [fresh, old],
            "clicks": [7, 9],
            "spend": [1.5, 2.5],
            "country": ["fr", None],  # None: not written
        }
    )
    result = client.write(df, "user_stats")
    assert result.values_written == 5
    assert result.requests == 1
    assert result.system_time is not None and result.version

    online = client.get_online_features(
        ["user_stats:clicks", "user_stats:spend", "user_stats:country"],
        [{"user_id": f"{uid}-a"}, {"user_id": f"{uid}-b"}, {"user_id": f"{uid}-never"}],
    )
    d = online.to_dict()
    assert d["user_id"] == [f"{uid}-a", f"{uid}-b", f"{uid}-never"]
    assert d["clicks"] == [7, 0, 0]
    # clicks has a registered default (0): stale and never-written rows are DEFAULTED.
    assert d["clicks__status"] == ["PRESENT", "DEFAULTED", "DEFAULTED"]
    assert d["spend"] == [1.5, None, None]
    assert d["spend__status"] == ["PRESENT", "STALE", "NOT_FOUND"]
    assert d["country"] == ["fr", "unknown", "unknown"]
    assert d["country__status"] == ["PRESENT", "DEFAULTED", "DEFAULTED"]
    assert d["spend__event_timestamp"][0] == fresh
    assert d["spend__event_timestamp"][1] is None
    assert all(f.group_version == 1 for f in online.features)

    df_out = online.to_df()
    assert list(df_out["user_id"]) == d["user_id"]
    assert df_out["clicks"].dtype == pd.Int64Dtype()
    assert math.isnan(df_out["spend"][2])
    table = online.to_arrow()
    assert table.schema.field("spend__event_timestamp").type == pa.timestamp("us", tz="UTC")

    # A DataFrame of entity rows and full feature names; without statuses.
    again = client.get_online_features(
        ["user_stats:spend"], pd.DataFrame({"user_id": [f"{uid}-a"]}), full_feature_names=True, with_status=False
    )
    assert again.to_dict() == {"user_id": [f"{uid}-a"], "user_stats__spend": [1.5]}

    # as_of: before the fresh event, nothing within the TTL (the old event is 3 h old).
    past = client.get_online_features(["user_stats:spend"], [{"user_id": f"{uid}-a"}], as_of=fresh - timedelta(seconds=1))
    assert past.to_dict()["spend__status"] == ["NOT_FOUND"]
    assert client.get_online_features(["user_stats:spend"], [{"user_id": f"{uid}-a"}], as_of=fresh).to_dict()["spend"] == [1.5]

    # default_missing: a complete vector.
    full = client.get_online_features(["user_stats:spend"], [{"user_id": f"{uid}-never"}], default_missing=True)
    assert full.to_dict()["spend"] == [0.0]
    assert full.to_dict()["spend__status"] == ["DEFAULTED"]


def test_every_type_round_trips_exactly(client: quiver.Client, uid: str) -> None:
    neg_zero = -0.0
    rows = [
        {
            "user_id": f"{uid}-1",
            "event_timestamp": NOW,
            "b": True,
            "i": I64_MAX,
            "f32": 1.5,
            "f64": float("nan"),
            "s": "nul\x00inside, ünïcode",
            "raw": b"\x00\xff\x00",
            "emb": [0.25, -1.0, 3.0],
            "ids": [I64_MIN, 0, I64_MAX],
            "tags": ["a", "", "c\x00d"],
        },
        {
            "user_id": f"{uid}-2",
            "event_timestamp": NOW,
            "b": False,
            "i": I64_MIN,
            "f32": -3.25,
            "f64": neg_zero,
            "s": "",
            "raw": b"",
            "emb": [0.0, 0.0, 0.0],
            "ids": [],
            "tags": [],
        },
    ]
    # From a list of dicts (through Arrow, where NaN is a value, not a null).
    assert client.write(rows, "all_types").values_written == 18
    names = ["b", "i", "f32", "f64", "s", "raw", "emb", "ids", "tags"]
    online = client.get_online_features([f"all_types:{n}" for n in names], [{"user_id": f"{uid}-1"}, {"user_id": f"{uid}-2"}])
    d = online.to_dict()
    for n in names:
        assert d[f"{n}__status"] == ["PRESENT", "PRESENT"], n
    assert d["b"] == [True, False]
    assert d["i"] == [I64_MAX, I64_MIN]
    assert d["f32"] == [1.5, -3.25]
    assert math.isnan(d["f64"][0])
    assert d["f64"][1] == 0.0 and math.copysign(1.0, d["f64"][1]) == -1.0
    assert struct.pack("<d", d["f64"][1]) == struct.pack("<d", neg_zero)
    assert d["s"] == ["nul\x00inside, ünïcode", ""]
    assert d["raw"] == [b"\x00\xff\x00", b""]
    assert d["emb"] == [[0.25, -1.0, 3.0], [0.0, 0.0, 0.0]]
    assert d["ids"] == [[I64_MIN, 0, I64_MAX], []]
    assert d["tags"] == [["a", "", "c\x00d"], []]
    # int64 extremes survive the trip into pandas.
    assert list(online.to_df()["i"]) == [I64_MAX, I64_MIN]


def test_pandas_nan_is_a_value_and_null_is_not_written(client: quiver.Client, uid: str) -> None:
    df = pd.DataFrame(
        {
            "user_id": [f"{uid}-x", f"{uid}-y"],
            "event_timestamp": pd.to_datetime([NOW, NOW], utc=True),
            "f64": [float("nan"), 2.0],
            "i": pd.array([None, 5], dtype="Int64"),
        }
    )
    assert client.write(df, "all_types").values_written == 3
    d = client.get_online_features(["all_types:f64", "all_types:i"], df[["user_id"]]).to_dict()
    assert math.isnan(d["f64"][0]) and d["f64"][1] == 2.0
    assert d["i__status"] == ["NOT_FOUND", "PRESENT"]


def test_polars_and_arrow_inputs(client: quiver.Client, uid: str) -> None:
    pl_df = pl.DataFrame(
        {"user_id": [f"{uid}-p"], "event_timestamp": [NOW], "spend": [4.0]},
        schema_overrides={"event_timestamp": pl.Datetime("us", "UTC")},
    )
    client.write(pl_df, "user_stats")
    table = pa.table({"user_id": [f"{uid}-q"], "event_timestamp": pa.array([NOW], pa.timestamp("ms", tz="UTC")), "spend": [5.0]})
    client.push(table, "user_stats")
    d = client.get_online_features(["user_stats:spend"], pa.table({"user_id": [f"{uid}-p", f"{uid}-q"]})).to_dict()
    assert d["spend"] == [4.0, 5.0]


def test_composite_keys(client: quiver.Client, uid: str) -> None:
    df = pd.DataFrame({"bank": [uid, uid], "number": [1, 2**40], "event_timestamp": [NOW, NOW], "balance": [10.0, 20.0]})
    client.write(df, "balances")
    d = client.get_online_features(
        ["balances:balance"], [{"bank": uid, "number": 2**40}, {"bank": uid, "number": 1}, {"bank": uid, "number": 3}]
    ).to_dict()
    assert d["balance"] == [20.0, 10.0, None]
    assert d["number"] == [2**40, 1, 3]


def test_many_entities_are_split_into_requests_and_keep_their_order(client: quiver.Client, uid: str) -> None:
    n = quiver.ONLINE_ENTITIES_MAX + 2_500
    users = [f"{uid}-{i}" for i in range(n)]
    df = pd.DataFrame({"user_id": users, "event_timestamp": NOW, "clicks": np.arange(n, dtype=np.int64)})
    result = client.write(df, "user_stats", durability="async")
    assert result.values_written == n
    assert result.requests == 2  # 10,000 rows per request
    d = client.get_online_features(["user_stats:clicks"], [{"user_id": u} for u in reversed(users)]).to_dict()
    assert d["clicks"] == list(range(n - 1, -1, -1))


def test_scan_history_and_delete(client: quiver.Client, uid: str) -> None:
    user = f"{uid}-h"
    t1, t2 = NOW - timedelta(minutes=10), NOW - timedelta(minutes=5)
    client.write([{"user_id": user, "event_timestamp": t1, "spend": 1.0}], "user_stats")
    client.write([{"user_id": user, "event_timestamp": t1, "spend": 1.5}], "user_stats")  # a correction
    client.delete("user_stats", [{"user_id": user}], ["spend"], t2)
    h = client.scan_history({"user_id": user}, "user_stats", features=["user_stats:spend"])
    assert list(h["deleted"]) == [True, False, False]
    assert list(h["value"])[1:] == [1.5, 1.0]
    assert list(h["event_timestamp"]) == [t2, t1, t1]
    assert h["system_timestamp"][1] > h["system_timestamp"][2]
    d = client.get_online_features(["user_stats:spend"], [{"user_id": user}]).to_dict()
    assert d["spend__status"] == ["NOT_FOUND"]
    assert client.get_online_features(["user_stats:spend"], [{"user_id": user}], as_of=t2 - timedelta(seconds=1)).to_dict()[
        "spend"
    ] == [1.5]


def test_monitor_counts_answers_by_status(client: quiver.Client, uid: str) -> None:
    client.get_online_features(["user_stats:spend"], [{"user_id": f"{uid}-none"}])
    health = client.monitor("user_stats")
    spend = health[health["feature"] == "spend"].iloc[0]
    assert spend["group"] == "user_stats"
    assert spend["not_found"] >= 1
    assert set(health["feature"]) == {"clicks", "spend", "country"}
