"""The daemon's end of the bulk data plane (frames in :mod:`plait.runtime.snapshot.transport.bulk`)."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from typing import TYPE_CHECKING

import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.runtime.snapshot.auth import CHALLENGE_BYTES, MAC_BYTES, JobSecret
from plait.runtime.snapshot.daemon.refusals import RefusalLog
from plait.runtime.snapshot.errors import SnapshotAuthError, SnapshotError, SnapshotRequestError
from plait.runtime.snapshot.transport.bulk import (
    _REQUEST,
    _STATUS_OF,
    IO_TIMEOUT_S,
    KIND_DATA,
    KIND_PARITY,
    OP_GET,
    OP_PUSH_CHUNK,
    RECEIVE_SLICE_BYTES,
    REPLY_ACCEPTED,
    REPLY_SEND,
    REQUEST_TO_END,
    Reply,
    Request,
    _bytes_view,
    _ConnectionLost,
    _recv_exact,
    MAGIC_CHALLENGE,
    MAGIC_PROOF,
    _send_all,
    tune_socket,
)

if TYPE_CHECKING:
    from plait.runtime.snapshot.daemon.store import SnapshotStore

__all__ = ["BulkServer"]

log = logging.getLogger(__name__)

STAGING_KEEP_BYTES = 512 << 20  # receive buffers kept between pushes, all connections together


class _StagingPool:
    """Receive buffers for pushed chunks, reused from one push to the next.

    Why: a pushed chunk must be received whole and verified before it is accumulated
    into parity (a bad chunk accumulated cannot be taken out again), so it needs a
    buffer of its size; fresh pages cost a page fault each on first touch, a large part
    of a transfer at memory speed. Buffers are shared by all connections and at most
    ``keep_bytes`` are kept idle, so idle connections hold no memory.
    """

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fitting = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
            if fitting:
                return self._idle.pop(min(fitting, key=lambda i: self._idle[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() > self.keep_bytes:
            return
        with self._lock:
            self._idle.append(buf)
            self._idle.sort(key=torch.Tensor.numel, reverse=True)  # keep the largest: they serve every size
            while sum(b.numel() for b in self._idle) > self.keep_bytes:
                self._idle.pop()


class BulkServer:
    """A daemon's bulk port: a listening socket and a thread per connection over the store.

    Connections are few (the group's peers and the occasional restorer) and mostly move
    large frames, so a thread each is simpler than an event loop and costs nothing
    measurable; the byte work (checksums, GF(2^8) accumulation, socket copies) runs
    without the GIL.
    """

    def __init__(self, store: SnapshotStore, host: str, port: int, *, secret: JobSecret, refusals: RefusalLog,
                 staging_keep_bytes: int = STAGING_KEEP_BYTES):
        self.store = store
        self.secret = secret
        self.refusals = refusals
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # create_server sets SO_REUSEADDR (a restarted daemon gets its port back at once) and never SO_REUSEPORT
        # (two daemons never share a port).
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._staging = _StagingPool(staging_keep_bytes)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="plait-bulk-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and cut every connection (transfers in flight fail; their senders retry)."""
        self._stop.set()
        for sock in [self._listener, *self._snapshot_connections()]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked in accept or recv
            except OSError:
                pass
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _snapshot_connections(self) -> list[socket.socket]:
        with self._lock:
            return list(self._connections)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError as err:
                if self._stop.is_set():
                    return
                log.warning("bulk port %d: accept failed: %s", self.port, err)
                self._stop.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            tune_socket(conn, IO_TIMEOUT_S)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name="plait-bulk-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        where = f"{peer[0]}:{peer[1]}"
        head = bytearray(_REQUEST.size)
        try:
            if not self._authenticate(conn, where):
                return
            while not self._stop.is_set():
                if not _recv_exact(conn, memoryview(head), at_boundary=True):
                    return  # the client closed between requests
                try:
                    request = Request.unpack(head)
                except SnapshotError as err:
                    log.warning("bulk connection from %s: %s", where, err)
                    _send_all(conn, Reply.refusal(err).pack())
                    return  # out of step with this client: whatever follows cannot be parsed
                if request.op == OP_PUSH_CHUNK:
                    self._push_chunk(conn, request)
                elif request.op == OP_GET:
                    self._get(conn, request)
                else:
                    err = SnapshotRequestError(f"bulk: unknown op {request.op}; accepted: {OP_PUSH_CHUNK} "
                                               f"(PUSH_CHUNK), {OP_GET} (GET)")
                    _send_all(conn, Reply.refusal(err).pack())
                    return
        except _ConnectionLost as err:
            log.info("bulk connection from %s dropped: %s", where, err)
        except Exception:  # noqa: BLE001 (a bad connection must never take the daemon down)
            log.exception("bulk connection from %s failed", where)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _authenticate(self, conn: socket.socket, where: str) -> bool:
        """Challenge the client to prove the job's secret; refuse (once logged per peer host) and close if it cannot."""
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        _send_all(conn, MAGIC_CHALLENGE + challenge)
        answer = bytearray(len(MAGIC_PROOF) + MAC_BYTES)
        if not _recv_exact(conn, memoryview(answer), at_boundary=True):
            return False
        if answer[:4] == MAGIC_PROOF and self.secret.check_bulk_proof(challenge, bytes(answer[4:])):
            return True
        err = SnapshotAuthError(f"bulk connection from {where} refused: it did not prove the job's secret "
                                "(wrong or missing PLAIT_SNAPSHOT_SECRET_FILE)")
        self.refusals.note(where.rpartition(":")[0], str(err))
        _send_all(conn, Reply.refusal(err).pack())
        return False

    def _refuse(self, conn: socket.socket, name: str, err: Exception) -> None:
        """Answer a request with its error; the stream stays in step (no payload is owed either way)."""
        if isinstance(err, SnapshotError):
            log.info("%s refused: %s", name, err)
            reply = Reply.refusal(err)
        else:
            log.exception("%s failed", name)
            reply = Reply(status=_STATUS_OF["INTERNAL"], message=f"{name}: {type(err).__name__}: {err}")
        _send_all(conn, reply.pack())

    def _get(self, conn: socket.socket, request: Request) -> None:
        try:
            kind = {KIND_DATA: "data", KIND_PARITY: "parity"}.get(request.kind)
            if kind is None:
                raise SnapshotRequestError(f"Get: kind must be SHARD_KIND_DATA or SHARD_KIND_PARITY, got "
                                           f"{request.kind}")
            length = None if request.flags & REQUEST_TO_END else request.length
            shard_range = self.store.read_range(kind, request.version, request.local_rank, stripe=request.stripe,
                                                index=request.index, offset=request.offset, length=length)
        except Exception as err:  # noqa: BLE001 (answered, and logged when unexpected)
            self._refuse(conn, "Get", err)
            return
        reply = Reply(checksum=shard_range.checksum, size=shard_range.size, offset=shard_range.offset,
                      length=shard_range.length)
        _send_all(conn, reply.pack())
        if shard_range.length:
            _send_all(conn, _bytes_view(shard_range.data))  # straight from the shared-memory mapping

    def _push_chunk(self, conn: socket.socket, request: Request) -> None:
        from plait.runtime.snapshot.records import ChunkHeader

        header = ChunkHeader(version=request.version, local_rank=request.local_rank, stripe=request.stripe,
                             index=request.index, member=request.member, node=request.node,
                             blob_size=request.blob_size, blob_checksum=request.blob_checksum,
                             chunk_len=request.length, chunk_checksum=request.chunk_checksum, step=request.step)
        try:
            shard = self.store.begin_chunk(header)  # validates the header and makes room before any byte moves
            buf = self._staging.take(header.chunk_len) if shard is not None else None
        except Exception as err:  # noqa: BLE001
            self._refuse(conn, "PushChunk", err)
            return
        if shard is None or buf is None:
            _send_all(conn, Reply().pack())  # that member already arrived: nothing to send
            return
        _send_all(conn, Reply(flags=REPLY_SEND).pack())
        try:
            chunk = buf[:header.chunk_len]
            view = _bytes_view(chunk)
            received = 0
            for pos in range(0, header.chunk_len, RECEIVE_SLICE_BYTES):
                piece = chunk[pos:pos + RECEIVE_SLICE_BYTES]
                _recv_exact(conn, view[pos:pos + piece.numel()])
                received = compute_checksum(piece, received)  # while the sender refills the socket buffer
            try:  # verify, then accumulate: as gRPC PushChunk
                accepted = self.store.add_chunk(header, shard, chunk, received_checksum=received)
            except Exception as err:  # noqa: BLE001
                self._refuse(conn, "PushChunk", err)
                return
        finally:
            self._staging.give(buf)
        _send_all(conn, Reply(flags=REPLY_ACCEPTED if accepted else 0).pack())
