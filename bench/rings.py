"""Reduce-scatter and all-gather as rings of point-to-point transfers (`plait.parallel.rings`) against gloo's own.

2 and 4 processes on this machine (loopback, one thread each), fp32 buffers of 1, 7.6 (the demo model's
gradient) and 32 MB. Each round runs every way once, in a random order (the same on every rank), after a
barrier; a time is the slowest rank's, and each way's figure is the median over rounds:

* ``gloo_all_reduce``: ``dist.all_reduce`` of the buffer (what DDP runs);
* ``gloo_reduce_scatter``: ``dist.reduce_scatter_tensor``;
* ``ring_reduce_scatter``: :func:`plait.parallel.rings.reduce_scatter` on the calling thread;
* ``ring_reduce_scatter_started``: :func:`~plait.parallel.rings.reduce_scatter_start`, then ``wait()`` (the
  data-parallel pieces' form: the ring on its group's own thread);
* ``gloo_all_gather``: ``dist.all_gather_into_tensor`` of a 1/g shard;
* ``ring_all_gather``: :func:`plait.parallel.rings.all_gather`.

The record also holds, per size, the largest difference between the ring's and gloo's reduce-scatter
(sums in different orders: a few fp32 ulps of the sum) and whether the all-gathers agree exactly.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from datetime import timedelta
from statistics import median
from typing import Any

from plait.bench.links import run_pair

NAME = "rings"
SIZES_MB = (1.0, 7.6, 32.0)
WORLDS = (2, 4)
WORKER_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world: int, port: int, settings: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from plait.bench.rounds import interleaved_rounds
    from plait.parallel import rings

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    pg, ranks = dist.group.WORLD, tuple(range(world))
    order = random.Random(settings["seed"])
    results = {}
    for mb in settings["sizes_mb"]:
        n = int(mb * 1e6 / 4) // world * world
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(n, generator=gen)
        reduced, shard, full = torch.empty(n), torch.empty(n // world), torch.empty(n)
        ring_out, gloo_out = torch.empty(n // world), torch.empty(n // world)
        ring_full, gloo_full = torch.empty(n), torch.empty(n)
        shard.copy_(x[:n // world])

        def all_reduce():
            reduced.copy_(x)
            dist.all_reduce(reduced)

        ways = {
            "gloo_all_reduce": all_reduce,
            "gloo_reduce_scatter": lambda: dist.reduce_scatter_tensor(gloo_out, x),
            "ring_reduce_scatter": lambda: rings.reduce_scatter(ring_out, x, ranks, rank, pg),
            "ring_reduce_scatter_started": lambda: rings.reduce_scatter_start(ring_out, x, ranks, rank, pg).wait(),
            "gloo_all_gather": lambda: dist.all_gather_into_tensor(gloo_full, shard),
            "ring_all_gather": lambda: rings.all_gather(ring_full, shard, ranks, rank, pg),
        }
        times = interleaved_rounds(ways, warm=settings["warm"], rounds=settings["rounds"], order=order)
        diff = torch.tensor([float((ring_out - gloo_out).abs().max()), float(gloo_out.abs().max())])
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        gathered_equal = torch.tensor([float(torch.equal(ring_full, gloo_full))])
        dist.all_reduce(gathered_equal, op=dist.ReduceOp.MIN)
        results[str(mb)] = {"elements": n, "times_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()},
                            "median_ms": {k: round(median(v) * 1e3, 3) for k, v in times.items()},
                            "reduce_scatter_max_abs_diff": float(diff[0]), "reduce_scatter_max_abs": float(diff[1]),
                            "all_gather_equal": bool(gathered_equal[0])}
    if rank == 0:
        print(json.dumps(results), flush=True)


def _measure(world: int, settings: dict[str, Any]) -> dict[str, Any]:
    port = _free_port()
    commands = [[sys.executable, "-m", "plait.bench.rings", str(rank), str(world), str(port), json.dumps(settings)]
                for rank in range(world)]
    return run_pair(commands, dict(os.environ), WORKER_TIMEOUT_S, f"rings at {world} ranks")


def run(quick: bool = False) -> dict[str, Any]:
    settings = {"sizes_mb": [1.0] if quick else list(SIZES_MB), "rounds": 3 if quick else 15,
                "warm": 1 if quick else 3, "seed": 0}
    rows = []
    for world in (2,) if quick else WORLDS:
        for mb, row in _measure(world, settings).items():
            m = row["median_ms"]
            row.update(world=world, mb=float(mb),
                       ring_rs_over_gloo_rs=round(m["ring_reduce_scatter"] / m["gloo_reduce_scatter"], 3),
                       ring_rs_over_gloo_all_reduce=round(m["ring_reduce_scatter"] / m["gloo_all_reduce"], 3),
                       ring_ag_over_gloo_ag=round(m["ring_all_gather"] / m["gloo_all_gather"], 3))
            rows.append(row)
            print(f"rings: {world} ranks, {float(mb):g} MB: reduce-scatter ring {m['ring_reduce_scatter']:.2f} ms "
                  f"(started {m['ring_reduce_scatter_started']:.2f}) vs gloo {m['gloo_reduce_scatter']:.2f} "
                  f"(all-reduce {m['gloo_all_reduce']:.2f}); all-gather ring {m['ring_all_gather']:.2f} vs gloo "
                  f"{m['gloo_all_gather']:.2f}", flush=True)
    return {"settings": settings, "rows": rows}


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(_worker, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
