"""FP8 and FP4 quantization along the last dimension of x [M, K] (ops
``torch.ops.plait.quantize_fp8 / quantize_mx / quantize_nvfp4`` and their
``dequantize_*``, CPU and CUDA; NumPy references in :mod:`plait.ops.quant_reference`).

Formats (scales are decode scales, ``x ~ q * s``):

=============== ================================= ============ ================ ======================
fmt             data                              data shape   scale            scale shape
=============== ================================= ============ ================ ======================
``fp8-tensor``  float8_e4m3fn or float8_e5m2      [M, K]       float32          [] (0-d)
``fp8-row``     same                              [M, K]       float32          [M, 1]
``fp8-1x128``   same                              [M, K]       float32          [M, ceil(K/128)]
``fp8-128x128`` same                              [M, K]       float32          [ceil(M/128), ceil(K/128)]
``mxfp8``       float8_e4m3fn                     [M, K]       float8_e8m0fnu   [M, ceil(K/32)]
``mxfp4``       float4_e2m1fn_x2                  [M, K/2]     float8_e8m0fnu   [M, ceil(K/32)]
``nvfp4``       float4_e2m1fn_x2                  [M, K/2]     float8_e4m3fn    [M, ceil(K/16)] + global
=============== ================================= ============ ================ ======================

Elements: OCP FP8 E4M3 (max 448, no infinity, NaN = S.1111.111) and E5M2 (max 57344);
E2M1 (values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), packed two per byte, element 2j in the low
nibble of byte j (K must be even). Trailing partial blocks are allowed.

Scales: FP8 ``s = amax / fmax`` per block (float32); MX (OCP MX v1.0 6.3) the E8M0 code
``floor(log2 amax) - emax_elem + 127`` (emax 8 for E4M3, 2 for E2M1, clamped to [0, 254]),
elements ``x * 2^-X``; NVFP4 ``g = amax_tensor / 2688`` and per 16 elements
``sb = to_e4m3(amax_block / 6 / g)``, elements ``x / (sb * g)`` (0 where that is 0), decoded
as ``(q * sb) * g``.

Rounding: to nearest, ties to even, finite values saturated to +-max (``"nearest"``), or
stochastic (``"stochastic"``): up in magnitude with probability equal to the distance to
the lower neighbour over the gap, the random bits a hash of ``seed`` and the element's
row-major index, so a seed reproduces the result on every device. Scales always round to
nearest. The sign of zero is kept (-0.0 and values that round to zero from below encode
to -0), except in NVFP4 blocks whose divisor is 0, which hold +0.

Ops (x float32 or bfloat16 [M, K]; dtype float32 or bfloat16):

- ``quantize_fp8(x, granularity, elem, stochastic=False, seed=0) -> (data, scale)``,
  granularity "tensor" | "row" | "1x128" | "128x128", elem "e4m3" | "e5m2";
  ``dequantize_fp8(data, scale, granularity, dtype)``.
- ``quantize_mx(x, elem, stochastic=False, seed=0) -> (data, scale)``, elem "e4m3"
  (MXFP8) | "e2m1" (MXFP4); ``dequantize_mx(data, scale, dtype)``.
- ``quantize_nvfp4(x, stochastic=False, seed=0) -> (data, scale, global_scale)``;
  ``dequantize_nvfp4(data, scale, global_scale, dtype)``.

Non-finite policy (loud on purpose): a NaN or +-inf anywhere in a block makes the block
decode to NaN everywhere: its float32 scale is NaN, its E8M0 code 0xFF, its NVFP4 block
scale the E4M3 NaN code; for NVFP4 the tensor amax is then non-finite too, so ``g`` is NaN
and the whole tensor decodes to NaN. FP8 elements of such blocks hold the NaN code, E2M1
ones 0. :func:`amax_stats` counts these elements as overflow.

A case the formulas leave open: an FP8 scale or NVFP4 global scale whose division
underflows to 0 in float32 (an amax below about ``fmax * 2^-150``) becomes 1, like an
all-zero block, so the block quantizes to zeros instead of dividing by zero.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = ["FORMATS", "QTensor", "QuantStats", "amax_stats", "dequantize", "quantize"]

FORMATS = ("fp8-tensor", "fp8-row", "fp8-1x128", "fp8-128x128", "mxfp8", "mxfp4", "nvfp4")
FP8_ELEMENTS = ("e4m3", "e5m2")
ROUNDINGS = ("nearest", "stochastic")
MX_SCALES = ("floor", "up")
# Per element dtype: the largest finite magnitude code, and (max + ulp/2) / max: beyond
# that many times its decoded max an element was clipped, not merely rounded to max.
_MAX_CODE = {torch.float8_e4m3fn: 0x7E, torch.float8_e5m2: 0x7B, torch.float4_e2m1fn_x2: 0x7}
_ROUNDING_REACH = {torch.float8_e4m3fn: 464 / 448, torch.float8_e5m2: 61440 / 57344, torch.float4_e2m1fn_x2: 7 / 6}


@dataclass(frozen=True)
class QTensor:
    """A quantized [M, K] tensor: data and scale as in the table of the module docstring."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    shape: tuple[int, int]
    global_scale: torch.Tensor | None = None  # nvfp4 only: float32 0-d


