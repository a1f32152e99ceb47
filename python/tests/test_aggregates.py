"""Aggregate features through the SDK: declared in the registry file, computed by the server
the same way online and in joins (over both transports), checked against pandas over the same
events."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

import quiver
from quiver.registry import parse_registry

BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)
WINDOW = timedelta(hours=3)

REGISTRY = """
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "user_windows"
entity_type = "user"
ttl = "1h"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "page"
type = "string"
[[feature_groups.features]]
name = "clicks_3h"
source = "clicks"
agg = "sum"
window = "3h"
[[feature_groups.features]]
name = "clicks_mean_3h"
source = "clicks"
agg = "mean"
window = "3h"
[[feature_groups.features]]
name = "pages_last2"
source = "page"
agg = "last_n"
n = 2
window = "3h"
"""


@pytest.fixture(scope="module")
def windows(client: quiver.Client) -> quiver.Client:
    client.apply(parse_registry(REGISTRY))
    return client


def write_events(client: quiver.Client, uid: str) -> pd.DataFrame:
    """Events of 10 users over 10 hours on a 10-minute grid, some corrected by a later write of
    the same event time (the later write wins, not both)."""
    rng = random.Random(17)
    rows = []
    for u in range(10):
        for _ in range(rng.randint(0, 30)):
            t = BASE + timedelta(minutes=10 * rng.randint(0, 60))
            rows.append(
                {"user_id": f"{uid}-{u}", "event_timestamp": t, "clicks": rng.randint(0, 50), "page": f"p{rng.randint(0, 4)}"}
            )
    corrections = [dict(r, clicks=r["clicks"] + 100, page="fixed") for r in rng.sample(rows, len(rows) // 5)]
    client.write(rows, "user_windows")
    client.write(corrections, "user_windows")
    return pd.DataFrame(rows + corrections).drop_duplicates(["user_id", "event_timestamp"], keep="last")


def window_of(events: pd.DataFrame, user: str, t: datetime) -> pd.DataFrame:
    """The events of the window ending at t: t - 3h < event time <= t, oldest first."""
    e = events[(events["user_id"] == user) & (events["event_timestamp"] > t - WINDOW) & (events["event_timestamp"] <= t)]
    return e.sort_values("event_timestamp")


def test_aggregates_declared_in_the_file_read_back_typed(windows: quiver.Client) -> None:
    g = windows.get_feature_group("user_windows")
    f = g.feature("clicks_3h")
    assert (f.type, f.source, f.agg, f.window, f.n) == ("int64", "clicks", "sum", WINDOW, 0)
    assert g.feature("clicks_mean_3h").type == "float64"
    assert (g.feature("pages_last2").type, g.feature("pages_last2").n) == ("string_list", 2)


def test_online_and_join_aggregates_match_pandas(windows: quiver.Client, uid: str) -> None:
    events = write_events(windows, uid)
    features = ["user_windows:clicks_3h", "user_windows:clicks_mean_3h", "user_windows:pages_last2"]
    rng = random.Random(3)
    spine_rows = [
        {
            "user_id": f"{uid}-{rng.randint(0, 11)}",
            "event_timestamp": BASE + timedelta(minutes=10 * rng.randint(-5, 70), microseconds=rng.choice([-1, 0, 1])),
        }
        for _ in range(400)
    ]
    spine = pd.DataFrame(spine_rows)
    out = windows.get_historical_features(spine, features, with_status=True).to_df()
    for i, r in enumerate(spine_rows):
        w = window_of(events, r["user_id"], r["event_timestamp"])
        assert out["clicks_3h"][i] == int(w["clicks"].sum()), (i, r)
        assert out["clicks_3h__status"][i] == "PRESENT"
        if w.empty:
            assert out["clicks_mean_3h__status"][i] == "NOT_FOUND" and pd.isna(out["clicks_mean_3h"][i])
        else:
            assert out["clicks_mean_3h"][i] == pytest.approx(w["clicks"].mean(), rel=1e-12)
        assert list(out["pages_last2"][i]) == list(w["page"])[-2:]

    # Online at one time: the same answers as the join's rows at that time.
    t = BASE + timedelta(hours=5)
    users = [{"user_id": f"{uid}-{u}"} for u in range(12)]
    online = windows.get_online_features(features, users, as_of=t).to_dict()
    for u in range(12):
        w = window_of(events, f"{uid}-{u}", t)
        assert online["clicks_3h"][u] == int(w["clicks"].sum())
        assert online["pages_last2"][u] == list(w["page"])[-2:]


def test_writing_an_aggregate_is_refused_and_names_the_source(windows: quiver.Client, uid: str) -> None:
    with pytest.raises(quiver.QuiverInvalidArgument, match="aggregate of clicks"):
        windows.write([{"user_id": f"{uid}-x", "event_timestamp": BASE, "clicks_3h": 5}], "user_windows")
