"""The bulk data plane of the snapshot daemon: shard bytes over a framed TCP stream.

gRPC (``snapshot.proto``) stays the control plane: Put allocation, Commit, List,
Status, Drop, Publish. The two paths that move shard bytes in bulk, a daemon pushing a
chunk to its parity holder and a reader fetching a byte range (restore, repair), go
over this plane instead, because it measured faster on every path here (``plait bench
transport``, ``bench/results/transport.json``; summarised in README.md, "Snapshots and
recovery"): bytes go from the shared-memory mapping straight into the socket
(``sendall`` of a memoryview) and from the socket straight into their destination
(``recv_into``), while gRPC's Python streaming copies every 4 MiB message between its
own buffers and Python objects and hands each one through its completion queue.

Each daemon listens on one more port (``--bulk-port``, on the same host as gRPC) and
reports it in its ready file and in Status. Clients learn it from Status and fall back
to gRPC when a daemon advertises none (``--bulk-port -1``) or when its bulk port fails
while gRPC still answers (see :class:`~plait.runtime.snapshot.transport.client.DaemonClient`).

Frames. Integers are little-endian. A connection carries any number of requests, one
after the other (each reply ends before the next request starts)::

    request   REQUEST header (88 bytes): magic "PLTB", protocol, op, flags, version,
              local_rank, stripe, index (j), member (c), node, kind, offset, length,
              blob_size, blob_checksum, chunk_checksum, step
    reply     REPLY header (44 bytes): magic "PLTR", status, flags, checksum, size,
              offset, length, message length; then the message (UTF-8; errors only)

    PUSH_CHUNK  ->  REQUEST (length = chunk_len)
                <-  REPLY: OK + SEND (send the bytes), OK alone (that member already
                    arrived: send nothing), or an error
                ->  exactly length payload bytes
                <-  REPLY: OK (+ ACCEPTED), or an error (e.g. checksum mismatch)
    GET         ->  REQUEST (kind, offset, length, or flag TO_END)
                <-  REPLY: OK with the shard's checksum and size and the range's
                    offset and length, then exactly length payload bytes; or an error

PUSH_CHUNK asks before it sends so that a refusal (an old version, the memory cap, a
duplicate) costs a round trip instead of a transfer, and the stream stays in step
without draining bytes nobody wants. An error's status is the name of the gRPC status
the same refusal gets over gRPC (``SnapshotError.code``) and its message is the same
text, so a caller catches the same typed exception whichever transport carried it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass, fields

import torch

from plait.runtime.snapshot.auth import CHALLENGE_BYTES, JobSecret
from plait.runtime.snapshot.errors import BulkTransportError, SnapshotError, SnapshotRequestError, error_from_status

__all__ = [
    "PROTOCOL",
    "OP_PUSH_CHUNK",
    "OP_GET",
    "KIND_DATA",
    "KIND_PARITY",
    "STATUS_NAMES",
    "Request",
    "Reply",
    "BulkConnection",
    "BulkPool",
]

log = logging.getLogger(__name__)

MAGIC_REQUEST = b"PLTB"
MAGIC_REPLY = b"PLTR"
PROTOCOL = 2  # raised on any incompatible change of the frames; a mismatch is refused, not guessed at
OP_PUSH_CHUNK = 1
OP_GET = 2
KIND_DATA, KIND_PARITY = 1, 2  # the values of snapshot.proto's ShardKind
REQUEST_TO_END = 1  # request flag: GET to the end of the shard (length is ignored)
REPLY_SEND = 1  # reply flags
REPLY_ACCEPTED = 2
# Status codes on the wire: the index of the gRPC status name (0 = OK).
STATUS_NAMES = ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "DATA_LOSS", "RESOURCE_EXHAUSTED", "NOT_FOUND",
                "OUT_OF_RANGE", "UNAVAILABLE", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "ALREADY_EXISTS",
                "UNAUTHENTICATED")
MAGIC_CHALLENGE = b"PLTC"  # the daemon's first bytes on a connection: magic + 32 random bytes
MAGIC_PROOF = b"PLTP"  # the client's answer: magic + HMAC(secret, "bulk|" + challenge)
_STATUS_OF = {name: i for i, name in enumerate(STATUS_NAMES)}

SOCKET_BUFFER_BYTES = 4 << 20  # the kernel clamps to net.core.[rw]mem_max (x2)
IO_TIMEOUT_S = 30.0  # longest wait for progress in the middle of a frame before the connection is dropped
MAX_MESSAGE_BYTES = 1 << 16
# A pushed chunk is received and checksummed in slices of this size: the checksum of one
# slice runs while the sender fills the socket buffers with the next.
RECEIVE_SLICE_BYTES = 8 << 20

_REQUEST = struct.Struct("<4sBBHqiiiiiiqqqQQq")
_REPLY = struct.Struct("<4sHHQqqqI")


class _ConnectionLost(Exception):
    """The peer closed, reset or stalled the connection: it is out of step and must be dropped."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Request:
    """One request header. Which fields matter depends on ``op`` (see the module docstring)."""

    op: int
    version: int = 0
    local_rank: int = 0
    stripe: int = 0
    index: int = 0
    member: int = 0
    node: int = 0
    kind: int = 0
    offset: int = 0
    length: int = 0
    blob_size: int = 0
    blob_checksum: int = 0
    chunk_checksum: int = 0
    step: int = 0
    flags: int = 0
    protocol: int = PROTOCOL

    def pack(self) -> bytes:
        try:
            return _REQUEST.pack(MAGIC_REQUEST, self.protocol, self.op, self.flags, self.version, self.local_rank,
                                 self.stripe, self.index, self.member, self.node, self.kind, self.offset, self.length,
                                 self.blob_size, self.blob_checksum, self.chunk_checksum, self.step)
        except struct.error as err:
            values = {f.name: getattr(self, f.name) for f in fields(self)}
            raise SnapshotRequestError(f"a field of the request does not fit its wire type ({err}): {values}; "
                                       "versions, sizes and offsets are 64-bit, ranks and indices 32-bit, "
                                       "checksums unsigned") from None

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> Request:
        (magic, protocol, op, flags, version, local_rank, stripe, index, member, node, kind, offset, length, blob_size,
         blob_checksum, chunk_checksum, step) = _REQUEST.unpack(raw)
        if magic != MAGIC_REQUEST:
            raise SnapshotRequestError(f"bulk: a frame starts with {bytes(magic)!r}, not {MAGIC_REQUEST!r}; is "
                                       "something other than a plait snapshot client talking to the bulk port?")
        if protocol != PROTOCOL:
            raise SnapshotRequestError(f"bulk: protocol {protocol} is not this daemon's protocol {PROTOCOL}; run "
                                       "the same plait version on every node (or use gRPC, which always works)")
        return cls(op, version, local_rank, stripe, index, member, node, kind, offset, length, blob_size,
                   blob_checksum, chunk_checksum, step, flags, protocol)


