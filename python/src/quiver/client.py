"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from os import PathLike, fspath
from typing import Any, TypeVar

import grpc
import pandas as pd
import pyarrow as pa

from quiver import _convert as cv
from quiver import _core as core
from quiver import _route
from quiver._core import FeatureRef, OnlineCache, OnlineResponse, WriteResult
from quiver.errors import QuiverError, QuiverInvalidArgument, QuiverResourceExhausted, QuiverUnavailable, from_rpc_error
from quiver.registry import EntityType, FeatureGroup, GroupVersion, RegistryChange, load_registry
from quiver.v1 import feature_service_pb2 as fs
from quiver.v1 import feature_service_pb2_grpc as fs_grpc
from quiver.v1 import monitor_pb2 as mon
from quiver.v1 import monitor_pb2_grpc as mon_grpc
from quiver.v1 import registry_pb2 as reg
from quiver.v1 import registry_pb2_grpc as reg_grpc

__all__ = ["Client", "Tls", "HistoricalJob"]

T = TypeVar("T")

#: Codes after which the degraded path answers from the cache and registered defaults.
DEGRADE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Tls:
    """TLS settings: the CA that signed the server's certificate (PEM bytes or a path), and for
    mutual TLS the client's certificate chain and key."""

    def __init__(
        self,
        ca: bytes | str | PathLike[str] | None = None,
        cert: bytes | str | PathLike[str] | None = None,
        key: bytes | str | PathLike[str] | None = None,
    ) -> None:
        self.ca, self.cert, self.key = _pem(ca), _pem(cert), _pem(key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)


