"""A rank's whole training state as one self-describing byte blob (the unit a daemon stores).

Layout of a blob (little endian)::

    b"PLAITSN3" | u64 header length H | MAC (32 bytes) | header (JSON, H bytes) | pad to 64 | tensor bytes …

The header lists every tensor (name, dtype, shape, offset, bytes) and carries the small
Python state: step, data-loader position, RNG states (python, numpy, torch CPU and CUDA),
the hooks' histories, the layout key, in the JSON of :mod:`.objects` (never pickle).
The MAC is HMAC-SHA256 with the job's secret over the prefix, the header, and the length
and CRC-32C of everything after the header; :func:`read_blob` checks it before it parses
anything, so a blob that did not come from this job (bytes planted in shared memory, a
parity chunk pushed by a stranger and decoded into a blob) is refused, whatever it holds,
and any changed byte (header or tensor) changes what the MAC covers. The tensor bytes are
bound through their CRC rather than hashed with SHA-256: a keyed hash of every byte costs
more than all the rest of a save or restore (hashlib's SHA-256 took 0.6-0.8 ms per MiB on
one core of an AMD EPYC, the CRC-32C kernel 0.03), and would stop no one that this check does not: the only ones who can write
a blob's bytes are processes of the job's own user (the segment directory is 0700), who can
read the secret file anyway, and peers that proved the secret on their connection. What
the CRC binding leaves open is forging bytes that keep the CRC, which needs write access to
the blob in the first place. Tensors start at 64-byte offsets, so that reading
maps them as views of the blob (no copies) and writing is one ``copy_`` per tensor into
the daemon's shared memory.

Writing is split in two so that training goes on meanwhile: :func:`plan` fixes the
offsets and serialises the Python state *now* (it changes every step), and
:meth:`BlobPlan.copy_tensors` copies the tensors later, from another thread, before the
optimizer next writes them (``ShardedAdamW.before_update``); :func:`seal` writes the MAC
once every byte is in place.
"""

from __future__ import annotations

import hmac
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from plait.ops.checksum import checksum
from plait.runtime.snapshot.auth import MAC_BYTES, JobSecret
from plait.runtime.snapshot.trainer import objects as object_codec

__all__ = ["MAGIC", "BlobError", "BlobPlan", "plan", "seal", "read_blob"]

MAGIC = b"PLAITSN3"
_PREFIX = struct.Struct("<8sQ")
_MAC_AT = _PREFIX.size  # the MAC field: bytes [16, 48)
_HEADER_AT = _MAC_AT + MAC_BYTES
ALIGN = 64
_DTYPES = {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
           "float8_e4m3fn", "float8_e5m2", "complex64"}


