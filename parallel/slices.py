"""Where each of this rank's tensors sits in the single-process model: global names, shapes and offsets.

A resharding checkpoint stores every tensor under its *global* name, cut into chunks at
global offsets, so that any layout (or one plain process) can read the parts it needs.
This module says, for one rank of a :class:`~plait.parallel.engine.ParallelEngine`, which
chunks its local state is made of, with no collective and no copy:

* a parameter is stored under its name in the plain model's ``state_dict()`` (the engine
  keeps global names, see :func:`plait.parallel.pp.split_model`); its local tensor is one
  box of the global one, at offsets composed from ``_plait_shards`` in the order the
  apply_* functions split it (``chunk(group.size, dim)[group.rank]`` each time);
* the AdamW moments live in flat ZeRO buckets (:mod:`plait.parallel.dp`): each rank owns
  a contiguous range of each piece of a bucket, which covers whole parameters and possibly
  the tail of one and the head of another. A contiguous range of a row-major tensor is a union of at
  most ``2·ndim − 1`` boxes (:func:`flat_range_boxes`); each box is stored under
  ``optim.exp_avg.<name>`` / ``optim.exp_avg_sq.<name>`` at its global offsets;
* the optimizer's step count, the same in every bucket, is ``optim.step`` (a scalar).

One writer per chunk: a parameter's local box is the same on every rank of its gradient
reduction group (the replicas), so the group's rank 0 writes it; the optimizer ranges are
disjoint by construction (every element is owned by exactly one rank), so each rank
writes all of its own; with replicated optimizer state (``parallel.zero: false``) every rank of
a group owns the whole bucket, and the group's rank 0 writes it; global rank 0 writes the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plait.parallel.engine import ParallelEngine

OPTIM_STEP = "optim.step"
MOMENTS = ("exp_avg", "exp_avg_sq")


def optim_name(moment: str, param: str) -> str:
    return f"optim.{moment}.{param}"


@dataclass(frozen=True)
class Slice:
    """One box of a global tensor held by this rank.

    ``key`` names the local tensor as in ``engine.local_tensors()``; the box is its flat
    elements ``[start, start + numel)`` viewed as ``sizes`` (always contiguous).
    """

    key: str
    start: int
    name: str  # global name
    shape: tuple[int, ...]  # global shape
    offsets: tuple[int, ...]  # of the box in the global tensor
    sizes: tuple[int, ...]
    writer: bool  # this rank is the one that stores this box

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def view(self, local: torch.Tensor) -> torch.Tensor:
        """The box inside ``local`` (the tensor named ``key``), as a view."""
        return local.reshape(-1)[self.start : self.start + self.numel].view(self.sizes)


def flat_range_boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Elements ``[lo, hi)`` of a row-major tensor of ``shape`` as boxes ``(offsets, sizes, flat start)``."""
    if lo >= hi:
        return []
    if len(shape) == 0:
        return [((), (), 0)]
    if len(shape) == 1:
        return [((lo,), (hi - lo,), lo)]
    inner = math.prod(shape[1:])
    r0, rem0 = divmod(lo, inner)
    r1, rem1 = divmod(hi, inner)

    def in_row(row: int, a: int, b: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        return [((row, *o), (1, *s), row * inner + f) for o, s, f in flat_range_boxes(shape[1:], a, b)]

    if r0 == r1:
        return in_row(r0, rem0, rem1)
    out = []
    if rem0:
        out += in_row(r0, rem0, inner)
        r0 += 1
    if r1 > r0:
        out.append(((r0, *[0] * (len(shape) - 1)), (r1 - r0, *shape[1:]), r0 * inner))
    if rem1:
        out += in_row(r1, 0, rem1)
    return out


def param_box(engine: ParallelEngine, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global shape, offsets) of this rank's part of parameter ``name``."""
    param = engine.params[name]
    shards = getattr(param, "_plait_shards", ())
    shape = list(param.shape)
    for axis, dim in shards:
        shape[dim] *= engine.meshes.group(axis).size
    offsets = [0] * len(shape)
    remaining = list(shape)
    for axis, dim in shards:
        g = engine.meshes.group(axis)
        remaining[dim] //= g.size
        offsets[dim] += g.rank * remaining[dim]
    return tuple(shape), tuple(offsets)


def local_slices(engine: ParallelEngine) -> list[Slice]:
    """Every box of this rank's parameters and optimizer state (see the module docstring)."""
    out: list[Slice] = []
    boxes = {name: param_box(engine, name) for name in engine.params}
    for name, param in sorted(engine.params.items()):
        shape, offsets = boxes[name]
        reduce_group = engine.meshes.group(getattr(param, "_plait_reduce", "dp+cp+tp"))
        out.append(Slice(f"param.{name}", 0, name, shape, offsets, tuple(param.shape), reduce_group.rank == 0))
    # Under CO2 each replica owns every range once (its groups stay inside it): replica 0 writes the moments.
    moment_writer = engine.optimizer.replicas is None or engine.optimizer.replicas[0] == 0
    for i, bucket in enumerate(engine.optimizer.buckets):
        # replicated optimizer state (parallel.zero=false): every rank of the group holds it all; its first writes it
        writer = moment_writer and (bucket.zero or bucket.group.rank == 0)
        for lo, hi, shard_at in bucket.owned_ranges():  # the rank's part of each piece of the flat buffer
            for name, p, at in zip(bucket.names, bucket.params, bucket.offsets):
                a, b = max(lo, at), min(hi, at + p.numel())
                if a >= b:
                    continue
                shape, base = boxes[name]
                for box_offsets, sizes, start in flat_range_boxes(tuple(p.shape), a - at, b - at):
                    global_offsets = tuple(o + g for o, g in zip(box_offsets, base))
                    for moment in MOMENTS:
                        out.append(Slice(f"optim.{i}.{moment}", shard_at + at + start - lo, optim_name(moment, name),
                                         shape, global_offsets, sizes, writer))
    if engine.optimizer.buckets:
        out.append(Slice("optim.0.step", 0, OPTIM_STEP, (), (), (), engine.meshes.rank == 0))
    return out


def global_shapes(engine: ParallelEngine) -> dict[str, list[int]]:
    """Every parameter of this rank under its global name and shape (the plain model's, for its stage)."""
    return {name: list(param_box(engine, name)[0]) for name in sorted(engine.params)}
