"""The multi-process harness itself: results come back, failures and hangs are reported."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from harness import DistributedTestError, run_distributed


def _all_reduce_body(rank: int, world: int, scale: float) -> float:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return float(t)


def _failing_body(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()


def _hanging_body(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(600)
    dist.barrier()


def test_results_come_back_from_every_rank():
    assert run_distributed(_all_reduce_body, world=4, args=(2.0,)) == [12.0] * 4


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank one is broken on purpose"):
        run_distributed(_failing_body, world=2, timeout=60)


def test_a_hang_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_hanging_body, world=2, timeout=8)
    assert time.monotonic() - start < 30
