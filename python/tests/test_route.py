"""Routing in a sharded region (``server/CLUSTER.md`` §4) against a real etcd and two quiverd
nodes started with ``--no-forward`` (the ``region`` fixture of ``conftest.py``): a node refuses
what it does not own, so an answer shows that the client sent each entity to its owner itself.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from conftest import Daemon

import quiver
from quiver.slots import slot_of


def test_a_routed_client_sends_each_entity_to_its_owner(region: list[Daemon]) -> None:
    a, b = region
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
