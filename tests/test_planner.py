"""The planner: bytes equal to the ledger's, a bound no placement beats, the exhaustive answer from branch and bound,
placements that keep data parallelism inside a NIC class, and every plan one the runtime accepts."""

from __future__ import annotations

import itertools

import pytest
from parity import GLOBAL_BATCH, MODEL
from test_parallel_parity import MATRIX

from plait.runtime.config import model_spec
from plait.runtime.models import ModelConfig
from plait.scheduler.cluster import parse_cluster
from plait.scheduler.comm_volume import Layout, step_volume
from plait.scheduler.dims import ParallelDims
from plait.scheduler.holmes import candidate_orders, place, topology
from plait.scheduler.pipeline import schedule, simulate
from plait.scheduler.bounds import Bounds
from plait.scheduler.planner import (REFINE, NoPlanError, PlanRequest, evaluate, layouts, ledger_bytes, plan,
                                     rates_for)
from plait.scheduler.spec import ModelSpec
from plait.scheduler.timing import DeviceRate, Transport, step_time


def cluster(nodes: list[tuple[str, str, str]], per_node: int = 4, devices: dict | None = None, uplink: int = 100):
    """A cluster file's contents: nodes as (nic, group, device)."""
    groups = sorted({g for _, g, _ in nodes})
    return parse_cluster({
        "name": "test", "workers_per_node": per_node,
        "devices": devices or {"h100": {"peak_tflops": 989, "memory_gib": 80, "link_gbit": 3600}},
        "nics": {"ib400": {"gbit": 400, "latency_us": 2}, "roce200": {"gbit": 200, "latency_us": 5},
                 "eth25": {"gbit": 25, "latency_us": 25}},
        "nodes": [{"name": f"n{i}", "nic": nic, "group": g, "device": dev} for i, (nic, g, dev) in enumerate(nodes)],
        "uplinks": [{"between": list(pair), "gbit": uplink} for pair in itertools.combinations(groups, 2)],
    })


def interleaved(n: int = 12, device: str = "h100") -> list[tuple[str, str, str]]:
    """NIC classes handed out in turn, as a scheduler that knows nothing of them might."""
    kinds = [("ib400", "east"), ("roce200", "west"), ("eth25", "west")]
    return [(*kinds[i % 3], device) for i in range(n)]


SPEC = ModelSpec(kind="moe", layers=8, dim=1024, heads=8, ffn_dim=1024, vocab=8192, seq_len=1024, experts=8, top_k=2)


def request(c, spec: ModelSpec = SPEC, global_batch: int = 96, **kw) -> PlanRequest:
    return PlanRequest(spec=spec, cluster=c, global_batch=global_batch, act_bytes=2, **kw)


# --- bytes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [True, False], ids=["zero1", "replicated"])
@pytest.mark.parametrize("kind, world, sizes", [(k, w, s) for w, s, kinds in MATRIX for k in kinds],
                         ids=lambda v: "-".join(f"{a}{b}" for a, b in v.items()) if isinstance(v, dict) else str(v))
