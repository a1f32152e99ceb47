"""Typed errors, one per gRPC status code the server documents.

Every failed call raises a subclass of :class:`QuiverError`; the status code, the server's
message and the raw status details stay available on it. A request the client refuses before
sending (a bad column, a timestamp below a microsecond) raises :class:`QuiverInvalidArgument`
too, with ``code`` ``INVALID_ARGUMENT``, so callers need one ``except`` for both.
"""

from __future__ import annotations

from datetime import timedelta

import grpc

__all__ = [
    "QuiverError",
    "QuiverInvalidArgument",
    "QuiverNotFound",
    "QuiverAlreadyExists",
    "QuiverPermissionDenied",
    "QuiverUnauthenticated",
    "QuiverResourceExhausted",
    "QuiverFailedPrecondition",
    "QuiverAborted",
    "CasConflict",
    "QuiverUnavailable",
    "QuiverDeadlineExceeded",
    "QuiverInternal",
    "from_code",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"


class QuiverError(Exception):
    """A call failed. ``code`` is the gRPC status code, ``message`` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str, details: bytes = b"") -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = details


class QuiverInvalidArgument(QuiverError):
    """The request is malformed or does not match the registry (INVALID_ARGUMENT)."""

    def __init__(self, message: str, details: bytes = b"") -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message, details)


class QuiverNotFound(QuiverError):
    """An entity type, group, version or feature that does not exist (NOT_FOUND)."""


class QuiverAlreadyExists(QuiverError):
    """ALREADY_EXISTS."""


class QuiverPermissionDenied(QuiverError):
    """The token lacks the scope or the group (PERMISSION_DENIED)."""


class QuiverUnauthenticated(QuiverError):
    """No token, or one the server does not know (UNAUTHENTICATED)."""


class QuiverResourceExhausted(QuiverError):
    """Over a limit, a rate, or (with ``retry_after`` set) overloaded right now."""

    def __init__(self, code: grpc.StatusCode, message: str, details: bytes = b"") -> None:
        super().__init__(code, message, details)
        self.retry_after: timedelta | None = _retry_after(details)


class QuiverFailedPrecondition(QuiverError):
    """The state does not allow it: a release gate refused a promotion, an idempotency key
    reused for another request, a retired version (FAILED_PRECONDITION)."""


class QuiverAborted(QuiverError):
    """ABORTED."""


class CasConflict(QuiverAborted):
    """A compare-and-swap write found other versions: nothing was written.

    ``current`` maps each conflicting ``"group:feature"`` to its current version vector
    (``{region: counter}``; empty when the cell holds no value).
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: bytes = b"") -> None:
        super().__init__(code, message, details)
        self.current: dict[str, dict[int, int]] = {}
        if details:
            from quiver.v1 import feature_service_pb2 as fs

            conflict = fs.CasConflict.FromString(details)
            for cell in conflict.cells:
                self.current[cell.feature_ref] = {e.region: e.counter for e in cell.current.entries}


class QuiverUnavailable(QuiverError):
    """The server cannot be reached or is stopping (UNAVAILABLE)."""


class QuiverDeadlineExceeded(QuiverError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class QuiverInternal(QuiverError):
    """INTERNAL, DATA_LOSS, UNKNOWN and any other code: a server-side failure."""


_BY_CODE: dict[grpc.StatusCode, type[QuiverError]] = {
    grpc.StatusCode.NOT_FOUND: QuiverNotFound,
    grpc.StatusCode.ALREADY_EXISTS: QuiverAlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: QuiverPermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: QuiverUnauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuiverResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: QuiverFailedPrecondition,
    grpc.StatusCode.ABORTED: CasConflict,
    grpc.StatusCode.UNAVAILABLE: QuiverUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: QuiverDeadlineExceeded,
}


def _retry_after(details: bytes) -> timedelta | None:
    """The delay of a google.rpc.RetryInfo in a google.rpc.Status, if there is one."""
    if not details:
        return None
    try:
        from google.rpc import error_details_pb2, status_pb2

        status = status_pb2.Status.FromString(details)
        for any_ in status.details:
            info = error_details_pb2.RetryInfo()
            if any_.Unpack(info):
                d = info.retry_delay
                return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)
    except Exception:  # details in another shape: no advice
        return None
    return None


def from_code(code: grpc.StatusCode, message: str, details: bytes = b"") -> QuiverError:
    """The typed error for a status code."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return QuiverInvalidArgument(message, details)
    return _BY_CODE.get(code, QuiverInternal)(code, message, details)


def from_rpc_error(err: grpc.RpcError) -> QuiverError:
    """The typed error for a failed gRPC call (sync or asyncio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(err)
    details = b""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            details = value
    return from_code(code, message, details)
