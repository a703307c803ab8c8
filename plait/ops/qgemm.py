"""Block-scaled GEMMs on quantized operands: ``dequant(a) [M, K] @ dequant(b) [N, K]^T``.

``a`` holds activations (one row per token), ``b`` a weight ``[N, K]`` (out features by
in features, as ``nn.Linear`` stores it), both quantized along K (:mod:`plait.ops.quant`).
The product is accumulated in float32 and returned as ``[M, N]``.

Pairs (``a.fmt`` x ``b.fmt``):

- ``fp8-tensor`` / ``fp8-row`` either side: ``torch._scaled_mm`` (per-tensor or per-row
  scales, E4M3 or E5M2).
- ``fp8-1x128`` x ``fp8-128x128`` (DeepSeek-V3's activations x weights) or x ``fp8-1x128``,
  E4M3 and E5M2 mixed as you like; ``mxfp8`` x ``mxfp8``; ``mxfp4`` x ``mxfp4``;
  ``nvfp4`` x ``nvfp4``: the op ``torch.ops.plait.block_scaled_mm`` (CPU; CUDA on sm_90a).

The op decodes tiles of a and b to float32 (``q * s``, nvfp4 ``(q * float(sb)) * g``,
exactly the float32 dequantize) and multiplies them with float32 accumulation, so each
output is within ``gamma_K * sum_k |a_k b_k|`` (``gamma_n = n u / (1 - n u)``,
``u = 2^-24``) of the exact product of the decoded operands, :func:`qmm_reference`. A
block that held NaN or infinity when it was quantized decodes to NaN, and so do the
outputs it touches: loud on purpose, so training counts it as an overflow.

:func:`qmm_grouped` multiplies rows ``offsets[e]:offsets[e + 1]`` of ``a`` by expert e's
weight (``torch.ops.plait.block_scaled_grouped_mm``), for MoE layers with stacked experts.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)
from plait.ops.quant import QTensor, dequantize

__all__ = ["qmm", "qmm_grouped", "qmm_grouped_reference", "qmm_reference"]

_SCALED_MM_FORMATS = ("fp8-tensor", "fp8-row")


@functools.cache
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``torch._scaled_mm`` takes row-wise scales (2.13 does; 2.11 raises)."""
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def _check_pair(a: QTensor, b: QTensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"qmm: K mismatch: a is {list(a.shape)} and b is {list(b.shape)}; b is the weight [N, K], not its transpose"
        )