def test_step_time_charges_exactly_the_bytes_the_ledger_records(kind, world, sizes, zero):
    """Every layout the parity tests run: the step-time model's bytes per axis are the ledger's closed form, which
    those tests hold to the measured ledger, under any placement on a multi-node cluster."""
    sizes = dict(sizes)
    vpp = sizes.pop("vpp", 1)
    layers = sizes.pop("pp_layers", None)
    dims = ParallelDims.resolve(world, **sizes)
    lay = Layout(world=world, pp=dims.pp, dp=dims.dp, cp=dims.cp, tp=dims.tp, edp=dims.edp, ep=dims.ep, etp=dims.etp,
                 vpp=vpp)
    spec = model_spec(ModelConfig(kind=kind, **MODEL))
    micro = 2
    expected = {axis: sum(ops.values()) for axis, ops in step_volume(
        spec, lay, global_batch=GLOBAL_BATCH, micro_batch=micro, stage_layers=layers, zero=zero).items()}
    per_node = 1 if world < 4 else 2
    c = cluster([("ib400", "east", "h100"), ("eth25", "west", "h100")] * (world // per_node // 2) or
                [("ib400", "east", "h100")], per_node=per_node)
    rates = {"h100": DeviceRate(1e12)}
    for order in candidate_orders(c).values():
        t = step_time(spec, lay, topology(c, order), rates, global_batch=GLOBAL_BATCH, micro_batch=micro,
                      stage_layers=layers, zero=zero)
        assert t.ledger == expected


# --- time ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pp, vpp, micros", [(2, 1, 4), (4, 1, 8), (2, 2, 4), (4, 2, 8), (4, 2, 4)])
def test_pipeline_makespan_is_the_runtime_schedule_executed(pp, vpp, micros):
    """With communication free and layers alike, the model's makespan is the simulated schedule's."""
    spec = ModelSpec(kind="gpt", layers=pp * vpp * 2, dim=256, heads=4, ffn_dim=512, vocab=0, seq_len=64)
    c = cluster([("ib400", "east", "h100")], per_node=pp, devices={"h100": {"peak_tflops": 1, "memory_gib": 80}})
    lay = Layout(world=pp, pp=pp, vpp=vpp)
    t = step_time(spec, lay, topology(c, (0,)), {"h100": DeviceRate(1e12)}, global_batch=micros, micro_batch=1,
                  transport=Transport(intra_latency_s=0.0))
    chunk = t.compute / (micros * vpp) / 3  # one chunk's forward; its backward is twice that
    sim = simulate([schedule(pp, vpp, micros, r) for r in range(pp)], pp, vpp, forward_time=1, backward_time=2)
    assert t.pipeline == pytest.approx(sim.makespan * chunk, rel=1e-9)


def all_candidates(req: PlanRequest, placement: str = "holmes"):
    found, _ = layouts(req)
    return [evaluate(req, lay, mb, placement=placement) for lay, mb in found]


@pytest.mark.parametrize("devices, zero", [("same", True), ("mixed", True), ("same", False)])
def test_the_bound_is_never_above_the_step_time_of_any_placement(devices, zero):
    nodes = interleaved(12)
    kinds = {"h100": {"peak_tflops": 989, "memory_gib": 80, "link_gbit": 3600}}
    if devices == "mixed":
        kinds["a100"] = {"peak_tflops": 312, "memory_gib": 80, "link_gbit": 2400}
        nodes = [(nic, g, "a100" if i % 4 == 1 else "h100") for i, (nic, g, _) in enumerate(nodes)]
    c = cluster(nodes, devices=kinds)
    req = request(c, zero=zero)
    rates = rates_for(req)
    bounds = Bounds(req, rates)
    found, _ = layouts(req)
    assert len(found) > 100
    tight = 0.0
    for lay, mb in found:
        bound = bounds.of(lay, mb)
        for name in candidate_orders(c):
            placed = place(c, lay, req.spec, rates, strategy=name, global_batch=req.global_batch, micro_batch=mb)
            t = step_time(req.spec, lay, placed.topology, rates, global_batch=req.global_batch, micro_batch=mb,
                          stage_layers=placed.stage_layers, zero=zero).total
            assert bound <= t * (1 + 1e-12), (lay, mb, name)
            tight = max(tight, bound / t)
    # and it is not vacuous: close on alike devices; looser where a speed-proportional split may move layers
    assert tight > (0.9 if devices == "same" else 0.4)


def test_branch_and_bound_ranks_the_same_plans_as_costing_everything():
    c = cluster(interleaved(12))
    req = request(c)
    result = plan(req, placement="holmes", keep=REFINE)
    assert result.pending, "the bound should rule some layouts out on this cluster"
    every = sorted((x for x in all_candidates(req) if x.fits), key=lambda x: x.time.total)
    top = [(x.layout, x.micro_batch, round(x.time.total, 12)) for x in every[:REFINE]]
    assert [(x.layout, x.micro_batch, round(x.time.total, 12)) for x in result.ranked[:REFINE]] == top
    # an alternative that was never costed is found on demand, and it is the fastest of its kind
    dp_only = result.find(lambda lay, mb: lay.pp == lay.tp == lay.cp == lay.ep == lay.etp == 1)
    best_dp_only = min((x for x in every if x.layout.pp == x.layout.tp == x.layout.cp == x.layout.ep == x.layout.etp == 1),
                       key=lambda x: x.time.total)
    assert dp_only.time.total == pytest.approx(best_dp_only.time.total)


# --- placement ----------------------------------------------------------------------------------------------------


def test_auto_placement_is_never_predicted_slower_than_the_file_order():
    c = cluster(interleaved(12))
    req = request(c)
    result = plan(req)
    for cand in result.ranked[:REFINE]:
        plain = evaluate(req, cand.layout, cand.micro_batch, placement="default")
        assert cand.time.total <= plain.time.total * (1 + 1e-9)
    assert any(not c.placed.is_default for c in result.ranked[:REFINE])


def test_holmes_keeps_each_stage_inside_one_nic_class_and_lets_the_pipeline_cross():
    c = cluster(interleaved(12))
    req = request(c)
    lay = Layout(world=48, pp=3, dp=16, edp=16)
    placed = place(c, lay, req.spec, rates_for(req), strategy="holmes", global_batch=96, micro_batch=1)
    per_stage = 16 // 4
    for p in range(3):
        nodes = placed.order[p * per_stage:(p + 1) * per_stage]
        assert len({c.nodes[n].nic.name for n in nodes}) == 1, [c.nodes[n].nic.name for n in nodes]
    # and that is faster than the interleaved order the file gives
    default = evaluate(req, lay, 1, placement="default")
    holmes = evaluate(req, lay, 1, placement="holmes")
    assert holmes.time.total < default.time.total
    assert default.time.slowest_link != holmes.time.slowest_link or holmes.time.data_parallel < default.time.data_parallel


def test_slower_devices_get_fewer_layers_when_that_is_faster():
    kinds = {"h100": {"peak_tflops": 989, "memory_gib": 80}, "a100": {"peak_tflops": 312, "memory_gib": 80}}
    c = cluster([("ib400", "east", "h100")] * 2 + [("ib400", "east", "a100")] * 2, devices=kinds)
    req = request(c, global_batch=512)
    rates = rates_for(req)
    lay = Layout(world=16, pp=2, dp=8, edp=8)
    placed = place(c, lay, req.spec, rates, strategy="default", global_batch=512, micro_batch=4)
    assert placed.stage_layers is not None and sum(placed.stage_layers) == SPEC.layers
    assert placed.stage_layers[0] > placed.stage_layers[1]
    split = evaluate(req, lay, 4, placement="default")
    uniform = step_time(req.spec, lay, placed.topology, rates, global_batch=512, micro_batch=4)
    assert split.time.total < uniform.total
    # with little work per step the gradients a fuller stage adds outweigh its speed: the split is dropped
    light = place(c, lay, req.spec, rates, strategy="default", global_batch=16, micro_batch=1)
    assert light.stage_layers is None


# --- answers ------------------------------------------------------------------------------------------------------


def test_every_plan_is_one_the_runtime_accepts():
    from plait.runtime.config import load_config

    c = cluster(interleaved(6), per_node=2)
    cfg = {"kind": "moe", "layers": 4, "dim": 64, "heads": 4, "ffn_dim": 96, "vocab": 128, "seq_len": 32,
           "experts": 4, "top_k": 2}
    spec = model_spec(ModelConfig(**cfg))
    result = plan(request(c, spec=spec, global_batch=24), keep=40)
    import tempfile
    from pathlib import Path

    import yaml
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump({"model": cfg, "train": {"steps": 1, "global_batch": 24, "micro_batch": 1}}))
        for cand in result.ranked[:40]:
            config = load_config(path, cand.sets(), nproc=12, nnodes=6)
            p = config.parallel
            assert (p.pp, p.tp, p.cp, p.ep, p.etp, p.vpp) == (cand.layout.pp, cand.layout.tp, cand.layout.cp,
                                                               cand.layout.ep, cand.layout.etp, cand.layout.vpp)


