"""A differentiable all-to-all-v split in two: start it, do other work, wait for it; the same in the backward pass.

``pending = start(x, group, send, recv)`` puts the exchange on the wire and returns at once;
``wait(pending)`` returns the rows received. Both ends are autograd nodes, linked by a zero-size
*token* tensor, so the backward pass is split the same way: ``wait``'s backward starts the
reverse exchange of the gradient, ``start``'s backward waits for it. PyTorch's autograd engine
runs ready nodes latest-created first, so whatever was created between a start and its wait in
the forward pass (another chunk's expert computation, say) runs between them in the backward
pass too, while the exchange is on the wire.

Ledger: each exchange is recorded once, as ``all_to_all`` of the whole send buffer, when it
starts (the same bytes and calls as :func:`plait.parallel.comm.all_to_all_v`); the time a rank
then spends waiting is timed as blocked in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from plait.parallel.comm import LEDGER, Group


def _launch(x: torch.Tensor, group: Group, send: list[int], recv: list[int]) -> tuple[torch.Tensor, Any]:
    x = x.contiguous()
    LEDGER.record(group.axis, "all_to_all", x.numel() * x.element_size())
    out = x.new_empty((sum(recv), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send), group=group.pg,
                                  async_op=True)
    return out, work


def _finish(work: Any, group: Group) -> None:
    with LEDGER.blocked(group.axis, "all_to_all"):
        work.wait()


@dataclass(eq=False)
class Pending:
    """An all-to-all on the wire: ``token`` carries the autograd link from :func:`start` to :func:`wait`."""

    group: Group
    send: list[int]
    recv: list[int]
    token: torch.Tensor | None = None
    out: torch.Tensor | None = None
    work: Any = None
    grad_in: torch.Tensor | None = field(default=None, repr=False)  # the backward exchange's result
    grad_work: Any = field(default=None, repr=False)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, box: Pending) -> torch.Tensor:
        ctx.box = box
        box.out, box.work = _launch(x, box.group, box.send, box.recv)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token: torch.Tensor):
        box = ctx.box
        _finish(box.grad_work, box.group)
        grad, box.grad_in, box.grad_work = box.grad_in, None, None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: torch.Tensor, box: Pending) -> torch.Tensor:
        ctx.box = box
        ctx.token_shape = token.shape
        _finish(box.work, box.group)
        out, box.out, box.work = box.out, None, None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        box = ctx.box
        # the reverse exchange: what each peer received from us goes back to it
        box.grad_in, box.grad_work = _launch(grad, box.group, box.recv, box.send)
        return grad.new_zeros(ctx.token_shape), None


def start(x: torch.Tensor, group: Group, send: list[int], recv: list[int]) -> Pending:
    """Start exchanging rows ``send[j]`` of ``x`` with group rank j (receiving ``recv[j]`` from it)."""
    box = Pending(group=group, send=list(send), recv=list(recv))
    if group.size == 1:
        box.out = x
        return box
    box.token = _Start.apply(x, box)
    return box


def wait(box: Pending) -> torch.Tensor:
    """The rows received, in source order (differentiable)."""
    if box.group.size == 1:
        out, box.out = box.out, None
        return out
    return _Wait.apply(box.token, box)
