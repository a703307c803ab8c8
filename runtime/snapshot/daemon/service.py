"""The daemon's gRPC service: the RPCs of snapshot.proto over one :class:`SnapshotStore`."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Callable

import grpc
import numpy as np
import torch

from plait.ops.checksum import checksum as compute_checksum
from plait.runtime.snapshot.auth import AUTH_METADATA, TokenVerifier
from plait.runtime.snapshot.daemon.pusher import ChunkPusher
from plait.runtime.snapshot.daemon.refusals import RefusalLog
from plait.runtime.snapshot.daemon.store import SnapshotStore
from plait.runtime.snapshot.errors import SnapshotError, SnapshotRequestError
from plait.runtime.snapshot.records import ChunkHeader, DataShardInfo, ParityShardInfo
from plait.runtime.snapshot.transport import snapshot_pb2 as pb
from plait.runtime.snapshot.transport import snapshot_pb2_grpc as pb_grpc
from plait.runtime.snapshot.transport import wire
from plait.runtime.snapshot.transport.channel import MESSAGE_BYTES, SERVICE

__all__ = ["AuthInterceptor", "SnapshotServicer", "add_servicer"]

log = logging.getLogger(__name__)



class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call that does not carry a valid ``plait-auth`` token (see auth.py) with UNAUTHENTICATED.

    The handler is not run, so nothing of the request is read or parsed. Each refused
    peer host is logged once (then at debug level).
    """

    def __init__(self, verifier: TokenVerifier, refusals: RefusalLog):
        self.verifier = verifier
        self.refusals = refusals

    def intercept_service(self, continuation, details):
        token = next((value for key, value in details.invocation_metadata or () if key == AUTH_METADATA), None)
        reason = self.verifier.check(details.method, token)
        handler = continuation(details)
        if reason is None or handler is None:
            return handler
        method = details.method

        def refuse(request, context):
            self.refusals.note(_peer_host(context.peer()), f"{method}: {reason}")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} refused: {reason}")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5555`` → ``127.0.0.1`` (the host a refusal is logged under)."""
    return peer.split(":", 1)[-1].rpartition(":")[0] or peer


def _status_of(err: SnapshotError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)


def _rpc(method: Callable) -> Callable:
    """Turn the typed errors of a handler into gRPC statuses with the same message.

    Unexpected exceptions become INTERNAL with the exception's text and a traceback in
    the log: a bad request must never take the daemon down.
    """
    name = method.__name__

    def abort(context: grpc.ServicerContext, err: BaseException) -> None:
        if not context.is_active():  # the caller went away (cancelled, timed out): nobody to answer
            log.info("%s abandoned by its caller: %s", name, err)
            return
        if isinstance(err, SnapshotError):
            log.info("%s refused: %s", name, err)
            context.abort(_status_of(err), str(err))
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL, f"{name}: {type(err).__name__}: {err}")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as err:  # noqa: BLE001 (reported to the caller, logged)
                abort(context, err)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as err:  # noqa: BLE001
            abort(context, err)
    return unary


