"""Errors come back typed, with the server's message and details; bad input changes nothing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from conftest import Daemon

import quiver

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def test_bad_requests(client: quiver.Client, uid: str) -> None:
    with pytest.raises(quiver.QuiverNotFound):
        client.get_online_features(["no_group:x"], [{"user_id": "a"}])
    with pytest.raises(quiver.QuiverInvalidArgument, match="has no feature 'nope'"):
        client.get_online_features(["user_stats:nope"], [{"user_id": "a"}])
    with pytest.raises(quiver.QuiverInvalidArgument, match="expected 'group:feature'"):
        client.get_online_features(["user_stats"], [{"user_id": "a"}])
    with pytest.raises(quiver.QuiverInvalidArgument, match="missing join key 'user_id'"):
        client.get_online_features(["user_stats:spend"], [{"uid": "a"}])
    with pytest.raises(quiver.QuiverInvalidArgument, match="more than one entity type"):
        client.get_online_features(["user_stats:spend", "balances:balance"], [{"user_id": "a"}])
    with pytest.raises(quiver.QuiverInvalidArgument, match="is not a int64"):
        client.write([{"user_id": f"{uid}-a", "event_timestamp": NOW, "clicks": "many"}], "user_stats")
    with pytest.raises(quiver.QuiverInvalidArgument, match="not a feature of user_stats"):
        client.write([{"user_id": f"{uid}-a", "event_timestamp": NOW, "clickz": 1}], "user_stats")
    with pytest.raises(quiver.QuiverInvalidArgument, match="durability"):
        client.write([{"user_id": f"{uid}-a", "event_timestamp": NOW, "clicks": 1}], "user_stats", durability="fast")
    # Refused by the server: a vector of the wrong length; nothing of the request is written.
    with pytest.raises(quiver.QuiverInvalidArgument) as e:
        client.write(
            [
                {"user_id": f"{uid}-ok", "event_timestamp": NOW, "emb": [1.0, 2.0, 3.0]},
                {"user_id": f"{uid}-bad", "event_timestamp": NOW, "emb": [1.0]},
            ],
            "all_types",
        )
    assert e.value.code.name == "INVALID_ARGUMENT" and "3" in e.value.message
    assert client.get_online_features(["all_types:emb"], [{"user_id": f"{uid}-ok"}]).to_dict()["emb__status"] == ["NOT_FOUND"]


def test_compare_and_swap_conflict_carries_the_current_versions(client: quiver.Client, uid: str) -> None:
    row = [{"user_id": f"{uid}-cas", "event_timestamp": NOW, "spend": 1.0}]
    first = client.write(row, "user_stats", expected_versions={"spend": {}})
    with pytest.raises(quiver.CasConflict) as e:
        client.write([dict(row[0], spend=2.0)], "user_stats", expected_versions={"spend": {}})
    assert e.value.current == {"user_stats:spend": first.version}
    client.write([dict(row[0], spend=3.0)], "user_stats", expected_versions={"spend": first.version})
    assert client.get_online_features(["user_stats:spend"], [{"user_id": f"{uid}-cas"}]).to_dict()["spend"] == [3.0]


def test_idempotency_keys(client: quiver.Client, uid: str) -> None:
    rows = pd.DataFrame({"user_id": [f"{uid}-i"], "event_timestamp": [NOW], "clicks": [1]})
    a = client.write(rows, "user_stats", idempotency_key=f"k-{uid}")
    b = client.write(rows, "user_stats", idempotency_key=f"k-{uid}")
    assert (a.deduplicated, b.deduplicated) == (0, 1) and a.system_time == b.system_time
    with pytest.raises(quiver.QuiverFailedPrecondition):
        client.write(rows.assign(clicks=2), "user_stats", idempotency_key=f"k-{uid}")
    with pytest.raises(quiver.QuiverInvalidArgument, match="over 128 bytes"):
        client.write(rows, "user_stats", idempotency_key="x" * 129)


def test_tokens(secured: tuple[Daemon, dict[str, str]]) -> None:
    daemon, tokens = secured
    with quiver.Client(daemon.address) as anonymous:
        with pytest.raises(quiver.QuiverUnauthenticated):
            anonymous.list_feature_groups()
    with quiver.Client(daemon.address, token="qvt_" + "0" * 64) as wrong:
        with pytest.raises(quiver.QuiverUnauthenticated):
            wrong.list_feature_groups()
    with quiver.Client(daemon.address, token=tokens["reader"]) as reader:
        assert reader.get_online_features(["user_stats:spend"], [{"user_id": "a"}]).to_dict()["spend__status"] == ["NOT_FOUND"]
        with pytest.raises(quiver.QuiverPermissionDenied):
            reader.write([{"user_id": "a", "event_timestamp": NOW, "spend": 1.0}], "user_stats")


def test_unreachable_server_is_unavailable() -> None:
    with quiver.Client("127.0.0.1:1", timeout=timedelta(seconds=5)) as q:
        with pytest.raises(quiver.QuiverUnavailable):
            q.list_feature_groups()