@dataclass(frozen=True)
class Reply:
    """One reply header and its message. ``status`` is an index into STATUS_NAMES (0: OK)."""

    status: int = 0
    flags: int = 0
    checksum: int = 0
    size: int = 0
    offset: int = 0
    length: int = 0
    message: str = ""

    def pack(self) -> bytes:
        text = self.message.encode("utf-8", errors="replace")[:MAX_MESSAGE_BYTES]
        return _REPLY.pack(MAGIC_REPLY, self.status, self.flags, self.checksum, self.size, self.offset, self.length,
                           len(text)) + text

    @classmethod
    def refusal(cls, err: SnapshotError) -> Reply:
        return cls(status=_STATUS_OF.get(err.code, _STATUS_OF["UNKNOWN"]), message=str(err))

    def error(self, address: str) -> SnapshotError:
        """The typed exception of an error reply, exactly as the gRPC client raises it."""
        name = STATUS_NAMES[self.status] if self.status < len(STATUS_NAMES) else "UNKNOWN"
        return error_from_status(name, self.message, address)


# --------------------------------------------------------------------------- sockets


def tune_socket(sock: socket.socket, timeout: float | None) -> None:
    """TCP_NODELAY, large buffers, blocking mode with kernel-side timeouts.

    No Nagle delay: the small headers of the two-phase push must leave at once. The
    socket stays in blocking mode (Python's own timeouts make it non-blocking and poll
    before every call, which forbids MSG_WAITALL); SO_RCVTIMEO/SO_SNDTIMEO give the
    kernel the timeout instead, so one recv_into can fill megabytes.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
    sock.settimeout(None)
    if timeout:
        seconds = int(timeout)
        timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _recv_exact(sock: socket.socket, view: memoryview, *, at_boundary: bool = False) -> bool:
    """Fill ``view`` from the socket. False only if ``at_boundary`` and the peer closed before a first byte."""
    pos, total = 0, len(view)
    while pos < total:
        try:
            got = sock.recv_into(view[pos:], total - pos, socket.MSG_WAITALL)
        except (BlockingIOError, TimeoutError):
            if at_boundary and pos == 0:
                continue  # an idle persistent connection between requests: keep waiting
            raise _ConnectionLost(f"stalled past the socket timeout after {pos} of {total} bytes") from None
        except OSError as err:
            raise _ConnectionLost(f"{type(err).__name__}: {err}") from None
        if got == 0:
            if at_boundary and pos == 0:
                return False
            raise _ConnectionLost(f"closed by the peer after {pos} of {total} bytes")
        pos += got
    return True


def _send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except (BlockingIOError, TimeoutError):
        raise _ConnectionLost("stalled past the socket timeout while sending") from None
    except OSError as err:
        raise _ConnectionLost(f"{type(err).__name__}: {err}") from None


def _recv_reply(sock: socket.socket) -> Reply:
    head = bytearray(_REPLY.size)
    _recv_exact(sock, memoryview(head))
    magic, status, flags, checksum, size, offset, length, nmessage = _REPLY.unpack(head)
    if magic != MAGIC_REPLY or nmessage > MAX_MESSAGE_BYTES:
        raise _ConnectionLost(f"the reply starts with {bytes(magic)!r} (message length {nmessage}), not a plait bulk "
                              "reply; is the bulk port right?")
    message = bytearray(nmessage)
    if nmessage:
        _recv_exact(sock, memoryview(message))
    return Reply(status, flags, checksum, size, offset, length, message.decode("utf-8", errors="replace"))


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous uint8 CPU tensor as a writable memoryview (no copy)."""
    return memoryview(t.numpy()).cast("B")


