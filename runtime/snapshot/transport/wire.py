"""The protobuf wire format of the byte-carrying messages, encoded and decoded by hand.

Why: a 4 MiB ``bytes`` field through the protobuf runtime is copied three or four times
per side (slice to bytes, into the message, serialised; parsed, then copied out again
on every ``.data`` access). For snapshot traffic those copies, not the socket, bound
the throughput. The messages that carry blob bytes (``PutRequest.data``,
``PushChunkRequest.data``, ``GetReply``) are therefore written straight from the
shared-memory view into the outgoing buffer (one copy), and read as a memoryview of
the incoming buffer (no copy). Everything stays valid protobuf of snapshot.proto: a
peer using the generated classes interoperates, and small messages (headers, replies)
still go through the generated classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Frame", "RawGetReply", "encode_data", "encode_get_reply", "decode_get_reply", "frame_decoder"]

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_DATA_TAG = bytes([(2 << 3) | _WIRE_LEN])  # field 2 (data) of PutRequest and PushChunkRequest


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(raw: bytes | memoryview):
    """Yield (field number, wire type, value) of a serialised message; LEN values are memoryviews."""
    buf = memoryview(raw)
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _WIRE_LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == _WIRE_I64:
            value, pos = bytes(buf[pos:pos + 8]), pos + 8
        elif wire == _WIRE_I32:
            value, pos = bytes(buf[pos:pos + 4]), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def encode_data(payload: Any) -> bytes:
    """A ``PutRequest`` or ``PushChunkRequest`` whose oneof is ``data = payload`` (any buffer)."""
    view = memoryview(payload).cast("B")
    return b"".join((_DATA_TAG, _varint(len(view)), view))


@dataclass(frozen=True)
class Frame:
    """A decoded Put/PushChunk request: either its header (a generated message) or a view of its data."""

    header: Any = None
    data: memoryview | None = None


def frame_decoder(message: type) -> Any:
    """A request deserializer for ``PutRequest`` or ``PushChunkRequest`` returning :class:`Frame`."""

    def decode(raw: bytes) -> Frame:
        data = None
        header = False
        for number, wire, value in _fields(raw):
            if number == 2 and wire == _WIRE_LEN:
                data, header = value, False  # oneof: the last one wins, as in protobuf
            elif number == 1 and wire == _WIRE_LEN:
                header, data = True, None
        if header:
            return Frame(header=message.FromString(raw).header)
        return Frame(data=data if data is not None else memoryview(b""))

    return decode


@dataclass(frozen=True)
class RawGetReply:
    """A decoded ``GetReply``; ``data`` is a view of the received buffer."""

    data: memoryview
    checksum: int = 0
    size: int = 0
    offset: int = 0
    length: int = 0


def encode_get_reply(data: Any, *, checksum: int = 0, size: int = 0, offset: int = 0, length: int = 0) -> bytes:
    """A serialised ``GetReply`` (fields in number order, zeros omitted, as protobuf writes them)."""
    view = memoryview(data).cast("B")
    parts: list[Any] = []
    if len(view):
        parts += [bytes([(1 << 3) | _WIRE_LEN]), _varint(len(view)), view]
    for number, value in ((2, checksum), (3, size), (4, offset), (5, length)):
        if value:
            parts += [bytes([number << 3 | _WIRE_VARINT]), _varint(value)]
    return b"".join(parts)


def decode_get_reply(raw: bytes) -> RawGetReply:
    values = {1: memoryview(b""), 2: 0, 3: 0, 4: 0, 5: 0}
    for number, wire, value in _fields(raw):
        if number == 1 and wire == _WIRE_LEN:
            values[1] = value
        elif number in (2, 3, 4, 5) and wire == _WIRE_VARINT:
            values[number] = value - (1 << 64) if number != 2 and value >= 1 << 63 else value
    return RawGetReply(values[1], values[2], values[3], values[4], values[5])
