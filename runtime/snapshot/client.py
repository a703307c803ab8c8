"""The client of a snapshot daemon, for workers (put and commit), the restore path and tests.

    client = DaemonClient("127.0.0.1:7100")
    view = client.alloc(version=step, local_rank=r, size=blob.numel())   # the daemon's shm pages
    view.copy_(blob)                                                     # written in place, no RPC
    client.commit(step, r, size=blob.numel(), checksum=checksum(view), step=step)

Every gRPC failure becomes a typed :class:`~plait.runtime.snapshot.errors.SnapshotError`
subclass carrying the daemon's message (see ``errors.py`` for the code of each), so
callers never handle ``grpc.RpcError``.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import grpc
import numpy as np
import torch

from plait.runtime.snapshot import shm, wire
from plait.runtime.snapshot import snapshot_pb2 as pb
from plait.runtime.snapshot import snapshot_pb2_grpc as pb_grpc
from plait.runtime.snapshot.errors import (
    ERROR_BY_CODE,
    DaemonUnavailable,
    SnapshotError,
    SnapshotNotFound,
    SnapshotRangeError,
    SnapshotRequestError,
)
from plait.runtime.snapshot.store import DataShardInfo, MemberInfo, ParityShardInfo, VersionInfo

__all__ = [
    "MESSAGE_BYTES",
    "channel_options",
    "tune_malloc",
    "RawStub",
    "data_messages",
    "DaemonClient",
    "DaemonStatus",
    "VersionStatus",
    "VersionInfo",
    "DataShardInfo",
    "ParityShardInfo",
    "MemberInfo",
]

MESSAGE_BYTES = 4 * 1024 * 1024  # payload per streamed message
MAX_GRPC_MESSAGE = 16 * 1024 * 1024  # above MESSAGE_BYTES plus the header fields


def channel_options() -> list[tuple[str, int]]:
    """Options of every channel to (and server of) a daemon: large messages, quick reconnects.

    gRPC's default reconnect backoff grows to two minutes, so a channel to a daemon that
    was down would keep failing long after the daemon is back; capping it at one second
    lets retries land soon after a restart.
    """
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def tune_malloc() -> None:
    """Keep glibc from returning every freed 4 MiB message buffer to the kernel (process-wide).

    Each streamed message allocates a few 4 MiB buffers (bytes, protobuf, gRPC slices).
    By default glibc serves such sizes with mmap, or trims the heap after each free, so
    every message pays about a thousand fresh page faults per buffer: that halves Get and
    PushChunk throughput on loopback. With a fixed 32 MiB mmap threshold and a heap
    trimmed only past 128 MiB of free space, the pages stay mapped. The daemon calls this
    at start; a process that streams large Gets may call it too. Best effort: a libc
    without mallopt is left alone.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


SERVICE = pb.DESCRIPTOR.services_by_name["SnapshotDaemon"].full_name


class RawStub:
    """The byte-carrying RPCs with the hand-written codec of :mod:`wire` (see there why).

    ``Put`` and ``PushChunk`` take already serialised messages (bytes); ``Get`` yields
    :class:`wire.RawGetReply` whose data is a view of the received buffer.
    """

    def __init__(self, channel: grpc.Channel):
        self.Put = channel.stream_unary(f"/{SERVICE}/Put", request_serializer=None,
                                        response_deserializer=pb.PutReply.FromString)
        self.PushChunk = channel.stream_unary(f"/{SERVICE}/PushChunk", request_serializer=None,
                                              response_deserializer=pb.PushChunkReply.FromString)
        self.Get = channel.unary_stream(f"/{SERVICE}/Get", request_serializer=pb.GetRequest.SerializeToString,
                                        response_deserializer=wire.decode_get_reply)


def data_messages(header: bytes, view: torch.Tensor) -> Iterator[bytes]:
    """A serialised header, then ``view``'s bytes in data messages of at most MESSAGE_BYTES."""
    yield header
    arr = view.numpy()
    for pos in range(0, view.numel(), MESSAGE_BYTES):
        yield wire.encode_data(arr[pos:pos + MESSAGE_BYTES])


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


class DaemonClient:
    """A connection to one daemon. Thread-safe (one gRPC channel); close it, or use it as a context manager."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=channel_options())
        self._stub = pb_grpc.SnapshotDaemonStub(self._channel)
        self._raw = RawStub(self._channel)

    # ----------------------------------------------------------------- lifecycle

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the daemon accepts connections, or raise DaemonUnavailable."""
        wait = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            raise DaemonUnavailable(f"snapshot daemon at {self.address} did not accept a connection within "
                                    f"{wait:.1f} s; is it running (see its log)?") from None

    def close(self) -> None:
        self._channel.close()

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
        header = pb.ChunkHeader(version=version, local_rank=local_rank, stripe=stripe, index=index, member=member,
                                node=node, blob_size=blob_size, blob_checksum=blob_checksum, chunk_len=data.numel(),
                                chunk_checksum=declared, step=step)
        messages = data_messages(pb.PushChunkRequest(header=header).SerializeToString(), data)
        return self._call(self._raw.PushChunk, messages, timeout=self._transfer_timeout(data.numel())).accepted

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
            _bytes_of(out, "out")
            if length is not None and out.numel() < length:
                raise SnapshotRequestError(f"get: out holds {out.numel()} bytes but length is {length}")
        stream = self._raw.Get(request, timeout=None if length is None else self._transfer_timeout(length))
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
        return out[:total], first.checksum

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
        )

    # ----------------------------------------------------------------- internals

    def _call(self, method, request, *, timeout: float | None = None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            self._raise(err)

    def _raise(self, err: grpc.RpcError) -> NoReturn:
        code = err.code()
        cls = ERROR_BY_CODE.get(code.name, SnapshotError)
        details = err.details() or code.name
        if cls is DaemonUnavailable:
            message = f"snapshot daemon at {self.address}: {code.name}: {details}"
        else:
            message = details
        error = cls(message)
        error.grpc_code = code.name  # type: ignore[attr-defined]
        raise error from None

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
