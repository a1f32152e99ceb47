"""The README's Python quickstart: register features, write a DataFrame, read them online, and
build a point-in-time training set, all from Python against a running quiverd.

    python examples/quickstart.py [ADDRESS]      # default localhost:50051
"""

import sys
from datetime import datetime, timedelta, timezone

import pandas as pd

import quiver

address = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
now = datetime.now(timezone.utc).replace(microsecond=0)

with quiver.Client(address) as q:
    # 1. Register an entity type and a feature group (or q.apply("registry.toml")).
    q.apply(
        [
            quiver.EntityType("driver", [quiver.JoinKey("driver_id", "int64")]),
            quiver.FeatureGroup(
                name="driver_stats",
                entity_type="driver",
                ttl=timedelta(days=1),
                features=[
                    quiver.Feature("trips_today", "int64", default=0),
                    quiver.Feature("rating", "float64"),
                ],
            ),
        ]
    )

    # 2. Write features from a DataFrame: join keys, an event time, one column per feature.
    events = pd.DataFrame(
        {
            "driver_id": [1001, 1002, 1001],
            "event_timestamp": [now - timedelta(hours=3), now - timedelta(hours=2), now - timedelta(hours=1)],
            "trips_today": [4, 7, 5],
            "rating": [4.8, 4.1, 4.9],
        }
    )
    print(q.write(events, "driver_stats"))

    # 3. Online: the latest values, with their statuses and event times.
    online = q.get_online_features(
        ["driver_stats:trips_today", "driver_stats:rating"],
        [{"driver_id": 1001}, {"driver_id": 1002}, {"driver_id": 9999}],
    )
    print(online.to_df())

    # 4. A training set: each spine row gets the values as of its own time, never later ones;
    #    the spine's other columns (the label) come along in order.
    spine = pd.DataFrame(
        {
            "driver_id": [1001, 1001, 1002],
            "event_timestamp": [now - timedelta(minutes=150), now, now],
            "label": [1, 0, 1],
        }
    )
    training = q.get_historical_features(spine, ["driver_stats:trips_today", "driver_stats:rating"]).to_df()
    print(training)
    assert training["trips_today"].tolist() == [4, 5, 7]
