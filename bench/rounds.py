"""Timing helper shared by the distributed benchmark workers (not a benchmark itself: it has no ``run``)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


def interleaved_rounds(ways: dict[str, Callable[[], object]], *, warm: int, rounds: int,
                       order: random.Random) -> dict[str, list[float]]:
    """Run every way once per round, in an order drawn from ``order`` (seed it alike on every rank, so the
    ranks run the same way at once), each after a barrier of the default group; a time is the slowest
    rank's (a collective is done when every rank is). The first ``warm`` rounds are not kept."""
    import torch
    import torch.distributed as dist

    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(warm + rounds):
        names = list(ways)
        order.shuffle(names)
        for name in names:
            dist.barrier()
            start = time.perf_counter()
            ways[name]()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_ >= warm:
                times[name].append(float(elapsed))
    return times
