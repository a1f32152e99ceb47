"""Conversions between Python/Arrow data and the protobuf messages of quiver.v1.

Times: the API carries microseconds since the Unix epoch, UTC. A naive ``datetime`` or a
timezone-less timestamp column is taken as UTC (as Feast does); a time with a nonzero part
below a microsecond is refused here with INVALID_ARGUMENT, as the server would refuse it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from quiver.errors import QuiverInvalidArgument
from quiver.registry import FeatureGroup
from quiver.v1 import types_pb2 as types

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: Status names, by the protobuf enum value.
STATUS_NAMES: dict[int, str] = {
    types.FEATURE_STATUS_UNSPECIFIED: "UNSPECIFIED",
    types.FEATURE_STATUS_PRESENT: "PRESENT",
    types.FEATURE_STATUS_NOT_FOUND: "NOT_FOUND",
    types.FEATURE_STATUS_STALE: "STALE",
    types.FEATURE_STATUS_DEFAULTED: "DEFAULTED",
    types.FEATURE_STATUS_UNAVAILABLE: "UNAVAILABLE",
    types.FEATURE_STATUS_OVERFLOW: "OVERFLOW",
}
#: Statuses whose value slot holds a served value (the others hold the type's zero value,
#: surfaced as null).
_HAS_VALUE = (types.FEATURE_STATUS_PRESENT, types.FEATURE_STATUS_DEFAULTED)

ARROW_TYPES: dict[int, pa.DataType] = {
    types.VALUE_TYPE_BOOL: pa.bool_(),
    types.VALUE_TYPE_INT64: pa.int64(),
    types.VALUE_TYPE_FLOAT32: pa.float32(),
    types.VALUE_TYPE_FLOAT64: pa.float64(),
    types.VALUE_TYPE_STRING: pa.string(),
    types.VALUE_TYPE_BYTES: pa.binary(),
    types.VALUE_TYPE_FLOAT32_VECTOR: pa.list_(pa.float32()),
    types.VALUE_TYPE_INT64_LIST: pa.list_(pa.int64()),
    types.VALUE_TYPE_STRING_LIST: pa.list_(pa.string()),
}
_VALUE_FIELDS = {
    types.VALUE_TYPE_BOOL: "bool_values",
    types.VALUE_TYPE_INT64: "int64_values",
    types.VALUE_TYPE_FLOAT32: "float32_values",
    types.VALUE_TYPE_FLOAT64: "float64_values",
    types.VALUE_TYPE_STRING: "string_values",
    types.VALUE_TYPE_BYTES: "bytes_values",
    types.VALUE_TYPE_FLOAT32_VECTOR: "float32_vector_values",
    types.VALUE_TYPE_INT64_LIST: "int64_list_values",
    types.VALUE_TYPE_STRING_LIST: "string_list_values",
}
TIMESTAMP = pa.timestamp("us", tz="UTC")


# ---- single times ------------------------------------------------------------------------


def to_micros(t: datetime | int | Any) -> int:
    """A time as microseconds since the epoch: a datetime (naive = UTC), a pandas Timestamp,
    or an int already in microseconds."""
    if isinstance(t, bool):
        raise QuiverInvalidArgument(f"{t!r} is not a time")
    if isinstance(t, (int, np.integer)):
        return int(t)
    nanos = getattr(t, "value", None)  # pandas.Timestamp: exact nanoseconds
    if isinstance(nanos, int) and hasattr(t, "tz_localize"):
        # .value counts from the epoch in UTC; a naive Timestamp is taken as UTC.
        if nanos % 1000:
            raise QuiverInvalidArgument(f"time {t} has nanoseconds below a microsecond")
        return nanos // 1000
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        d = t - EPOCH
        return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
    raise QuiverInvalidArgument(f"{t!r} is not a time (a datetime, a pandas Timestamp or microseconds)")


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def set_timestamp(ts: Any, us: int) -> None:
    """Fills a google.protobuf.Timestamp from microseconds (floor division: negative times
    keep 0 <= nanos < 1e9)."""
    ts.seconds = us // 1_000_000
    ts.nanos = (us % 1_000_000) * 1000


def timestamp_micros(ts: Any) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


# ---- tables in -----------------------------------------------------------------------------


def to_arrow_table(data: Any, what: str) -> pa.Table:
    """A pandas or polars DataFrame, an Arrow Table/RecordBatch, or a list of row dicts as an
    Arrow Table.

    In a pandas float column NaN stays NaN (a value Quiver stores); an absent value is None in
    an object column, pd.NA in a nullable column, or a null in Arrow and polars.
    """
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, list):
        if not data:
            raise QuiverInvalidArgument(f"{what}: no rows")
        if not all(isinstance(r, dict) for r in data):
            raise QuiverInvalidArgument(f"{what}: a list of rows must hold dicts")
        return pa.Table.from_pylist(data)
    if isinstance(data, dict):
        return pa.table(data)
    module = type(data).__module__
    if module.startswith("polars"):
        return data.to_arrow()
    if module.startswith("pandas"):
        return _pandas_to_arrow(data)
    raise QuiverInvalidArgument(
        f"{what}: expected a pandas or polars DataFrame, an Arrow Table or a list of dicts, got {type(data).__name__}"
    )


def _pandas_to_arrow(df: Any) -> pa.Table:
    columns = {}
    for name in df.columns:
        col = df[name]
        if col.dtype.kind == "f":
            # from_pandas semantics would turn NaN into null; NaN is a value here.
            columns[str(name)] = pa.array(col.to_numpy(), from_pandas=False)
        else:
            columns[str(name)] = pa.array(col, from_pandas=True)
    return pa.table(columns)


def plain_key(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A join key column as the server reads it: dictionary (pandas categorical) strings as
    plain strings."""
    if pa.types.is_dictionary(col.type):
        return pc.cast(col, col.type.value_type)
    return col


