"""GF(2^8) multiply-accumulate over byte regions: ``dst[i] ^= coef * src[i]``.

This is the inner loop of Reed-Solomon erasure coding: a parity shard is the sum
(XOR) of the data shards, each multiplied by a coefficient of the code matrix. The
field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), polynomial 0x11d, as in ISA-L and
klauspost/reedsolomon, so shards are interchangeable with those codecs' for the same
matrix.

The kernels are C++/CUDA (``csrc/ec/``) and registered as ``torch.ops.plait.gf256_mul_add_``;
their argument checks are the source of truth. This module adds:

* :func:`gf256_mul_add_`, the Python entry point;
* the fake (meta) kernel, so the op traces under ``torch.compile`` and ``FakeTensorMode``;
* :func:`gf256_mul_add_reference`, a slow pure-PyTorch implementation sharing no code
  with the kernels, and :func:`gf256_mul`, a scalar multiply, for tests.
"""

from __future__ import annotations

import functools
import operator

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = ["GF256_POLY", "gf256_mul", "gf256_mul_add_", "gf256_mul_add_reference"]

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
