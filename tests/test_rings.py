"""plait.parallel.rings on real gloo ranks: the reduce-scatter is the sum in its documented order (and within
float rounding of an fp64 sum), the all-gather is exact, the all-reduce is the two of them in place (the same
bits on every rank), the started forms equal the blocking ones, run while the caller goes on, and a
subgroup's ring stays inside it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from harness import run_distributed

from plait.parallel import comm, rings
from plait.parallel.comm import Group


def _inputs(world: int, m: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    # mixed magnitudes, so that a different summation order would change low bits
    return [torch.randn(world * m, generator=gen) * 10.0 ** torch.randint(-3, 4, (world * m,), generator=gen)
            for _ in range(world)]


def _ordered_sum(xs: list[torch.Tensor], r: int, m: int) -> torch.Tensor:
    """((x_{r+1} + x_{r+2}) + …) + x_r on chunk r, group ranks wrapping: the module docstring's order."""
    g = len(xs)
    chunk = [x.view(g, m)[r] for x in xs]
    acc = chunk[(r + 1) % g].clone()
    for k in range(2, g + 1):
        acc = acc + chunk[(r + k) % g]
    return acc


def _body(rank: int, world: int, m: int) -> dict:
    torch.set_num_threads(1)
    xs = _inputs(world, m)
    x = xs[rank].clone()
    ranks = tuple(range(world))
    out = torch.empty(m)
    rings.reduce_scatter(out, x, ranks, rank, dist.group.WORLD)
    started = torch.full((m,), float("nan"))
    work = rings.reduce_scatter_start(started, x, ranks, rank, dist.group.WORLD)
    # the caller goes on meanwhile: a blocking all-gather on the same group while the started ring runs
    gathered = torch.empty(world * m)
    rings.all_gather(gathered, out, ranks, rank, dist.group.WORLD)
    work.wait()
    whole = xs[rank].clone()
    rings.all_reduce(whole, ranks, rank, dist.group.WORLD)
    whole_started = xs[rank].clone()
    rings.all_reduce_start(whole_started, ranks, rank, dist.group.WORLD).wait()
    return {
        "all_reduce": torch.equal(whole, torch.cat([_ordered_sum(xs, r, m) for r in range(world)])),
        "all_reduce_started": torch.equal(whole_started, whole),
        "input_untouched": torch.equal(x, xs[rank]),
        "ordered": torch.equal(out, _ordered_sum(xs, rank, m)),
        "fp64_err": float((out.double() - sum(v.double() for v in xs).view(world, m)[rank]).abs().max()),
        "scale": float(sum(v.double().abs() for v in xs).max()),
        "started_equal": torch.equal(started, out),
        "gathered": torch.equal(gathered, torch.cat([_ordered_sum(xs, r, m) for r in range(world)])),
    }


def test_reduce_scatter_and_all_gather_at_2_3_and_4_ranks():
    for world in (2, 3, 4):
        for result in run_distributed(_body, world=world, args=(1000,), timeout=120):
            assert result["input_untouched"] and result["ordered"] and result["started_equal"] and result["gathered"]
            assert result["all_reduce"] and result["all_reduce_started"]
            # g − 1 fp32 additions: each rounds by ≤ 2⁻²⁴ of the running magnitude, at most the sum of |x|
            assert result["fp64_err"] <= (world - 1) * 2.0 ** -24 * result["scale"]


def _comm_body(rank: int, world: int) -> dict:
    """comm's collectives over a subgroup {1, 3} of 4 ranks go through the rings (gloo, CPU) and stay inside it."""
    torch.set_num_threads(1)
    pgs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    members = (0, 2) if rank % 2 == 0 else (1, 3)
    group = Group(axis="dp", ranks=members, rank=members.index(rank), pg=pgs[rank % 2])
    assert rings.usable(group.pg, torch.zeros(2))
    t = torch.arange(8.0).view(2, 4) + 100 * rank  # dim 1 is split: 2 chunks of 2 columns
    rs = comm.reduce_scatter(t, group, dim=1)
    ag = comm.all_gather(rs, group, dim=1)
    flat = torch.arange(6.0) * (rank + 1)
    part = torch.empty(3)
    comm.wait(comm.reduce_scatter_async(part, flat, group), group, "reduce_scatter")
    summed = torch.arange(6.0) * (rank + 1)
    comm.wait(comm.all_reduce_ring_async(summed, group), group, "all_reduce")
    return {"rs": rs.tolist(), "ag": ag.tolist(), "part": part.tolist(), "summed": summed.tolist()}


def test_comm_uses_the_rings_over_a_subgroup():
    results = run_distributed(_comm_body, world=4, timeout=120)
    for rank, result in enumerate(results):
        a, b = (0, 2) if rank % 2 == 0 else (1, 3)
        both = torch.arange(8.0).view(2, 4) * 2 + 100 * (a + b)
        i = (a, b).index(rank)
        assert result["rs"] == both[:, 2 * i:2 * i + 2].tolist()
        assert result["ag"] == both.tolist()
        assert result["part"] == (torch.arange(6.0) * (a + 1 + b + 1)).view(2, 3)[i].tolist()
        assert result["summed"] == (torch.arange(6.0) * (a + 1 + b + 1)).tolist()


def _failing_body(rank: int, world: int) -> str:
    """A started ring whose peer never joins: its wait() raises (the group's timeout), it does not hang."""
    from datetime import timedelta

    pg = dist.new_group([0, 1], timeout=timedelta(seconds=3))
    if rank == 1:
        return "absent"
    work = rings.reduce_scatter_start(torch.empty(2), torch.zeros(4), (0, 1), 0, pg)
    try:
        work.wait()
    except RuntimeError as err:
        return f"raised: {err}"
    return "returned"


def test_a_started_ring_whose_peer_is_gone_raises_at_wait():
    results = run_distributed(_failing_body, world=2, timeout=120)
    assert results[1] == "absent"
    assert results[0].startswith("raised: a ring collective failed")