class SnapshotServicer(pb_grpc.SnapshotDaemonServicer):
    """The RPCs of snapshot.proto over one store; byte payloads in messages of <= 4 MiB."""

    def __init__(self, store: SnapshotStore, pusher: ChunkPusher | None, bulk_port: int = 0):
        self.store = store
        self.pusher = pusher
        self.bulk_port = bulk_port  # advertised in Status; 0: no bulk plane
        self.started = time.monotonic()

    @_rpc
    def Put(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.header is None:
            raise SnapshotRequestError("Put: the first message must be the header {version, local_rank, size, "
                                       "alloc_only}")
        h = first.header
        shard = self.store.alloc(h.version, h.local_rank, h.size)
        if h.alloc_only:
            return pb.PutReply(path=str(shard.path), size=shard.size)
        offset = 0
        try:
            for msg in request_iterator:
                if msg.header is not None:
                    raise SnapshotRequestError("Put: only the first message may be a header; the others carry data")
                self.store.write(shard, offset, msg.data)
                offset += len(msg.data)
            if offset != shard.size:
                raise SnapshotRequestError(f"Put for version {h.version}, local rank {h.local_rank}: got {offset} "
                                           f"bytes but the header declared size {shard.size}; send exactly size bytes")
        except BaseException:
            self.store.discard(shard)
            raise
        return pb.PutReply(path=str(shard.path), size=shard.size)

    @_rpc
    def Commit(self, request, context):
        complete = self.store.commit(request.version, request.local_rank, size=request.size,
                                     checksum=request.checksum, step=request.step, meta=request.meta)
        if self.pusher is not None:
            self.pusher.submit(request.version, request.local_rank)
        return pb.CommitReply(complete=complete)

    @_rpc
    def Get(self, request, context):
        kind = {pb.SHARD_KIND_DATA: "data", pb.SHARD_KIND_PARITY: "parity"}.get(request.kind)
        if kind is None:
            raise SnapshotRequestError(f"Get: kind must be SHARD_KIND_DATA or SHARD_KIND_PARITY, got {request.kind}")
        r = self.store.read_range(kind, request.version, request.local_rank, stripe=request.stripe,
                                  index=request.index, offset=request.offset,
                                  length=request.length if request.HasField("length") else None)
        arr = r.data.numpy()  # a drop meanwhile keeps this view valid
        yield wire.encode_get_reply(arr[:MESSAGE_BYTES], checksum=r.checksum, size=r.size, offset=r.offset,
                                    length=r.length)
        for pos in range(MESSAGE_BYTES, r.length, MESSAGE_BYTES):
            yield wire.encode_get_reply(arr[pos:pos + MESSAGE_BYTES])

    @_rpc
    def List(self, request, context):
        version = request.version if request.HasField("version") else None
        return pb.ListReply(versions=[
            pb.VersionInfo(version=v.version, step=v.step, complete=v.complete, published=v.published,
                           data=[_data_pb(d) for d in v.data], parity=[_parity_pb(p) for p in v.parity])
            for v in self.store.versions(version)
        ])

    @_rpc
    def Status(self, request, context):
        s = self.store
        pusher = self.pusher
        return pb.StatusReply(
            job=s.job, node=s.node, nnodes=s.nnodes, nproc_per_node=s.nproc_per_node, ec_k=s.k, ec_m=s.m,
            memory_used=s.memory_used, memory_cap=s.max_memory,
            versions=[pb.VersionState(version=v.version, complete=v.complete, published=v.published)
                      for v in s.versions()],
            uptime_s=time.monotonic() - self.started, pid=os.getpid(), published=s.published,
            pushes_pending=pusher.pending if pusher else 0, pushes_done=pusher.done if pusher else 0,
            pushes_failed=pusher.failed if pusher else 0, bulk_port=self.bulk_port,
            pushes_over_grpc=pusher.over_grpc if pusher else 0, floor=s.floor,
        )

    @_rpc
    def Reset(self, request, context):
        keep = request.keep if request.HasField("keep") else None
        return pb.ResetReply(dropped=self.store.reset(request.floor, keep))

    @_rpc
    def Drop(self, request, context):
        return pb.DropReply(dropped=self.store.drop(request.version))

    @_rpc
    def Publish(self, request, context):
        return pb.PublishReply(dropped=self.store.publish(request.version))

    @_rpc
    def PushChunk(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.header is None:
            raise SnapshotRequestError("PushChunk: the first message must be the chunk header")
        h = first.header
        header = ChunkHeader(version=h.version, local_rank=h.local_rank, stripe=h.stripe, index=h.index,
                             member=h.member, node=h.node, blob_size=h.blob_size, blob_checksum=h.blob_checksum,
                             chunk_len=h.chunk_len, chunk_checksum=h.chunk_checksum, step=h.step)
        shard = self.store.begin_chunk(header)
        if shard is None:
            return pb.PushChunkReply(accepted=False)
        buf = torch.empty(header.chunk_len, dtype=torch.uint8)
        arr = buf.numpy()
        pos = received = 0
        for msg in request_iterator:
            if msg.header is not None:
                raise SnapshotRequestError("PushChunk: only the first message may be a header")
            n = len(msg.data)
            if pos + n > header.chunk_len:
                raise SnapshotRequestError(f"PushChunk: more than the declared chunk_len {header.chunk_len} bytes "
                                           f"for stripe {header.stripe}, member {header.member}")
            arr[pos:pos + n] = np.frombuffer(msg.data, dtype=np.uint8)
            received = compute_checksum(buf[pos:pos + n], received)  # message by message, as on the bulk plane
            pos += n
        if pos != header.chunk_len:
            raise SnapshotRequestError(f"PushChunk: got {pos} bytes but the header declared chunk_len "
                                       f"{header.chunk_len} (stripe {header.stripe}, member {header.member})")
        return pb.PushChunkReply(accepted=self.store.add_chunk(header, shard, buf, received_checksum=received))


def _data_pb(d: DataShardInfo) -> pb.DataShardInfo:
    return pb.DataShardInfo(local_rank=d.local_rank, size=d.size, checksum=d.checksum, step=d.step,
                            committed=d.committed, path=d.path, meta=d.meta)


def _parity_pb(p: ParityShardInfo) -> pb.ParityShardInfo:
    return pb.ParityShardInfo(local_rank=p.local_rank, stripe=p.stripe, index=p.index, size=p.size,
                              checksum=p.checksum, complete=p.complete, path=p.path,
                              members=[pb.MemberInfo(**vars(mb)) for mb in p.members])


def add_servicer(servicer: SnapshotServicer, server: grpc.Server) -> None:
    """Register the RPCs like the generated ``add_SnapshotDaemonServicer_to_server``, except that the
    byte-carrying ones use the codec of :mod:`wire` (same wire format, fewer copies)."""
    unary = {
        "Commit": (pb.CommitRequest, pb.CommitReply), "List": (pb.ListRequest, pb.ListReply),
        "Status": (pb.StatusRequest, pb.StatusReply), "Drop": (pb.DropRequest, pb.DropReply),
        "Publish": (pb.PublishRequest, pb.PublishReply), "Reset": (pb.ResetRequest, pb.ResetReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                  response_serializer=rep.SerializeToString)
        for name, (req, rep) in unary.items()
    }
    handlers["Put"] = grpc.stream_unary_rpc_method_handler(
        servicer.Put, request_deserializer=wire.frame_decoder(pb.PutRequest),
        response_serializer=pb.PutReply.SerializeToString)
    handlers["PushChunk"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushChunk, request_deserializer=wire.frame_decoder(pb.PushChunkRequest),
        response_serializer=pb.PushChunkReply.SerializeToString)
    handlers["Get"] = grpc.unary_stream_rpc_method_handler(
        servicer.Get, request_deserializer=pb.GetRequest.FromString, response_serializer=None)  # already bytes
    declared = {m.name for m in pb.DESCRIPTOR.services_by_name["SnapshotDaemon"].methods}
    if declared != set(handlers):
        raise RuntimeError(f"snapshot.proto declares {sorted(declared)} but the server registers {sorted(handlers)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

