"""The asyncio twin of :class:`quiver.Client`, on ``grpc.aio``: the same methods and results,
as coroutines (and an async iterator for join batches)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from os import PathLike, fspath
from typing import Any

import grpc
import grpc.aio
import pandas as pd
import pyarrow as pa

from quiver import _convert as cv
from quiver import _core as core
from quiver._core import FeatureRef, OnlineCache, OnlineResponse, WriteResult
from quiver.client import (
    DEGRADE_CODES,
    Tls,
    apply_request,
    channel_credentials,
    delete_requests,
    group_key,
    refs_of,
    scan_request,
    write_requests,
)
from quiver.errors import QuiverError, QuiverResourceExhausted, from_rpc_error
from quiver.registry import EntityType, FeatureGroup, GroupVersion, RegistryChange
from quiver.v1 import feature_service_pb2_grpc as fs_grpc
from quiver.v1 import monitor_pb2 as mon
from quiver.v1 import monitor_pb2_grpc as mon_grpc
from quiver.v1 import registry_pb2 as reg
from quiver.v1 import registry_pb2_grpc as reg_grpc

__all__ = ["AsyncClient", "AsyncHistoricalJob"]


class AsyncClient:
    """:class:`quiver.Client` for asyncio (``async with AsyncClient(...) as q``)."""

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
    ) -> None:
        creds = channel_credentials(tls)
        # Flight calls run the blocking pyarrow client in a worker thread (asyncio.to_thread).
        self._flight = core.FlightChoice(core.target(address), token, tls, core.timeout_seconds(timeout), use_flight)
        opts = core.CHANNEL_OPTIONS + list(options)
        self._channel = (
            grpc.aio.secure_channel(core.target(address), creds, opts)
            if creds is not None
            else grpc.aio.insecure_channel(core.target(address), opts)
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = core.timeout_seconds(timeout)
        self._features = fs_grpc.FeatureServiceStub(self._channel)
        self._registry = reg_grpc.RegistryServiceStub(self._channel)
        self._monitor = mon_grpc.MonitorServiceStub(self._channel)
        self._meta = core.Meta()
        self.cache = cache
        self.fallback = fallback

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._flight.close()
        await self._channel.close()

    @property
    def use_flight(self) -> bool | None:
        """See :attr:`quiver.Client.use_flight`."""
        return self._flight.use

    @use_flight.setter
    def use_flight(self, use: bool | None) -> None:
        self._flight.use = use

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout if timeout is not None else self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Any]:
        try:
            async for item in method(request, timeout=self._timeout, metadata=self._metadata):
                yield item
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def refresh(self) -> None:
        self._meta.clear()

    async def _entity_keys(self, entity_type: str) -> list[tuple[str, str]]:
        keys = self._meta.join_keys(entity_type)
        if keys is None:
            e = await self._call(self._registry.GetEntityType, reg.GetEntityTypeRequest(name=entity_type))
            self._meta.put_entity_type(EntityType.from_proto(e))
            keys = self._meta.join_keys(entity_type) or []
        return keys

    async def _load_meta(self, refs: Sequence[FeatureRef], entity_type: str | None = None) -> tuple[str, list[tuple[str, str]]]:
        for name, version in self._meta.missing_groups(refs):
            m = await self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=name, version=version))
            self._meta.put_group((name, version), FeatureGroup.from_proto(m))
        for r in refs:
            self._meta.feature(r)
        et = self._meta.entity_type_of(refs, entity_type)
        return et, await self._entity_keys(et)

    async def _group_meta(self, group: str) -> tuple[FeatureGroup, list[tuple[str, str]]]:
        key = group_key(group)
        if key not in self._meta.groups:
            m = await self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=key[0], version=key[1]))
            self._meta.put_group(key, FeatureGroup.from_proto(m))
        g = self._meta.groups[key]
        return g, await self._entity_keys(g.entity_type)

    async def get_online_features(
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
        """See :meth:`quiver.Client.get_online_features`."""
        refs = refs_of(features)
        entity_type, join_keys = await self._load_meta(refs)
        keys = cv.rows_to_keys(entity_rows, join_keys)
        columns = core.column_names(refs, full_feature_names, [name for name, _ in join_keys])
        cache = self.cache if as_of is None else None
        plan = core.OnlinePlan(
            self._meta, refs, columns, entity_type, join_keys, keys, cache, default_missing, with_status, default_unavailable
        )
        timeout = core.timeout_seconds(deadline)
        for rows, req in plan.requests(as_of, default_unavailable):
            try:
                plan.answered(rows, await self._call(self._features.GetOnlineFeatures, req, timeout))
            except QuiverError as e:
                if not (self.fallback and e.code in DEGRADE_CODES):
                    raise
                plan.degrade(rows)
        return plan.response()

    async def get_historical_features(
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
    ) -> AsyncHistoricalJob:
        """See :meth:`quiver.Client.get_historical_features`."""
        refs = refs_of(features)
        et, join_keys = await self._load_meta(refs, entity_type)
        params = dict(
            timestamp_column=timestamp_column,
            known_at=known_at,
            strict_availability=strict_availability,
            use_defaults=use_defaults,
        )
        return AsyncHistoricalJob(self, entity_df, refs, et, join_keys, params, full_feature_names, with_status)

    async def write(
        self,
        df: Any,
        group: str,
        *,
        durability: str | None = None,
        idempotency_key: str | None = None,
        timestamp_column: str = "event_timestamp",
        expected_versions: dict[str, dict[int, int]] | None = None,
    ) -> WriteResult:
        """See :meth:`quiver.Client.write`."""
        d = core.durability(durability)
        table = cv.to_arrow_table(df, f"write to {group}")
        g, join_keys = await self._group_meta(group)
        table = cv.check_write_columns(table, g, group, join_keys, timestamp_column)
        ft = self._flight.transport() if expected_versions is None else None
        if ft is not None:
            try:
                result: WriteResult = await asyncio.to_thread(
                    ft.write, table, group, join_keys, timestamp_column, d, idempotency_key
                )
                return result
            except QuiverError as e:
                if not self._flight.failed(e):
                    raise
        reqs = write_requests(table, group, g, join_keys, durability, idempotency_key, timestamp_column, expected_versions)
        result = WriteResult()
        for req in reqs:
            result.add(await self._call(self._features.WriteFeatures, req))
        return result

    push = write

    async def delete(
        self, group: str, entity_rows: Any, features: Sequence[str], event_time: Any, *, durability: str | None = None
    ) -> WriteResult:
        core.durability(durability)
        _, join_keys = await self._group_meta(group)
        result = WriteResult()
        for req in delete_requests(group, join_keys, entity_rows, features, event_time, durability):
            result.add(await self._call(self._features.WriteFeatures, req))
        return result

    async def apply(
        self,
        path_or_objects: str | PathLike[str] | Iterable[EntityType | FeatureGroup],
        *,
        dry_run: bool = False,
        promote: bool = False,
    ) -> list[RegistryChange]:
        resp = await self._call(self._registry.ApplyRegistry, apply_request(path_or_objects, dry_run, promote))
        if not dry_run:
            self._meta.clear()
        return [RegistryChange.from_proto(c) for c in resp.changes]

    async def list_feature_groups(self) -> list[FeatureGroup]:
        resp = await self._call(self._registry.ListFeatureGroups, reg.ListFeatureGroupsRequest())
        return [FeatureGroup.from_proto(g) for g in resp.feature_groups]

    async def get_feature_group(self, name: str, version: int = 0) -> FeatureGroup:
        m = await self._call(self._registry.GetFeatureGroup, reg.GetFeatureGroupRequest(name=name, version=version))
        return FeatureGroup.from_proto(m)

    async def list_entity_types(self) -> list[EntityType]:
        resp = await self._call(self._registry.ListEntityTypes, reg.ListEntityTypesRequest())
        return [EntityType.from_proto(e) for e in resp.entity_types]

    async def get_entity_type(self, name: str) -> EntityType:
        return EntityType.from_proto(await self._call(self._registry.GetEntityType, reg.GetEntityTypeRequest(name=name)))

    async def promote(self, group: str, version: int, *, dry_run: bool = False, force: bool = False, reason: str = "") -> bool:
        """See :meth:`quiver.Client.promote`."""
        resp = await self._call(
            self._registry.PromoteGroup,
            reg.PromoteGroupRequest(group=group, version=version, force=force, reason=reason, dry_run=dry_run),
        )
        return resp.changed

    async def rollback(self, group: str, *, reason: str = "") -> int:
        resp = await self._call(self._registry.RollbackGroup, reg.RollbackGroupRequest(group=group, reason=reason))
        return resp.promotion.to_version

    async def list_group_versions(self, group: str) -> list[GroupVersion]:
        resp = await self._call(self._registry.ListGroupVersions, reg.ListGroupVersionsRequest(group=group))
        return [GroupVersion.from_proto(v) for v in resp.versions]

    async def scan_history(
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
        g, join_keys = await self._group_meta(group)
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
                return core.history_frame_from_arrow(await asyncio.to_thread(ft.scan, req))
            except QuiverError as e:
                if not self._flight.failed(e):
                    raise
        return core.history_frame([resp async for resp in self._stream(self._features.ScanHistory, req)])

    async def monitor(self, group: str = "") -> pd.DataFrame:
        resp = await self._call(self._monitor.GetFeatureHealth, mon.GetFeatureHealthRequest(group=group))
        return core.health_frame(resp)


class AsyncHistoricalJob(core.JoinJob):
    """:class:`quiver.HistoricalJob` for asyncio: ``await job.to_df()``, ``async for batch in
    job.iter_batches()``."""

    async def iter_batches(self) -> AsyncIterator[pa.RecordBatch]:
        for chunk in core.spine_chunks(self._entity_df):
            async for batch in self._chunk(chunk):
                yield batch

    async def _chunk(self, chunk: pa.Table) -> AsyncIterator[pa.RecordBatch]:
        """One spine request's answers; one the server sheds for load is sent again after its
        advice, one it could never hold is sent in halves (see HistoricalJob)."""
        columns = self._columns(chunk.schema)
        retry = core.ShedRetry()
        while True:
            rows = 0
            try:
                # Closed at once if this request ends early, so its Flight call ends with it.
                async with contextlib.aclosing(self._answers(chunk, columns)) as answers:
                    async for batch in answers:
                        rows += batch.num_rows
                        yield batch.cast(self._schema) if batch.schema != self._schema else batch
                return
            except QuiverResourceExhausted as e:
                wait = retry.after(e, rows > 0, chunk.num_rows)
                if wait is None:
                    half = chunk.num_rows // 2
                    for part in (chunk.slice(0, half), chunk.slice(half)):
                        async for batch in self._chunk(part):
                            yield batch
                    return
                await asyncio.sleep(wait)

    async def _answers(self, chunk: pa.Table, columns: list[str]) -> AsyncGenerator[pa.RecordBatch, None]:
        """Over Flight (each batch read in a worker thread), else the protobuf stream."""
        p = self._params
        flight = self._client._flight
        ft = flight.transport()
        if ft is not None:
            answers = ft.join(chunk, self._entity_type, self._join_keys, self._refs, columns, p, self._with_status)
            try:
                try:
                    batch = await asyncio.to_thread(next, answers, None)
                except QuiverError as e:
                    if not flight.failed(e):
                        raise
                else:
                    while batch is not None:
                        yield batch
                        batch = await asyncio.to_thread(next, answers, None)
                    return
            finally:
                # Cancelled, or abandoned by the reader: end the call, which also frees a
                # worker thread blocked in it (a no-op once the call has ended).
                answers.cancel()
        rows = 0
        async for resp in self._client._stream(self._client._features.GetHistoricalFeatures, self._request(chunk)):
            batch = core.historical_batch(chunk, resp, columns, self._with_status)
            rows += batch.num_rows
            yield batch
        core.check_answered(rows, chunk.num_rows)

    async def to_arrow(self) -> pa.Table:
        batches = [b async for b in self.iter_batches()]
        if not batches:
            return self._empty()
        return pa.Table.from_batches(batches, schema=self._schema)

    async def to_df(self) -> pd.DataFrame:
        return core.arrow_to_pandas(await self.to_arrow())

    async def to_polars(self) -> Any:
        import polars as pl

        return pl.from_arrow(await self.to_arrow())

    async def to_parquet(self, path: str | PathLike[str]) -> int:
        import pyarrow.parquet as pq

        writer = None
        rows = 0
        try:
            async for batch in self.iter_batches():
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
