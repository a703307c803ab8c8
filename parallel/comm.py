"""Every collective plait's parallel code issues, and the ledger that counts them.

All parallel code calls collectives through this module, never ``torch.distributed``
directly, so that each call is recorded in :data:`LEDGER` as (mesh axis, operation,
bytes). The byte count is always *what this rank hands to the collective*:

=================  =====================================================
operation          bytes recorded on each participating rank
=================  =====================================================
``all_reduce``     the tensor reduced
``all_gather``     this rank's input shard
``reduce_scatter`` the full input (group size × the shard it gets back)
``all_to_all``     the whole send buffer (including the part kept locally)
``send``           the tensor sent (the receiver records nothing)
``broadcast``      the tensor, on every rank of the group
=================  =====================================================

Summed over the ranks of a job, these are the volumes the planner's closed forms
(:mod:`plait.scheduler.comm_volume`) predict. A group of size 1 issues nothing and
records nothing.

The autograd functions here are the building blocks of TP/SP, CP and EP: each names its
backward collective, which is recorded when the backward pass runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from plait.parallel import rings


class Ledger:
    """Bytes and calls per (axis, operation) on this rank since the last :meth:`reset`.

    It also times the blocking collectives (:meth:`blocked`): ``comm_s`` is the time this
    rank spent inside them since the reset (waiting for its peers included), and
    ``current``/``since`` name the one in flight, and ``phase`` the part of the step, for the control plane's heartbeats
    (read from another thread: plain attributes, written whole).
    """

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.enabled = True
        self.comm_s = 0.0
        self.current = ""  # "axis:op" of the collective this rank is blocked in, "" when none
        self.since = 0.0  # time.perf_counter() when it began
        self.phase = "idle"  # forward | backward while the engine computes them; the runtime sets the others

    @contextmanager
    def blocked(self, axis: str, op: str) -> Iterator[None]:
        """Time a blocking collective and name it while it runs."""
        self.since = start = time.perf_counter()
        self.current = f"{axis}:{op}"
        try:
            yield
        finally:
            self.current = ""
            self.comm_s += time.perf_counter() - start

    def record(self, axis: str, op: str, nbytes: int) -> None:
        if self.enabled:
            self.bytes[(axis, op)] += int(nbytes)
            self.calls[(axis, op)] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.comm_s = 0.0

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{axis: {op: {"bytes": b, "calls": c}}}``, sorted, as plain data."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (axis, op) in sorted(self.bytes):
            out.setdefault(axis, {})[op] = {"bytes": self.bytes[(axis, op)], "calls": self.calls[(axis, op)]}
        return out

    def total_by_axis(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for (axis, _), n in self.bytes.items():
            totals[axis] += n
        return dict(sorted(totals.items()))


LEDGER = Ledger()


def merge_snapshots(snapshots: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Sum several ranks' :meth:`Ledger.snapshot` values."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for snap in snapshots:
        for axis, ops in snap.items():
            for op, v in ops.items():
                slot = out.setdefault(axis, {}).setdefault(op, {"bytes": 0, "calls": 0})
                slot["bytes"] += v["bytes"]
                slot["calls"] += v["calls"]
    return {a: dict(sorted(ops.items())) for a, ops in sorted(out.items())}


@dataclass(frozen=True, eq=False)
class Group:
    """A process group along one or more mesh axes, as this rank sees it.

    ``axis`` is the ledger label: one axis name ("tp") or several joined by "+"
    ("dp+cp"). ``ranks`` are the global ranks of the group in group-rank order.
    """

    axis: str
    ranks: tuple[int, ...]
    rank: int  # this process's index in ``ranks``
    pg: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def single(cls, axis: str) -> Group:
        """A trivial group of this process only (size 1: every collective is a no-op)."""
        me = dist.get_rank() if dist.is_initialized() else 0
        return cls(axis=axis, ranks=(me,), rank=0, pg=None)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- plain collectives


def all_reduce(t: torch.Tensor, group: Group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In place; returns ``t``."""
    if group.size > 1:
        LEDGER.record(group.axis, "all_reduce", _nbytes(t))
        with LEDGER.blocked(group.axis, "all_reduce"):
            dist.all_reduce(t, op=op, group=group.pg)
    return t


