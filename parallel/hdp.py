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

import torch.distributed as dist

from plait.parallel.comm import Group
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