#: Protobuf's timestamp range (0001-01-01 .. 9999-12-31), in seconds since the epoch.
_SECONDS_MIN, _SECONDS_MAX = -62_135_596_800, 253_402_300_799


def micros_column(col: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """A timestamp column (any unit; no time zone = UTC) as int64 microseconds, refusing nulls
    and parts below a microsecond."""
    if col.null_count:
        raise QuiverInvalidArgument(f"{what}: {col.null_count} null timestamps")
    t = col.type
    if pa.types.is_timestamp(t):
        if t.unit == "ns":
            ns = pc.cast(col, pa.int64()).to_numpy()
            if np.any(ns % 1000):
                raise QuiverInvalidArgument(f"{what}: a timestamp has nanoseconds below a microsecond")
            return ns // 1000
        scale = {"s": 1_000_000, "ms": 1000, "us": 1}[t.unit]
        raw = pc.cast(col, pa.int64()).to_numpy()
        lo, hi = _SECONDS_MIN * 1_000_000 // scale, (_SECONDS_MAX + 1) * 1_000_000 // scale
        if len(raw) and (raw.min() < lo or raw.max() >= hi):
            raise QuiverInvalidArgument(f"{what}: a timestamp is outside 0001-01-01 .. 9999-12-31")
        return raw * scale
    if pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64()).to_numpy()
    raise QuiverInvalidArgument(f"{what}: not a timestamp column (type {t})")


# ---- entity keys ---------------------------------------------------------------------------


def check_key_columns(table: pa.Table, join_keys: list[tuple[str, str]], what: str) -> list[Any]:
    """The join key columns of a table (dictionaries decoded), checked against the key types."""
    cols = []
    for name, kind in join_keys:
        if name not in table.column_names:
            raise QuiverInvalidArgument(f"{what}: missing join key column {name!r}")
        col = plain_key(table.column(name))
        if col.null_count:
            raise QuiverInvalidArgument(f"{what}: join key column {name!r} has nulls")
        t = col.type
        if kind == "int64" and not pa.types.is_integer(t):
            raise QuiverInvalidArgument(f"{what}: join key {name!r} is int64 but the column holds {t}")
        if kind == "string" and not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise QuiverInvalidArgument(f"{what}: join key {name!r} is a string but the column holds {t}")
        cols.append(col)
    return cols


def key_columns(table: pa.Table, join_keys: list[tuple[str, str]], what: str) -> list[list[Any]]:
    """The join key columns of a table as Python lists, checked against the key types."""
    return [col.to_pylist() for col in check_key_columns(table, join_keys, what)]


