"""The checksum of snapshot shards: ``checksum(t) -> int`` over a uint8 tensor's bytes.

Placeholder implementation: zlib's CRC-32 over the tensor's memory (no copy).
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["checksum"]


def checksum(t: torch.Tensor, seed: int = 0) -> int:
    if t.dtype != torch.uint8 or not t.is_contiguous():
        raise ValueError("checksum: expects a contiguous uint8 tensor")
    return zlib.crc32(t.numpy(), seed) if t.numel() else seed
