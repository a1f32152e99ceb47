"""Quiver's Python SDK: online lookups, point-in-time training sets, writes and the registry,
over quiverd's gRPC API, with results as pandas, Arrow or polars.

    import quiver
    with quiver.Client("localhost:50051") as q:
        q.apply("registry.toml")
        q.write(df, "user_stats")
        online = q.get_online_features(["user_stats:clicks"], [{"user_id": "u1"}]).to_df()
        training = q.get_historical_features(spine_df, ["user_stats:clicks"]).to_df()
"""

from quiver._core import (
    IDEMPOTENCY_KEY_MAX,
    ONLINE_CELLS_MAX,
    ONLINE_ENTITIES_MAX,
    SPINE_ROWS_PER_REQUEST,
    WRITE_ROWS_MAX,
    WRITE_VALUES_MAX,
    FeatureResult,
    OnlineCache,
    OnlineResponse,
    WriteResult,
)
from quiver.aio import AsyncClient, AsyncHistoricalJob
from quiver.client import Client, HistoricalJob, Tls
from quiver.errors import (
    CasConflict,
    QuiverAborted,
    QuiverAlreadyExists,
    QuiverDeadlineExceeded,
    QuiverError,
    QuiverFailedPrecondition,
    QuiverInternal,
    QuiverInvalidArgument,
    QuiverNotFound,
    QuiverPermissionDenied,
    QuiverResourceExhausted,
    QuiverUnauthenticated,
    QuiverUnavailable,
)
from quiver.registry import (
    EntityType,
    Feature,
    FeatureGroup,
    GroupVersion,
    JoinKey,
    RegistryChange,
    load_registry,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncHistoricalJob",
    "CasConflict",
    "Client",
    "EntityType",
    "Feature",
    "FeatureGroup",
    "FeatureResult",
    "GroupVersion",
    "HistoricalJob",
    "IDEMPOTENCY_KEY_MAX",
    "JoinKey",
    "ONLINE_CELLS_MAX",
    "ONLINE_ENTITIES_MAX",
    "OnlineCache",
    "OnlineResponse",
    "QuiverAborted",
    "QuiverAlreadyExists",
    "QuiverDeadlineExceeded",
    "QuiverError",
    "QuiverFailedPrecondition",
    "QuiverInternal",
    "QuiverInvalidArgument",
    "QuiverNotFound",
    "QuiverPermissionDenied",
    "QuiverResourceExhausted",
    "QuiverUnauthenticated",
    "QuiverUnavailable",
    "RegistryChange",
    "SPINE_ROWS_PER_REQUEST",
    "Tls",
    "WRITE_ROWS_MAX",
    "WRITE_VALUES_MAX",
    "WriteResult",
    "load_registry",
]
