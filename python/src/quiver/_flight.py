"""The Arrow Flight transport (``proto/quiver/v1/flight.proto``): training sets and bulk writes
move as Arrow record batches, with no protobuf message per row on either side.

quiverd serves Flight on its gRPC port. :class:`quiver.Client` uses it for
``get_historical_features`` and ``write`` unless ``use_flight=False``; with the default
(``None``) a server that answers UNIMPLEMENTED (one without Flight) is remembered and the
protobuf API used instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as fl

from quiver import _convert as cv
from quiver._core import IDEMPOTENCY_KEY_MAX, WRITE_ROWS_MAX, WRITE_VALUES_MAX, FeatureRef, WriteResult
from quiver.errors import (
    QuiverDeadlineExceeded,
    QuiverError,
    QuiverInternal,
    QuiverInvalidArgument,
    QuiverNotFound,
    QuiverPermissionDenied,
    QuiverResourceExhausted,
    QuiverUnauthenticated,
    QuiverUnavailable,
    from_code,
)
from quiver.v1 import flight_pb2 as fpb
from quiver.v1 import types_pb2 as types

#: Rows per record batch a write sends at most (the server splits each into atomic requests of
#: at most 10,000 rows and 99,999 values) ...
WRITE_BATCH_ROWS = 100_000
#: ... and bytes per batch at most, so that a batch fits the server's request memory (it
#: reserves three times a batch while writing it; 64 MiB at quiverd's default budget).
WRITE_BATCH_BYTES = 8 * 1024 * 1024


def batch_rows(table: pa.Table) -> int:
    """Rows per write batch for this table: WRITE_BATCH_BYTES of its rows, within 1 ..
    WRITE_BATCH_ROWS."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(1, min(WRITE_BATCH_ROWS, WRITE_BATCH_BYTES // per_row))


_CONTEXT = re.compile(r"gRPC client debug context: ([A-Z_]+):")
_GRPC_STATUS = re.compile(r"grpc_status:(\d+)")
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_MESSAGE = re.compile(r"with message: (.*?)(?:\. gRPC client debug context|$)", re.S)


def error_from(e: Exception) -> QuiverError:
    """The typed error for a failed Flight call: the gRPC code pyarrow reports in its message,
    else the exception's kind."""
    text = str(e)
    m = _MESSAGE.search(text)
    message = m.group(1) if m else text
    # pyarrow names the code in its debug context ("...context: NOT_FOUND:..."), or, in some
    # versions, only as "grpc_status:5" inside it.
    err = _coded(text, message)
    if isinstance(err, QuiverResourceExhausted) and err.retry_after is None:
        # pyarrow drops the status's details (its RetryInfo) over Flight; quiverd's message
        # says the same thing in words.
        err.retry_after = retry_advice(message)
    if err is not None:
        return err
    if isinstance(e, fl.FlightUnauthenticatedError):
        return QuiverUnauthenticated(grpc.StatusCode.UNAUTHENTICATED, message)
    if isinstance(e, fl.FlightUnauthorizedError):
        return QuiverPermissionDenied(grpc.StatusCode.PERMISSION_DENIED, message)
    if isinstance(e, fl.FlightUnavailableError):
        return QuiverUnavailable(grpc.StatusCode.UNAVAILABLE, message)
    if isinstance(e, fl.FlightTimedOutError):
        return QuiverDeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    if isinstance(e, pa.ArrowInvalid):
        return QuiverInvalidArgument(message)
    if isinstance(e, pa.ArrowKeyError):
        return QuiverNotFound(grpc.StatusCode.NOT_FOUND, message)
    if isinstance(e, pa.ArrowNotImplementedError):
        return from_code(grpc.StatusCode.UNIMPLEMENTED, message)
    return QuiverInternal(grpc.StatusCode.INTERNAL, message)


#: How quiverd's refusals for load end (README "Overload"), and the retry advice they carry
#: (``RETRY_AFTER`` in server/src/admission.rs).
SHED_SUFFIX = "; retry shortly"
SHED_RETRY_AFTER = timedelta(milliseconds=100)
#: How a token's rate-limit refusal ends: "; retry in <duration>" (a Rust Duration, "1.5s").
_RETRY_IN = re.compile(r"; retry in ([0-9]+(?:\.[0-9]+)?)(ns|µs|us|ms|s)$")
_UNIT_SECONDS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def retry_advice(message: str) -> timedelta | None:
    """The retry advice a quiverd RESOURCE_EXHAUSTED message states, if any: a request shed for
    load, or a token over its rate limit. A request that can never fit states none."""
    if message.endswith(SHED_SUFFIX):
        return SHED_RETRY_AFTER
    m = _RETRY_IN.search(message)
    if m:
        return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    return None


