"""Routing in a sharded region (``server/CLUSTER.md`` §4) against a real etcd and two quiverd
nodes started with ``--no-forward``: a node refuses what it does not own, so an answer shows
that the client sent each entity to its owner itself.

etcd is ``$QUIVER_TEST_ETCD``, else ``etcd`` on the PATH (Debian: etcd-server; ``.ci/run``
installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import Daemon, cli, start_quiverd

import quiver
from quiver.slots import slot_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, registry_file: Path) -> Iterator[list[Daemon]]:
    etcd_bin = os.environ.get("QUIVER_TEST_ETCD") or shutil.which("etcd")
    if etcd_bin is None:
        pytest.fail("etcd not found: install etcd-server, or set QUIVER_TEST_ETCD")
    d = tmp_path_factory.mktemp("region")
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    etcd = subprocess.Popen(
        [
            etcd_bin,
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nodes: list[Daemon] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.1)
        for node in ("a", "b"):
            args = ["--etcd", url, "--node-id", node, "--cluster", "py", "--no-forward"]
            nodes.append(start_quiverd(d / node, *args))
        for n in nodes:
            with quiver.Client(n.address) as q:
                q.apply(registry_file)
        while True:
            status = json.loads(cli("--addr", f"http://{nodes[0].address}", "--json", "cluster", "status").stdout)
            if sum(1 for n in status["nodes"] if n["live"]) == 2:
                break
            assert time.monotonic() < deadline, f"both nodes never registered: {status}"
            time.sleep(0.1)
        cli("--addr", f"http://{nodes[0].address}", "cluster", "init")
        for n in nodes:
            while not json.loads(cli("--addr", f"http://{n.address}", "--json", "cluster", "status").stdout)["runs"]:
                assert time.monotonic() < deadline, "a node never saw the map"
                time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.stop()
        etcd.terminate()
        etcd.wait(timeout=20)


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