def test_nothing_fits_names_the_shortfall_and_the_nearest_change():
    small = {"h100": {"peak_tflops": 989, "memory_gib": 0.05}}
    c = cluster([("ib400", "east", "h100")] * 2, devices=small)
    with pytest.raises(NoPlanError) as err:
        plan(request(c))
    text = str(err.value)
    assert "nothing fits" in text and "GiB per device" in text and "nearest change" in text
    assert "\n" not in text
    assert err.value.exit_code == 2


def test_replicated_state_costs_memory_and_changes_the_data_parallel_collectives():
    """parallel.zero=false reaches the plan: more memory per rank (the whole model's moments), the buckets
    all-reduced in the ledger, and a data-parallel time of its own."""
    c = cluster(interleaved(4))
    lay = Layout(world=16, pp=2, dp=4, tp=2, edp=4, ep=2)
    cands = {zero: evaluate(request(c, zero=zero), lay, 2) for zero in (True, False)}
    assert max(m.optimizer for m in cands[False].memory) > 2 * max(m.optimizer for m in cands[True].memory)
    assert cands[False].time.data_parallel != cands[True].time.data_parallel
    for zero, cand in cands.items():
        ledger = ledger_bytes(request(c, zero=zero), cand)
        dp_ops = {op for axis, ops in ledger.items() if axis in ("dp+cp+tp", "dp+cp", "edp") for op in ops}
        # (the MoE layers' own all-reduce of routing statistics is on dp+cp+tp in both)
        assert dp_ops == ({"reduce_scatter", "all_gather", "all_reduce"} if zero else {"all_reduce"})
    assert plan(request(c, zero=False)).ranked  # the search runs with it
