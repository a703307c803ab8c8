"""The gRPC side of the transport: channel options, the byte-carrying stubs, message framing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import grpc
import torch

from plait.runtime.snapshot.auth import AUTH_METADATA, JobSecret
from plait.runtime.snapshot.transport import snapshot_pb2 as pb
from plait.runtime.snapshot.transport import wire

__all__ = ["MESSAGE_BYTES", "MAX_GRPC_MESSAGE", "SERVICE", "channel_options", "tune_malloc", "RawStub", "data_messages",
           "authenticated_channel"]

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


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _CallDetailsType(_CallDetails, grpc.ClientCallDetails):
    pass


class _Authenticate(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds a fresh ``plait-auth`` token (see :mod:`plait.runtime.snapshot.auth`) to every call."""

    def __init__(self, secret: JobSecret):
        self.secret = secret

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = [*(details.metadata or ()), (AUTH_METADATA, self.secret.token(method))]
        return _CallDetailsType(details.method, details.timeout, metadata, details.credentials,
                                getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def authenticated_channel(address: str, secret: JobSecret) -> tuple[grpc.Channel, grpc.Channel]:
    """(raw channel, channel whose every call proves ``secret``) to a daemon; close the raw one."""
    raw = grpc.insecure_channel(address, options=channel_options())
    return raw, grpc.intercept_channel(raw, _Authenticate(secret))
