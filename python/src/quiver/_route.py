"""Routing in a sharded region (``server/CLUSTER.md`` §4): which node owns each slot, and a
channel to each, so that a client sends every entity straight to its owner instead of through
a node that forwards it (one hop more).

The map and the nodes' addresses come from ``ClusterService.GetClusterStatus`` at the client's
address (the seed). Against a node that is not sharded, or before the map exists, everything
goes to the seed, and so does an entity whose slot has no owner with a known address. A part
refused for a slot its node does not own (nodes started with ``--no-forward``) makes the client
re-read the map and resend that part, at most :data:`ROUTE_RETRIES` times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from quiver.errors import QuiverError, QuiverFailedPrecondition
from quiver.slots import SLOTS, slot_of
from quiver.v1 import cluster_pb2 as cl
from quiver.v1 import cluster_pb2_grpc as cl_grpc
from quiver.v1 import feature_service_pb2_grpc as fs_grpc
from quiver.v1 import types_pb2 as ty

#: How many times a part refused for a moved slot is resent after re-reading the map.
ROUTE_RETRIES = 1

T = TypeVar("T")
#: Sends one part (the positions of its entities in the request) with a feature-service stub.
Send = Callable[[fs_grpc.FeatureServiceStub, list[int]], T]


def key_of(entity: ty.EntityKey) -> tuple[str | int, ...]:
    """An entity key message's parts, as :func:`quiver.slots.slot_of` takes them."""
    return tuple(p.string_value if p.WhichOneof("kind") == "string_value" else p.int64_value for p in entity.parts)


def not_owned(e: QuiverError) -> bool:
    """Whether ``e`` refuses a slot its node does not own (``SlotNotOwned`` in its details; a
    node strips them from a split write that other shards applied, which must not be resent)."""
    if not isinstance(e, QuiverFailedPrecondition) or not e.details:
        return False
    try:
        return bool(cl.SlotNotOwned.FromString(e.details).owner)
    except DecodeError:
        return False


class Router:
    """The slot map as last read, and a feature-service stub per owner."""

    def __init__(
        self,
        seed: fs_grpc.FeatureServiceStub,
        seed_channel: grpc.Channel,
        open_channel: Callable[[str], grpc.Channel],
        call: Callable[..., Any],
    ) -> None:
        self._seed = seed
        self._seed_channel = seed_channel
        self._open = open_channel
        self._call = call
        self._lock = threading.Lock()
        self._owners: list[str | None] = [None] * SLOTS
        self._revision = 0
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, fs_grpc.FeatureServiceStub] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="quiver-route")
        self.refresh()

    @property
    def revision(self) -> int:
        """The map's revision routed by (0: no map, or not sharded)."""
        return self._revision

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for ch in self._channels.values():
            ch.close()

    def refresh(self) -> None:
        """Re-reads the map from the seed (an older map never replaces a newer one)."""
        stub = cl_grpc.ClusterServiceStub(self._seed_channel)
        st = self._call(stub.GetClusterStatus, cl.GetClusterStatusRequest())
        if not st.sharded or not st.HasField("map"):
            return
        addrs = {n.node: n.addr for n in st.nodes if n.addr}
        owners: list[str | None] = [None] * SLOTS
        for run in st.map.runs:
            addr = addrs.get(run.owner)
            for slot in range(run.first, min(run.last, SLOTS - 1) + 1):
                owners[slot] = addr
        with self._lock:
            if st.map.revision >= self._revision:
                self._owners, self._revision = owners, st.map.revision

    def _stub(self, addr: str | None) -> fs_grpc.FeatureServiceStub:
        if addr is None:
            return self._seed
        with self._lock:
            stub = self._stubs.get(addr)
            if stub is None:
                ch = self._open(addr)
                self._channels[addr] = ch
                stub = self._stubs[addr] = fs_grpc.FeatureServiceStub(ch)
            return stub

    def split(self, entities: Sequence[ty.EntityKey], positions: Sequence[int]) -> dict[str | None, list[int]]:
        """``positions`` (into ``entities``) by owner address (None: the seed), each ascending."""
        owners = self._owners
        parts: dict[str | None, list[int]] = {}
        for i in positions:
            parts.setdefault(owners[slot_of(key_of(entities[i]))], []).append(i)
        return parts

    def fan_out(self, entities: Sequence[ty.EntityKey], send: Send[T]) -> list[tuple[list[int], T]]:
        """Sends each owner its part of a request whose entities are ``entities`` (at once), and
        returns every answer with the positions it covers. A part refused for a moved slot is
        resent after re-reading the map; any other failure raises (other parts may have been
        applied: a write is atomic per shard only)."""
        pending = list(range(len(entities)))
        answers: list[tuple[list[int], T]] = []
        for attempt in range(ROUTE_RETRIES + 1):
            parts = self.split(entities, pending)
            futures = [(rows, self._pool.submit(send, self._stub(addr), rows)) for addr, rows in parts.items()]
            pending = []
            failed: QuiverError | None = None
            for rows, fut in futures:
                try:
                    answers.append((rows, fut.result()))
                except QuiverError as e:
                    if not_owned(e) and attempt < ROUTE_RETRIES:
                        pending.extend(rows)
                    elif failed is None:
                        failed = e
            if failed is not None:
                raise failed
            if not pending:
                break
            pending.sort()
            self.refresh()
        return answers