def all_reduce_async(t: torch.Tensor, group: Group):
    """Start summing ``t`` over ``group`` in place; returns the handle for :func:`wait` (None: a group of one)."""
    if group.size == 1:
        return None
    LEDGER.record(group.axis, "all_reduce", _nbytes(t))
    return dist.all_reduce(t, group=group.pg, async_op=True)


def all_reduce_ring_async(t: torch.Tensor, group: Group):
    """Start summing the contiguous 1-D ``t`` (a multiple of the group size long) over ``group`` in place; returns
    the handle for :func:`wait` (None: a group of one). ``t`` must not be touched until then.

    Over gloo on CPU tensors the sum runs as a reduce-scatter ring then an all-gather ring on the group's own
    thread (:func:`plait.parallel.rings.all_reduce_start`), summed in one fixed order, so every rank and every run
    gets the same bits; elsewhere it is the backend's all-reduce. Recorded as one ``all_reduce`` of ``t``."""
    if group.size == 1:
        return None
    if t.numel() % group.size:
        raise ValueError(f"all_reduce over {group.axis}: {t.numel()} elements are not divisible by {group.size}")
    LEDGER.record(group.axis, "all_reduce", _nbytes(t))
    if rings.usable(group.pg, t):
        return rings.all_reduce_start(t, group.ranks, group.rank, group.pg)
    return dist.all_reduce(t, group=group.pg, async_op=True)