def _pem(x: bytes | str | PathLike[str] | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    with open(fspath(x), "rb") as f:
        return f.read()


def channel_credentials(tls: bool | Tls | None) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    return (Tls() if tls is True else tls).credentials()


def refs_of(features: Sequence[str]) -> list[FeatureRef]:
    if isinstance(features, str):
        raise QuiverInvalidArgument("features: a list of 'group:feature' strings, not one string")
    if not features:
        raise QuiverInvalidArgument("features: none asked for")
    return [FeatureRef.parse(f) for f in features]


def apply_request(path_or_objects: Any, dry_run: bool, promote: bool) -> reg.ApplyRegistryRequest:
    if isinstance(path_or_objects, (str, PathLike)):
        entity_types, groups = load_registry(path_or_objects)
    else:
        items = list(path_or_objects)
        if len(items) == 2 and all(isinstance(x, list) for x in items):  # load_registry's tuple
            items = items[0] + items[1]
        entity_types = [x for x in items if isinstance(x, EntityType)]
        groups = [x for x in items if isinstance(x, FeatureGroup)]
        if len(entity_types) + len(groups) != len(items):
            raise QuiverInvalidArgument("apply: expects a registry file path or EntityType / FeatureGroup objects")
    return reg.ApplyRegistryRequest(
        entity_types=[e.to_proto() for e in entity_types],
        feature_groups=[g.to_proto() for g in groups],
        dry_run=dry_run,
        promote=promote,
    )


def scan_request(
    entity_type: str,
    join_keys: list[tuple[str, str]],
    entity: Any,
    group: str,
    features: Sequence[str] | None,
    event_time_from: Any,
    event_time_to: Any,
    system_time_from: Any,
    system_time_to: Any,
    limit: int,
) -> fs.ScanHistoryRequest:
    key = (
        tuple(entity[name] for name, _ in join_keys)
        if isinstance(entity, dict)
        else tuple(entity)
        if isinstance(entity, (tuple, list))
        else (entity,)
    )
    req = fs.ScanHistoryRequest(entity_type=entity_type, group=group, features=list(features or ()), limit=limit)
    cv.fill_key(req.entity, key, join_keys)
    for field_, t in (
        ("event_time_from", event_time_from),
        ("event_time_to", event_time_to),
        ("system_time_from", system_time_from),
        ("system_time_to", system_time_to),
    ):
        if t is not None:
            cv.set_timestamp(getattr(req, field_), cv.to_micros(t))
    return req


def group_key(group: str) -> tuple[str, int]:
    """("name", version) of "name" (0: serving) or "name@3"."""
    name, at, version = group.partition("@")
    if not name or (at and (not version.isdigit() or int(version) < 1)):
        raise QuiverInvalidArgument(f"group {group!r}: expected 'group' or 'group@3'")
    return name, int(version) if at else 0


def write_requests(
    table: pa.Table,
    group: str,
    g: FeatureGroup,
    join_keys: list[tuple[str, str]],
    durability: str | None,
    idempotency_key: str | None,
    timestamp_column: str,
    expected_versions: dict[str, dict[int, int]] | None,
) -> list[fs.WriteFeaturesRequest]:
    rows = list(cv.write_rows(table, g, group, join_keys, timestamp_column))
    if expected_versions is not None:
        if len(rows) != 1:
            raise QuiverInvalidArgument(f"expected_versions: a compare-and-swap writes one row, not {len(rows)}")
        for feature, vv in expected_versions.items():
            cell = rows[0].expected_versions[feature]
            for region, counter in sorted(vv.items()):
                cell.entries.add(region=region, counter=counter)
    n_values = len(table.column_names) - len(join_keys) - 1
    return core.write_requests(rows, n_values, core.durability(durability), idempotency_key)


def delete_requests(
    group: str,
    join_keys: list[tuple[str, str]],
    entity_rows: Any,
    features: Sequence[str],
    event_time: Any,
    durability: str | None,
) -> list[fs.WriteFeaturesRequest]:
    if isinstance(features, str) or not features:
        raise QuiverInvalidArgument("delete: features is a non-empty list of feature names")
    keys = cv.rows_to_keys(entity_rows, join_keys)
    us = cv.to_micros(event_time)
    rows = []
    for key in keys:
        row = fs.WriteRow(group=group, deletes=list(features))
        cv.fill_key(row.entity, key, join_keys)
        cv.set_timestamp(row.event_time, us)
        rows.append(row)
    return core.write_requests(rows, len(features), core.durability(durability), None)


class Client:
    """A Quiver client over one gRPC channel (thread-safe).

    >>> with Client("localhost:50051") as q:
    ...     q.get_online_features(["user_stats:clicks"], [{"user_id": "u1"}]).to_df()

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. ``tls`` is True (the
    system's roots), a :class:`Tls`, or None for plaintext. ``cache`` (an
    :class:`OnlineCache`) and ``fallback`` turn on client-side degradation for inference:
    cached answers are served for lookups without ``as_of``, and when the server is unreachable
    or the deadline passes, the client answers from the cache, else the feature's registered
    default (DEFAULTED), else nothing (UNAVAILABLE), instead of raising.

    With ``route=True`` the client reads a sharded region's slot map from ``address`` and sends
    each entity of a lookup or write straight to its owner (``server/CLUSTER.md`` §4), saving
    the hop a forwarding node adds; writes then go over gRPC, not Flight. A write spanning
    shards is atomic on each shard, not across them. Against a node that is not sharded it
    changes nothing.
    """

    def __init__(
        self,
        address: str = "localhost:50051",
        token: str | None = None,
        tls: bool | Tls | None = None,
        *,
        timeout: float | timedelta | None = None,
        cache: OnlineCache | None = None,
        fallback: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        use_flight: bool | None = None,
        route: bool = False,
    ) -> None:
        creds = channel_credentials(tls)
        opts = core.CHANNEL_OPTIONS + list(options)
        self._flight = core.FlightChoice(core.target(address), token, tls, core.timeout_seconds(timeout), use_flight)
        self._channel = (
            grpc.secure_channel(core.target(address), creds, opts)
            if creds is not None
            else grpc.insecure_channel(core.target(address), opts)
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = core.timeout_seconds(timeout)
        self._features = fs_grpc.FeatureServiceStub(self._channel)
        self._registry = reg_grpc.RegistryServiceStub(self._channel)
        self._monitor = mon_grpc.MonitorServiceStub(self._channel)
        self._meta = core.Meta()
        self.cache = cache
        self.fallback = fallback
        self._router: _route.Router | None = None
        if route:

            def open_channel(addr: str) -> grpc.Channel:
                target = core.target(addr)
                return grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)

            self._router = _route.Router(self._features, self._channel, open_channel, self._call)
            # Flight's DoPut is not routed: a node refuses another node's entities there.
            self._flight.use = False

    # ---- plumbing ---------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._router is not None:
            self._router.close()
        self._flight.close()
        self._channel.close()

    @property
    def use_flight(self) -> bool | None:
        """Arrow Flight for training sets, writes and history scans: True, False, or None (use
        it unless the server turns out not to serve it)."""
        return self._flight.use

    @use_flight.setter
    def use_flight(self, use: bool | None) -> None:
        self._flight.use = use

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        try:
            return method(request, timeout=timeout if timeout is not None else self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, method: Callable[..., Iterable[T]], request: Any) -> Iterator[T]:
        try:
            yield from method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def refresh(self) -> None:
        """Forgets the registry metadata the client cached (entity types, groups)."""
        self._meta.clear()

    def _load_meta(self, refs: Sequence[FeatureRef], entity_type: str | None = None) -> tuple[str, list[tuple[str, str]]]:
        for name, version in self._meta.missing_groups(refs):
            m = self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=name, version=version))
            self._meta.put_group((name, version), FeatureGroup.from_proto(m))
        for r in refs:
            self._meta.feature(r)  # an unknown feature is refused here, with its name
        et = self._meta.entity_type_of(refs, entity_type)
        return et, self._entity_keys(et)

    def _entity_keys(self, entity_type: str) -> list[tuple[str, str]]:
        """The entity type's join keys, fetched once."""
        keys = self._meta.join_keys(entity_type)
        if keys is None:
            e = self._call(self._registry.GetEntityType, reg.GetEntityTypeRequest(name=entity_type))
            self._meta.put_entity_type(EntityType.from_proto(e))
            keys = self._meta.join_keys(entity_type) or []
        return keys

    # ---- online -----------------------------------------------------------------------------

    def get_online_features(
        self,
        features: Sequence[str],
        entity_rows: Any,
        *,
        as_of: datetime | Any = None,
        deadline: float | timedelta | None = None,
        default_missing: bool = False,
        default_unavailable: bool = False,
        full_feature_names: bool = False,
        with_status: bool = True,
    ) -> OnlineResponse:
        """Latest values of ``features`` ("group:feature" or "group@3:feature") for each entity
        row (dicts of join keys, or a DataFrame/Table with the join key columns), in row order.

        ``as_of`` serves what online would have served then. ``deadline`` (seconds) is the
        request's gRPC deadline: features the server cannot read in time come back UNAVAILABLE
        (or DEFAULTED with ``default_unavailable``). Requests over the server's limits are split
        (``ONLINE_ENTITIES_MAX`` entities, ``ONLINE_CELLS_MAX`` cells each).
        """
        refs = refs_of(features)
        entity_type, join_keys = self._load_meta(refs)
        keys = cv.rows_to_keys(entity_rows, join_keys)
        columns = core.column_names(refs, full_feature_names, [name for name, _ in join_keys])
        cache = self.cache if as_of is None else None
        plan = core.OnlinePlan(
            self._meta, refs, columns, entity_type, join_keys, keys, cache, default_missing, with_status, default_unavailable
        )
        timeout = core.timeout_seconds(deadline)
        for rows, req in plan.requests(as_of, default_unavailable):
            try:
                self._online(plan, rows, req, timeout)
            except QuiverError as e:
                if not (self.fallback and e.code in DEGRADE_CODES):
                    raise
                plan.degrade(rows)
        return plan.response()

    def _online(self, plan: core.OnlinePlan, rows: list[int], req: fs.GetOnlineFeaturesRequest, timeout: float | None) -> None:
        """Sends one request of a lookup (of the plan's ``rows``), each entity to its owner when
        the client routes."""
        if self._router is None:
            plan.answered(rows, self._call(self._features.GetOnlineFeatures, req, timeout))
            return

        def send(stub: fs_grpc.FeatureServiceStub, at: list[int]) -> fs.GetOnlineFeaturesResponse:
            part = fs.GetOnlineFeaturesRequest()
            part.CopyFrom(req)
            del part.entities[:]
            part.entities.extend(req.entities[i] for i in at)
            return self._call(stub.GetOnlineFeatures, part, timeout)

        for at, resp in self._router.fan_out(req.entities, send):
            plan.answered([rows[i] for i in at], resp)

    def _write(self, req: fs.WriteFeaturesRequest, result: WriteResult) -> None:
        """Sends one write request, each row to its owner when the client routes."""
        if self._router is None:
            result.add(self._call(self._features.WriteFeatures, req))
            return

        def send(stub: fs_grpc.FeatureServiceStub, at: list[int]) -> fs.WriteFeaturesResponse:
            part = fs.WriteFeaturesRequest()
            part.CopyFrom(req)
            del part.rows[:]
            part.rows.extend(req.rows[i] for i in at)
            return self._call(stub.WriteFeatures, part)

        for _, resp in self._router.fan_out([r.entity for r in req.rows], send):
            result.add(resp)

    # ---- training sets ----------------------------------------------------------------------

    def get_historical_features(
        self,
        entity_df: Any,
        features: Sequence[str],
        *,
        known_at: datetime | Any = None,
        strict_availability: bool = False,
        use_defaults: bool = False,
        timestamp_column: str = "event_timestamp",
        full_feature_names: bool = False,
        with_status: bool = False,
        entity_type: str | None = None,
    ) -> HistoricalJob:
        """A point-in-time join: for each row of ``entity_df`` (join keys and
        ``timestamp_column``), each feature's value as of the row's time, without leakage.

        Nothing is sent until the job is read (``to_arrow``, ``to_df``, ``to_polars``,
        ``to_parquet`` or ``iter_batches``). Rows keep their order and every column of
        ``entity_df`` (labels included). ``entity_df`` may also be a ``pyarrow.RecordBatchReader``
        or an iterable of DataFrames for spines larger than memory; the spine is sent in
        requests of ``SPINE_ROWS_PER_REQUEST`` rows. ``known_at`` answers with only what the
        store knew then (reproducible training sets); ``strict_availability`` with only what
        online could have served at each row's time.
        """
        refs = refs_of(features)
        et, join_keys = self._load_meta(refs, entity_type)
        return HistoricalJob(
            self,
            entity_df,
            refs,
            et,
            join_keys,
            dict(
                timestamp_column=timestamp_column,
                known_at=known_at,
                strict_availability=strict_availability,
                use_defaults=use_defaults,
            ),
            full_feature_names,
            with_status,
        )

    # ---- writes -----------------------------------------------------------------------------

    def write(
        self,
        df: Any,
        group: str,
        *,
        durability: str | None = None,
        idempotency_key: str | None = None,
        timestamp_column: str = "event_timestamp",
        expected_versions: dict[str, dict[int, int]] | None = None,
    ) -> WriteResult:
        """Writes a DataFrame (pandas, polars, Arrow, or a list of dicts) of one group: the join
        key columns, ``timestamp_column`` (event time), and one column per feature. A null
        cell is not written; in a pandas float column NaN is a value and is written.

        Rows go in requests of at most ``WRITE_ROWS_MAX`` rows and ``WRITE_VALUES_MAX`` values,
        each atomic; with ``idempotency_key`` a retry of the same write is applied once (request
        i of a split write carries ``<key>/<i>``; over Flight request i of batch b carries
        ``<key>/<b>/<i>``, so a retry must use the same transport). ``durability`` is "sync", "async" or None
        (the server's default). ``expected_versions`` (one-row writes only) makes the write a
        compare-and-swap per feature: ``{feature: {region: counter}}`` ({} = must not exist);
        a mismatch raises :class:`quiver.CasConflict` and writes nothing.
        """
        d = core.durability(durability)
        table = cv.to_arrow_table(df, f"write to {group}")
        g, join_keys = self._group_for_write(group)
        table = cv.check_write_columns(table, g, group, join_keys, timestamp_column)
        ft = self._flight.transport() if expected_versions is None else None
        if ft is not None:
            try:
                return ft.write(table, group, join_keys, timestamp_column, d, idempotency_key)
            except QuiverError as e:
                if not self._flight.failed(e):
                    raise
        reqs = write_requests(table, group, g, join_keys, durability, idempotency_key, timestamp_column, expected_versions)
        result = WriteResult()
        for req in reqs:
            self._write(req, result)
        return result

    push = write

    def delete(
        self,
        group: str,
        entity_rows: Any,
        features: Sequence[str],
        event_time: datetime | Any,
        *,
        durability: str | None = None,
    ) -> WriteResult:
        """Writes tombstones: ``features`` (names) of ``group`` are absent for these entities
        from ``event_time`` on (until a later event)."""
        reqs = self._delete_requests(group, entity_rows, features, event_time, durability)
        result = WriteResult()
        for req in reqs:
            self._write(req, result)
        return result

    def _group_for_write(self, group: str) -> tuple[FeatureGroup, list[tuple[str, str]]]:
        key = group_key(group)
        if key not in self._meta.groups:
            m = self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=key[0], version=key[1]))
            self._meta.put_group(key, FeatureGroup.from_proto(m))
        g = self._meta.groups[key]
        return g, self._entity_keys(g.entity_type)

    def _delete_requests(
        self, group: str, entity_rows: Any, features: Sequence[str], event_time: Any, durability: str | None
    ) -> list[fs.WriteFeaturesRequest]:
        _, join_keys = self._group_for_write(group)
        return delete_requests(group, join_keys, entity_rows, features, event_time, durability)

    # ---- registry ---------------------------------------------------------------------------

    def apply(
        self,
        path_or_objects: str | PathLike[str] | Iterable[EntityType | FeatureGroup],
        *,
        dry_run: bool = False,
        promote: bool = False,
    ) -> list[RegistryChange]:
        """Applies a registry file (the ``quiver apply`` TOML format) or EntityType /
        FeatureGroup objects. A changed group gets a new version, staged unless ``promote``;
        ``dry_run`` only reports the changes."""
        req = apply_request(path_or_objects, dry_run, promote)
        resp = self._call(self._registry.ApplyRegistry, req)
        if not dry_run:
            self._meta.clear()
        return [RegistryChange.from_proto(c) for c in resp.changes]

    def list_feature_groups(self) -> list[FeatureGroup]:
        """The serving version of every group the token may see."""
        resp = self._call(self._registry.ListFeatureGroups, reg.ListFeatureGroupsRequest())
        return [FeatureGroup.from_proto(g) for g in resp.feature_groups]

    def get_feature_group(self, name: str, version: int = 0) -> FeatureGroup:
        """A group's definition: the serving version, or ``version``."""
        return FeatureGroup.from_proto(
            self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=name, version=version))
        )

    def list_entity_types(self) -> list[EntityType]:
        resp = self._call(self._registry.ListEntityTypes, reg.ListEntityTypesRequest())
        return [EntityType.from_proto(e) for e in resp.entity_types]

    def get_entity_type(self, name: str) -> EntityType:
        return EntityType.from_proto(self._call(self._registry.GetEntityType, reg.GetEntityTypeRequest(name=name)))

    def list_group_versions(self, group: str) -> list[GroupVersion]:
        resp = self._call(self._registry.ListGroupVersions, reg.ListGroupVersionsRequest(group=group))
        return [GroupVersion.from_proto(v) for v in resp.versions]

    def promote(self, group: str, version: int, *, dry_run: bool = False, force: bool = False, reason: str = "") -> bool:
        """Makes ``version`` serve ``group`` after the release gate passes (``force`` skips
        it). Returns whether the serving version changed; a refusal raises
        :class:`quiver.QuiverFailedPrecondition` whose ``details`` hold the gate report."""
        resp = self._call(
            self._registry.PromoteGroup,
            reg.PromoteGroupRequest(group=group, version=version, force=force, reason=reason, dry_run=dry_run),
        )
        return resp.changed

    def rollback(self, group: str, *, reason: str = "") -> int:
        """Serves the version that served before the current one; returns it."""
        resp = self._call(self._registry.RollbackGroup, reg.RollbackGroupRequest(group=group, reason=reason))
        return resp.promotion.to_version

    # ---- history and monitoring --------------------------------------------------------------

    def scan_history(
        self,
        entity: Any,
        group: str,
        *,
        features: Sequence[str] | None = None,
        event_time_from: Any = None,
        event_time_to: Any = None,
        system_time_from: Any = None,
        system_time_to: Any = None,
        limit: int = 0,
    ) -> pd.DataFrame:
        """Every version of one entity's features of ``group`` (all of them, or ``features`` as
        "group:feature"), newest event time first, with system times, version vectors and
        tombstones (``deleted``). ``entity`` is a dict of join keys, a tuple, or the one key."""
        g, join_keys = self._group_for_write(group)
        req = scan_request(
            g.entity_type,
            join_keys,
            entity,
            group,
            features,
            event_time_from,
            event_time_to,
            system_time_from,
            system_time_to,
            limit,
        )
        ft = self._flight.transport()
        if ft is not None:
            try:
                return core.history_frame_from_arrow(ft.scan(req))
            except QuiverError as e:
                if not self._flight.failed(e):
                    raise
        return core.history_frame(self._stream(self._features.ScanHistory, req))

    def monitor(self, group: str = "") -> pd.DataFrame:
        """Feature health as this node served it (one row per feature): answers by status over
        the monitoring window, null rate against its bound, group freshness and SLA."""
        return core.health_frame(self._call(self._monitor.GetFeatureHealth, mon.GetFeatureHealthRequest(group=group)))


