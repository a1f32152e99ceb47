"""Training sets on Ray (``quiver.ray``) against a sharded region (the ``region`` fixture: a
real etcd and two ``--no-forward`` quiverd nodes, so each shard must be sent its own rows):
the distributed join, run by local Ray tasks, is compared row by row with the single-node join
of the same data on an unsharded quiverd. Needs ``pip install 'quiver[ray]'`` (``.ci/run``
installs it)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from conftest import Daemon

import quiver
import quiver.ray
from quiver.slots import slot_of


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Ray's own start-up can time out on a loaded 2-core machine ("the current node timed out
    # during startup"): start it again, up to three times, before failing the setup.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def test_the_ray_join_is_the_single_node_join_row_by_row(
    region: list[Daemon], daemon: Daemon, registry_file: Path, local_ray: None
) -> None:
    a, b, _gw = region
    users = [f"ray{i}" for i in range(60)]
    assert len({slot_of(u) < 2048 for u in users}) == 2, "both shards hold some"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t1, t2 = now - timedelta(hours=2), now - timedelta(hours=1)
    rows = [{"user_id": u, "event_timestamp": t1, "clicks": i} for i, u in enumerate(users)]
    rows += [{"user_id": u, "event_timestamp": t2, "clicks": 1000 + i} for i, u in enumerate(users) if i % 2]
    with quiver.Client(a.address, route=True) as q:
        q.write(rows, "user_stats")
    with quiver.Client(daemon.address) as single:
        single.apply(registry_file)
        single.write(rows, "user_stats")

    # A spine of 500 rows: known and unknown users, before, between and after the versions.
    rng = random.Random(7)
    times = [t1 - timedelta(minutes=5), t1 + timedelta(minutes=5), t2 + timedelta(minutes=5)]
    spine = pa.table(
        {
            "row_id": list(range(500)),
            "user_id": [rng.choice(users + ["nobody"]) for _ in range(500)],
            "event_timestamp": pa.array([rng.choice(times) for _ in range(500)], type=pa.timestamp("us", tz="UTC")),
            "label": [rng.random() for _ in range(500)],
        }
    )
    features = ["user_stats:clicks"]
    with quiver.Client(daemon.address) as single:
        want = single.get_historical_features(spine, features, with_status=True).to_arrow()
    assert want.num_rows == 500

    # The routed client joins each part on its shard and keeps the spine's order.
    with quiver.Client(b.address, route=True) as q:
        routed = q.get_historical_features(spine, features, with_status=True).to_arrow()
    assert routed.to_pylist() == want.to_pylist()

    # Ray: the spine in several blocks, joined by tasks, back as a Dataset.
    ds = ray.data.from_arrow([spine.slice(i, 125) for i in range(0, 500, 125)])
    out = quiver.ray.get_historical_features(ds, features, address=a.address, with_status=True, batch_rows=64)
    got = pa.Table.from_pylist(sorted(out.take_all(), key=lambda r: r["row_id"]))
    assert got.column_names == want.column_names
    assert got.to_pylist() == want.to_pylist()
    present = [r for r in got.to_pylist() if r["clicks__status"] == "PRESENT"]
    assert 100 < len(present) < 500, "values and missing rows both"
