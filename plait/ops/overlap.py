"""One chunk of a collective matmul (op ``torch.ops.plait.matmul_into``).

Tensor-parallel layers that overlap their sequence all-gather or reduce-scatter with the
GEMM next to it (:mod:`plait.parallel.tp_overlap`; Wang et al., "Overlap Communication with
Dependent Computation via Decomposition in Large Deep Learning Models", ASPLOS 2023) split
one GEMM over the sequence into one GEMM per chunk of the tp ring. :func:`matmul_into`
computes one of them into its slice of a preallocated output, ``out[:, r : r + m] = x @ wᵀ``
(``accumulate``: ``+=``), so the full product is assembled in place, with no concatenation.

``stage=(src, dst)`` also copies ``src`` into ``dst``: a chunk moving while this one is
multiplied. On CUDA the copy runs on a copy stream and the GEMM on the current stream,
ordered by events after the work queued before the call and before the work queued after
it (csrc/overlap/matmul_into_cuda.cu); on the CPU they run one after the other.

There is no autograd formula: the op is a building block of the autograd functions of
:mod:`plait.parallel.tp_overlap`, whose backward passes are ring collectives of their own.
"""

from __future__ import annotations

import torch

import plait  # noqa: F401  (loads plait._C, which defines torch.ops.plait.*)

__all__ = ["matmul_into", "matmul_into_reference"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def matmul_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, row_offset: int, *, accumulate: bool = False,
                stage: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``out[:, row_offset : row_offset + m] = x @ wᵀ`` (or ``+=``) in place; returns ``out``.

    ``x`` [B, m, k] and ``w`` [n, k] may have any strides (a transposed weight view, a slice of
    a longer sequence); ``out`` [B, M, n] needs unit stride along n, and must not overlap them.
    ``stage``: (src, dst) of a copy made meanwhile (see the module docstring).
    Raises RuntimeError naming the bad argument.
    """
    src, dst = stage if stage is not None else (None, None)
    torch.ops.plait.matmul_into(x, w, out, row_offset, accumulate, src, dst)
    return out


def matmul_into_reference(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, row_offset: int, *,
                          accumulate: bool = False, stage: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`matmul_into` in plain PyTorch (a product, then a copy into the slice)."""
    if stage is not None:
        stage[1].copy_(stage[0])
    product = torch.matmul(x, w.t())
    rows = out[:, row_offset:row_offset + x.shape[1]]
    if accumulate:
        rows.add_(product)
    else:
        rows.copy_(product)
    return out


@torch.library.register_fake("plait::matmul_into")
def _matmul_into_fake(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, row_offset: int, accumulate: bool = False,
                      stage_src: torch.Tensor | None = None, stage_dst: torch.Tensor | None = None) -> None:
    # The shape checks of matmul_into_check in csrc/overlap/matmul_into_cpu.cpp, in the same words (the
    # overlap checks need real addresses).
    torch._check(x.dim() == 3, lambda: f"matmul_into: x must be [B, m, k], got {x.dim()} dims {list(x.shape)}")
    torch._check(w.dim() == 2, lambda: f"matmul_into: w must be [n, k], got {w.dim()} dims {list(w.shape)}")
    torch._check(out.dim() == 3, lambda: f"matmul_into: out must be [B, M, n], got {out.dim()} dims {list(out.shape)}")
    torch._check(x.dtype in _DTYPES, lambda: f"matmul_into: x must be float32, float64, bfloat16 or float16, got {x.dtype}")
    torch._check(w.dtype == x.dtype and out.dtype == x.dtype,
                 lambda: f"matmul_into: x, w and out must have one dtype, got {x.dtype}, {w.dtype} and {out.dtype}")
    torch._check(x.shape[0] == out.shape[0], lambda: f"matmul_into: x has {x.shape[0]} batch rows but out has {out.shape[0]}")
    torch._check(x.shape[2] == w.shape[1], lambda: f"matmul_into: x [B, m, k] has k = {x.shape[2]} but w [n, k] has k = {w.shape[1]}")
    torch._check(w.shape[0] == out.shape[2], lambda: f"matmul_into: w [n, k] has n = {w.shape[0]} but out [B, M, n] has n = {out.shape[2]}")
    torch._check(0 <= row_offset and row_offset + x.shape[1] <= out.shape[1],
                 lambda: f"matmul_into: rows {row_offset} ... {row_offset + x.shape[1]} of the chunk do not fit out's {out.shape[1]} rows")
    torch._check((stage_src is None) == (stage_dst is None),
                 lambda: "matmul_into: stage_src and stage_dst come together (the copy source and its destination)")
