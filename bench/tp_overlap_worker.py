"""One of the two tp ranks of ``plait bench tp_overlap``; rank 0 prints the measurements as one JSON line.

``python -m plait.bench.tp_overlap_worker RANK MASTER_ADDR PORT SETTINGS_JSON``, with GLOO_SOCKET_IFNAME
set to the interface between the two ranks. SETTINGS_JSON: ``batch``, ``seq``, ``dim``, ``ffn``,
``rounds``, ``warm``, ``order_seed``, ``calibrate`` (time ``comm`` and ``compute`` only).

The region is a dense SwiGLU MLP split by :func:`plait.parallel.tp.apply_tp` over the two ranks, forward
and backward of one micro-batch; the four ways of running it share its weights and inputs:

* ``off``: plain TP+SP (all-gather, the GEMMs, reduce-scatter; the same in backward);
* ``on``: ``parallel.tp_overlap`` (the rings of :mod:`plait.parallel.tp_overlap`);
* ``comm``: the four rings of ``on`` with no GEMM in them: the transfers alone;
* ``compute``: the region's GEMMs and elementwise work on the whole sequence, with this rank's weight
  shards and no communication: the compute alone.
* ``comm_plain``: plain TP+SP's collectives alone (all-gather and reduce-scatter, forward and backward).

Each round runs the five once, in a random order (the same on both ranks), after a barrier; a
measurement is the slower rank's time (the region is done when both are).
"""

from __future__ import annotations

import copy
import json
import random
import sys
from datetime import timedelta
from statistics import median


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from plait.bench.rounds import interleaved_rounds
    from plait.parallel import comm
    from plait.parallel.comm import Group
    from plait.parallel.tp import apply_tp
    from plait.parallel.tp_overlap import all_gather_ring, reduce_scatter_ring
    from plait.runtime.models.layers import SwiGLU

    rank, master, port = int(argv[0]), argv[1], int(argv[2])
    settings = json.loads(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    group = Group(axis="tp", ranks=(0, 1), rank=rank, pg=dist.group.WORLD)
    B, T, dim, ffn = settings["batch"], settings["seq"], settings["dim"], settings["ffn"]
    n = T // 2

    torch.manual_seed(0)
    whole = nn.ModuleDict({"mlp": SwiGLU(dim, ffn)})
    whole["mlp"].reset_parameters(0.02, 0.02)
    plain, overlapped = copy.deepcopy(whole), copy.deepcopy(whole)
    apply_tp(plain, group)
    apply_tp(overlapped, group, overlap=True)
    alone = SwiGLU(dim, ffn // 2)  # this rank's shards, on the whole sequence, with no collective
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(alone, name).weight.copy_(getattr(plain["mlp"], name).weight)

    gen = torch.Generator().manual_seed(1)
    x_full = torch.randn(B, T, dim, generator=gen)
    dz_full = torch.randn(B, T, dim, generator=gen)
    rows = slice(rank * n, (rank + 1) * n)
    x_local, dz_local = x_full[:, rows].contiguous(), dz_full[:, rows].contiguous()

    def region(module: nn.Module) -> torch.Tensor:
        x = x_local.clone().requires_grad_()
        z = module["mlp"](x)
        z.backward(dz_local)
        return torch.cat([z.detach().flatten(), x.grad.flatten()])

    def compute() -> None:
        x = x_full.clone().requires_grad_()
        alone(x).backward(dz_full)

    def transfers() -> None:
        def copy_only(row: int, piece: torch.Tensor, stage) -> None:  # the ring's own send-buffer copies
            if stage is not None:
                stage[1].copy_(stage[0])

        def zeros(row: int, out: torch.Tensor) -> None:
            out.zero_()

        for _ in range(2):  # forward: gather then scatter; backward: the same two rings
            all_gather_ring(x_local, group, copy_only)
            reduce_scatter_ring((B, n, dim), x_local, group, zeros)

    def collectives() -> None:  # plain TP+SP's communication alone: all-gather and reduce-scatter, twice
        for _ in range(2):
            comm.all_gather(x_local, group, 1)
            comm.reduce_scatter(x_full, group, 1)

    runs = {"off": lambda: region(plain), "on": lambda: region(overlapped), "comm": transfers, "compute": compute,
            "comm_plain": collectives}
    if settings["calibrate"]:  # only what sizes the link
        runs = {"comm": transfers, "compute": compute}
    # Same math: the overlapped region's output and input gradient against the plain one's.
    same_math = float((region(plain) - region(overlapped)).abs().max())
    comm.LEDGER.reset()
    region(overlapped)
    ring_bytes = comm.LEDGER.snapshot()
    times = interleaved_rounds(runs, warm=settings["warm"], rounds=settings["rounds"],
                               order=random.Random(settings["order_seed"]))
    if rank == 0:
        print(json.dumps({"times_s": times, "median_s": {k: median(v) for k, v in times.items()},
                          "same_math_max_abs": same_math, "ring_ledger": ring_bytes}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from plait.parallel.teardown import run_and_exit

    run_and_exit(main, sys.argv[1:])
