"""AsyncClient: the same answers as the sync client, over grpc.aio and (training sets, writes,
history scans) Arrow Flight run in worker threads."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from conftest import Daemon

import quiver

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def test_async_client(daemon: Daemon, client: quiver.Client, uid: str) -> None:
    async def run() -> None:
        # The shared client's transport: this test runs over Flight and over protobuf alone.
        async with quiver.AsyncClient(daemon.address, use_flight=client.use_flight) as q:
            user = f"{uid}-async"
            t = NOW - timedelta(minutes=1)
            w = await q.write(
                pd.DataFrame({"user_id": [user], "event_timestamp": [t], "spend": [9.5], "clicks": [3]}), "user_stats"
            )
            assert w.values_written == 2
            online = await q.get_online_features(
                ["user_stats:spend", "user_stats:clicks"], [{"user_id": user}, {"user_id": f"{uid}-x"}]
            )
            assert (
                online.to_dict()
                == client.get_online_features(
                    ["user_stats:spend", "user_stats:clicks"], [{"user_id": user}, {"user_id": f"{uid}-x"}]
                ).to_dict()
            )
            assert online.to_dict()["spend"] == [9.5, None]

            spine = pd.DataFrame({"user_id": [user, user], "event_timestamp": [t - timedelta(seconds=1), t], "y": [0, 1]})
            job = await q.get_historical_features(spine, ["user_stats:spend"])
            df = await job.to_df()
            assert df["spend"].isna().tolist() == [True, False] and df["y"].tolist() == [0, 1]
            batches = [b async for b in job.iter_batches()]
            assert sum(b.num_rows for b in batches) == 2
            # Joins at once on one client (over Flight, each in its own worker thread).
            many = await asyncio.gather(*(job.to_arrow() for _ in range(4)))
            assert all(t.equals(many[0]) for t in many) and many[0].num_rows == 2

            history = await q.scan_history({"user_id": user}, "user_stats")
            assert sorted(history["feature"]) == ["user_stats@1:clicks", "user_stats@1:spend"]
            assert "user_stats" in {g.name for g in await q.list_feature_groups()}
            assert (await q.get_feature_group("user_stats")).version == 1
            changes = await q.apply([quiver.EntityType("user", [quiver.JoinKey("user_id", "string")])], dry_run=True)
            assert changes[0].kind == "unchanged"
            with pytest.raises(quiver.QuiverNotFound):
                await q.get_feature_group("nope")
            with pytest.raises(quiver.QuiverInvalidArgument):
                await q.write([{"user_id": user, "event_timestamp": t, "spend": "x"}], "user_stats")
            # Over Flight the transport was made and never given up on.
            assert (q._flight._transport is not None) == (client.use_flight is not False)
            assert q.use_flight == client.use_flight

    asyncio.run(run())