def fill_key(key: Any, parts: Sequence[Any], join_keys: list[tuple[str, str]]) -> None:
    """Fills a quiver.v1.EntityKey."""
    if len(parts) != len(join_keys):
        names = ", ".join(name for name, _ in join_keys)
        raise QuiverInvalidArgument(f"an entity key has {len(parts)} parts; its entity type's join keys are {names}")
    for (name, kind), v in zip(join_keys, parts, strict=True):
        if kind == "int64":
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise QuiverInvalidArgument(f"join key {name!r} is int64, got {v!r}")
            key.parts.add().int64_value = int(v)
        else:
            if not isinstance(v, str):
                raise QuiverInvalidArgument(f"join key {name!r} is a string, got {v!r}")
            key.parts.add().string_value = v


def rows_to_keys(entity_rows: Any, join_keys: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """Entity rows (a list of dicts, or a DataFrame/Table with the join key columns) as key
    tuples in order."""
    if isinstance(entity_rows, list) and all(isinstance(r, dict) for r in entity_rows):
        keys = []
        for i, row in enumerate(entity_rows):
            try:
                keys.append(tuple(row[name] for name, _ in join_keys))
            except KeyError as e:
                raise QuiverInvalidArgument(f"entity row {i}: missing join key {e.args[0]!r}") from None
        return keys
    table = to_arrow_table(entity_rows, "entity rows")
    return list(zip(*key_columns(table, join_keys, "entity rows"), strict=True))


# ---- values --------------------------------------------------------------------------------


def column_to_arrow(col: Any, n: int) -> tuple[pa.Array, pa.Array, pa.Array]:
    """A FeatureColumn's (values, statuses, event times) for n rows. Values are null where the
    status holds no value (NOT_FOUND, STALE, UNAVAILABLE)."""
    statuses = np.fromiter(col.statuses, dtype=np.int32, count=len(col.statuses))
    if len(statuses) != n:
        raise QuiverInvalidArgument(f"{col.feature_ref}: {len(statuses)} statuses for {n} rows")
    missing = ~np.isin(statuses, _HAS_VALUE)
    arrow_type = ARROW_TYPES.get(col.type)
    if arrow_type is None:
        raise QuiverInvalidArgument(f"{col.feature_ref}: unknown value type {col.type}")
    raw = getattr(col, _VALUE_FIELDS[col.type])
    py: Any
    if col.type in (types.VALUE_TYPE_FLOAT32_VECTOR, types.VALUE_TYPE_INT64_LIST, types.VALUE_TYPE_STRING_LIST):
        py = [list(v.values) for v in raw]
    elif col.type in (types.VALUE_TYPE_INT64, types.VALUE_TYPE_FLOAT32, types.VALUE_TYPE_FLOAT64, types.VALUE_TYPE_BOOL):
        py = np.array(raw, dtype=arrow_type.to_pandas_dtype())
    else:
        py = list(raw)
    if len(py) != n:
        py = list(py) + [None] * (n - len(py))  # a short column: the rest hold no value
        missing |= np.array([v is None for v in py])
    values = pa.array(py, type=arrow_type, mask=missing if missing.any() else None)
    times = np.fromiter(col.event_times_us, dtype=np.int64, count=len(col.event_times_us))
    # An event time only for a PRESENT value (as the Flight answers have it).
    present = statuses == types.FEATURE_STATUS_PRESENT
    event_times = pa.array(times, type=TIMESTAMP, mask=~present) if len(times) == n else pa.nulls(n, TIMESTAMP)
    status_names = pa.array([STATUS_NAMES.get(int(s), "UNSPECIFIED") for s in statuses], type=pa.string())
    return values, status_names, event_times


def python_value(v: Any, type_name: str, what: str) -> types.Value:
    """A Python value (from an Arrow column's to_pylist) as a quiver.v1.Value of a feature's
    registered type."""
    if isinstance(v, np.generic):
        v = v.item()
    try:
        if type_name == "bool":
            if not isinstance(v, bool):
                raise TypeError
            return types.Value(bool_value=v)
        if type_name == "int64":
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError
            return types.Value(int64_value=v)
        if type_name == "float32":
            return types.Value(float32_value=_float(v))
        if type_name == "float64":
            return types.Value(float64_value=_float(v))
        if type_name == "string":
            if not isinstance(v, str):
                raise TypeError
            return types.Value(string_value=v)
        if type_name == "bytes":
            if not isinstance(v, (bytes, bytearray)):
                raise TypeError
            return types.Value(bytes_value=bytes(v))
        if type_name == "float32_vector":
            return types.Value(float32_vector=types.Float32List(values=[_float(x) for x in v]))
        if type_name == "int64_list":
            if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
                raise TypeError
            return types.Value(int64_list=types.Int64List(values=v))
        if type_name == "string_list":
            if any(not isinstance(x, str) for x in v):
                raise TypeError
            return types.Value(string_list=types.StringList(values=v))
    except (TypeError, ValueError):
        pass
    raise QuiverInvalidArgument(f"{what}: {v!r} is not a {type_name}")


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    return float(v)


def _feeds(t: pa.DataType, type_name: str) -> bool:
    """Whether an Arrow column of type t can feed a feature of type_name (as the server's
    Flight writes convert them)."""
    ints = pa.types.is_integer(t)
    strings = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if type_name == "bool":
        return pa.types.is_boolean(t)
    if type_name == "int64":
        return ints
    if type_name in ("float32", "float64"):
        return pa.types.is_floating(t) or ints
    if type_name == "string":
        return strings
    if type_name == "bytes":
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    item = t.value_type
    if pa.types.is_null(item):
        return type_name in ("float32_vector", "int64_list", "string_list")  # empty lists only
    if type_name == "float32_vector":
        return pa.types.is_floating(item) or pa.types.is_integer(item)
    if type_name == "int64_list":
        return pa.types.is_integer(item)
    return pa.types.is_string(item) or pa.types.is_large_string(item)


def check_write_columns(
    table: pa.Table, group: FeatureGroup, group_ref: str, join_keys: list[tuple[str, str]], timestamp_column: str
) -> pa.Table:
    """The table to write: every column a join key, the time column or a feature whose type
    the column can feed (all-null columns are dropped: they write nothing)."""
    what = f"write to {group_ref}"
    if timestamp_column not in table.column_names:
        raise QuiverInvalidArgument(f"{what}: missing event time column {timestamp_column!r}")
    key_names = {name for name, _ in join_keys}
    feature_types = {f.name: f.type for f in group.features}
    keep = []
    for c in table.column_names:
        if c in key_names or c == timestamp_column:
            keep.append(c)
            continue
        if c not in feature_types:
            raise QuiverInvalidArgument(
                f"{what}: column {c!r} is not a feature of {group.name} (features: {', '.join(feature_types)})"
            )
        t = table.schema.field(c).type
        if pa.types.is_null(t):
            continue
        if not _feeds(t, feature_types[c]):
            raise QuiverInvalidArgument(f"{what}: column {c!r} holds {t}, which is not a {feature_types[c]}")
        keep.append(c)
    if len(keep) == len(key_names) + 1:
        raise QuiverInvalidArgument(f"{what}: no feature columns")
    return table.select(keep)


def write_rows(
    table: pa.Table,
    group: FeatureGroup,
    group_ref: str,
    join_keys: list[tuple[str, str]],
    timestamp_column: str,
) -> Iterator[Any]:
    """WriteRow messages for every row of a table: join key columns, the event time column, and
    one column per feature written (nulls are not written)."""
    from quiver.v1 import feature_service_pb2 as fs

    what = f"write to {group_ref}"
    if timestamp_column not in table.column_names:
        raise QuiverInvalidArgument(f"{what}: missing event time column {timestamp_column!r}")
    key_names = {name for name, _ in join_keys}
    feature_types = {f.name: f.type for f in group.features}
    feature_cols = [c for c in table.column_names if c not in key_names and c != timestamp_column]
    for c in feature_cols:
        if c not in feature_types:
            raise QuiverInvalidArgument(
                f"{what}: column {c!r} is not a feature of {group.name} (features: {', '.join(feature_types)})"
            )
    if not feature_cols:
        raise QuiverInvalidArgument(f"{what}: no feature columns")
    keys = list(zip(*key_columns(table, join_keys, what), strict=True))
    times = micros_column(table.column(timestamp_column), f"{what}: {timestamp_column}")
    values = {c: table.column(c).to_pylist() for c in feature_cols}
    for i, key in enumerate(keys):
        row = fs.WriteRow(group=group_ref)
        fill_key(row.entity, key, join_keys)
        set_timestamp(row.event_time, int(times[i]))
        for c in feature_cols:
            v = values[c][i]
            if v is not None:
                row.values[c].CopyFrom(python_value(v, feature_types[c], f"{what}: row {i}, {c}"))
        yield row


def micros_list(times: pa.Array) -> list[int | None]:
    """A timestamp array as microseconds (None where null)."""
    return pc.cast(times, pa.int64()).to_pylist()
