"""``parallel.ep_overlap``: a MoE layer's expert all-to-alls in two chunks, one on the wire while the other computes.

The parity checks of the layout matrix (:mod:`test_parallel_parity`: every step redone by plain PyTorch from the
layout's own state, and free-running against one process), with the overlap on, for ep over all ranks and for
ep × etp; the first step's ledger equals the closed form with its two chunks. And the async all-to-all itself:
values and gradients equal the blocking exchange's, bit for bit (it moves the same numbers).
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from parity import GLOBAL_BATCH, MODEL, run_layout, train_config
from parity_checks import Report, compare_free_running, compare_replay
from test_parallel_parity import MICRO, STEPS, TOKENS, reference

from plait.errors import ConfigError
from plait.parallel.comm import merge_snapshots
from plait.parallel.config import ParallelConfig
from plait.runtime.config import model_spec
from plait.runtime.models import ModelConfig
from plait.scheduler.comm_volume import Layout, step_volume
from plait.scheduler.dims import ParallelDims


def check(world: int, sizes: dict) -> Report:
    ref = reference("moe", MICRO)
    ranks = run_distributed(run_layout, world=world, args=("moe", sizes, MICRO, STEPS, {"ep_overlap": True}), timeout=600)
    got = ranks[0]
    dims = ParallelDims.resolve(world, **sizes)
    layout = Layout(world=world, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep, etp=dims.etp)
    expected = step_volume(model_spec(ModelConfig(kind="moe", **MODEL)), layout, global_batch=GLOBAL_BATCH,
                           micro_batch=MICRO, ep_overlap=True)
    measured = {axis: {op: v["bytes"] for op, v in ops.items()} for axis, ops in merge_snapshots([r["ledger"] for r in ranks]).items()}
    assert measured == expected
    report = Report()
    compare_replay(got, got["replay"], train_config(STEPS, MICRO), report, TOKENS)
    compare_free_running(got, ref, report)
    return report


@pytest.mark.parametrize("world, sizes", [(2, dict(ep=2)), (4, dict(cp=2, dp=2, ep=2, etp=2))],
                         ids=["ep2", "cp2-dp2-ep2-etp2"])
def test_parity_with_the_exchanges_overlapped(world, sizes):
    report = check(world, sizes)  # raises, naming the element and the bound, on any difference past it
    assert report.worst and max(report.worst.values()) <= 1


def exchange(rank: int, world: int) -> dict:
    from plait.parallel import a2a_async, comm
    from plait.parallel.mesh import ParallelMeshes

    meshes = ParallelMeshes(ParallelDims.resolve(world, ep=world))
    ep = meshes.group("ep")
    gen = torch.Generator().manual_seed(rank)
    send = [1 + (rank + j) % 3 for j in range(world)]
    recv = [1 + (j + rank) % 3 for j in range(world)]  # what peer j sends to this rank
    x = torch.randn(sum(send), 5, generator=gen, requires_grad=True)
    w = torch.randn(sum(recv), 5, generator=gen)
    blocking = comm.all_to_all_v(x, ep, send, recv)
    (blocking * w).sum().backward()
    grad_blocking, x.grad = x.grad.clone(), None
    pending = a2a_async.start(x, ep, send, recv)
    between = torch.randn(3)  # other work while the rows travel
    rows = a2a_async.wait(pending)
    (rows * w).sum().backward()
    return {"forward": torch.equal(rows, blocking), "backward": torch.equal(x.grad, grad_blocking),
            "between": between.numel()}


def test_the_split_all_to_all_moves_the_same_numbers_both_ways():
    for got in run_distributed(exchange, 3, timeout=120):
        assert got["forward"] and got["backward"]


@pytest.mark.parametrize("over, match", [(dict(capacity_factor=1.25), "capacity_factor"),
                                         (dict(ep_compress="lsh"), "ep_compress")])
def test_what_it_does_not_chunk_is_refused_by_name(over, match):
    with pytest.raises(ConfigError, match="parallel.ep_overlap") as err:
        ParallelConfig(ep_overlap=True, **over).validate()
    assert match in str(err.value)
