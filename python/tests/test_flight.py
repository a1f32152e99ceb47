"""Arrow Flight on quiverd's port, spoken directly with pyarrow.flight: answers, refusals with
their gRPC codes, tokens, and the methods it does not serve."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pandas as pd
import pyarrow as pa
import pyarrow.flight as fl
import pytest
from conftest import Daemon, start_quiverd

import quiver
from quiver import _core
from quiver._flight import error_from
from quiver.v1 import flight_pb2 as fpb

NOW = datetime.now(timezone.utc).replace(microsecond=0)


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def join_ticket(spine: pa.Table, features: list[str], **kw: object) -> fl.Ticket:
    join = fpb.FlightJoin(entity_type="user", features=features, spine_ipc=ipc(spine), **kw)  # type: ignore[arg-type]
    return fl.Ticket(fpb.FlightTicket(join=join).SerializeToString())


def spine(users: list[str], ts: pa.Array | None = None) -> pa.Table:
    return pa.table(
        {"user_id": users, "event_timestamp": ts if ts is not None else pa.array([NOW] * len(users), pa.timestamp("us"))}
    )


def refused(call: object) -> quiver.QuiverError:
    with pytest.raises((fl.FlightError, pa.ArrowException)) as e:
        call()  # type: ignore[operator]
    return error_from(e.value)


def test_join_batches_schema_and_group_version(daemon: Daemon, client: quiver.Client, uid: str) -> None:
    client.write([{"user_id": f"{uid}-1", "event_timestamp": NOW, "spend": 3.5}], "user_stats")
    c = fl.FlightClient(f"grpc+tcp://{daemon.address}")
    out = c.do_get(join_ticket(spine([f"{uid}-1", f"{uid}-2"]), ["user_stats:spend"], with_status=True)).read_all()
    assert out.column_names == ["user_stats:spend", "user_stats:spend:status", "user_stats:spend:event_timestamp"]
    assert out.column(0).to_pylist() == [3.5, None]
    assert out.column(1).to_pylist() == ["PRESENT", "NOT_FOUND"]
    assert out.column(2).to_pylist()[0] == NOW and out.column(2).to_pylist()[1] is None
    assert out.schema.field(0).metadata == {b"quiver.group_version": b"1"}
    # Without statuses: the values alone; an empty spine: the schema and no rows.
    assert c.do_get(join_ticket(spine([f"{uid}-1"]), ["user_stats:spend"])).read_all().num_columns == 1
    empty = c.do_get(join_ticket(spine([]), ["user_stats:spend"])).read_all()
    assert empty.num_rows == 0 and empty.column_names == ["user_stats:spend"]


def test_bad_tickets_and_spines_are_refused_with_their_codes(daemon: Daemon, client: quiver.Client) -> None:
    c = fl.FlightClient(f"grpc+tcp://{daemon.address}")
    get = lambda t: lambda: c.do_get(t).read_all()  # noqa: E731
    codes = {
        "garbage ticket": refused(get(fl.Ticket(b"\xff\xff\xff"))),
        "not IPC": refused(
            get(
                fl.Ticket(
                    fpb.FlightTicket(
                        join=fpb.FlightJoin(entity_type="user", features=["user_stats:spend"], spine_ipc=b"junk")
                    ).SerializeToString()
                )
            )
        ),
        "null key": refused(
            get(
                join_ticket(
                    pa.table({"user_id": pa.array(["a", None]), "event_timestamp": pa.array([NOW, NOW], pa.timestamp("us"))}),
                    ["user_stats:spend"],
                )
            )
        ),
        "int key": refused(
            get(
                join_ticket(
                    pa.table({"user_id": [1], "event_timestamp": pa.array([NOW], pa.timestamp("us"))}), ["user_stats:spend"]
                )
            )
        ),
        "no key": refused(
            get(
                join_ticket(
                    pa.table({"uid": ["a"], "event_timestamp": pa.array([NOW], pa.timestamp("us"))}), ["user_stats:spend"]
                )
            )
        ),
        "nanoseconds": refused(
            get(join_ticket(spine(["a"], pa.array([1_700_000_000_000_000_001], pa.timestamp("ns"))), ["user_stats:spend"]))
        ),
        "year 10000": refused(
            get(join_ticket(spine(["a"], pa.array([253_402_300_800], pa.timestamp("s"))), ["user_stats:spend"]))
        ),
        "not a time": refused(get(join_ticket(pa.table({"user_id": ["a"], "event_timestamp": ["noon"]}), ["user_stats:spend"]))),
    }
    for what, e in codes.items():
        assert isinstance(e, quiver.QuiverInvalidArgument), (what, e)
    assert "spine row" in codes["null key"].message or "nulls" in codes["null key"].message
    assert "below a microsecond" in codes["nanoseconds"].message
    assert isinstance(refused(get(join_ticket(spine(["a"]), ["user_stats:nope"]))), quiver.QuiverNotFound)
    assert isinstance(refused(get(join_ticket(spine(["a"]), ["balances:balance"]))), quiver.QuiverInvalidArgument)
    unimplemented = refused(lambda: list(c.list_flights()))
    assert unimplemented.code.name == "UNIMPLEMENTED"
    # A ticket with no request this server knows (empty, or a newer client's kind): UNIMPLEMENTED,
    # which the SDK takes as "use the protobuf API".
    assert refused(get(fl.Ticket(b""))).code.name == "UNIMPLEMENTED"


def test_bad_writes_write_nothing(daemon: Daemon, client: quiver.Client, uid: str) -> None:
    c = fl.FlightClient(f"grpc+tcp://{daemon.address}")

    def put(cmd: bytes, table: pa.Table) -> None:
        w, r = c.do_put(fl.FlightDescriptor.for_command(cmd), table.schema)
        w.write_table(table)
        w.done_writing()
        while r.read() is not None:
            pass
        w.close()

    user = f"{uid}-w"
    good = pa.table({"user_id": [user], "event_timestamp": pa.array([NOW], pa.timestamp("us", "UTC")), "spend": [1.0]})
    write = lambda group: fpb.FlightWrite(group=group).SerializeToString()  # noqa: E731
    assert isinstance(refused(lambda: put(b"\xff", good)), quiver.QuiverInvalidArgument)
    assert isinstance(refused(lambda: put(write("no_group"), good)), quiver.QuiverNotFound)
    assert isinstance(
        refused(lambda: put(write("user_stats"), good.append_column("extra", pa.array([1])))), quiver.QuiverInvalidArgument
    )
    assert isinstance(
        refused(lambda: put(write("user_stats"), good.set_column(2, "spend", pa.array(["x"])))), quiver.QuiverInvalidArgument
    )
    assert isinstance(
        refused(lambda: put(write("user_stats"), good.drop_columns(["event_timestamp"]))), quiver.QuiverInvalidArgument
    )
    long_key = fpb.FlightWrite(group="user_stats", idempotency_key="k" * 126).SerializeToString()
    assert isinstance(refused(lambda: put(long_key, good)), quiver.QuiverInvalidArgument)
    got = client.get_online_features(["user_stats:spend"], [{"user_id": user}]).to_dict()
    assert got["spend__status"] == ["NOT_FOUND"]
    put(write("user_stats"), good)
    assert client.get_online_features(["user_stats:spend"], [{"user_id": user}]).to_dict()["spend"] == [1.0]


def test_flight_needs_the_same_tokens(secured: tuple[Daemon, dict[str, str]]) -> None:
    daemon, tokens = secured
    c = fl.FlightClient(f"grpc+tcp://{daemon.address}")
    assert isinstance(
        refused(lambda: c.do_get(join_ticket(spine(["a"]), ["user_stats:spend"])).read_all()), quiver.QuiverUnauthenticated
    )
    reader = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {tokens['reader']}".encode())])
    assert c.do_get(join_ticket(spine(["a"]), ["user_stats:spend"]), reader).read_all().num_rows == 1
    table = pa.table({"user_id": ["a"], "event_timestamp": pa.array([NOW], pa.timestamp("us")), "spend": [1.0]})

    def put() -> None:
        w, r = c.do_put(
            fl.FlightDescriptor.for_command(fpb.FlightWrite(group="user_stats").SerializeToString()), table.schema, reader
        )
        w.write_table(table)
        w.done_writing()
        r.read()
        w.close()

    assert isinstance(refused(put), quiver.QuiverPermissionDenied)
    # The SDK over Flight with the admin token.
    with quiver.Client(daemon.address, token=tokens["admin"], use_flight=True) as q:
        assert q.write(table, "user_stats").values_written == 1
        assert q.get_historical_features(spine(["a"]), ["user_stats:spend"]).to_df()["spend"].tolist() == [1.0]


def test_error_codes_are_read_from_either_form_pyarrow_reports() -> None:
    named = fl.FlightServerError(
        "Flight returned not found error, with message: no group. gRPC client debug context: NOT_FOUND:no group"
    )
    assert isinstance(error_from(named), quiver.QuiverNotFound) and error_from(named).message == "no group"
    numbered = fl.FlightServerError(
        "Flight returned unknown error, with message: gone. gRPC client debug context: UNKNOWN:Error received from peer "
        'ipv4:127.0.0.1:1 {grpc_message:"gone", grpc_status:12}'
    )
    assert error_from(numbered).code.name == "UNIMPLEMENTED"
    assert isinstance(error_from(fl.FlightUnauthenticatedError("no token")), quiver.QuiverUnauthenticated)
    # A request shed for load keeps its retry advice, which pyarrow's error drops (as quiverd
    # words it); one that can never fit has none.
    shed = pa.ArrowInvalid(
        "gRPC returned resource exhausted error, with message: overloaded: this request needs 3 bytes and requests in "
        "flight hold 9 of 10; retry shortly. gRPC client debug context: RESOURCE_EXHAUSTED:overloaded: ..."
    )
    e = error_from(shed)
    assert isinstance(e, quiver.QuiverResourceExhausted) and e.retry_after == timedelta(milliseconds=100)
    never = pa.ArrowInvalid(
        "gRPC returned resource exhausted error, with message: this request needs 30 bytes, more than requests may hold "
        "(10). gRPC client debug context: RESOURCE_EXHAUSTED:this request ..."
    )
    e = error_from(never)
    assert isinstance(e, quiver.QuiverResourceExhausted) and e.retry_after is None
    # A token over its rate says when to come back (a Rust Duration).
    for said, seconds in (("1.5s", 1.5), ("250ms", 0.25), ("12.5µs", 12.5e-6)):
        limited = pa.ArrowInvalid(
            'gRPC returned resource exhausted error, with message: token "t" is over its rate limit of 3 requests per '
            f"second; retry in {said}. gRPC client debug context: RESOURCE_EXHAUSTED:token ..."
        )
        e = error_from(limited)
        assert isinstance(e, quiver.QuiverResourceExhausted) and e.retry_after == timedelta(seconds=seconds), said


def test_shed_retries_wait_at_least_the_advice_within_their_budget() -> None:
    err = quiver.QuiverResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "x")
    err.retry_after = timedelta(seconds=3)  # over SHED_RETRY_DELAY_MAX: the advice still wins
    r = _core.ShedRetry(budget=8.0)
    assert 3.0 <= (r.delay(err) or 0) <= 3.3
    assert 3.0 <= (r.delay(err) or 0) <= 3.3
    assert r.delay(err) is None  # over 6 s of 8 waited: another 3 s does not fit
    err.retry_after = timedelta(milliseconds=100)
    r = _core.ShedRetry(budget=60.0)
    waits = [r.delay(err) or 0 for _ in range(8)]
    assert 0.1 <= waits[0] <= 0.11 and 0.2 <= waits[1] <= 0.22 and all(2.0 <= w <= 2.2 for w in waits[5:])
    err.retry_after = None
    assert _core.ShedRetry().delay(err) is None


def test_a_cancelled_flight_join_ends_its_call(daemon: Daemon, registry_file: Path, uid: str) -> None:
    """An abandoned or cancelled join must not keep the server's join (and its memory) running:
    cancel() ends the call, from any thread."""
    with quiver.Client(daemon.address, use_flight=True) as q:
        q.apply(registry_file)  # unchanged if another test applied it
        big = pa.table({"user_id": [f"{uid}-{i}" for i in range(300_000)], "event_timestamp": pa.array([NOW] * 300_000)})
        job = q.get_historical_features(big, ["user_stats:spend"])
        columns = job._columns(big.schema)
        stream = q._flight.transport().join(big, "user", [("user_id", "string")], job._refs, columns, job._params, True)
        assert next(stream).num_rows > 0
        stream.cancel()
        with pytest.raises(quiver.QuiverError) as e:
            for _ in stream:
                pass
        assert e.value.code == grpc.StatusCode.CANCELLED


def test_categorical_keys_and_requests_too_large_for_the_server(tmp_path: Path, registry_file: Path) -> None:
    # Requests may hold 1/8 of a 16 MiB budget: a 150,000-row spine does not fit in one request,
    # is refused without retry advice, and is sent again in halves until it fits.
    daemon = start_quiverd(tmp_path / "data", "--memory-budget-mb", "16")
    try:
        for use_flight in (True, False):
            with quiver.Client(daemon.address, use_flight=use_flight) as q:
                q.apply(registry_file)
                users = pd.Categorical([f"c{i % 500}" for i in range(150_000)])
                q.write(pd.DataFrame({"user_id": users[:500], "event_timestamp": NOW, "clicks": range(500)}), "user_stats")
                spine_df = pd.DataFrame({"user_id": users, "event_timestamp": NOW, "row": range(150_000)})
                out = q.get_historical_features(spine_df, ["user_stats:clicks"]).to_arrow()
                assert out.column("row").to_pylist() == list(range(150_000)), use_flight
                assert out.column("clicks").to_pylist() == [i % 500 for i in range(150_000)], use_flight
    finally:
        daemon.stop()