def broadcast(t: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """In place from group rank ``src``; returns ``t``."""
    if group.size > 1:
        LEDGER.record(group.axis, "broadcast", _nbytes(t))
        with LEDGER.blocked(group.axis, "broadcast"):
            dist.broadcast(t, src=group.ranks[src], group=group.pg)
    return t


def all_gather(t: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (group-rank order)."""
    if group.size == 1:
        return t
    LEDGER.record(group.axis, "all_gather", _nbytes(t))
    moved = t.movedim(dim, 0).contiguous()
    out = moved.new_empty((group.size * moved.shape[0], *moved.shape[1:]))
    with LEDGER.blocked(group.axis, "all_gather"):
        if rings.usable(group.pg, moved):  # gloo: a ring of point-to-point transfers is faster (plait.parallel.rings)
            rings.all_gather(out, moved, group.ranks, group.rank, group.pg)
        else:
            dist.all_gather_into_tensor(out, moved, group=group.pg)
    return out.movedim(0, dim)


def reduce_scatter(t: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, then keep this rank's ``1/size`` slice along ``dim``."""
    if group.size == 1:
        return t
    if t.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter over {group.axis}: dim {dim} of size {t.shape[dim]} is not divisible by {group.size}")
    LEDGER.record(group.axis, "reduce_scatter", _nbytes(t))
    moved = t.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    with LEDGER.blocked(group.axis, "reduce_scatter"):
        if rings.usable(group.pg, moved):  # gloo: a ring of point-to-point transfers is faster (plait.parallel.rings)
            rings.reduce_scatter(out, moved, group.ranks, group.rank, group.pg)
        else:
            dist.reduce_scatter_tensor(out, moved, group=group.pg)
    return out.movedim(0, dim)


def reduce_scatter_async(out: torch.Tensor, t: torch.Tensor, group: Group):
    """Start summing the contiguous 1-D ``t`` over ranks into this rank's ``1/size`` slice ``out``; returns the
    handle to pass to :func:`wait` (None: a group of one, copied at once). ``t`` and ``out`` must not be touched
    until then.

    Over gloo on CPU tensors the sum runs as a ring of point-to-point transfers on the group's own thread
    (:func:`plait.parallel.rings.reduce_scatter_start`): it moves half the bytes of an all-reduce and, on 2
    and 4 processes, takes 0.3–0.8× the time of gloo's all-reduce and 0.16–0.7× that of its reduce-scatter
    (``plait bench rings``)."""
    if group.size == 1:
        out.copy_(t)
        return None
    LEDGER.record(group.axis, "reduce_scatter", _nbytes(t))
    if rings.usable(group.pg, out, t):
        return rings.reduce_scatter_start(out, t, group.ranks, group.rank, group.pg)
    return dist.reduce_scatter_tensor(out, t, group=group.pg, async_op=True)


def wait(work, group: Group, op: str) -> None:
    """Wait for an asynchronous collective (timed as a blocking one: what is left of it when the caller needs it)."""
    if work is not None:
        with LEDGER.blocked(group.axis, op):
            work.wait()


def all_to_all(t: torch.Tensor, group: Group, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """Rows ``send_splits[j]`` of ``t`` go to group rank j; returns the rows received, in source order."""
    if group.size == 1:
        return t
    LEDGER.record(group.axis, "all_to_all", _nbytes(t))
    t = t.contiguous()
    out = t.new_empty((sum(recv_splits), *t.shape[1:]))
    with LEDGER.blocked(group.axis, "all_to_all"):
        dist.all_to_all_single(out, t, output_split_sizes=list(recv_splits), input_split_sizes=list(send_splits),
                               group=group.pg)
    return out


def isend(t: torch.Tensor, dst: int, axis: str = "pp", tag: int = 0) -> dist.Work:
    """Asynchronous point-to-point send to global rank ``dst``."""
    LEDGER.record(axis, "send", _nbytes(t))
    return dist.isend(t.contiguous(), dst=dst, tag=tag)


def ring_shift(send: torch.Tensor, recv: torch.Tensor, group: Group, tag: int = 0) -> list[dist.Work]:
    """Start one step of a ring over ``group``: ``send`` goes to the next group rank (wrapping), ``recv`` is
    filled from the previous one. Returns the handles to pass to :func:`wait_all`.

    Both buffers must be contiguous (they are the wire). The ledger records ``send`` as a ``send`` on the
    group's axis: a ring all-gather or reduce-scatter over g ranks then shows its g − 1 sends per rank, the
    bytes that really cross the links, not the collective it stands for. ``tag`` tells apart the messages of
    one ring that are in flight at once."""
    nxt = group.ranks[(group.rank + 1) % group.size]
    prev = group.ranks[(group.rank - 1) % group.size]
    LEDGER.record(group.axis, "send", _nbytes(send))
    return [dist.isend(send, dst=nxt, group=group.pg, tag=tag), dist.irecv(recv, src=prev, group=group.pg, tag=tag)]


def wait_all(works: list[dist.Work], group: Group, op: str = "send") -> None:
    """Wait for the handles of :func:`ring_shift` (timed as a blocking collective: what is left of the transfer)."""
    if works:
        with LEDGER.blocked(group.axis, op):
            for work in works:
                work.wait()


def recv(t: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
    """Blocking receive into ``t`` from global rank ``src`` (not recorded: the sender records it)."""
    with LEDGER.blocked("pp", "recv"):
        dist.recv(t, src=src, tag=tag)
    return t


# ----------------------------------------------------------------------------- autograd building blocks


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None


class _SplitTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return x.chunk(group.size, dim)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_splits, recv_splits):
        ctx.group, ctx.send, ctx.recv = group, send_splits, recv_splits
        return all_to_all(x, group, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group, ctx.recv, ctx.send), None, None, None


def gather_from(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Forward all-gather along ``dim``; backward reduce-scatter (sequence-parallel entry, CP K/V)."""
    return x if group.size == 1 else _GatherFrom.apply(x, group, dim)


def scatter_to(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Forward reduce-scatter along ``dim``; backward all-gather (sequence-parallel exit)."""
    return x if group.size == 1 else _ScatterTo.apply(x, group, dim)


def reduce_from(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward all-reduce; backward identity."""
    return x if group.size == 1 else _ReduceFrom.apply(x, group)


def copy_to(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward identity; backward all-reduce."""
    return x if group.size == 1 else _CopyTo.apply(x, group)


def split_to(x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Forward: this rank's chunk along ``dim``; backward all-gather."""
    return x if group.size == 1 else _SplitTo.apply(x, group, dim)


def all_to_all_v(x: torch.Tensor, group: Group, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """Differentiable all-to-all-v along dim 0; backward is the reverse exchange."""
    return x if group.size == 1 else _AllToAll.apply(x, group, list(send_splits), list(recv_splits))


def gather_objects(obj: object, group: Group, dst: int = 0) -> list[object] | None:
    """Pickled objects of every rank of ``group`` on group rank ``dst`` (None elsewhere).

    For state conversion, not for training steps: not recorded in the ledger.
    """
    if group.size == 1:
        return [obj]
    out: list[object] | None = [None] * group.size if group.rank == dst else None
    dist.gather_object(obj, out, dst=group.ranks[dst], group=group.pg)
    return out