class JoinStream:
    """One spine chunk's answers over Flight: an iterator of record batches. The call starts at
    the first ``next``; ``cancel()`` ends it from any thread (an abandoned or cancelled join
    must not keep the server's join, and its share of memory, running)."""

    def __init__(self, start: Callable[[], Any], chunk: pa.Table, columns: list[str], with_status: bool) -> None:
        self._start = start
        self._chunk, self._columns, self._with_status = chunk, columns, with_status
        self._reader: Any = None
        self._cancelled = False
        self._batches = self._read()

    def __iter__(self) -> JoinStream:
        return self

    def __next__(self) -> pa.RecordBatch:
        return next(self._batches)

    def cancel(self) -> None:
        self._cancelled = True
        if self._reader is not None:
            self._reader.cancel()

    def _read(self) -> Iterator[pa.RecordBatch]:
        chunk, row = self._chunk, 0
        try:
            self._reader = reader = self._start()
            if self._cancelled:
                reader.cancel()
            try:
                for piece in reader:
                    batch = piece.data
                    n = batch.num_rows
                    if row + n > chunk.num_rows:
                        raise QuiverInvalidArgument(f"the server answered rows {row}..{row + n} of a {chunk.num_rows}-row spine")
                    yield _rename(chunk.slice(row, n), batch, self._columns, self._with_status)
                    row += n
            finally:
                # Ends the call if the reader stopped early (a no-op once it has ended).
                reader.cancel()
        except (fl.FlightError, pa.ArrowException) as e:
            raise error_from(e) from None
        if row != chunk.num_rows:
            raise QuiverInternal(grpc.StatusCode.INTERNAL, f"the join answered {row} of {chunk.num_rows} rows")


def _coded(text: str, message: str) -> QuiverError | None:
    """The error for the gRPC code pyarrow names in ``text``, if it names one."""
    n = _GRPC_STATUS.search(text)
    if n and int(n.group(1)) in _CODES:
        return from_code(_CODES[int(n.group(1))], message)
    c = _CONTEXT.search(text)
    if c and c.group(1) in grpc.StatusCode.__members__ and c.group(1) != "UNKNOWN":
        return from_code(grpc.StatusCode[c.group(1)], message)
    return None


def is_unimplemented(e: QuiverError) -> bool:
    return e.code == grpc.StatusCode.UNIMPLEMENTED


