"""The client of a snapshot daemon, for workers (put and commit), the restore path and tests.

    client = DaemonClient("127.0.0.1:7100")
    view = client.alloc(version=step, local_rank=r, size=blob.numel())   # the daemon's shm pages
    view.copy_(blob)                                                     # written in place, no RPC
    client.commit(step, r, size=blob.numel(), checksum=checksum(view), step=step)

Every gRPC failure becomes a typed :class:`~plait.runtime.snapshot.errors.SnapshotError`
subclass carrying the daemon's message (see ``errors.py`` for the code of each), so
callers never handle ``grpc.RpcError``.

Bulk bytes (:meth:`DaemonClient.get`, :meth:`DaemonClient.push_chunk`) go over the
daemon's framed-TCP bulk plane (``bulk.py``) when it advertises one in Status, and over
gRPC otherwise: the same requests, the same refusals, the same exceptions.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import grpc
import numpy as np
import torch

from plait.runtime.snapshot import shm
from plait.runtime.snapshot.transport import bulk, wire
from plait.runtime.snapshot.transport import snapshot_pb2 as pb
from plait.runtime.snapshot.transport import snapshot_pb2_grpc as pb_grpc
from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret
from plait.runtime.snapshot.errors import (
    BulkTransportError,
    SnapshotAuthError,
    DaemonUnavailable,
    SnapshotNotFound,
    SnapshotRangeError,
    SnapshotRequestError,
    error_from_status,
)
from plait.runtime.snapshot.records import DataShardInfo, MemberInfo, ParityShardInfo, VersionInfo
from plait.runtime.snapshot.transport.channel import RawStub, authenticated_channel, data_messages

__all__ = [
    "DaemonClient",
    "DaemonStatus",
    "VersionStatus",
    "VersionInfo",
    "DataShardInfo",
    "ParityShardInfo",
    "MemberInfo",
    "Transport",
]

log = logging.getLogger(__name__)

Transport = Literal["auto", "grpc", "tcp"]
T = TypeVar("T")

BULK_RECHECK_S = 30.0  # after the bulk plane failed (or was not advertised), how long to use gRPC before asking again

@dataclass(frozen=True)
class VersionStatus:
    version: int
    complete: bool
    published: bool


@dataclass(frozen=True)
class DaemonStatus:
    """What ``Status`` reports: identity, memory, versions, and the background pushes' counters."""

    job: str
    node: int
    nnodes: int
    nproc_per_node: int
    ec_k: int
    ec_m: int
    memory_used: int
    memory_cap: int
    versions: list[VersionStatus]
    uptime_s: float
    pid: int
    published: int | None
    pushes_pending: int
    pushes_done: int
    pushes_failed: int
    bulk_port: int = 0  # the framed-TCP bulk plane's port; 0: none (bytes over gRPC)
    pushes_over_grpc: int = 0  # of pushes_done, those that fell back to gRPC
    floor: int = 0  # the oldest version accepted: the start of the daemon's restore generation


