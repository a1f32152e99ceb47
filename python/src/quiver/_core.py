"""What the sync and asyncio clients share: limits, feature references, registry metadata,
request building and answer assembly. The clients only do the I/O."""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc
import pandas as pd
import pyarrow as pa

from quiver import _convert as cv
from quiver.errors import QuiverError, QuiverInternal, QuiverInvalidArgument
from quiver.registry import VALUE_TYPES, EntityType, FeatureGroup, value_from_proto
from quiver.v1 import feature_service_pb2 as fs
from quiver.v1 import types_pb2 as types

# Limits of the server's API (proto/quiver/v1/feature_service.proto); the client splits work
# to stay under them.
#: Entities per GetOnlineFeatures request.
ONLINE_ENTITIES_MAX = 10_000
#: Entities x features per GetOnlineFeatures request.
ONLINE_CELLS_MAX = 1_000_000
#: Rows per WriteFeatures request.
WRITE_ROWS_MAX = 10_000
#: Values per WriteFeatures request.
WRITE_VALUES_MAX = 99_999
#: Idempotency key bytes.
IDEMPOTENCY_KEY_MAX = 128
#: Bytes per WriteFeatures request the client aims at most (quiverd reserves three times a
#: request's bytes; its default memory budget gives requests 64 MiB in all).
WRITE_REQUEST_BYTES = 8 * 1024 * 1024
#: Spine rows the client sends per GetHistoricalFeatures request (the server takes up to
#: 10,000,000; smaller requests keep both sides' memory bounded and start answers sooner).
SPINE_ROWS_PER_REQUEST = 1_000_000
#: The largest message either side accepts (the server's request limit).
MESSAGE_BYTES_MAX = 256 * 1024 * 1024
#: How long a spine request the server refuses with retry advice (shed for load, or a token
#: over its rate) is sent again before the error is raised: joins only read, so a retry is
#: safe. Each wait is at least the advice; past it, waits double up to SHED_RETRY_DELAY_MAX
#: (with up to a tenth more at random, so that clients shed together do not return together).
SHED_RETRY_SECONDS = 120.0
SHED_RETRY_DELAY_MAX = 2.0

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
]

_DURABILITY: dict[str | None, types.Durability] = {
    None: types.DURABILITY_UNSPECIFIED,
    "sync": types.DURABILITY_SYNC,
    "async": types.DURABILITY_ASYNC,
}


def durability(d: str | None) -> types.Durability:
    if d not in _DURABILITY:
        raise QuiverInvalidArgument(f"durability {d!r}: use 'sync', 'async' or None (the server's default)")
    return _DURABILITY[d]


def target(address: str) -> str:
    """host:port from an address that may carry an http:// or https:// scheme."""
    for scheme in ("http://", "https://"):
        if address.startswith(scheme):
            return address[len(scheme) :].rstrip("/")
    return address


def timeout_seconds(deadline: float | timedelta | None) -> float | None:
    if deadline is None:
        return None
    if isinstance(deadline, timedelta):
        return deadline.total_seconds()
    return float(deadline)


@dataclass(frozen=True)
class FeatureRef:
    """A parsed "group:feature" or "group@3:feature"."""

    text: str
    group: str
    version: int  # 0: the serving version
    feature: str

    @classmethod
    def parse(cls, text: str) -> FeatureRef:
        group_part, sep, feature = text.partition(":")
        if not sep or not group_part or not feature:
            raise QuiverInvalidArgument(f"feature {text!r}: expected 'group:feature' or 'group@3:feature'")
        group, at, version = group_part.partition("@")
        v = 0
        if at:
            if not version.isdigit() or int(version) < 1:
                raise QuiverInvalidArgument(f"feature {text!r}: the version after @ must be a number >= 1")
            v = int(version)
        return cls(text, group, v, feature)

    def column_name(self, full: bool) -> str:
        return self.text.replace(":", "__") if full else self.feature


def column_names(refs: Sequence[FeatureRef], full: bool, taken: Iterable[str]) -> list[str]:
    names = [r.column_name(full) for r in refs]
    seen = set(taken)
    for name, ref in zip(names, refs, strict=True):
        if name in seen:
            hint = "" if full else " (use full_feature_names=True)"
            raise QuiverInvalidArgument(f"feature {ref.text}: column {name!r} is already taken{hint}")
        seen.add(name)
    return names