class FlightTransport:
    """One pyarrow Flight client to quiverd."""

    def __init__(self, target: str, token: str | None, tls: Any, timeout: float | None) -> None:
        kwargs: dict[str, Any] = {}
        scheme = "grpc+tcp"
        if tls is not None and tls is not False:
            scheme = "grpc+tls"
            if tls is not True:
                if tls.ca is not None:
                    kwargs["tls_root_certs"] = tls.ca
                if tls.cert is not None and tls.key is not None:
                    kwargs["cert_chain"] = tls.cert
                    kwargs["private_key"] = tls.key
        self._client = fl.FlightClient(f"{scheme}://{target}", **kwargs)
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = fl.FlightCallOptions(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def join(
        self,
        chunk: pa.Table,
        entity_type: str,
        join_keys: list[tuple[str, str]],
        refs: Sequence[FeatureRef],
        columns: list[str],
        params: dict[str, Any],
        with_status: bool,
    ) -> JoinStream:
        """One spine chunk's answers, in spine order, with the chunk's own columns first."""
        ts_col = params["timestamp_column"]
        if ts_col not in chunk.column_names:
            raise QuiverInvalidArgument(f"entity_df: missing timestamp column {ts_col!r}")
        cv.check_key_columns(chunk, join_keys, "entity_df")  # the SDK's checks and messages first
        micros = cv.micros_column(chunk.column(ts_col), f"entity_df: {ts_col}")
        spine = pa.table(
            {
                **{name: cv.plain_key(chunk.column(name)) for name, _ in join_keys},
                ts_col: pa.array(micros, type=cv.TIMESTAMP),
            }
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, spine.schema) as w:
            w.write_table(spine)
        join = fpb.FlightJoin(
            entity_type=entity_type,
            features=[r.text for r in refs],
            strict_availability=params["strict_availability"],
            use_defaults=params["use_defaults"],
            spine_ipc=sink.getvalue().to_pybytes(),
            timestamp_column=ts_col,
            with_status=with_status,
        )
        if params["known_at"] is not None:
            cv.set_timestamp(join.known_at, cv.to_micros(params["known_at"]))
        ticket = fl.Ticket(fpb.FlightTicket(join=join).SerializeToString())
        return JoinStream(lambda: self._client.do_get(ticket, self._options), chunk, columns, with_status)

    def scan(self, req: Any) -> pa.Table:
        """A history scan (a quiver.v1.ScanHistoryRequest) as one Arrow table."""
        ticket = fl.Ticket(fpb.FlightTicket(scan=req).SerializeToString())
        try:
            return self._client.do_get(ticket, self._options).read_all()
        except (fl.FlightError, pa.ArrowException) as e:
            raise error_from(e) from None

    def write(
        self,
        table: pa.Table,
        group: str,
        join_keys: list[tuple[str, str]],
        timestamp_column: str,
        durability: types.Durability,
        idempotency_key: str | None,
    ) -> WriteResult:
        if timestamp_column not in table.column_names:
            raise QuiverInvalidArgument(f"write to {group}: missing event time column {timestamp_column!r}")
        cv.check_key_columns(table, join_keys, f"write to {group}")
        micros = cv.micros_column(table.column(timestamp_column), f"write to {group}: {timestamp_column}")
        i = table.column_names.index(timestamp_column)
        table = table.set_column(i, timestamp_column, pa.array(np.asarray(micros), type=cv.TIMESTAMP))
        for name, _ in join_keys:
            table = table.set_column(table.column_names.index(name), name, cv.plain_key(table.column(name)))
        # Batches at fixed row offsets (not the table's chunk layout), so that a retry of the same
        # rows maps each idempotency key to the same rows.
        table = table.combine_chunks()
        rows = batch_rows(table)
        batches = table.to_batches(max_chunksize=rows)
        if idempotency_key:
            per_request = max(1, min(WRITE_ROWS_MAX, WRITE_VALUES_MAX // max(1, table.num_columns - len(join_keys) - 1)))
            longest = f"{idempotency_key}/{max(0, len(batches) - 1)}/{max(0, (rows - 1) // per_request)}"
            if len(longest.encode()) > IDEMPOTENCY_KEY_MAX:
                raise QuiverInvalidArgument(
                    f"idempotency key {idempotency_key[:20]!r}...: with /<batch>/<request> it is over {IDEMPOTENCY_KEY_MAX} bytes"
                )
        cmd = fpb.FlightWrite(
            group=group,
            durability=durability,
            idempotency_key=idempotency_key or "",  # "" is no key, as on the protobuf path
            timestamp_column=timestamp_column,
        )
        result = WriteResult()
        try:
            writer, reader = self._client.do_put(
                fl.FlightDescriptor.for_command(cmd.SerializeToString()), table.schema, self._options
            )
            with writer:
                for batch in batches:
                    writer.write_batch(batch)
                writer.done_writing()
                while True:
                    buf = reader.read()
                    if buf is None:
                        break
                    r = fpb.FlightWriteResult.FromString(buf.to_pybytes())
                    result.values_written += r.values_written
                    result.requests += r.requests
                    result.deduplicated += r.deduplicated
                    if r.HasField("system_time"):
                        result.system_time = cv.from_micros(cv.timestamp_micros(r.system_time))
                        result.version = {e.region: e.counter for e in r.version.entries}
        except (fl.FlightError, pa.ArrowException) as e:
            raise error_from(e) from None
        return result


def _rename(spine: pa.Table, answers: pa.RecordBatch, columns: list[str], with_status: bool) -> pa.RecordBatch:
    arrays = [c.combine_chunks() for c in spine.columns]
    names = list(spine.column_names)
    per = 3 if with_status else 1
    if answers.num_columns != per * len(columns):
        raise QuiverInternal(grpc.StatusCode.INTERNAL, f"the join answered {answers.num_columns} columns")
    for k, name in enumerate(columns):
        arrays.append(answers.column(per * k))
        names.append(name)
        if with_status:
            arrays.append(answers.column(per * k + 1).cast(pa.string()))
            arrays.append(answers.column(per * k + 2))
            names += [f"{name}__status", f"{name}__event_timestamp"]
    return pa.RecordBatch.from_arrays(arrays, names=names)
