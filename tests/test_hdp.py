"""Hybrid data parallelism on real gloo ranks: block groups made once, and a step equal to one process."""

from __future__ import annotations

import pytest
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


LENGTHS = [5, 60, 12, 33, 7, 3, 48, 20, 9, 1]


def _model(kind: str):
    from plait.runtime.models import ModelConfig, build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, layers=2, dim=32, heads=4, ffn_dim=64, vocab=61, seq_len=64,
                                   experts=4, top_k=2, aux_loss_coef=0.0))


def _documents():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 61, (n,), generator=gen), torch.randint(0, 61, (n,), generator=gen)) for n in LENGTHS]


AUX = 0.1  # a balancing loss weight large enough that a wrong one moves the gradients well past rounding


def hybrid_step(rank: int, world: int, kind: str, schedule: str = "balance", aux_coef: float | None = None) -> dict:
    from plait.parallel.hdp import forward_backward, reduce_gradients
    from plait.scheduler.balance import Cost, balance, static_plan

    dims = ParallelDims.resolve(world)
    blocks = BlockGroups(dims)
    model = _model(kind)
    if schedule == "balance":
        plan = balance(LENGTHS, world, Cost(a=1.0, b=1 / 16), budget=64)
    else:  # windows of 64 tokens packed in batch order, dealt to 2 replicas of cp = 2
        plan = static_plan(LENGTHS, world, 2, Cost(a=1.0, b=1 / 16), window=64)
        assert any(len(g.sequences) > 1 for g in plan.groups) and all(g.packed for g in plan.groups)
    sums = forward_backward(model, blocks, plan, _documents(), sum(LENGTHS), aux_coef=aux_coef)
    reduce_gradients(model, blocks)
    dist.all_reduce(sums, group=blocks.block(0, world).pg)
    return {"loss": sums[0].item(), "aux": sums[1].item(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "split": [g.size for g in plan.groups if g.size > 1]}


@pytest.mark.parametrize("kind,schedule,aux", [("gpt", "balance", None), ("moe", "balance", None), ("gpt", "static", None),
                                               ("moe", "balance", AUX), ("moe", "static", AUX)],
                         ids=["gpt", "moe", "gpt-static", "moe-aux", "moe-aux-static"])
def test_hybrid_dp_gives_one_processs_loss_and_gradients(kind, schedule, aux):
    """Both the balance plan and the static mesh's packed windows (each document attending only itself,
    rotary positions restarting per document, across a zig-zag split) equal plain PyTorch; with the balancing
    loss on, each document's loss is its own whether it runs whole, packed with others or split."""
    results = run_distributed(hybrid_step, 4, args=(kind, schedule, aux), timeout=180)
    assert results[0]["split"]  # the plan splits some sequences over blocks and runs others whole
    assert_equals_plain_pytorch(results, kind, aux)


def assert_equals_plain_pytorch(results: list[dict], kind: str, aux_coef: float | None = None) -> None:
    """Every rank's summed loss and reduced gradients against plain PyTorch: every document alone, token-mean
    over the whole batch; with ``aux_coef``, plus that times the mean over documents of each one's balancing loss
    (the layer's own Switch loss of a forward over that document alone)."""
    import torch.nn.functional as F

    model = _model(kind)
    total = balancing = 0
    for x, y in _documents():
        total = total + F.cross_entropy(model(x[None]).flatten(0, 1), y, reduction="sum")
        if aux_coef is not None:
            balancing = balancing + model.aux_loss() / len(LENGTHS)
    (total / sum(LENGTHS) + (aux_coef or 0.0) * balancing).backward()
    for got in results:
        assert got["loss"] == pytest.approx(total.item(), rel=1e-6)
        if aux_coef is not None:
            assert got["aux"] == pytest.approx(balancing.item(), rel=1e-6)
        for name, p in model.named_parameters():
            # the same sums in another order over 4 ranks: float32 rounding only
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def lockstep_expert_step(rank: int, world: int, aux_coef: float | None = None) -> dict:
    """Experts over ep 2 × edp 2: ranks 0 and 1 share two long sequences, rank 2 has four rows and rank 3 one,
    so ranks 0, 1 and 3 make padding calls that must still run every expert all-to-all."""
    from plait.parallel.ep import apply_ep
    from plait.parallel.hdp_calls import prepare, run_calls
    from plait.parallel.mesh import ParallelMeshes
    from plait.scheduler.balance import Group, Plan
    from plait.scheduler.hdp_calls import rounds

    dims = ParallelDims.resolve(world, ep=2)
    meshes = ParallelMeshes(dims)
    blocks = BlockGroups(dims)
    model = _model("moe")
    apply_ep(model, meshes)
    plan = Plan(groups=[Group(0, 2, (1,)), Group(0, 2, (6,)), Group(2, 1, (0, 2, 3, 4, 5, 7)), Group(3, 1, (8, 9))],
                load=[0.0] * world, tokens=[0] * world)
    table = rounds(plan, LENGTHS, world, row_tokens=20)
    calls = table.of(blocks.index, lockstep=True)
    docs = _documents()
    weight = None if aux_coef is None else 1 / len(LENGTHS)
    prepared = [prepare(c, dict(enumerate(docs)), blocks.block, blocks.index, balance_weight=weight) for c in calls]
    sums = run_calls(model, prepared, sum(LENGTHS), aux_coef or 0.0)
    dist.all_reduce(sums)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "_plait_reduce", None) == "edp":  # this rank's experts: summed over its edp pair
            dist.all_reduce(g, group=meshes.group("edp").pg)
            g = dist_gather_experts(g, meshes.group("ep"))
        else:
            dist.all_reduce(g)
        grads[name] = g
    return {"loss": sums[0].item(), "aux": sums[1].item(), "grads": grads, "calls": len(calls),
            "padding": sum(c is None for c in calls)}


def dist_gather_experts(g: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(g) for _ in range(group.size)]
    dist.all_gather(parts, g.contiguous(), group=group.pg)
    return torch.cat(parts)


@pytest.mark.parametrize("aux", [None, AUX], ids=["no-aux", "aux"])
def test_lockstep_padding_calls_run_the_expert_all_to_alls_and_add_nothing(aux):
    results = run_distributed(lockstep_expert_step, 4, args=(aux,), timeout=180)
    assert {r["calls"] for r in results} == {4}  # rank 2's rows, first fit: 5+12+3 | 33 | 7 | 20
    assert [r["padding"] for r in results] == [2, 2, 0, 3]
    assert_equals_plain_pytorch(results, "moe", aux)