class Meta:
    """Registry metadata the client needs to build requests (entity types' join keys, groups'
    features and defaults), fetched on first use and kept until :meth:`clear`. It is also what
    the degraded path serves defaults from when the server cannot be reached."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, int], FeatureGroup] = {}
        self.entity_types: dict[str, EntityType] = {}
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            self.groups.clear()
            self.entity_types.clear()

    def missing_groups(self, refs: Sequence[FeatureRef]) -> list[tuple[str, int]]:
        with self.lock:
            return sorted({(r.group, r.version) for r in refs} - set(self.groups))

    def put_group(self, key: tuple[str, int], g: FeatureGroup) -> None:
        with self.lock:
            self.groups[key] = g

    def put_entity_type(self, e: EntityType) -> None:
        with self.lock:
            self.entity_types[e.name] = e

    def entity_type_of(self, refs: Sequence[FeatureRef], given: str | None) -> str:
        with self.lock:
            names = {self.groups[(r.group, r.version)].entity_type for r in refs}
        if given is not None:
            names.add(given)
        if len(names) != 1:
            raise QuiverInvalidArgument(f"features of more than one entity type: {', '.join(sorted(names))}")
        return names.pop()

    def join_keys(self, entity_type: str) -> list[tuple[str, str]] | None:
        with self.lock:
            e = self.entity_types.get(entity_type)
        return None if e is None else [(k.name, k.type) for k in e.join_keys]

    def feature(self, ref: FeatureRef) -> Any:
        with self.lock:
            g = self.groups[(ref.group, ref.version)]
        try:
            return g.feature(ref.feature)
        except KeyError:
            raise QuiverInvalidArgument(f"feature {ref.text}: {ref.group} has no feature {ref.feature!r}") from None


# ---- online answers ------------------------------------------------------------------------


@dataclass
class FeatureResult:
    """One requested feature's answers, row i for entity i."""

    ref: str
    column: str
    group_version: int
    values: pa.Array
    statuses: pa.Array
    event_times: pa.Array