class DaemonClient:
    """A connection to one daemon. Thread-safe (one gRPC channel, a pool of bulk connections); close it, or use
    it as a context manager.

    ``transport`` chooses how bulk bytes travel: "auto" (the bulk plane when the daemon
    advertises one, gRPC otherwise or when the bulk port fails while gRPC answers),
    "grpc" (never the bulk plane), "tcp" (only the bulk plane: DaemonUnavailable when the
    daemon has none). ``transfers`` counts the bulk calls per "op/transport".
    """

    def __init__(self, address: str, timeout: float = 30.0, *, transport: Transport = "auto",
                 secret: JobSecret | None = None):
        if transport not in ("auto", "grpc", "tcp"):
            raise SnapshotRequestError(f"transport: got {transport!r}; accepted: 'auto', 'grpc' or 'tcp'")
        secret = secret or JobSecret.from_env()
        if secret is None:
            raise SnapshotAuthError(f"no job secret to reach the snapshot daemon at {address}: pass secret= or set "
                                    f"{SECRET_ENV} to the job's secret file (plait train writes <run dir>/secret)")
        self.address = address
        self.timeout = timeout
        self.transport: Transport = transport
        self.transfers: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._raw_channel, self._channel = authenticated_channel(address, secret)
        self._stub = pb_grpc.SnapshotDaemonStub(self._channel)
        self._raw = RawStub(self._channel)
        host = address.rpartition(":")[0].strip("[]")
        self._pool = bulk.BulkPool(host, timeout=timeout, address=address, secret=secret) if host else None
        self._bulk_lock = threading.Lock()
        self._bulk_port: int | None = None  # as last advertised; None: none, or not asked yet
        self._bulk_asked_at: float | None = None  # monotonic time of the last Status that told us

    # ----------------------------------------------------------------- lifecycle

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the daemon accepts connections, or raise DaemonUnavailable."""
        wait = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise DaemonUnavailable(f"snapshot daemon at {self.address} did not accept a connection within "
                                    f"{wait:.1f} s; is it running (see its log)?") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
        self._raw_channel.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- writing

    def alloc(self, version: int, local_rank: int, size: int) -> torch.Tensor:
        """Create the shard's shared-memory segment and return a writable uint8 view of it (zero-copy).

        Write the blob through the view, then :meth:`commit`. The daemon must be on this
        machine (the view maps its /dev/shm file).
        """
        header = pb.PutHeader(version=version, local_rank=local_rank, size=size, alloc_only=True)
        reply = self._call(self._raw.Put, iter([pb.PutRequest(header=header).SerializeToString()]),
                           timeout=self._transfer_timeout(size))  # the daemon reserves (fallocates) the pages
        return shm.map_segment(Path(reply.path), reply.size)

    def put(self, version: int, local_rank: int, data: torch.Tensor) -> str:
        """Stream a blob's bytes to the daemon (for a writer on another machine); return the segment path."""
        blob = _bytes_of(data, "data")
        header = pb.PutRequest(header=pb.PutHeader(version=version, local_rank=local_rank, size=blob.numel()))
        messages = data_messages(header.SerializeToString(), blob)
        return self._call(self._raw.Put, messages, timeout=self._transfer_timeout(blob.numel())).path

    def commit(self, version: int, local_rank: int, *, size: int, checksum: int, step: int, meta: bytes = b"") -> bool:
        """Commit a written shard; return whether its version is now locally complete on this node.

        The daemon re-reads the bytes: SnapshotChecksumError if they do not have
        ``checksum`` (the shard stays uncommitted), SnapshotRequestError if ``size`` is not
        the allocated size. Safe to retry.
        """
        request = pb.CommitRequest(version=version, local_rank=local_rank, size=size, checksum=checksum, step=step,
                                   meta=meta)
        return self._call(self._stub.Commit, request, timeout=self._transfer_timeout(size)).complete

    def publish(self, version: int) -> list[int]:
        """Mark ``version`` globally complete on this daemon; return the older versions it dropped."""
        return builtins.list(self._call(self._stub.Publish, pb.PublishRequest(version=version)).dropped)

    def reset(self, floor: int, keep: int | None = None) -> list[int]:
        """Begin a restore generation on this daemon (see ``SnapshotStore.reset``); return the versions dropped."""
        request = pb.ResetRequest(floor=floor) if keep is None else pb.ResetRequest(floor=floor, keep=keep)
        return builtins.list(self._call(self._stub.Reset, request).dropped)

    def drop(self, version: int) -> bool:
        """Remove a version; False if the daemon did not hold it."""
        return self._call(self._stub.Drop, pb.DropRequest(version=version)).dropped

    def push_chunk(self, version: int, local_rank: int, *, stripe: int, index: int, member: int, node: int,
                   blob_size: int, blob_checksum: int, step: int, chunk: torch.Tensor,
                   chunk_checksum: int | None = None) -> bool:
        """Send one member chunk to the daemon holding parity ``index`` of ``stripe`` (what daemons do
        after a commit; exposed for repair tools and tests). False: that member had already arrived.
        """
        from plait.ops.checksum import checksum as compute_checksum

        data = _bytes_of(chunk, "chunk")
        declared = compute_checksum(data) if chunk_checksum is None else chunk_checksum
        request = bulk.Request(bulk.OP_PUSH_CHUNK, version=version, local_rank=local_rank, stripe=stripe,
                               index=index, member=member, node=node, length=data.numel(), blob_size=blob_size,
                               blob_checksum=blob_checksum, chunk_checksum=declared, step=step)
        done = self._over_bulk("push_chunk", lambda conn: conn.push_chunk(request, data))
        if done is not None:
            return done
        header = pb.ChunkHeader(version=version, local_rank=local_rank, stripe=stripe, index=index, member=member,
                                node=node, blob_size=blob_size, blob_checksum=blob_checksum, chunk_len=data.numel(),
                                chunk_checksum=declared, step=step)
        messages = data_messages(pb.PushChunkRequest(header=header).SerializeToString(), data)
        accepted = self._call(self._raw.PushChunk, messages, timeout=self._transfer_timeout(data.numel())).accepted
        self._count("push_chunk/grpc")
        return accepted

    # ----------------------------------------------------------------- reading

    def get(self, version: int, *, kind: Literal["data", "parity"], local_rank: int, stripe: int | None = None,
            index: int | None = None, offset: int = 0, length: int | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Stream bytes [offset, offset + length) of a committed data shard or complete parity shard.

        The bytes land in ``out`` (a contiguous uint8 tensor with at least ``length``
        elements; the filled prefix is returned) or in a new tensor. Nothing is verified
        here: compare with the shard's checksum (:meth:`get_with_checksum`, :meth:`list`).
        """
        return self.get_with_checksum(version, kind=kind, local_rank=local_rank, stripe=stripe, index=index,
                                      offset=offset, length=length, out=out)[0]

    def get_with_checksum(self, version: int, *, kind: Literal["data", "parity"], local_rank: int,
                          stripe: int | None = None, index: int | None = None, offset: int = 0,
                          length: int | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """:meth:`get`, also returning the checksum the daemon stored for the whole shard."""
        if kind == "data":
            request = pb.GetRequest(version=version, kind=pb.SHARD_KIND_DATA, local_rank=local_rank, offset=offset)
        elif kind == "parity":
            if stripe is None or index is None:
                raise SnapshotRequestError("get: a parity shard is addressed by stripe and index (j); pass both")
            request = pb.GetRequest(version=version, kind=pb.SHARD_KIND_PARITY, local_rank=local_rank, stripe=stripe,
                                    index=index, offset=offset)
        else:
            raise SnapshotRequestError(f"get: kind must be 'data' or 'parity', got {kind!r}")
        if length is not None:
            request.length = length
        if out is not None:
            out = _bytes_of(out, "out")
            if length is not None and out.numel() < length:
                raise SnapshotRequestError(f"get: out holds {out.numel()} bytes but length is {length}")
        frame = bulk.Request(bulk.OP_GET, version=version, local_rank=local_rank, stripe=request.stripe,
                             index=request.index, kind=request.kind, offset=offset, length=length or 0,
                             flags=bulk.REQUEST_TO_END if length is None else 0)
        got = self._over_bulk("get", lambda conn: conn.get(frame, out))
        if got is not None:
            return got
        stream = self._raw.Get(request, timeout=self._transfer_timeout(
            length if length is not None else self._shard_size(version, kind, local_rank, stripe, index) - offset))
        try:
            first = next(stream)
            total = first.length
            if out is None:
                out = torch.empty(total, dtype=torch.uint8)
            elif out.numel() < total:
                stream.cancel()
                raise SnapshotRequestError(f"get: out holds {out.numel()} bytes but the range has {total}")
            arr = out.numpy()
            pos = 0
            for reply in _chain(first, stream):
                n = len(reply.data)
                if pos + n > total:
                    raise SnapshotRangeError(f"get: the daemon at {self.address} sent more than the {total} bytes "
                                             "it announced")
                arr[pos:pos + n] = np.frombuffer(reply.data, dtype=np.uint8)
                pos += n
            if pos != total:
                raise SnapshotRangeError(f"get: the daemon at {self.address} sent {pos} of the {total} bytes it "
                                         "announced")
        except grpc.RpcError as err:
            self._raise(err)
        except StopIteration:
            raise SnapshotRangeError(f"get: the daemon at {self.address} ended the stream without a reply") from None
        self._count("get/grpc")
        return out[:total], first.checksum

    def _shard_size(self, version: int, kind: str, local_rank: int, stripe: int | None, index: int | None) -> int:
        """The size of a shard as List reports it (0 when absent: the Get that follows is refused anyway)."""
        for info in self.list(version):
            shards = info.data if kind == "data" else [p for p in info.parity if (p.stripe, p.index) == (stripe, index)]
            for shard in shards:
                if shard.local_rank == local_rank:
                    return shard.size
        return 0

    def open_data(self, version: int, local_rank: int) -> torch.Tensor:
        """A zero-copy view of a committed data shard in this machine's shared memory.

        Read-only by convention: the mapping is writable, but writing to a committed
        shard corrupts it (its checksum no longer matches and a restarted daemon discards it).
        """
        for info in self.list(version):
            for shard in info.data:
                if shard.local_rank == local_rank:
                    if not shard.committed:
                        break
                    return shm.map_segment(Path(shard.path), shard.size)
        raise SnapshotNotFound(f"daemon at {self.address} holds no committed data shard for version {version}, "
                               f"local rank {local_rank}")

    def list(self, version: int | None = None) -> list[VersionInfo]:
        """Every version the daemon holds (or only ``version``), with all shards' metadata."""
        request = pb.ListRequest() if version is None else pb.ListRequest(version=version)
        reply = self._call(self._stub.List, request)
        return [
            VersionInfo(
                version=v.version,
                step=v.step if v.HasField("step") else None,
                complete=v.complete,
                published=v.published,
                data=[DataShardInfo(d.local_rank, d.size, d.checksum if d.HasField("checksum") else None,
                                    d.step if d.HasField("step") else None, d.committed, d.path, bytes(d.meta))
                      for d in v.data],
                parity=[ParityShardInfo(p.local_rank, p.stripe, p.index, p.size,
                                        p.checksum if p.HasField("checksum") else None, p.complete, p.path,
                                        [MemberInfo(mb.position, mb.node, mb.size, mb.checksum, mb.chunk_len,
                                                    mb.chunk_checksum, mb.step) for mb in p.members])
                        for p in v.parity],
            )
            for v in reply.versions
        ]

    def status(self) -> DaemonStatus:
        s = self._call(self._stub.Status, pb.StatusRequest())
        return DaemonStatus(
            job=s.job, node=s.node, nnodes=s.nnodes, nproc_per_node=s.nproc_per_node, ec_k=s.ec_k, ec_m=s.ec_m,
            memory_used=s.memory_used, memory_cap=s.memory_cap,
            versions=[VersionStatus(v.version, v.complete, v.published) for v in s.versions],
            uptime_s=s.uptime_s, pid=s.pid, published=s.published if s.HasField("published") else None,
            pushes_pending=s.pushes_pending, pushes_done=s.pushes_done, pushes_failed=s.pushes_failed,
            bulk_port=s.bulk_port, pushes_over_grpc=s.pushes_over_grpc, floor=s.floor,
        )

    # ----------------------------------------------------------------- the bulk plane

    def _over_bulk(self, what: str, call: Callable[[bulk.BulkConnection], T]) -> T | None:
        """Run ``call`` on a bulk connection; None: this call goes over gRPC instead.

        When the bulk port fails (refused, reset, stalled), the daemon is asked over gRPC
        for its port again: if gRPC fails too, the daemon is down and the caller gets
        DaemonUnavailable (as over gRPC alone); if it answers, maybe with a new port (a
        restarted daemon), the call is tried once more on a fresh connection, and if
        that fails too, gRPC carries it and the bulk plane rests for BULK_RECHECK_S.
        Refusals (typed errors other than DaemonUnavailable) are final on either path.
        """
        if self.transport == "grpc" or self._pool is None:
            return None
        failure: BulkTransportError | None = None
        for attempt in range(2):
            port = self._advertised_bulk_port(refresh=attempt > 0)
            if port is None:
                break
            conn: bulk.BulkConnection | None = None
            try:
                if attempt == 0:
                    conn = self._pool.acquire(port)
                else:  # a fresh connection: idle ones may all be as stale as the one that failed
                    conn = bulk.BulkConnection(self._pool.host, port, timeout=self.timeout, address=self.address,
                                               secret=self._pool.secret)
                result = call(conn)
            except BulkTransportError as err:
                failure = err
                self._pool.clear()
                log.info("%s over the bulk plane of %s failed: %s", what, self.address, err)
                continue
            finally:
                if conn is not None:
                    self._pool.release(conn)
            self._count(f"{what}/tcp")
            return result
        if self.transport == "tcp":
            raise failure or DaemonUnavailable(f"snapshot daemon at {self.address} advertises no bulk port (it runs "
                                               "with --bulk-port -1, or predates the bulk plane); use transport="
                                               "'auto' or 'grpc'")
        if failure is not None:
            log.warning("bulk plane of the snapshot daemon at %s failed (%s) while gRPC answers; moving bytes over "
                        "gRPC for %.0f s", self.address, failure, BULK_RECHECK_S)
            with self._bulk_lock:
                self._bulk_port, self._bulk_asked_at = None, time.monotonic()
        return None

    def _advertised_bulk_port(self, *, refresh: bool) -> int | None:
        """The daemon's bulk port as Status reports it: asked once and kept; asked again on ``refresh``, or
        BULK_RECHECK_S after it said none. Raises DaemonUnavailable when gRPC cannot reach the daemon."""
        with self._bulk_lock:
            asked = self._bulk_asked_at
            if not refresh and asked is not None and (
                    self._bulk_port is not None or time.monotonic() - asked < BULK_RECHECK_S):
                return self._bulk_port
            port = self.status().bulk_port or None
            if port != self._bulk_port or asked is None:
                log.info("snapshot daemon at %s: %s", self.address,
                         f"bulk plane on port {port}" if port else "no bulk plane; shard bytes go over gRPC")
            self._bulk_port, self._bulk_asked_at = port, time.monotonic()
            return port

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.transfers[key] += 1

    # ----------------------------------------------------------------- internals

    def _call(self, method, request, *, timeout: float | None = None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            self._raise(err)

    def _raise(self, err: grpc.RpcError) -> NoReturn:
        raise error_from_status(err.code().name, err.details() or "", self.address) from None

    def _transfer_timeout(self, nbytes: int) -> float:
        """The base timeout plus time for the bytes at a pessimistic 50 MB/s."""
        return self.timeout + nbytes / 50e6


def _bytes_of(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or not t.is_contiguous() or t.device.type != "cpu":
        raise SnapshotRequestError(f"{name}: expected a contiguous uint8 CPU tensor; got "
                                   f"{getattr(t, 'dtype', type(t).__name__)}; use t.contiguous().view(torch.uint8)"
                                   ".reshape(-1).cpu()")
    return t.reshape(-1)


def _chain(first: wire.RawGetReply, rest: Iterable[wire.RawGetReply]) -> Iterator[wire.RawGetReply]:
    yield first
    yield from rest