class QuantStats(NamedTuple):
    """Fractions of the elements of x (float32 0-d tensors, on x's device)."""

    overflow: torch.Tensor  # saturated to the format's max, or in a non-finite block
    underflow: torch.Tensor  # non-zero in x, zero after the round trip


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> str:
    if value in accepted:
        return value  # type: ignore[return-value]
    close = difflib.get_close_matches(str(value), accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"quantize: {name} must be one of {', '.join(map(repr, accepted))}, got {value!r}{hint}")


def quantize(
    x: torch.Tensor, fmt: str, *, elem: str = "e4m3", rounding: str = "nearest", seed: int = 0,
    mx_scale: str = "floor", block_rows: int = 1,
) -> QTensor:
    """Quantize x [M, K] (float32 or bfloat16) to ``fmt`` along its last dimension.

    ``elem`` ("e4m3" | "e5m2") applies to the fp8-* formats only; ``rounding`` is
    "nearest" or "stochastic" (with ``seed``, an int64). ``mx_scale`` (mxfp8, mxfp4):
    "floor", OCP's ``floor(log2 amax) - emax``, or "up", the smallest power of two that
    keeps every element of the block unsaturated (Mishra et al. 2025). ``block_rows``
    (nvfp4): 1, or 16 for 16x16 tiles (the NVFP4 paper's 2-D weight scaling: a tile's scale
    is stored in each of its rows, so the layout is nvfp4's and quantizing x^T gives the
    transpose of quantizing x). Raises ValueError for an unknown fmt, elem, rounding or
    mx_scale, or an option its format does not take; RuntimeError naming the bad argument
    for a bad x.
    """
    fmt = _choice("fmt", fmt, FORMATS)
    stochastic = _choice("rounding", rounding, ROUNDINGS) == "stochastic"
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"quantize: seed must fit an int64, got {seed}")
    shape = tuple(x.shape)
    scale_up = _choice("mx_scale", mx_scale, MX_SCALES) == "up"
    if scale_up and fmt not in ("mxfp8", "mxfp4"):
        raise ValueError(f"quantize: mx_scale='up' applies to mxfp8 and mxfp4, not {fmt}")
    block_rows = operator.index(block_rows)
    if block_rows != 1 and fmt != "nvfp4":
        raise ValueError(f"quantize: block_rows={block_rows} applies to nvfp4 (1 or 16), not {fmt}")
    if fmt.startswith("fp8-"):
        elem = _choice("elem", elem, FP8_ELEMENTS)
        data, scale = torch.ops.plait.quantize_fp8(x, fmt[4:], elem, stochastic, seed)
        return QTensor(data, scale, fmt, shape)
    if fmt == "nvfp4":
        data, scale, global_scale = torch.ops.plait.quantize_nvfp4(x, stochastic, seed, block_rows)
        return QTensor(data, scale, fmt, shape, global_scale)
    data, scale = torch.ops.plait.quantize_mx(x, "e4m3" if fmt == "mxfp8" else "e2m1", stochastic, seed, scale_up)
    return QTensor(data, scale, fmt, shape)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [M, K] values ``q`` stands for, in ``dtype`` (float32 or bfloat16; float64: the float32 decode, widened)."""
    if dtype == torch.float64:
        return dequantize(q, torch.float32).double()
    fmt = _choice("fmt", q.fmt, FORMATS)
    if fmt.startswith("fp8-"):
        return torch.ops.plait.dequantize_fp8(q.data, q.scale, fmt[4:], dtype)
    if fmt == "nvfp4":
        if q.global_scale is None:
            raise ValueError("dequantize: an nvfp4 QTensor needs its global_scale (float32 0-d)")
        return torch.ops.plait.dequantize_nvfp4(q.data, q.scale, q.global_scale, dtype)
    return torch.ops.plait.dequantize_mx(q.data, q.scale, dtype)


def storage_bytes(q: QTensor) -> int:
    """Bytes ``q`` occupies: data, scales and the global scale."""
    total = q.data.numel() * q.data.element_size() + q.scale.numel() * q.scale.element_size()
    if q.global_scale is not None:
        total += q.global_scale.numel() * q.global_scale.element_size()
    return total


def _magnitude_codes(q: QTensor) -> torch.Tensor:
    """The element codes of q without their sign bit, [M, K] int16."""
    raw = q.data.view(torch.uint8).to(torch.int16)
    if q.data.dtype == torch.float4_e2m1fn_x2:
        return torch.stack((raw & 0x7, (raw >> 4) & 0x7), dim=-1).reshape(q.shape)
    return raw & 0x7F


def amax_stats(x: torch.Tensor, q: QTensor) -> QuantStats:
    """Overflow and underflow fractions of quantizing x into q (q = quantize(x, ...)).

    Overflow: elements saturated to the format's largest code from beyond where rounding
    to nearest would have put them (more than half an ulp above max, scaled), plus every
    element of a non-finite block.
    Underflow: non-zero finite elements of x that decode to zero. A few elementwise
    passes, no host synchronisation.
    """
    if tuple(x.shape) != tuple(q.shape):
        raise ValueError(f"amax_stats: x has shape {list(x.shape)} but q was quantized from {list(q.shape)}")
    xf = x.float()
    decoded = dequantize(q)
    reach = _ROUNDING_REACH[q.data.dtype]
    saturated = (_magnitude_codes(q) == _MAX_CODE[q.data.dtype]) & (xf.abs() > decoded.abs() * reach)
    overflow = saturated | ~torch.isfinite(decoded)
    underflow = (xf != 0) & torch.isfinite(xf) & (decoded == 0)
    count = max(xf.numel(), 1)
    return QuantStats(overflow.sum(dtype=torch.float32) / count, underflow.sum(dtype=torch.float32) / count)


# ------------------------------------------------------------------------- fake kernels


def _check_input(op: str, x: torch.Tensor, even: bool = False) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D [M, K], got shape {list(x.shape)}")
    torch._check(
        x.dtype in (torch.float32, torch.bfloat16),
        lambda: f"{op}: x must be float32 or bfloat16, got {x.dtype}; convert it with x.float()",
    )
    torch._check(x.shape[1] >= 1, lambda: f"{op}: x must have at least one column, got shape {list(x.shape)}")
    if even:
        torch._check(x.shape[1] % 2 == 0, lambda: f"{op}: x must have an even number of columns K, got {x.shape[1]}")


def _ceil_div(a, b: int):
    return (a + b - 1) // b


@torch.library.register_fake("plait::quantize_fp8")
def _quantize_fp8_fake(x, granularity, elem, stochastic=False, seed=0):
    _check_input("quantize_fp8", x)
    torch._check(elem in FP8_ELEMENTS, lambda: f"quantize_fp8: elem must be 'e4m3' or 'e5m2', got {elem!r}")
    dtype = torch.float8_e4m3fn if elem == "e4m3" else torch.float8_e5m2
    rows, cols = x.shape
    scale_shape = {
        "tensor": (),
        "row": (rows, 1),
        "1x128": (rows, _ceil_div(cols, 128)),
        "128x128": (_ceil_div(rows, 128), _ceil_div(cols, 128)),
    }
    torch._check(granularity in scale_shape, lambda: f"quantize_fp8: unknown granularity {granularity!r}")
    return x.new_empty((rows, cols), dtype=dtype), x.new_empty(scale_shape[granularity], dtype=torch.float32)


@torch.library.register_fake("plait::dequantize_fp8")
def _dequantize_fp8_fake(data, scale, granularity, dtype):
    return data.new_empty(data.shape, dtype=dtype)


@torch.library.register_fake("plait::quantize_mx")
def _quantize_mx_fake(x, elem, stochastic=False, seed=0, scale_up=False):
    torch._check(elem in ("e4m3", "e2m1"), lambda: f"quantize_mx: elem must be 'e4m3' or 'e2m1', got {elem!r}")
    _check_input("quantize_mx", x, even=elem == "e2m1")
    rows, cols = x.shape
    if elem == "e2m1":
        data = x.new_empty((rows, cols // 2), dtype=torch.float4_e2m1fn_x2)
    else:
        data = x.new_empty((rows, cols), dtype=torch.float8_e4m3fn)
    return data, x.new_empty((rows, _ceil_div(cols, 32)), dtype=torch.float8_e8m0fnu)


@torch.library.register_fake("plait::dequantize_mx")
def _dequantize_mx_fake(data, scale, dtype):
    cols = data.shape[1] * (2 if data.dtype == torch.float4_e2m1fn_x2 else 1)
    return data.new_empty((data.shape[0], cols), dtype=dtype)


@torch.library.register_fake("plait::quantize_nvfp4")
def _quantize_nvfp4_fake(x, stochastic=False, seed=0, block_rows=1):
    _check_input("quantize_nvfp4", x, even=True)
    torch._check(block_rows in (1, 16), lambda: f"quantize_nvfp4: block_rows must be 1 (1x16 blocks) or 16 "
                 f"(16x16 tiles, the 2-D weight scaling), got {block_rows}")
    rows, cols = x.shape
    return (
        x.new_empty((rows, cols // 2), dtype=torch.float4_e2m1fn_x2),
        x.new_empty((rows, _ceil_div(cols, 16)), dtype=torch.float8_e4m3fn),
        x.new_empty((), dtype=torch.float32),
    )


@torch.library.register_fake("plait::dequantize_nvfp4")
def _dequantize_nvfp4_fake(data, scale, global_scale, dtype):
    return data.new_empty((data.shape[0], 2 * data.shape[1]), dtype=dtype)