@dataclass
class OnlineResponse:
    """Answers of :meth:`Client.get_online_features`: values, statuses ("PRESENT",
    "NOT_FOUND", "STALE", "DEFAULTED", "UNAVAILABLE", and "OVERFLOW" for an aggregate's int64 sum
    outside int64) and event times per feature.

    ``degraded`` is true when some answers came from the client's cache or registered defaults
    because the server could not answer (see ``fallback``)."""

    entities: dict[str, list[Any]]
    features: list[FeatureResult]
    degraded: bool = False
    with_status: bool = True

    def to_arrow(self) -> pa.Table:
        cols: dict[str, pa.Array] = {k: pa.array(v) for k, v in self.entities.items()}
        for f in self.features:
            cols[f.column] = f.values
            if self.with_status:
                cols[f"{f.column}__status"] = f.statuses
                cols[f"{f.column}__event_timestamp"] = f.event_times
        return pa.table(cols)

    def to_dict(self) -> dict[str, list[Any]]:
        """Join keys and features as lists of Python values (None where nothing is served),
        with ``<feature>__status`` and ``<feature>__event_timestamp`` lists."""
        table = self.to_arrow()
        return {k: v.to_pylist() for k, v in zip(table.column_names, table.columns, strict=True)}

    def to_df(self) -> pd.DataFrame:
        return arrow_to_pandas(self.to_arrow())

    def statuses(self, column: str) -> list[str]:
        for f in self.features:
            if f.column == column or f.ref == column:
                return f.statuses.to_pylist()
        raise KeyError(column)


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow to pandas keeping int64 and bool columns with nulls exact (pandas' nullable
    Int64/boolean) instead of turning them into float64."""

    def mapper(t: pa.DataType) -> Any:
        if pa.types.is_int64(t):
            return pd.Int64Dtype()
        if pa.types.is_boolean(t):
            return pd.BooleanDtype()
        return None

    return table.to_pandas(types_mapper=mapper)


def online_request(
    entity_type: str,
    keys: Sequence[tuple[Any, ...]],
    join_keys: list[tuple[str, str]],
    refs: Sequence[FeatureRef],
    as_of: Any,
    default_missing: bool,
    default_unavailable: bool,
) -> fs.GetOnlineFeaturesRequest:
    req = fs.GetOnlineFeaturesRequest(
        entity_type=entity_type,
        features=[r.text for r in refs],
        default_missing=default_missing,
        default_unavailable=default_unavailable,
    )
    for key in keys:
        cv.fill_key(req.entities.add(), key, join_keys)
    if as_of is not None:
        cv.set_timestamp(req.as_of, cv.to_micros(as_of))
    return req


def online_chunks(n_entities: int, n_features: int) -> Iterator[tuple[int, int]]:
    step = max(1, min(ONLINE_ENTITIES_MAX, ONLINE_CELLS_MAX // max(1, n_features)))
    for start in range(0, n_entities, step):
        yield start, min(n_entities, start + step)


@dataclass
class OnlineCache:
    """An in-process LRU cache of online answers, for inference servers (off by default).

    A cached answer is served for ``ttl`` after it was fetched, for lookups without ``as_of``;
    with ``fallback`` on, it is also what the client serves while the server is unreachable.
    """

    max_entries: int = 100_000
    ttl: timedelta = timedelta(seconds=60)
    _entries: OrderedDict[Any, tuple[Any, str, int, float]] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    hits: int = 0
    misses: int = 0

    def get(self, key: Any) -> tuple[Any, str, int] | None:
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(key)
            if e is None or e[3] <= now:
                if e is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return e[0], e[1], e[2]

    def put(self, key: Any, value: Any, status: str, event_us: int) -> None:
        expires = time.monotonic() + self.ttl.total_seconds()
        with self._lock:
            self._entries[key] = (value, status, event_us, expires)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class OnlinePlan:
    """One get_online_features call: which cells come from the cache, which entities are asked
    of the server, and how the answers are assembled in request order."""

    def __init__(
        self,
        meta: Meta,
        refs: list[FeatureRef],
        columns: list[str],
        entity_type: str,
        join_keys: list[tuple[str, str]],
        keys: list[tuple[Any, ...]],
        cache: OnlineCache | None,
        default_missing: bool,
        with_status: bool,
        default_unavailable: bool = False,
    ) -> None:
        self.meta, self.refs, self.columns = meta, refs, columns
        self.entity_type, self.join_keys, self.keys = entity_type, join_keys, keys
        self.cache, self.default_missing, self.with_status = cache, default_missing, with_status
        self.default_unavailable = default_unavailable
        # cells[(row, feature index)] = (value, status, event_us); filled from the cache first.
        self.cells: dict[tuple[int, int], tuple[Any, str, int]] = {}
        self.versions = [0] * len(refs)
        self.fetch: list[int] = list(range(len(keys)))
        if cache is not None:
            self.fetch = []
            for i, key in enumerate(keys):
                hit_all = True
                for j, ref in enumerate(refs):
                    hit = cache.get(self.cache_key(key, ref))
                    if hit is None:
                        hit_all = False
                        break
                    self.cells[(i, j)] = hit
                if not hit_all:
                    self.fetch.append(i)
        self.answers: list[tuple[list[int], Any]] = []
        self.degraded = False

    def cache_key(self, key: tuple[Any, ...], ref: FeatureRef) -> Any:
        # The flags change what a status means (a DEFAULTED answer may stand for a missed
        # deadline), so answers are cached per flag combination.
        return (self.entity_type, key, ref.text, self.default_missing, self.default_unavailable)

    def requests(self, as_of: Any, default_unavailable: bool) -> Iterator[tuple[list[int], fs.GetOnlineFeaturesRequest]]:
        for start, end in online_chunks(len(self.fetch), len(self.refs)):
            rows = self.fetch[start:end]
            yield (
                rows,
                online_request(
                    self.entity_type,
                    [self.keys[i] for i in rows],
                    self.join_keys,
                    self.refs,
                    as_of,
                    self.default_missing,
                    default_unavailable,
                ),
            )

    def answered(self, rows: list[int], resp: fs.GetOnlineFeaturesResponse) -> None:
        if len(resp.columns) != len(self.refs):
            raise QuiverInvalidArgument(f"the server answered {len(resp.columns)} columns for {len(self.refs)} features")
        self.answers.append((rows, resp))

    def degrade(self, rows: list[int]) -> None:
        """Answers rows the server could not: the cache's answer if fresh, else the feature's
        registered default (DEFAULTED), else nothing (UNAVAILABLE)."""
        self.degraded = True
        for j, ref in enumerate(self.refs):
            default = self.meta.feature(ref).default
            for i in rows:
                hit = self.cache.get(self.cache_key(self.keys[i], ref)) if self.cache is not None else None
                if hit is not None:
                    self.cells[(i, j)] = hit
                elif default is not None:
                    self.cells[(i, j)] = (default, "DEFAULTED", 0)
                else:
                    self.cells[(i, j)] = (None, "UNAVAILABLE", 0)

    def response(self) -> OnlineResponse:
        n = len(self.keys)
        key_cols = {name: [k[p] for k in self.keys] for p, (name, _) in enumerate(self.join_keys)}
        features = []
        fast = self.cache is None and not self.cells and len(self.answers) <= 1
        for j, ref in enumerate(self.refs):
            arrow_type = cv.ARROW_TYPES[VALUE_TYPES[self.meta.feature(ref).type]]
            if fast:
                if self.answers:
                    _, resp = self.answers[0]
                    col = resp.columns[j]
                    self.versions[j] = col.group_version
                    values, statuses, times = cv.column_to_arrow(col, n)
                else:
                    values, statuses, times = (pa.nulls(0, arrow_type), pa.array([], pa.string()), pa.nulls(0, cv.TIMESTAMP))
            else:
                vals: list[Any] = [None] * n
                stats: list[str] = ["UNAVAILABLE"] * n
                evs: list[int | None] = [None] * n
                for rows, resp in self.answers:
                    col = resp.columns[j]
                    self.versions[j] = col.group_version
                    a_vals, a_stats, a_times = cv.column_to_arrow(col, len(rows))
                    for r, v, s, t in zip(rows, a_vals.to_pylist(), a_stats.to_pylist(), cv.micros_list(a_times), strict=True):
                        vals[r], stats[r], evs[r] = v, s, t
                        if self.cache is not None and s != "UNAVAILABLE":
                            self.cache.put(self.cache_key(self.keys[r], ref), v, s, t or 0)
                for (r, jj), (v, s, t) in self.cells.items():
                    if jj == j:
                        vals[r], stats[r], evs[r] = v, s, t or None
                values = pa.array(vals, type=arrow_type)
                statuses = pa.array(stats, type=pa.string())
                times = pa.array(evs, type=pa.int64()).cast(cv.TIMESTAMP)
            features.append(FeatureResult(ref.text, self.columns[j], self.versions[j], values, statuses, times))
        return OnlineResponse(key_cols, features, self.degraded, self.with_status)


# ---- historical answers --------------------------------------------------------------------


def spine_pieces(entity_df: Any) -> Iterator[pa.Table]:
    """The spine as Arrow tables: one for a DataFrame or Table, one per batch for a
    RecordBatchReader or an iterable of DataFrames/Tables (spines larger than memory)."""
    if isinstance(entity_df, pa.RecordBatchReader):
        for batch in entity_df:
            yield pa.Table.from_batches([batch])
        return
    module = type(entity_df).__module__
    if isinstance(entity_df, (pa.Table, pa.RecordBatch, list, dict)) or module.startswith(("pandas", "polars")):
        yield cv.to_arrow_table(entity_df, "entity_df")
        return
    try:
        iterator = iter(entity_df)
    except TypeError:
        raise QuiverInvalidArgument(f"entity_df: {type(entity_df).__name__} is not a table") from None
    for piece in iterator:
        yield cv.to_arrow_table(piece, "entity_df")


def spine_chunks(entity_df: Any, rows: int | None = None) -> Iterator[pa.Table]:
    """Spine pieces regrouped into tables of at most ``rows`` (default
    SPINE_ROWS_PER_REQUEST) rows; the last may be shorter."""
    rows = rows or SPINE_ROWS_PER_REQUEST
    pending: list[pa.Table] = []
    pending_rows = 0
    schema = None
    for piece in spine_pieces(entity_df):
        if schema is None:
            schema = piece.schema
        elif piece.schema != schema:
            piece = piece.cast(schema)
        while piece.num_rows:
            take = min(rows - pending_rows, piece.num_rows)
            pending.append(piece.slice(0, take))
            pending_rows += take
            piece = piece.slice(take)
            if pending_rows == rows:
                yield pa.concat_tables(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.concat_tables(pending)


def historical_request(
    chunk: pa.Table,
    entity_type: str,
    join_keys: list[tuple[str, str]],
    refs: Sequence[FeatureRef],
    timestamp_column: str,
    known_at: Any,
    strict_availability: bool,
    use_defaults: bool,
) -> fs.GetHistoricalFeaturesRequest:
    if timestamp_column not in chunk.column_names:
        raise QuiverInvalidArgument(f"entity_df: missing timestamp column {timestamp_column!r}")
    keys = cv.key_columns(chunk, join_keys, "entity_df")
    times = cv.micros_column(chunk.column(timestamp_column), f"entity_df: {timestamp_column}")
    req = fs.GetHistoricalFeaturesRequest(
        entity_type=entity_type,
        features=[r.text for r in refs],
        strict_availability=strict_availability,
        use_defaults=use_defaults,
    )
    if known_at is not None:
        cv.set_timestamp(req.known_at, cv.to_micros(known_at))
    spine = req.spine
    for i, key in enumerate(zip(*keys, strict=True)):
        row = spine.add()
        cv.fill_key(row.entity, key, join_keys)
        us = int(times[i])
        row.timestamp.seconds = us // 1_000_000
        row.timestamp.nanos = (us % 1_000_000) * 1000
    return req


def historical_batch(
    chunk: pa.Table,
    resp: fs.GetHistoricalFeaturesResponse,
    columns: list[str],
    with_status: bool,
) -> pa.RecordBatch:
    """One answer chunk as a record batch: the spine rows it answers, then the features."""
    if len(resp.columns) != len(columns):
        raise QuiverInvalidArgument(f"the server answered {len(resp.columns)} columns for {len(columns)} features")
    n = len(resp.columns[0].statuses) if resp.columns else 0
    first = resp.first_row
    if first + n > chunk.num_rows:
        raise QuiverInvalidArgument(f"the server answered rows {first}..{first + n} of a {chunk.num_rows}-row spine")
    spine = chunk.slice(first, n)
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in spine.columns]
    names = list(spine.column_names)
    for name, col in zip(columns, resp.columns, strict=True):
        values, statuses, times = cv.column_to_arrow(col, n)
        arrays.append(values)
        names.append(name)
        if with_status:
            arrays += [statuses, times]
            names += [f"{name}__status", f"{name}__event_timestamp"]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def check_answered(rows: int, spine_rows: int) -> None:
    """A join stream that ended early (a server fault) is an error, not a short answer."""
    if rows != spine_rows:
        raise QuiverInternal(grpc.StatusCode.INTERNAL, f"the join answered {rows} of {spine_rows} spine rows")


def historical_schema(
    spine_schema: pa.Schema, meta: Meta, refs: Sequence[FeatureRef], columns: list[str], with_status: bool
) -> pa.Schema:
    fields = list(spine_schema)
    for ref, name in zip(refs, columns, strict=True):
        fields.append(pa.field(name, cv.ARROW_TYPES[VALUE_TYPES[meta.feature(ref).type]]))
        if with_status:
            fields += [pa.field(f"{name}__status", pa.string()), pa.field(f"{name}__event_timestamp", cv.TIMESTAMP)]
    return pa.schema(fields)


def empty_result(entity_df: Any, meta: Meta, refs: Sequence[FeatureRef], full: bool, with_status: bool) -> pa.Table:
    """The answer to a spine without rows: no rows, the columns it would have had."""
    pieces = list(spine_pieces(entity_df))
    spine_schema = pieces[0].schema if pieces else pa.schema([])
    columns = column_names(refs, full, spine_schema.names)
    return historical_schema(spine_schema, meta, refs, columns, with_status).empty_table()


class JoinJob:
    """What the sync and asyncio join jobs share: the request's parts, the output column names,
    one spine chunk's protobuf request, and the answer to an empty spine."""

    def __init__(
        self,
        client: Any,
        entity_df: Any,
        refs: list[FeatureRef],
        entity_type: str,
        join_keys: list[tuple[str, str]],
        params: dict[str, Any],
        full_feature_names: bool,
        with_status: bool,
    ) -> None:
        self._client, self._entity_df, self._refs = client, entity_df, refs
        self._entity_type, self._join_keys, self._params = entity_type, join_keys, params
        self._full, self._with_status = full_feature_names, with_status
        self._schema: pa.Schema | None = None

    def _columns(self, spine: pa.Schema) -> list[str]:
        """The feature columns' names for a chunk, and the chunk's output schema (kept)."""
        columns = column_names(self._refs, self._full, spine.names)
        self._schema = historical_schema(spine, self._client._meta, self._refs, columns, self._with_status)
        return columns

    def _request(self, chunk: pa.Table) -> fs.GetHistoricalFeaturesRequest:
        p = self._params
        return historical_request(
            chunk,
            self._entity_type,
            self._join_keys,
            self._refs,
            p["timestamp_column"],
            p["known_at"],
            p["strict_availability"],
            p["use_defaults"],
        )

    def _empty(self) -> pa.Table:
        return empty_result(self._entity_df, self._client._meta, self._refs, self._full, self._with_status)


