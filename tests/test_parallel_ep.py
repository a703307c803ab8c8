"""Expert parallelism on real gloo ranks against the unmodified model, one micro-batch block per rank.

Every rank builds the full model with the same seed, shards it with ``apply_ep`` and runs
its own slice of the batch (here dp = world: each rank's rows are one micro-batch block, whose
balancing loss is its own); the loss is a sum over tokens plus each block's balancing loss, so
the ranks' losses, aux losses and (after the edp / stage reductions) gradients add up to those
of the unmodified model run once per block in one process.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

from plait.errors import ConfigError
from plait.parallel import comm
from plait.parallel.comm import Group
from plait.scheduler.dims import MeshAxis, ParallelDims
from plait.parallel.ep import apply_ep
from plait.parallel.mesh import ParallelMeshes
from plait.runtime.models import ModelConfig, build_model
from plait.runtime.models.moe import MoE

CFG = ModelConfig(kind="moe", layers=2, dim=16, heads=2, ffn_dim=32, vocab=64, seq_len=8, experts=4, top_k=2)
BATCH, COEF = 8, 0.1
RTOL, ATOL = 1e-5, 1e-7
EXPERT_W = ("w1", "w2", "w3")
SHARD_DIM = {"w1": 1, "w3": 1, "w2": 2}


@contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(CFG.vocab, (BATCH, CFG.seq_len), generator=g)
    weights = torch.randn(BATCH, CFG.seq_len, CFG.vocab, generator=g)
    return tokens, weights


def _rows(rank: int, world: int) -> slice:
    per = BATCH // world
    return slice(rank * per, (rank + 1) * per)


@functools.cache
def _reference(world: int) -> dict:
    """Single process, unmodified model, once per block (``world`` blocks); also each token's experts per layer."""
    with deterministic():
        torch.manual_seed(0)
        model = build_model(CFG)
        tokens, weights = _data()
        moe_layers = len(model.moe_layers())
        chosen: list[list[torch.Tensor]] = [[] for _ in range(moe_layers)]
        layer = [0]

        def record(mod, args, out):
            chosen[layer[0] % moe_layers].append(out.detach().topk(CFG.top_k, -1).indices)
            layer[0] += 1

        hooks = [m.router.register_forward_hook(record) for m in model.moe_layers()]
        logits, loss, aux, tpe = [], 0.0, 0.0, 0
        for block in range(world):
            rows = _rows(block, world)
            out = model(tokens[rows])
            block_aux = model.aux_loss()
            block_loss = (out * weights[rows]).sum() + COEF * block_aux
            block_loss.backward()
            logits.append(out.detach())
            loss, aux, tpe = loss + block_loss.detach(), aux + block_aux.detach(), tpe + model.tokens_per_expert()
        for h in hooks:
            h.remove()
    return {
        "logits": torch.cat(logits), "loss": loss, "aux": aux, "tpe": tpe,
        "chosen": [torch.cat(c) for c in chosen],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def _layout(rank: int, world: int, ep: int, etp: int) -> dict:
    meshes = ParallelMeshes(ParallelDims.resolve(world, ep=ep, etp=etp))
    torch.manual_seed(0)
    model = build_model(CFG)
    names_before = [n for n, _ in model.named_parameters()]
    apply_ep(model, meshes)
    tokens, weights = _data()
    mine = _rows(rank, world)
    comm.LEDGER.reset()
    logits = model(tokens[mine])
    aux = model.aux_loss()
    loss = (logits * weights[mine]).sum() + COEF * aux
    loss.backward()
    ledger = comm.LEDGER.snapshot()
    grads, tags = {}, {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "_plait_reduce", None) == "edp":
            comm.all_reduce(g, meshes.group("edp"))
            tags[name] = (p._plait_shards, p._plait_reduce)
        elif "router" in name:
            comm.all_reduce(g, meshes.group("dp+cp+tp"))
        grads[name] = g
    coords = meshes.coordinates()
    return {
        "names": (names_before, [n for n, _ in model.named_parameters()]),
        # each layer holds its rank's counts (the engine sums them at the step's end)
        "logits": logits.detach(), "loss": loss.detach(), "aux": aux.detach(),
        "tpe": comm.all_reduce(model.tokens_per_expert().clone(), meshes.group("dp+cp+tp")),
        "grads": grads, "tags": tags, "ledger": ledger,
        "ep_rank": coords[MeshAxis.EP], "etp_rank": coords[MeshAxis.ETP],
    }


def _expected_ledger(dims: ParallelDims, rank: int, chosen: list[torch.Tensor]) -> dict:
    """The module docstring's table: per layer, forward and backward, dropless."""
    e, k, d, b = CFG.experts, CFG.top_k, CFG.dim, 4
    el = e // dims.ep
    per = BATCH // dims.world * CFG.seq_len
    ep_group = next(g for g in dims.groups(MeshAxis.EP) if rank in g)
    etp_group = next(g for g in dims.groups(MeshAxis.ETP) if rank in g)
    stage = dims.world // dims.pp

    def received(r: int, layer: int) -> int:  # M: copies of r's ep group routed to r's experts
        lo = dims.coordinates(r, (MeshAxis.PP, MeshAxis.EDP, MeshAxis.EP, MeshAxis.ETP))[MeshAxis.EP] * el
        group = next(g for g in dims.groups(MeshAxis.EP) if r in g)
        ids = torch.cat([chosen[layer].reshape(dims.world, per, k)[s] for s in group])
        return int(((ids >= lo) & (ids < lo + el)).sum())

    out: dict = {}

    def add(axis: str, op: str, nbytes: int, calls: int) -> None:
        slot = out.setdefault(axis, {}).setdefault(op, {"bytes": 0, "calls": 0})
        slot["bytes"] += nbytes
        slot["calls"] += calls

    for layer in range(CFG.layers):
        t, m = per * k, received(rank, layer)
        g = sum(received(p, layer) for p in etp_group)
        if dims.cp * dims.tp > 1:  # the block's counts, for its balancing loss (a block on one rank needs none)
            add("dp+cp+tp", "all_reduce", dims.dp * (e + 2) * 8, 1)
        if len(ep_group) > 1:
            add("ep", "all_to_all", e * 8 + (t + m) * d * b + (t + m) * d * b, 3 + 2)
        if len(etp_group) > 1:
            add("etp", "all_gather", el * 8, 1)
            add("etp", "all_to_all", 2 * (dims.etp * m + g) * d * b, 2 + 2)
    return out


LAYOUTS = [(2, 2, 1), (4, 4, 1), (4, 2, 2), (4, 2, 1), (2, 1, 1)]
CAPACITY = (0.0, 8.0, 0.5)  # dropless, nothing exceeds the capacity, some copies dropped


def _world_body(rank: int, world: int, layouts: list[tuple[int, int]], capacity: bool) -> dict:
    """All layouts of one world size in one launch (starting the ranks costs more than the checks)."""
    torch.use_deterministic_algorithms(True)
    out: dict = {layout: _layout(rank, world, *layout) for layout in layouts}
    if capacity:
        out["capacity"] = _capacity(rank, world, CAPACITY)
    return out


@functools.cache
def _launch(world: int) -> list[dict]:
    layouts = [(ep, etp) for w, ep, etp in LAYOUTS if w == world]
    return run_distributed(_world_body, world, args=(layouts, world == 2), timeout=120)


@pytest.mark.parametrize("world, ep, etp", LAYOUTS, ids=[f"w{w}-ep{e}-etp{t}" for w, e, t in LAYOUTS])
def test_matches_single_process(world: int, ep: int, etp: int) -> None:
    ref = _reference(world)
    results = [r[(ep, etp)] for r in _launch(world)]
    dims = ParallelDims.resolve(world, ep=ep, etp=etp)
    close = functools.partial(torch.testing.assert_close, rtol=RTOL, atol=ATOL)
    el, fl = CFG.experts // ep, CFG.ffn_dim // etp
    for rank, res in enumerate(results):
        assert res["names"][0] == res["names"][1]
        close(res["logits"], ref["logits"][_rows(rank, world)])
        assert torch.equal(res["tpe"], ref["tpe"])
        for name, grad in res["grads"].items():
            full = ref["grads"][name]
            if name.split(".")[-1] in EXPERT_W and ".experts." in name:
                dim = SHARD_DIM[name.split(".")[-1]]
                assert res["tags"][name] == ((("ep", 0), ("etp", dim)), "edp")
                full = full.narrow(0, res["ep_rank"] * el, el).narrow(dim, res["etp_rank"] * fl, fl)
                close(grad, full, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
            elif "router" in name:
                close(grad, full, msg=lambda m, n=name: f"rank {rank} {n}: {m}")
        assert res["ledger"] == _expected_ledger(dims, rank, ref["chosen"]), f"rank {rank}"
    close(sum(r["loss"] for r in results), ref["loss"])
    close(sum(r["aux"] for r in results), ref["aux"])
    # Everything else is replicated: the ranks' partial gradients add up to the reference.
    for name in results[0]["grads"]:
        if ".experts." not in name and "router" not in name:
            close(sum(r["grads"][name] for r in results), ref["grads"][name], rtol=RTOL, atol=1e-5)


# ----------------------------------------------------------------------------- capacity and errors

DIM, FFN, E, K, N_LOCAL = 16, 32, 4, 2, 24


def _moe_data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(world * N_LOCAL, DIM, generator=g), torch.randn(world * N_LOCAL, DIM, generator=g)


def _moe() -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, FFN, E, K)
    layer.reset_parameters(0.3, 0.3)  # large enough for the routing to be far from uniform
    return layer


def _capacity(rank: int, world: int, factors: tuple[float, ...]) -> dict:
    meshes = ParallelMeshes(ParallelDims.resolve(world, ep=2))
    x, w = _moe_data(world)
    mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    runs = {}
    for cf in factors:
        layer = _moe()
        apply_ep(layer, meshes, capacity_factor=cf)
        out = layer(x[mine])
        (out * w[mine]).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        comm.all_reduce(grads["router.weight"], meshes.group("dp+cp+tp"))
        runs[cf] = {"out": out.detach(), "dropped": layer.dropped_tokens, "grads": grads}
    errors = []
    for sizes, experts, ffn in ((dict(ep=2), 3, FFN), (dict(etp=2), E, 31)):
        bad = MoE(DIM, ffn, experts, 1)
        try:
            apply_ep(bad, ParallelMeshes(ParallelDims.resolve(world, **sizes)))
        except ConfigError as err:
            errors.append(str(err))
    return {"runs": runs, "errors": errors, "ep_rank": meshes.coordinates()[MeshAxis.EP]}


def _capacity_reference(world: int, cf: float) -> tuple[torch.Tensor, int, dict]:
    """Pure-Python drop rule per (source rank, expert), then a differentiable per-copy recomputation."""
    layer = _moe()
    x, w = _moe_data(world)
    routing = layer.route(x)
    gates, ids = routing.weights.detach().tolist(), routing.indices.tolist()
    cap = math.ceil(cf * N_LOCAL * K / E)
    kept, dropped = [], 0
    for src in range(world):
        for e in range(E):
            copies = [(-gates[t][j], t * K + j, t, j) for t in range(src * N_LOCAL, (src + 1) * N_LOCAL)
                      for j in range(K) if ids[t][j] == e]
            copies.sort()
            kept += [(t, j, e) for _, _, t, j in copies[:cap]]
            dropped += max(len(copies) - cap, 0)
    ex = layer.experts
    out = torch.zeros_like(x)
    for t, j, e in kept:
        xt = x[t]
        y = (F.silu(ex.w1[e] @ xt) * (ex.w3[e] @ xt)) @ ex.w2[e].t()
        out = out.index_add(0, torch.tensor([t]), (routing.weights[t, j] * y)[None])
    (out * w).sum().backward()
    return out.detach(), dropped, {n: p.grad for n, p in layer.named_parameters()}


def test_capacity_modes_and_config_errors() -> None:
    world, (_, large, small) = 2, CAPACITY
    results = [r["capacity"] for r in _launch(world)]
    with deterministic():
        ref_out, ref_dropped, ref_grads = _capacity_reference(world, small)
    assert ref_dropped > 0
    el = E // 2
    for rank, res in enumerate(results):
        runs = res["runs"]
        # A capacity nothing exceeds changes nothing, bit for bit.
        assert runs[large]["dropped"] == 0 and runs[0.0]["dropped"] == 0
        assert torch.equal(runs[large]["out"], runs[0.0]["out"])
        # A small one drops exactly the copies of the rule (each rank counts its own; the engine sums them at the
        # step's end); wholly dropped tokens give zeros.
        assert sum(r["runs"][small]["dropped"] for r in results) == ref_dropped
        mine = ref_out[rank * N_LOCAL:(rank + 1) * N_LOCAL]
        torch.testing.assert_close(runs[small]["out"], mine, rtol=RTOL, atol=1e-6)
        assert torch.equal(runs[small]["out"][mine.abs().sum(1) == 0], mine[mine.abs().sum(1) == 0])
        grads = runs[small]["grads"]
        torch.testing.assert_close(grads["router.weight"], ref_grads["router.weight"], rtol=RTOL, atol=1e-5)
        for name in EXPERT_W:
            shard = ref_grads[f"experts.{name}"].narrow(0, res["ep_rank"] * el, el)
            torch.testing.assert_close(grads[f"experts.{name}"], shard, rtol=RTOL, atol=1e-6)
        assert "'parallel.ep'" in res["errors"][0] and "model.experts=3" in res["errors"][0]
        assert "'parallel.etp'" in res["errors"][1] and "model.ffn_dim=31" in res["errors"][1]


def test_size_one_groups_reproduce_the_layer_bit_for_bit() -> None:
    """One rank, every group of size 1: no collectives, and exactly the unmodified layer's numbers."""
    x, w = _moe_data(1)
    results = []
    with deterministic():
        for parallel in (False, True):
            layer = _moe()
            if parallel:
                apply_ep(layer, SimpleNamespace(group=Group.single))
                assert type(layer).__name__ == "ExpertParallelMoE" and isinstance(layer, MoE)
            xr = x.clone().requires_grad_(True)
            out = layer(xr)
            ((out * w).sum() + layer.aux_loss).backward()
            results.append((out, layer.aux_loss, layer.tokens_per_expert, xr.grad, [p.grad for p in layer.parameters()]))
    (out0, aux0, tpe0, gx0, g0), (out1, aux1, tpe1, gx1, g1) = results
    assert torch.equal(out0, out1) and torch.equal(aux0, aux1) and torch.equal(tpe0, tpe1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    with pytest.raises(ValueError, match="already expert parallel"):
        apply_ep(layer, SimpleNamespace(group=Group.single))
