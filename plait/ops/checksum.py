"""The checksum of snapshot shards: ``checksum(t) -> int`` over a uint8 tensor's bytes.

CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and final XOR
0xFFFFFFFF), the checksum of iSCSI, ext4 and most storage systems, computed by
``torch.ops.plait.crc32c`` (``csrc/checksum/crc32c_cpu.cpp``) straight from the
tensor's memory: no copy, carry-less multiplication folding (VPCLMULQDQ on AVX-512 or
AVX2 registers, else PCLMULQDQ) or the SSE4.2 crc32 instruction where the CPU has them,
several threads on large buffers.
"""

from __future__ import annotations

import operator

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = ["checksum", "crc32c_kernels"]


def checksum(t: torch.Tensor, seed: int = 0, *, kernel: str | None = None) -> int:
    """CRC-32C of the bytes of ``t``, a contiguous uint8 CPU tensor; an int in [0, 2**32).

    ``seed`` continues an earlier checksum, as with ``zlib.crc32``:
    ``checksum(b, checksum(a)) == checksum(a ++ b)``, so a shard can be checksummed
    piece by piece. ``checksum(bytes 123456789) == 0xE3069283`` (the standard check
    value). To checksum a tensor of another dtype, pass ``t.view(torch.uint8)``.

    ``kernel`` names the implementation (see :func:`crc32c_kernels`); ``None`` takes the
    best this CPU runs (``PLAIT_CRC32C_KERNEL`` overrides the choice for the process).
    Every kernel gives the same value.

    Raises RuntimeError (from the op's checks) for a tensor that is not uint8,
    contiguous and on the CPU, a seed outside [0, 2**32), or a kernel this CPU lacks.
    """
    return torch.ops.plait.crc32c(t, operator.index(seed), kernel)


def crc32c_kernels(*, all: bool = False) -> list[str]:  # noqa: A002  (the op's argument)
    """The CRC-32C kernels this CPU runs, the default first, then the others best first;
    with ``all=True``, every kernel of this build, runnable or not.

    Names: ``vpclmul_avx512``, ``vpclmul_avx2``, ``pclmul``, ``sse42``, ``portable``.
    """
    return list(torch.ops.plait.crc32c_kernels(all))