class HistoricalJob(core.JoinJob):
    """A point-in-time join, run when read. Reading it twice runs it twice."""

    def iter_batches(self) -> Iterator[pa.RecordBatch]:
        """The answers as Arrow record batches in spine order, one spine request at a time."""
        for chunk in core.spine_chunks(self._entity_df):
            yield from self._chunk(chunk)

    def _chunk(self, chunk: pa.Table) -> Iterator[pa.RecordBatch]:
        """One spine request's answers. A request the server sheds for load is sent again after
        its advice (``core.ShedRetry``); one it could never hold (RESOURCE_EXHAUSTED without
        retry advice) is sent again in two halves."""
        columns = self._columns(chunk.schema)
        retry = core.ShedRetry()
        while True:
            yielded = False
            try:
                for batch in self._answers(chunk, columns):
                    yielded = True
                    yield batch.cast(self._schema) if batch.schema != self._schema else batch
                return
            except QuiverResourceExhausted as e:
                wait = retry.after(e, yielded, chunk.num_rows)
                if wait is None:
                    half = chunk.num_rows // 2
                    yield from self._chunk(chunk.slice(0, half))
                    yield from self._chunk(chunk.slice(half))
                    return
                time.sleep(wait)

    def _answers(self, chunk: pa.Table, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if self._client._router is not None:
            yield self._routed(chunk, columns)
            return
        p = self._params
        ft = self._client._flight.transport()
        if ft is not None:
            answers = ft.join(chunk, self._entity_type, self._join_keys, self._refs, columns, p, self._with_status)
            try:
                first = next(answers, None)
            except QuiverError as e:
                if not self._client._flight.failed(e):
                    raise
            else:
                if first is not None:
                    yield first
                yield from answers
                return
        req = self._request(chunk)
        rows = 0
        for resp in self._client._stream(self._client._features.GetHistoricalFeatures, req):
            batch = core.historical_batch(chunk, resp, columns, self._with_status)
            rows += batch.num_rows
            yield batch
        core.check_answered(rows, chunk.num_rows)

    def _routed(self, chunk: pa.Table, columns: list[str]) -> pa.RecordBatch:
        """One spine request split by the owners of its rows' slots, each part joined by its
        owner (over gRPC) at once, and the rows put back in spine order."""
        router = self._client._router
        assert router is not None
        req = self._request(chunk)
        spine = list(req.spine)
        del req.spine[:]  # the template of every part

        def send(stub: fs_grpc.FeatureServiceStub, at: list[int]) -> list[fs.GetHistoricalFeaturesResponse]:
            part = fs.GetHistoricalFeaturesRequest()
            part.CopyFrom(req)
            part.spine.extend(spine[i] for i in at)
            return list(self._client._stream(stub.GetHistoricalFeatures, part))

        positions: list[int] = []
        tables: list[pa.Table] = []
        shape: list[tuple[str, int, int]] | None = None
        for at, resps in router.fan_out([r.entity for r in spine], send):
            for resp in resps:
                got = [(c.feature_ref, c.group_version, c.type) for c in resp.columns]
                if shape is None:
                    shape = got
                elif got != shape:
                    raise QuiverUnavailable(
                        grpc.StatusCode.UNAVAILABLE,
                        "shards answer the join with different versions of its features (a promotion is reaching them); retry",
                    )
            sub = chunk.take(pa.array(at, type=pa.int64()))
            batches = [core.historical_batch(sub, resp, columns, self._with_status) for resp in resps]
            core.check_answered(sum(b.num_rows for b in batches), len(at))
            tables.extend(pa.Table.from_batches([b]) for b in batches)
            positions.extend(at)
        core.check_answered(len(positions), chunk.num_rows)
        table = pa.concat_tables(tables)
        order = sorted(range(len(positions)), key=positions.__getitem__)
        return table.take(pa.array(order, type=pa.int64())).combine_chunks().to_batches()[0]

    def to_arrow(self) -> pa.Table:
        batches = list(self.iter_batches())
        if not batches:
            return self._empty()
        return pa.Table.from_batches(batches, schema=self._schema)

    def to_df(self) -> pd.DataFrame:
        return core.arrow_to_pandas(self.to_arrow())

    def to_polars(self) -> Any:
        import polars as pl

        return pl.from_arrow(self.to_arrow())

    def to_parquet(self, path: str | PathLike[str]) -> int:
        """Streams the answers into a Parquet file; returns the rows written."""
        import pyarrow.parquet as pq

        writer = None
        rows = 0
        try:
            for batch in self.iter_batches():
                if writer is None:
                    writer = pq.ParquetWriter(fspath(path), batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is None:
                pq.write_table(self._empty(), fspath(path))
        finally:
            if writer is not None:
                writer.close()
        return rows