class BlobError(ValueError):
    """The bytes are not a snapshot blob (bad magic, truncated, inconsistent header)."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class BlobPlan:
    """Where each tensor goes in a blob of ``size`` bytes; the header is already serialised."""

    size: int
    header: bytes
    entries: list[tuple[str, int, int]]  # (name, offset, nbytes)
    tensors: dict[str, torch.Tensor]  # live references, read by copy_tensors
    ready: Any = None  # a torch.cuda.Event recorded by plan() when some tensor is on a GPU

    def write_header(self, dst: torch.Tensor) -> None:
        prefix = _PREFIX.pack(MAGIC, len(self.header))
        raw = prefix + bytes(MAC_BYTES) + self.header
        dst[: len(raw)].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def copy_tensors(self, dst: torch.Tensor) -> None:
        """Copy every tensor into ``dst`` (a uint8 tensor of ``size`` bytes, e.g. shared memory).

        CUDA tensors are copied device → host on a side stream that first waits for
        everything queued on the current stream when :func:`plan` ran (``ready``), into
        ``dst`` registered as pinned memory for the time of the copy, so the DMA runs
        at full speed without blocking the training stream.
        """
        if dst.numel() != self.size:
            raise BlobError(f"destination has {dst.numel()} bytes, the blob needs {self.size}")
        if self.ready is not None:
            _copy_from_cuda(self, dst)
            return
        for name, offset, nbytes in self.entries:
            if nbytes == 0:
                continue
            src = self.tensors[name].detach()
            dst[offset : offset + nbytes].view(src.dtype).view(src.shape).copy_(src)

    def write(self, dst: torch.Tensor, secret: JobSecret) -> None:
        self.write_header(dst)
        self.copy_tensors(dst)
        seal(dst, secret)


def plan(tensors: dict[str, torch.Tensor], objects: dict[str, Any]) -> BlobPlan:
    """Lay out ``tensors`` (contiguous) and serialise ``objects`` (what :mod:`.objects` stores) now."""
    entries: list[tuple[str, int, int]] = []
    descr: list[tuple[str, str, list[int], int, int]] = []
    # Offsets depend on the header's length, and the header holds the offsets: lay out
    # relative to the end of the header, then shift by its aligned length.
    relative = 0
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise BlobError(f"tensor {name} is not contiguous")
        nbytes = t.numel() * t.element_size()
        descr.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), relative, nbytes))
        relative = _align(relative + nbytes)
    header = object_codec.dumps({"tensors": descr, "objects": objects})
    base = _align(_HEADER_AT + len(header))
    for name, _, _, rel, nbytes in descr:
        entries.append((name, base + rel, nbytes))
    ready = None
    if any(t.is_cuda for t in tensors.values()):
        ready = torch.cuda.Event()
        ready.record()
    return BlobPlan(size=base + relative, header=header, entries=entries, tensors=dict(tensors), ready=ready)


def _copy_from_cuda(p: BlobPlan, dst: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    registered = cudart.cudaHostRegister(dst.data_ptr(), dst.numel(), 0) == 0
    try:
        stream = torch.cuda.Stream()
        stream.wait_event(p.ready)
        with torch.cuda.stream(stream):
            for name, offset, nbytes in p.entries:
                if nbytes == 0:
                    continue
                src = p.tensors[name].detach()
                dst[offset : offset + nbytes].view(src.dtype).view(src.shape).copy_(src, non_blocking=registered)
        stream.synchronize()
    finally:
        if registered:
            cudart.cudaHostUnregister(dst.data_ptr())


_BOUND = struct.Struct("<QI")  # bytes after the header, and their CRC-32C


def _mac(blob: torch.Tensor, secret: JobSecret) -> bytes:
    """The MAC of a blob: over its prefix, header, and the length and CRC-32C of the rest.

    The header's length comes from the prefix, unchecked: one that runs past the blob is
    clamped here, and the MAC then fails (the prefix it covers holds the real length).
    """
    view = memoryview(blob.numpy())
    hlen = min(_PREFIX.unpack(view[: _PREFIX.size])[1], blob.numel() - _HEADER_AT)
    body = blob[_HEADER_AT + hlen :]
    bound = _BOUND.pack(body.numel(), checksum(body) if body.numel() else 0)
    return secret.mac(view[:_MAC_AT], view[_HEADER_AT : _HEADER_AT + hlen], bound)


def seal(blob: torch.Tensor, secret: JobSecret) -> None:
    """Write the blob's MAC (after the header and every tensor are in place)."""
    blob[_MAC_AT:_HEADER_AT].copy_(torch.frombuffer(bytearray(_mac(blob, secret)), dtype=torch.uint8))


def read_blob(blob: torch.Tensor, secret: JobSecret) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (views of ``blob``: copy them before the blob goes away) and objects of a blob.

    The MAC is checked first: BlobError, and nothing parsed, when the blob was not sealed
    with ``secret``. Then every tensor entry is checked against the blob's bounds.
    """
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise BlobError("a blob is a 1-D uint8 tensor")
    if blob.numel() < _HEADER_AT:
        raise BlobError(f"blob of {blob.numel()} bytes is shorter than its prefix")
    magic, hlen = _PREFIX.unpack(bytes(blob[: _PREFIX.size].numpy()))
    if magic != MAGIC:
        raise BlobError(f"bad magic {magic!r}; not a plait snapshot blob (of this format)")
    stored = bytes(blob[_MAC_AT:_HEADER_AT].numpy())
    if not hmac.compare_digest(stored, _mac(blob, secret)):
        raise BlobError("the blob's MAC does not match: it was not written by this job (or was altered); refusing to "
                        "read it")
    if _HEADER_AT + hlen > blob.numel():
        raise BlobError(f"header of {hlen} bytes runs past the blob's {blob.numel()} bytes")
    try:
        body = object_codec.loads(blob[_HEADER_AT : _HEADER_AT + hlen].numpy())
        entries, objects = body["tensors"], body["objects"]
    except (object_codec.ObjectsError, KeyError, TypeError) as err:
        raise BlobError(f"unreadable blob header: {err}") from None
    base = _align(_HEADER_AT + hlen)
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        try:
            name, dtype, shape, rel, nbytes = entry
        except (TypeError, ValueError):
            raise BlobError(f"bad tensor entry {entry!r}") from None
        if dtype not in _DTYPES or not isinstance(name, str):
            raise BlobError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        dt = getattr(torch, dtype)
        if not all(isinstance(n, int) and n >= 0 for n in shape) or nbytes != math.prod(shape) * dt.itemsize:
            raise BlobError(f"tensor {name}: shape {shape} does not match its {nbytes} bytes")
        start = base + rel
        if rel < 0 or start + nbytes > blob.numel():
            raise BlobError(f"tensor {name} runs past the end of the blob")
        tensors[name] = blob[start : start + nbytes].view(dt).view(shape) if nbytes else torch.empty(shape, dtype=dt)
    return tensors, objects
