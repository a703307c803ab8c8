"""A rank's whole training state as one self-describing byte blob (the unit a daemon stores).

Layout of a blob (little endian)::

    b"PLAITSNP" | u64 header length H | header (pickle, H bytes) | pad to 64 | tensor bytes …

The header lists every tensor (name, dtype, shape, offset, bytes) and carries the small
Python state: step, data-loader position, RNG states (python, numpy, torch CPU and CUDA),
the hooks' histories, the layout key. Tensors start at 64-byte offsets, so that reading
maps them as views of the blob (no copies) and writing is one ``copy_`` per tensor into
the daemon's shared memory.

Writing is split in two so that training goes on meanwhile: :func:`plan` fixes the
offsets and serialises the Python state *now* (it changes every step), and
:meth:`BlobPlan.copy_tensors` copies the tensors later, from another thread, before the
optimizer next writes them (``ShardedAdamW.before_update``). The header is trusted data:
it is written and read by the same job on the same machines.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MAGIC", "BlobError", "BlobPlan", "plan", "read_blob"]

MAGIC = b"PLAITSNP"
_PREFIX = struct.Struct("<8sQ")
ALIGN = 64


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
        raw = prefix + self.header
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

    def write(self, dst: torch.Tensor) -> None:
        self.write_header(dst)
        self.copy_tensors(dst)


def plan(tensors: dict[str, torch.Tensor], objects: dict[str, Any]) -> BlobPlan:
    """Lay out ``tensors`` (contiguous, any dtype) and serialise ``objects`` (picklable) now."""
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
    body = {"tensors": descr, "objects": objects}
    header = pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    base = _align(_PREFIX.size + len(header))
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


def read_blob(blob: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (views of ``blob``: copy them before the blob goes away) and objects of a blob."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise BlobError("a blob is a 1-D uint8 tensor")
    if blob.numel() < _PREFIX.size:
        raise BlobError(f"blob of {blob.numel()} bytes is shorter than its prefix")
    magic, hlen = _PREFIX.unpack(bytes(blob[: _PREFIX.size].numpy()))
    if magic != MAGIC:
        raise BlobError(f"bad magic {magic!r}; not a plait snapshot blob")
    if _PREFIX.size + hlen > blob.numel():
        raise BlobError(f"header of {hlen} bytes runs past the blob's {blob.numel()} bytes")
    body = pickle.loads(bytes(blob[_PREFIX.size : _PREFIX.size + hlen].numpy()))
    base = _align(_PREFIX.size + hlen)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, rel, nbytes in body["tensors"]:
        start = base + rel
        if start + nbytes > blob.numel():
            raise BlobError(f"tensor {name} runs past the end of the blob")
        dt = getattr(torch, dtype)
        tensors[name] = blob[start : start + nbytes].view(dt).view(shape) if nbytes else torch.empty(shape, dtype=dt)
    return tensors, body["objects"]