# ---- writes --------------------------------------------------------------------------------


@dataclass
class WriteResult:
    """What a write did: cell versions stored, requests sent, and (for a single-request write)
    the system time and version vector its cells carry (what a later compare-and-swap
    expects)."""

    values_written: int = 0
    requests: int = 0
    deduplicated: int = 0
    system_time: datetime | None = None
    version: dict[int, int] = field(default_factory=dict)

    def add(self, resp: fs.WriteFeaturesResponse) -> None:
        self.values_written += resp.values_written
        self.requests += 1
        self.deduplicated += int(resp.deduplicated)
        self.system_time = resp.system_time.ToDatetime(tzinfo=cv.EPOCH.tzinfo)
        self.version = {e.region: e.counter for e in resp.version.entries}


def write_requests(
    rows: list[fs.WriteRow],
    values_per_row: int,
    durability_: types.Durability,
    idempotency_key: str | None,
) -> list[fs.WriteFeaturesRequest]:
    step = max(1, min(WRITE_ROWS_MAX, WRITE_VALUES_MAX // max(1, values_per_row)))
    if rows:
        # Requests of at most WRITE_REQUEST_BYTES (the server reserves three times a request).
        sample = rows[: min(len(rows), 100)]
        per_row = max(1, sum(r.ByteSize() for r in sample) // len(sample))
        step = max(1, min(step, WRITE_REQUEST_BYTES // per_row))
    n = (len(rows) + step - 1) // step
    out = []
    for i in range(n):
        key = ""
        if idempotency_key:  # "" is no key
            key = idempotency_key if n == 1 else f"{idempotency_key}/{i}"
            if len(key.encode()) > IDEMPOTENCY_KEY_MAX:
                raise QuiverInvalidArgument(
                    f"idempotency key {key[:20]!r}...: over {IDEMPOTENCY_KEY_MAX} bytes (a write of {n} requests adds /<n> to it)"
                )
        out.append(fs.WriteFeaturesRequest(rows=rows[i * step : (i + 1) * step], durability=durability_, idempotency_key=key))
    return out


def history_frame(responses: Iterable[fs.ScanHistoryResponse]) -> pd.DataFrame:
    rows = []
    for resp in responses:
        for v in resp.versions:
            rows.append(
                {
                    "feature": v.feature_ref,
                    "event_timestamp": cv.from_micros(cv.timestamp_micros(v.event_time)),
                    "system_timestamp": cv.from_micros(cv.timestamp_micros(v.system_time)),
                    "value": value_from_proto(v.value) if v.HasField("value") else None,
                    "deleted": not v.HasField("value"),
                    "version": {e.region: e.counter for e in v.version.entries},
                }
            )
    columns = ["feature", "event_timestamp", "system_timestamp", "value", "deleted", "version"]
    return pd.DataFrame(rows, columns=columns)


def history_frame_from_arrow(t: pa.Table) -> pd.DataFrame:
    """A history scan over Flight (flight.proto, FlightTicket.scan) as history_frame's DataFrame."""
    features = t.column("feature").to_pylist()
    values = {name: t.column(name).to_pylist() for name in t.column_names[6:]}
    regions, counters = t.column("version_regions").to_pylist(), t.column("version_counters").to_pylist()
    deleted = t.column("deleted").to_pylist()
    return pd.DataFrame(
        {
            "feature": features,
            "event_timestamp": t.column("event_timestamp").to_pylist(),
            "system_timestamp": t.column("system_timestamp").to_pylist(),
            "value": [None if deleted[i] else values[f][i] for i, f in enumerate(features)],
            "deleted": deleted,
            "version": [dict(zip(r, c, strict=True)) for r, c in zip(regions, counters, strict=True)],
        },
        columns=["feature", "event_timestamp", "system_timestamp", "value", "deleted", "version"],
    )


def health_frame(resp: Any) -> pd.DataFrame:
    rows = []
    for g in resp.groups:
        freshness = g.freshness.ToTimedelta().total_seconds() if g.HasField("freshness") else None
        for f in g.features:
            rows.append(
                {
                    "group": g.group,
                    "version": g.version,
                    "feature": f.feature,
                    "present": f.present,
                    "not_found": f.not_found,
                    "stale": f.stale,
                    "defaulted": f.defaulted,
                    "unavailable": f.unavailable,
                    "null_rate": f.null_rate if f.HasField("null_rate") else None,
                    "null_rate_breached": f.null_rate_breached,
                    "freshness_seconds": freshness,
                    "sla_breached": g.sla_breached,
                }
            )
    columns = [
        "group",
        "version",
        "feature",
        "present",
        "not_found",
        "stale",
        "defaulted",
        "unavailable",
        "null_rate",
        "null_rate_breached",
        "freshness_seconds",
        "sla_breached",
    ]
    return pd.DataFrame(rows, columns=columns)


def as_datetime(t: Any) -> datetime | None:
    return None if t is None else cv.from_micros(cv.to_micros(t))


class FlightChoice:
    """Whether a client sends training sets, writes and history scans over Arrow Flight: ``use``
    is True, False, or None (use it unless the server turns out not to serve it). Shared by
    :class:`quiver.Client` and :class:`quiver.AsyncClient` (which runs the blocking transport in
    a worker thread)."""

    def __init__(self, target: str, token: str | None, tls: Any, timeout: float | None, use: bool | None) -> None:
        self.use = use
        self._args = (target, token, tls, timeout)
        self._transport: Any = None
        self._lock = threading.Lock()

    def transport(self) -> Any:
        """The Flight transport (made once, on first use, whichever thread asks), or None when
        Flight is off."""
        if self.use is False:
            return None
        with self._lock:
            if self._transport is None:
                from quiver._flight import FlightTransport

                self._transport = FlightTransport(*self._args)
            return self._transport

    def failed(self, e: Exception) -> bool:
        """True if the call should go over the protobuf API instead: the server has no Flight
        and the client was not told to insist on it (Flight is then off for this client)."""
        from quiver._flight import is_unimplemented

        if isinstance(e, QuiverError) and is_unimplemented(e) and self.use is None:
            self.use = False
            return True
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ShedRetry:
    """When to send a shed read again (see SHED_RETRY_SECONDS): ``delay(e)`` is the wait
    before the next attempt, or None when ``e`` is not worth retrying or the time is up."""

    def __init__(self, budget: float = SHED_RETRY_SECONDS) -> None:
        self._until = time.monotonic() + budget
        self._attempt = 0
        # When the waits handed out so far end (the caller sleeps them).
        self._waited = 0.0

    def after(self, e: Exception, answered: bool, rows: int) -> float | None:
        """What a join's spine request does once refused with RESOURCE_EXHAUSTED ``e``: wait the
        returned seconds and send it again, or (None) send it again in two halves (it can never
        fit). Raises ``e`` when answers were already given, or the retries are spent."""
        if answered:
            raise e
        if getattr(e, "retry_after", None) is None and rows >= 2:
            return None
        wait = self.delay(e)
        if wait is None:
            raise e
        return wait

    def delay(self, e: Exception) -> float | None:
        advice = getattr(e, "retry_after", None)
        if advice is None:
            return None
        a = max(advice.total_seconds(), 0.01)
        d = max(a, min(a * 2**self._attempt, SHED_RETRY_DELAY_MAX)) * (1 + random.random() / 10)
        self._attempt += 1
        start = max(time.monotonic(), self._waited)
        if start + d > self._until:
            return None
        self._waited = start + d
        return d