# --------------------------------------------------------------------------- client


class BulkConnection:
    """One client connection to a daemon's bulk port, good for any number of requests in turn.

    Refusals raise the typed error and leave the connection usable; anything that
    leaves it out of step (a reset, a close, a stall, a garbled reply) marks it
    ``broken`` and raises :class:`BulkTransportError`.
    """

    def __init__(self, host: str, port: int, *, timeout: float, address: str, secret: JobSecret):
        self.host, self.port, self.address = host, port, address
        self.broken = False
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as err:
            raise BulkTransportError(f"snapshot daemon at {address}: bulk port {host}:{port}: cannot connect: "
                                     f"{err}") from None
        tune_socket(self._sock, timeout)
        with self._guard():  # the challenge: prove the job's secret before the first request
            challenge = bytearray(len(MAGIC_CHALLENGE) + CHALLENGE_BYTES)
            _recv_exact(self._sock, memoryview(challenge))
            if challenge[:4] != MAGIC_CHALLENGE:
                raise BulkTransportError(f"snapshot daemon at {address}: bulk port {host}:{port} did not open with a "
                                         "challenge; is it a plait daemon of this version?")
            _send_all(self._sock, MAGIC_PROOF + secret.bulk_proof(bytes(challenge[4:])))

    def close(self) -> None:
        self.broken = True
        self._sock.close()

    def get(self, request: Request, out: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Send a GET; receive the range into ``out`` (or a new tensor); return (filled prefix, shard checksum)."""
        with self._guard():
            _send_all(self._sock, request.pack())
            reply = _recv_reply(self._sock)
            if reply.status:
                raise reply.error(self.address)
            total = reply.length
            if out is None:
                out = torch.empty(total, dtype=torch.uint8)
            elif out.numel() < total:
                self.close()  # the payload is on its way and nobody will read it
                raise SnapshotRequestError(f"get: out holds {out.numel()} bytes but the range has {total}")
            if total:
                _recv_exact(self._sock, _bytes_view(out[:total]))
            return out[:total], reply.checksum

    def push_chunk(self, request: Request, chunk: torch.Tensor) -> bool:
        """Send a PUSH_CHUNK and its bytes if the daemon wants them; True if the member was accumulated."""
        with self._guard():
            _send_all(self._sock, request.pack())
            reply = _recv_reply(self._sock)
            if reply.status:
                raise reply.error(self.address)
            if not reply.flags & REPLY_SEND:
                return False
            if chunk.numel():
                _send_all(self._sock, _bytes_view(chunk))
            reply = _recv_reply(self._sock)
            if reply.status:
                raise reply.error(self.address)
            return bool(reply.flags & REPLY_ACCEPTED)

    def _guard(self) -> _Guard:
        return _Guard(self)


class _Guard:
    """Turn a lost connection into BulkTransportError and mark the connection broken."""

    def __init__(self, conn: BulkConnection):
        self.conn = conn

    def __enter__(self) -> None:
        if self.conn.broken:
            raise BulkTransportError(f"snapshot daemon at {self.conn.address}: the bulk connection is closed")

    def __exit__(self, kind: type | None, err: BaseException | None, tb: object) -> bool:
        if err is None or isinstance(err, SnapshotError):
            return False
        self.conn.close()
        if isinstance(err, _ConnectionLost):
            raise BulkTransportError(f"snapshot daemon at {self.conn.address}: bulk port {self.conn.host}:"
                                     f"{self.conn.port}: {err}") from None
        return False  # KeyboardInterrupt and the like: the connection is closed, the error goes on


class BulkPool:
    """Idle bulk connections to one daemon, reused by later calls (thread-safe)."""

    def __init__(self, host: str, *, timeout: float, address: str, secret: JobSecret, max_idle: int = 8):
        self.host, self.timeout, self.address, self.max_idle = host, timeout, address, max_idle
        self.secret = secret
        self._idle: list[BulkConnection] = []
        self._lock = threading.Lock()

    def acquire(self, port: int) -> BulkConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.port == port and not conn.broken:
                    return conn
                conn.close()
        return BulkConnection(self.host, port, timeout=self.timeout, address=self.address, secret=self.secret)

    def release(self, conn: BulkConnection) -> None:
        with self._lock:
            if not conn.broken and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
