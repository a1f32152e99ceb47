"""Routing in a sharded region (``server/CLUSTER.md`` §4) against a real etcd and two quiverd
nodes started with ``--no-forward`` (the ``region`` fixture of ``conftest.py``): a node refuses
what it does not own, so an answer shows that the client sent each entity to its owner itself.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import Daemon

import quiver
from quiver.slots import slot_of


def test_a_routed_client_sends_each_entity_to_its_owner(region: list[Daemon]) -> None:
    a, b, _gw = region
    users = [f"r{i}" for i in range(40)]
    # The two owners each hold some of them (slots from the engine's definition).
    assert len({slot_of(u) < 2048 for u in users}) == 2
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    rows = [{"user_id": u, "event_timestamp": at, "clicks": i} for i, u in enumerate(users)]
    with quiver.Client(a.address, route=True) as q:
        result = q.write(rows, "user_stats")
        assert result.values_written == len(users)
        assert result.requests == 2
    # Read back through the other node, in request order (reversed), one lookup for all.
    entities = [{"user_id": u} for u in reversed(users)]
    with quiver.Client(b.address, route=True) as q:
        df = q.get_online_features(["user_stats:clicks"], entities).to_df()
    assert df["user_id"].tolist() == list(reversed(users))
    assert df["clicks"].tolist() == list(reversed(range(len(users))))
    # A plain client is refused by a node that does not forward, naming the owner.
    with quiver.Client(a.address) as q, pytest.raises(quiver.QuiverFailedPrecondition, match="is owned by node"):
        q.get_online_features(["user_stats:clicks"], entities)


def test_only_a_slot_refusal_with_its_details_is_resent() -> None:
    import grpc

    from quiver._route import not_owned
    from quiver.v1 import cluster_pb2 as cl

    fp, un = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE

    details = cl.SlotNotOwned(slot=7, owner="b", owner_addr="127.0.0.1:1", epoch=1, map_revision=3)
    assert not_owned(quiver.QuiverFailedPrecondition(fp, "slot 7 is owned by node b", details.SerializeToString()))
    # A split write that other shards applied carries no details: it must not be resent.
    assert not not_owned(quiver.QuiverFailedPrecondition(fp, "the write spans 2 shards ...", b""))
    assert not not_owned(quiver.QuiverFailedPrecondition(fp, "slot 7 ...", b"\xff\xff"))
    assert not not_owned(quiver.QuiverUnavailable(un, "down", details.SerializeToString()))


def test_flight_writes_joins_and_scans_go_through_a_forwarding_node(
    region: list[Daemon], daemon: Daemon, registry_file: Path
) -> None:
    """A plain Flight client of the gateway (a forwarding node that owns no slots): its DoPut
    batches are routed to the owners, its joins split by owner and merged in spine order, its
    history scans passed through; the answers equal an unsharded quiverd's for the same data."""
    a, _b, gw = region
    users = [f"fl{i}" for i in range(40)]
    assert len({slot_of(u) < 2048 for u in users}) == 2, "both shards hold some"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t1, t2 = now - timedelta(hours=2), now - timedelta(hours=1)
    rows = [{"user_id": u, "event_timestamp": t1, "clicks": i} for i, u in enumerate(users)]
    rows += [{"user_id": u, "event_timestamp": t2, "clicks": 500 + i} for i, u in enumerate(users) if i % 3]
    with quiver.Client(gw.address, use_flight=True) as q:
        first = q.write(rows, "user_stats", idempotency_key="flight-span")
        assert first.values_written == len(rows) and first.deduplicated == 0, first
        # The retry is replayed by each shard from its own record of its part.
        again = q.write(rows, "user_stats", idempotency_key="flight-span")
        assert again.deduplicated == again.requests == first.requests, again
    with quiver.Client(daemon.address, use_flight=True) as single:
        single.apply(registry_file)
        single.write(rows, "user_stats")

    # Each owner holds its own users' rows, written once (a refuses what it does not own).
    mine = [u for u in users if slot_of(u) < 2048]
    i = users.index(mine[1])
    with quiver.Client(a.address) as q:
        hist = q.scan_history({"user_id": mine[1]}, "user_stats")
    assert sorted(hist["value"].tolist()) == ([i, 500 + i] if i % 3 else [i])

    # A 700-row spine over both shards, joined through the gateway over Flight.
    rng = random.Random(11)
    times = [t1 - timedelta(minutes=5), t1 + timedelta(minutes=5), t2 + timedelta(minutes=5)]
    spine = pa.table(
        {
            "row_id": list(range(700)),
            "user_id": [rng.choice(users + ["nobody"]) for _ in range(700)],
            "event_timestamp": pa.array([rng.choice(times) for _ in range(700)], type=pa.timestamp("us", tz="UTC")),
        }
    )
    features = ["user_stats:clicks"]
    with quiver.Client(daemon.address, use_flight=True) as single:
        want = single.get_historical_features(spine, features, with_status=True).to_arrow()
    with quiver.Client(gw.address, use_flight=True) as q:
        got = q.get_historical_features(spine, features, with_status=True).to_arrow()
    assert got.to_pylist() == want.to_pylist()
    present = [r for r in got.to_pylist() if r["clicks__status"] == "PRESENT"]
    assert 100 < len(present) < 700, "values and missing rows both"

    # History scans of users of either shard, through the gateway, as on the single node
    # (system times differ: each store stamped its own).
    for u in (mine[0], next(u for u in users if slot_of(u) >= 2048)):
        with quiver.Client(gw.address, use_flight=True) as q:
            got_h = q.scan_history({"user_id": u}, "user_stats")
        with quiver.Client(daemon.address, use_flight=True) as single:
            want_h = single.scan_history({"user_id": u}, "user_stats")
        keep = ["feature", "event_timestamp", "value", "deleted"]
        assert got_h[keep].to_dict("records") == want_h[keep].to_dict("records"), u
