"""Hybrid data parallelism's process groups: every aligned power-of-two block of the dp × cp ranks, made once.

A step's plan (:func:`plait.scheduler.balance.balance`) splits a long sequence over an
aligned block of g ranks of the dp × cp space (ranks ``start … start+g−1`` of that space,
``start`` a multiple of g). Because blocks are aligned and sized in powers of two, a space
of R ranks has only R − 1 such blocks of two or more ranks; making them all when the job
starts means no step ever creates a process group. The space is the ranks that share a
pipeline stage and a tensor-parallel position (the ``dp+cp`` groups), so tensor, pipeline
and expert parallelism around it are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.parallel.comm import Group
from plait.parallel.cp import ContextParallelAttention, attention_modules, zigzag_positions
from plait.scheduler.balance import Plan
from plait.scheduler.dims import MeshAxis, ParallelDims


class BlockGroups:
    """This rank's :class:`Group` for every aligned power-of-two block of its dp × cp space that holds it.

    Construction is a collective (every rank creates every group, in the same order).
    """

    def __init__(self, dims: ParallelDims):
        spaces = dims.groups((MeshAxis.DP, MeshAxis.CP))
        size = len(spaces[0])
        if size & (size - 1):
            raise ValueError(f"hybrid data parallelism splits sequences over power-of-two blocks: dp × cp = {size} "
                             f"must be a power of two")
        self.size = size
        self.rank = dist.get_rank()
        self.space: tuple[int, ...] = ()
        self._mine: dict[tuple[int, int], Group] = {}
        for space in spaces:
            if self.rank in space:
                self.space = tuple(space)
            g = 2
            while g <= size:
                for start in range(0, size, g):
                    members = space[start:start + g]
                    pg = dist.new_group(members)
                    if self.rank in members:
                        self._mine[(start, g)] = Group(axis="hdp", ranks=tuple(members),
                                                       rank=members.index(self.rank), pg=pg)
                g *= 2
        self.index = self.space.index(self.rank)  # this rank's place in its dp × cp space

    def block(self, start: int, size: int) -> Group:
        """The group of block ``start … start+size−1`` (positions in the dp × cp space); this rank must be in it."""
        found = self._mine.get((start, size))
        if found is None:
            raise KeyError(f"rank {self.rank} (position {self.index} of its dp × cp space) is not in the aligned "
                           f"block of {size} at {start}")
        return found

    def __len__(self) -> int:
        return len(self._mine)


IGNORE = -100  # target of a padding token: no loss


def forward_backward(model: nn.Module, blocks: BlockGroups, plan: Plan, documents: list[tuple[torch.Tensor, torch.Tensor]],
                     total_tokens: int) -> torch.Tensor:
    """Run this rank's share of a step's plan, forward and backward: gradients accumulate into ``model``.

    Split sequences come first, in the plan's order, so every rank of a block reaches the block's
    sequence together; each is padded at its end to a multiple of 2·g (padding attends only to
    itself and has no loss), cut zig-zag and attended with its K and V gathered over the block.
    Then this rank's whole sequences, packed into one row, each attending only to itself. The loss
    is the sum of token losses over ``total_tokens`` (the token mean of the whole global batch), so
    summing gradients over the dp × cp space gives one process's gradients. Returns this rank's loss
    sum (float64, detached).
    """
    total = torch.zeros((), dtype=torch.float64)
    me = blocks.index
    for group in plan.groups:
        if group.size == 1 or me not in group.ranks:
            continue
        (i,) = group.sequences
        x, y = documents[i]
        length = x.numel()
        padded = -(-length // (2 * group.size)) * (2 * group.size)
        xp = torch.cat((x, x.new_zeros(padded - length)))
        yp = torch.cat((y, y.new_full((padded - length,), IGNORE)))
        block = blocks.block(group.start, group.size)
        positions = zigzag_positions(padded, group.size, block.rank)
        attention = attention_modules(model)
        for m in attention:
            m.attend = ContextParallelAttention(block, padded)
        try:
            logits = model(xp[positions][None], positions=positions)
        finally:
            for m in attention:
                del m.attend
        loss = F.cross_entropy(logits.float().flatten(0, 1), yp[positions], ignore_index=IGNORE, reduction="sum")
        (loss / total_tokens).backward()
        total += loss.detach().double()
    whole = [i for g in plan.groups if g.size == 1 and g.start == me for i in g.sequences]
    if whole:
        x = torch.cat([documents[i][0] for i in whole])[None]
        y = torch.cat([documents[i][1] for i in whole])
        logits = model(x, documents=[[documents[i][0].numel() for i in whole]])
        loss = F.cross_entropy(logits.float().flatten(0, 1), y, reduction="sum")
        (loss / total_tokens).backward()
        total += loss.detach().double()
    return total


def reduce_gradients(model: nn.Module, blocks: BlockGroups) -> None:
    """Sum every gradient over this rank's dp × cp space (each rank holds the grads of its own tokens)."""
    whole = blocks.block(0, blocks.size) if blocks.size > 1 else None
    if whole is None:
        return
    for p in model.parameters():
        if p.grad is None:  # a rank without tokens this step, or an expert no token reached: still reduces
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=whole.pg)
