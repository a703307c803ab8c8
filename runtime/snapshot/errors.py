"""The typed errors of the snapshot daemon, shared by the store, the server and the client.

Each class carries the gRPC status code it travels as (``code``, the name of a
``grpc.StatusCode`` member), so the store can raise it without knowing about gRPC, the
server turns it into that status with the same message, and the client turns the
status back into the same class: a caller catches ``SnapshotMemoryError`` whether the
cap was hit in its own process or in a daemon.
"""

from __future__ import annotations

from plait.errors import PlaitError

__all__ = [
    "SnapshotError",
    "SnapshotRequestError",
    "SnapshotVersionError",
    "SnapshotChecksumError",
    "SnapshotMemoryError",
    "SnapshotNotFound",
    "SnapshotRangeError",
    "SnapshotAuthError",
    "DaemonUnavailable",
    "BulkTransportError",
    "DaemonStartError",
    "ERROR_BY_CODE",
    "error_from_status",
]


class SnapshotError(PlaitError):
    """Base of every snapshot error; ``code`` is the gRPC status it is sent as."""

    code = "UNKNOWN"


class SnapshotRequestError(SnapshotError):
    """A request names a shard, index, size or length that cannot be right (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class SnapshotVersionError(SnapshotError):
    """The version or shard is not in a state that allows the request (FAILED_PRECONDITION).

    For example: the version is not newer than the published one, the shard is already
    committed, or it is not committed (or its parity not complete) yet.
    """

    code = "FAILED_PRECONDITION"


class SnapshotChecksumError(SnapshotError):
    """Bytes do not match the checksum their sender declared (DATA_LOSS)."""

    code = "DATA_LOSS"


class SnapshotMemoryError(SnapshotError):
    """An allocation would exceed ``snapshot.max_memory`` (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class SnapshotNotFound(SnapshotError):
    """No such version or shard on this daemon (NOT_FOUND)."""

    code = "NOT_FOUND"


class SnapshotRangeError(SnapshotError):
    """A byte range reaches past the end of a shard (OUT_OF_RANGE)."""

    code = "OUT_OF_RANGE"


class SnapshotAuthError(SnapshotError):
    """The caller did not prove the job's secret, or the secret file is missing or unsafe (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"


class DaemonUnavailable(SnapshotError):
    """The daemon cannot be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    code = "UNAVAILABLE"


class BulkTransportError(DaemonUnavailable):
    """The bulk TCP connection to a daemon failed: refused, reset, closed mid-frame, timed out, or garbled.

    A subclass of DaemonUnavailable because that is what it means to a caller that gets
    it; :class:`~plait.runtime.snapshot.transport.client.DaemonClient` catches it first, asks the
    daemon over gRPC whether it is alive (and on which bulk port), and retries or falls
    back to gRPC.
    """


class DaemonStartError(SnapshotError):
    """A daemon process exited or did not become ready; the message holds its log's tail."""

    code = "UNAVAILABLE"
    exit_code = 1


ERROR_BY_CODE: dict[str, type[SnapshotError]] = {
    cls.code: cls
    for cls in (
        SnapshotRequestError,
        SnapshotVersionError,
        SnapshotChecksumError,
        SnapshotMemoryError,
        SnapshotNotFound,
        SnapshotRangeError,
        SnapshotAuthError,
        DaemonUnavailable,
    )
}
ERROR_BY_CODE["DEADLINE_EXCEEDED"] = DaemonUnavailable
ERROR_BY_CODE["ALREADY_EXISTS"] = SnapshotVersionError


def error_from_status(code: str, details: str, address: str) -> SnapshotError:
    """The typed exception for a daemon's refusal with status ``code`` (a gRPC status name) and ``details``.

    One function for both transports (gRPC and the bulk plane), so the same refusal is
    the same class with the same message whichever carried it. ``grpc_code`` keeps the
    status name for callers that log it.
    """
    cls = ERROR_BY_CODE.get(code, SnapshotError)
    details = details or code
    message = f"snapshot daemon at {address}: {code}: {details}" if cls is DaemonUnavailable else details
    error = cls(message)
    error.grpc_code = code  # type: ignore[attr-defined]
    return error
