"""Training sets on Ray (``server/CLUSTER.md`` §6): a point-in-time join of a spine held in a
Ray Dataset, run by Ray tasks against a sharded region.

Each task (a Ray actor, which holds the token given in its constructor's arguments, as Ray
stores them) joins one block of the spine with its own routing client
(``quiver.Client(address, route=True)``): the block's rows are split by the owners of their
slots, each part is joined by its owner at once, and the rows come back in the block's order.
So every shard serves its own part, many tasks run at once, and the answer is the single-node
join's, row for row.

Ray is optional: ``pip install 'quiver[ray]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from quiver.client import Client, Tls

#: Spine rows each Ray task joins at once (a block is cut into batches of this size).
RAY_BATCH_ROWS = 10_000
#: Join tasks (Ray actors, each with its routing client) when ``concurrency`` is not given.
RAY_TASKS_DEFAULT = 2
#: CPUs Ray reserves for each join task: it mostly waits for the shards.
RAY_TASK_CPUS = 0.5


class _Join:
    """A Ray task's join: one routing client for every batch it is given."""

    def __init__(self, address: str, features: Sequence[str], options: dict[str, Any], client: dict[str, Any]) -> None:
        self._client = Client(address, route=True, **client)
        self._features = list(features)
        self._options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._client.get_historical_features(batch, self._features, **self._options).to_arrow()


def get_historical_features(
    ds: Any,
    features: Sequence[str],
    *,
    address: str,
    known_at: datetime | None = None,
    strict_availability: bool = False,
    use_defaults: bool = False,
    timestamp_column: str = "event_timestamp",
    full_feature_names: bool = False,
    with_status: bool = False,
    entity_type: str | None = None,
    token: str | None = None,
    tls: bool | Tls | None = None,
    batch_rows: int = RAY_BATCH_ROWS,
    concurrency: int | None = None,
) -> Any:
    """The point-in-time join of ``ds`` (a ``ray.data.Dataset`` with the entity type's join
    keys and ``timestamp_column``, and any other columns, which are kept) with ``features``,
    as a Ray Dataset: one output row per spine row, with the columns
    ``Client.get_historical_features`` gives. Rows keep their order within a batch; across
    blocks Ray Data orders them only with ``DataContext.execution_options.preserve_order``, so
    carry a row id in the spine if the order matters. ``address`` is any node of the region; each task
    reads the slot map from it and sends each row to its owner, with ``token`` and ``tls`` as
    ``quiver.Client`` takes them. ``concurrency`` is how many tasks (Ray actors, each with its
    client) run at once (``RAY_TASKS_DEFAULT`` unless given)."""
    options: dict[str, Any] = dict(
        known_at=known_at,
        strict_availability=strict_availability,
        use_defaults=use_defaults,
        timestamp_column=timestamp_column,
        full_feature_names=full_feature_names,
        with_status=with_status,
        entity_type=entity_type,
    )
    client: dict[str, Any] = dict(token=token, tls=tls)
    import ray

    return ds.map_batches(
        _Join,
        fn_constructor_kwargs=dict(address=address, features=list(features), options=options, client=client),
        batch_format="pyarrow",
        batch_size=batch_rows,
        compute=ray.data.ActorPoolStrategy(size=concurrency if concurrency is not None else RAY_TASKS_DEFAULT),
        # A join task mostly waits for the shards: half a CPU each.
        num_cpus=RAY_TASK_CPUS,
    )