def qmm(a: QTensor, b: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(a) [M, K] @ dequantize(b) [N, K]^T`` as ``out_dtype`` [M, N], accumulated in float32."""
    _check_pair(a, b)
    if a.fmt in _SCALED_MM_FORMATS or b.fmt in _SCALED_MM_FORMATS:
        if a.fmt not in _SCALED_MM_FORMATS or b.fmt not in _SCALED_MM_FORMATS:
            raise ValueError(
                f"qmm: fp8-tensor and fp8-row pair only with each other (torch._scaled_mm), got a {a.fmt} x b {b.fmt}"
            )
        scale_a, scale_b = a.scale, b.scale.reshape(1, -1)
        if a.fmt == b.fmt == "fp8-tensor":
            scale_b = b.scale
        elif a.fmt == "fp8-tensor":  # _scaled_mm takes tensor-wise or row-wise on both sides
            scale_a = a.scale.expand(a.shape[0], 1).contiguous()
        elif b.fmt == "fp8-tensor":
            scale_b = b.scale.expand(1, b.shape[0]).contiguous()
        if a.data.device.type == "cpu" and scale_a.numel() * scale_b.numel() > 1 and not _cpu_rowwise_scaled_mm():
            # This torch's CPU _scaled_mm takes per-tensor scales only (2.11 asserts): the same product of
            # the FP8 codes (exact in float32), accumulated in float32, then the outer product of the scales.
            codes = a.data.float() @ b.data.float().t()
            return (codes * scale_a * scale_b).to(out_dtype)
        return torch._scaled_mm(a.data, b.data.t(), scale_a, scale_b, out_dtype=out_dtype)
    out = torch.ops.plait.block_scaled_mm(
        a.data, a.scale, b.data, b.scale, a.fmt, b.fmt, a.global_scale, b.global_scale
    )
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _stack(b: QTensor | Sequence[QTensor]) -> QTensor:
    if isinstance(b, QTensor):
        if b.data.dim() != 3:
            raise ValueError(f"qmm_grouped: a stacked b needs data [E, N, K], got shape {list(b.data.shape)}")
        return b
    return stack_experts(b)


def stack_experts(b: Sequence[QTensor]) -> QTensor:
    """The experts' QTensors (same format and shape) as one: data ``[E, ...]``, scale ``[E, ...]``."""
    b = list(b)
    if not b:
        raise ValueError("qmm_grouped: b holds no experts")
    fmts = {q.fmt for q in b}
    shapes = {tuple(q.shape) for q in b}
    if len(fmts) != 1 or len(shapes) != 1:
        raise ValueError(f"qmm_grouped: experts differ in format {sorted(fmts)} or shape {sorted(shapes)}")
    scales = [q.global_scale for q in b]
    global_scale = None if scales[0] is None else torch.stack(scales)
    return QTensor(
        torch.stack([q.data for q in b]), torch.stack([q.scale for q in b]), b[0].fmt, b[0].shape, global_scale
    )


def _offsets(offsets: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if isinstance(offsets, torch.Tensor):
        return offsets
    return torch.tensor([operator.index(o) for o in offsets], dtype=torch.long)


def qmm_grouped(
    a: QTensor, b: QTensor | Sequence[QTensor], offsets: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """float32 [M, N]: rows ``offsets[e]:offsets[e + 1]`` of ``a`` times expert e's ``b``.

    ``b`` is a list of the experts' QTensors (same format and shape) or one QTensor with
    data ``[E, N, K]``, scale ``[E, ...]`` and (nvfp4) global scale ``[E]``; ``offsets`` is
    int64 ``[E + 1]`` from 0 to M (empty groups allowed).
    """
    stacked = _stack(b)
    _check_pair(a, stacked)
    return torch.ops.plait.block_scaled_grouped_mm(
        a.data, a.scale, stacked.data, stacked.scale, _offsets(offsets), a.fmt, stacked.fmt,
        a.global_scale, stacked.global_scale,
    )


def qmm_reference(a: QTensor, b: QTensor) -> torch.Tensor:
    """The exact product of the decoded operands: both decoded as :func:`dequantize` does (float32),
    multiplied in float64 [M, N]."""
    _check_pair(a, b)
    return dequantize(a, torch.float64) @ dequantize(b, torch.float64).T


def qmm_grouped_reference(
    a: QTensor, b: QTensor | Sequence[QTensor], offsets: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """:func:`qmm_grouped` in float64, expert by expert."""
    stacked = _stack(b)
    bounds = [int(o) for o in _offsets(offsets)]
    dense_a = dequantize(a, torch.float64)
    out = torch.zeros(a.shape[0], stacked.shape[0], dtype=torch.float64)
    for e in range(len(bounds) - 1):
        gs = None if stacked.global_scale is None else stacked.global_scale[e]
        expert = QTensor(stacked.data[e], stacked.scale[e], stacked.fmt, stacked.shape, gs)
        out[bounds[e] : bounds[e + 1]] = dense_a[bounds[e] : bounds[e + 1]] @ dequantize(expert, torch.float64).T
    return out


# ------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("plait::block_scaled_mm")
def _block_scaled_mm_fake(a, a_scale, b, b_scale, a_fmt, b_fmt, a_global=None, b_global=None):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: f"block_scaled_mm: a and b must be 2-D, got {list(a.shape)}, {list(b.shape)}")
    torch._check(a.shape[1] == b.shape[1], lambda: f"block_scaled_mm: K mismatch: a {list(a.shape)}, b {list(b.shape)}")
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.float32)


@torch.library.register_fake("plait::block_scaled_grouped_mm")
def _block_scaled_grouped_mm_fake(a, a_scale, b, b_scale, offsets, a_fmt, b_fmt, a_global=None, b_global=None):
    torch._check(a.dim() == 2 and b.dim() == 3, lambda: f"block_scaled_grouped_mm: a must be 2-D and b 3-D, got {list(a.shape)}, {list(b.shape)}")
    torch._check(a.shape[1] == b.shape[2], lambda: f"block_scaled_grouped_mm: K mismatch: a {list(a.shape)}, b {list(b.shape)}")
    torch._check(
        offsets.dim() == 1 and offsets.shape[0] == b.shape[0] + 1,
        lambda: f"block_scaled_grouped_mm: offsets must be [E + 1] = [{b.shape[0] + 1}], got {list(offsets.shape)}",
    )
    return a.new_empty(a.shape[0], b.shape[1], dtype=torch.float32)
