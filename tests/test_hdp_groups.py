"""Hybrid data parallelism's block groups: made once, on real gloo ranks, each reducing over exactly its block."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import run_distributed

from plait.parallel.hdp import BlockGroups
from plait.scheduler.dims import ParallelDims


def sums_in_blocks(rank: int, world: int, tp: int) -> dict:
    dims = ParallelDims.resolve(world, tp=tp)
    blocks = BlockGroups(dims)
    out = {"space": list(blocks.space), "index": blocks.index, "count": len(blocks), "sums": {}}
    g = 2
    while g <= blocks.size:
        start = blocks.index // g * g
        group = blocks.block(start, g)
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group.pg)
        out["sums"][g] = (start, list(group.ranks), value.item())
        g *= 2
    try:
        blocks.block((blocks.index // 2 * 2 + 2) % blocks.size, 2)
        out["other"] = "no error"
    except KeyError as err:
        out["other"] = str(err)
    return out


def test_every_aligned_block_reduces_over_its_own_ranks():
    results = run_distributed(sums_in_blocks, 4, args=(1,), timeout=120)
    for rank, got in enumerate(results):
        assert got["space"] == [0, 1, 2, 3] and got["index"] == rank
        assert got["count"] == 2  # the pair holding it and the whole space
        start, members, total = got["sums"][2]
        assert members == [start, start + 1] and total == start + start + 1
        assert got["sums"][4] == (0, [0, 1, 2, 3], 6.0)
        assert "is not in the aligned block of 2" in got["other"]


def test_the_space_is_the_ranks_of_one_tensor_parallel_position():
    results = run_distributed(sums_in_blocks, 4, args=(2,), timeout=120)
    for rank, got in enumerate(results):
        assert got["space"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert got["sums"][2] == (0, got["space"], float(sum(got["space"])))
