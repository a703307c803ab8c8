"""GF(2^8) multiply-accumulate over byte regions: ``dst[i] ^= coef * src[i]``.

This is the inner loop of Reed-Solomon erasure coding: a parity shard is the sum
(XOR) of the data shards, each multiplied by a coefficient of the code matrix. The
field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), polynomial 0x11d, as in ISA-L and
klauspost/reedsolomon, so shards are interchangeable with those codecs' for the same
matrix.

The kernels are C++/CUDA (``csrc/ec/``) and registered as ``torch.ops.plait.gf256_mul_add_``
and ``torch.ops.plait.gf256_matmul_`` (the fused product of a whole coefficient matrix,
one pass over the data: what Reed-Solomon encode and decode run); their argument checks
are the source of truth. This module adds:

* :func:`gf256_mul_add_` and :func:`gf256_matmul_`, the Python entry points, and
  :func:`gf256_matmul_kernels`, the CPU kernels of the latter that this CPU runs;
* the fake (meta) kernels, so the ops trace under ``torch.compile`` and ``FakeTensorMode``;
* :func:`gf256_mul_add_reference`, a slow pure-PyTorch implementation sharing no code
  with the kernels, and :func:`gf256_mul`, a scalar multiply, for tests.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = [
    "GF256_POLY",
    "gf256_matmul_",
    "gf256_matmul_kernels",
    "gf256_mul",
    "gf256_mul_add_",
    "gf256_mul_add_reference",
]

#: The reduction polynomial x^8 + x^4 + x^3 + x^2 + 1.
GF256_POLY = 0x11D


def gf256_mul(a: int, b: int) -> int:
    """Return ``a * b`` in GF(2^8) (polynomial 0x11d); ``a`` and ``b`` are in [0, 255].

    Shift-and-add ("Russian peasant") multiplication: add (XOR) ``a * x^i`` for each
    set bit i of ``b``, reducing ``a * x`` by the polynomial whenever it reaches x^8.
    """
    for name, v in (("a", a), ("b", b)):
        if not 0 <= operator.index(v) <= 255:
            raise ValueError(f"gf256_mul: {name} must be in [0, 255], got {v}")
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= GF256_POLY
    return product


@functools.cache
def _product_table() -> torch.Tensor:
    """The 256 x 256 multiplication table (uint8, CPU), built from log/exp tables.

    exp[i] = 2^i, by repeated multiplication with :func:`gf256_mul`; 2 generates the
    multiplicative group of this field, so log is exp's inverse on the 255 nonzero
    elements and a * b = exp[log a + log b] for a, b != 0.
    """
    exp = []
    x = 1
    for _ in range(255):
        exp.append(x)
        x = gf256_mul(x, 2)
    if x != 1 or len(set(exp)) != 255:
        raise AssertionError("2 does not generate GF(2^8)* under 0x11d")
    log = [0] * 256
    for i, v in enumerate(exp):
        log[v] = i
    exp_t = torch.tensor(exp + exp, dtype=torch.uint8)  # indices up to 254 + 254
    log_t = torch.tensor(log, dtype=torch.long)
    table = exp_t[log_t[:, None] + log_t[None, :]]
    table[0, :] = 0
    table[:, 0] = 0
    return table


def gf256_mul_add_reference(dst: torch.Tensor, src: torch.Tensor, coef: int) -> torch.Tensor:
    """``dst ^= coef * src`` elementwise in GF(2^8), in pure PyTorch; returns ``dst``.

    Slow (it materialises an int64 index per byte) and meant for tests. Accepts what
    the op accepts (uint8, same number of elements, same device, coef in [0, 255]),
    except that it does not require contiguity.
    """
    coef = operator.index(coef)
    for name, t in (("dst", dst), ("src", src)):
        if t.dtype != torch.uint8:
            raise TypeError(f"gf256_mul_add_reference: {name} must be uint8, got {t.dtype}")
    if dst.numel() != src.numel():
        raise ValueError(
            "gf256_mul_add_reference: dst and src must have the same number of elements, "
            f"got {dst.numel()} and {src.numel()}"
        )
    if dst.device != src.device:
        raise ValueError(
            f"gf256_mul_add_reference: dst is on {dst.device} but src on {src.device}"
        )
    if not 0 <= coef <= 255:
        raise ValueError(f"gf256_mul_add_reference: coef must be in [0, 255], got {coef}")
    row = _product_table()[coef].to(src.device)
    dst.bitwise_xor_(row[src.reshape(-1).long()].reshape(dst.shape))
    return dst


def gf256_mul_add_(dst: torch.Tensor, src: torch.Tensor, coef: int) -> torch.Tensor:
    """``dst[i] ^= coef * src[i]`` in GF(2^8) (polynomial 0x11d), in place; returns ``dst``.

    ``dst`` and ``src`` are contiguous uint8 tensors on the same device with the same
    number of elements (shapes may differ), and must not partially overlap; ``coef``
    is an int in [0, 255]. ``dst`` is written through its own memory, never a copy,
    so it may be a slice of a larger buffer or a byte view (``t.view(torch.uint8)``) of
    another tensor. Runs on CPU (AVX2 when available) and CUDA (current stream).

    Raises RuntimeError (from the kernel's checks) naming the bad argument.

    There is no autograd formula, on purpose: the op is defined on uint8 tensors,
    which cannot require grad, and GF(2^8) arithmetic has no derivative in the real
    sense anyway. The only autograd-related kernel is the C++ ADInplaceOrView one,
    which bumps ``dst``'s version counter like every in-place op, so autograd still
    detects bytes that were saved for backward and then overwritten through a view.
    """
    torch.ops.plait.gf256_mul_add_(dst, src, operator.index(coef))
    return dst


@torch.library.register_fake("plait::gf256_mul_add_")
def _gf256_mul_add_fake(dst: torch.Tensor, src: torch.Tensor, coef: int) -> None:
    # The same checks, in the same words, as gf256_mul_add_check in csrc/ec/gf256_cpu.cpp
    # (except the memory-overlap one, which needs real addresses).
    for name, t in (("dst", dst), ("src", src)):
        torch._check(
            t.dtype == torch.uint8,
            lambda name=name, t=t: f"gf256_mul_add_: {name} must be uint8, got {t.dtype}; "
            f"reinterpret the bytes with {name}.view(torch.uint8)",
        )
        torch._check(
            t.is_contiguous(),
            lambda name=name, t=t: f"gf256_mul_add_: {name} must be contiguous, got strides {t.stride()}",
        )
    torch._check(
        dst.numel() == src.numel(),
        lambda: "gf256_mul_add_: dst and src must have the same number of elements, got dst "
        f"{dst.numel()} and src {src.numel()}; slice them to the same length",
    )
    torch._check(
        dst.device == src.device,
        lambda: "gf256_mul_add_: dst and src must be on the same device, got dst on "
        f"{dst.device} and src on {src.device}; move src with src.to(dst.device)",
    )
    torch._check(
        0 <= coef <= 255,
        lambda: f"gf256_mul_add_: coef must be a GF(2^8) element in [0, 255], got {coef}",
    )
    return None


def gf256_matmul_(
    outs: Sequence[torch.Tensor],
    ins: Sequence[torch.Tensor],
    coefs: torch.Tensor | Sequence[Sequence[int]],
    *,
    kernel: str | None = None,
) -> Sequence[torch.Tensor]:
    """``outs[i] = XOR_j coefs[i][j] * ins[j]`` in GF(2^8) (polynomial 0x11d); returns ``outs``.

    The outputs are overwritten (not accumulated into), each through its own memory, so
    they may be slices of a larger buffer or views of shared memory
    (``torch.from_file`` on ``/dev/shm``). Every input and output is a contiguous uint8
    tensor with the same number of elements, all on one device (CPU or CUDA); there are
    1 to 32 inputs and 1 to 8 outputs, and no output may share memory with an input or
    another output. ``coefs`` is a uint8 CPU tensor of shape ``[len(outs), len(ins)]``,
    or a nested sequence of ints that is converted to one.

    One call reads each input once and writes each output once (a fused kernel,
    multi-threaded on large shards), where ``len(outs) * len(ins)`` calls of
    :func:`gf256_mul_add_` would read and write each output ``len(ins)`` times.

    On the CPU, ``kernel`` names the implementation (see :func:`gf256_matmul_kernels`);
    ``None`` takes the best this CPU runs: GFNI on AVX-512 or AVX2 registers, AVX-512 or
    AVX2 byte shuffles, or scalar code (``PLAIT_GF256_KERNEL`` overrides the choice for
    the process). Every kernel gives the same bytes. CUDA tensors take ``None`` only.

    Raises RuntimeError (from the kernel's checks) naming the bad argument. Like
    :func:`gf256_mul_add_`, it bumps each output's version counter and has no autograd
    formula.
    """
    if not isinstance(coefs, torch.Tensor):
        coefs = torch.tensor(coefs, dtype=torch.uint8)
    torch.ops.plait.gf256_matmul_(list(outs), list(ins), coefs, kernel)
    return outs


def gf256_matmul_kernels(*, all: bool = False) -> list[str]:  # noqa: A002  (the op's argument)
    """The CPU kernels of :func:`gf256_matmul_` this CPU runs, the default first, then the
    others best first; with ``all=True``, every kernel of this build, runnable or not.

    Names: ``gfni_avx512``, ``avx512``, ``gfni_avx2``, ``avx2``, ``scalar`` and
    ``gfni_emulated`` (the GFNI kernels' loop with the instruction computed in portable
    code, which runs anywhere and is never the default: it tests the GFNI kernels' loop
    and bit matrices on CPUs without GFNI).
    """
    return list(torch.ops.plait.gf256_matmul_kernels(all))


@torch.library.register_fake("plait::gf256_matmul_")
def _gf256_matmul_fake(
    outs: list[torch.Tensor], ins: list[torch.Tensor], coefs: torch.Tensor, kernel: str | None = None
) -> None:
    # The same checks, in the same words, as gf256_matmul_check in
    # csrc/ec/gf256_matmul_cpu.cpp, but for the overlap one (it needs real addresses).
    torch._check(
        1 <= len(ins) <= 32,
        lambda: f"gf256_matmul_: ins must hold 1 to 32 tensors (the k <= 32 data shards of a "
        f"stripe), got {len(ins)}; use a code with at most 32 data shards",
    )
    torch._check(
        1 <= len(outs) <= 8,
        lambda: f"gf256_matmul_: outs must hold 1 to 8 tensors, got {len(outs)}; compute more "
        "outputs in several calls of at most 8 (one per group of rows of coefs)",
    )
    first = ins[0]
    for name, tensors in (("ins", ins), ("outs", outs)):
        for index, t in enumerate(tensors):
            torch._check(
                t.dtype == torch.uint8,
                lambda name=name, index=index, t=t: f"gf256_matmul_: {name}[{index}] must be uint8, "
                f"got {t.dtype}; reinterpret the bytes with {name}[{index}].view(torch.uint8)",
            )
            torch._check(
                t.is_contiguous(),
                lambda name=name, index=index, t=t: f"gf256_matmul_: {name}[{index}] must be "
                f"contiguous, got strides {list(t.stride())}; pass a contiguous tensor (or a "
                "contiguous slice of one)",
            )
            torch._check(
                t.numel() == first.numel(),
                lambda name=name, index=index, t=t: f"gf256_matmul_: {name}[{index}] has {t.numel()} "
                f"bytes but ins[0] has {first.numel()}; every shard of a stripe must have the same "
                "length (pad the last one)",
            )
            torch._check(
                t.device == first.device,
                lambda name=name, index=index, t=t: f"gf256_matmul_: {name}[{index}] is on {t.device} "
                f"but ins[0] is on {first.device}; all shards must be on one device (move them with "
                ".to(ins[0].device))",
            )
    torch._check(
        coefs.dtype == torch.uint8,
        lambda: f"gf256_matmul_: coefs must be uint8, got {coefs.dtype}; build it with "
        "torch.tensor(rows, dtype=torch.uint8)",
    )
    torch._check(
        coefs.device.type == "cpu",
        lambda: f"gf256_matmul_: coefs must be a CPU tensor, got one on {coefs.device}; the "
        "coefficients are read on the host, pass coefs.cpu()",
    )
    torch._check(
        tuple(coefs.shape) == (len(outs), len(ins)),
        lambda: f"gf256_matmul_: coefs must have shape [len(outs), len(ins)] = [{len(outs)}, "
        f"{len(ins)}], got {list(coefs.shape)}; row i holds the coefficients of outs[i]",
    )
    return None
