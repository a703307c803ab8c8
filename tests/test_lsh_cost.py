"""ep_compress=auto's decision (plait.scheduler.lsh_cost), and the engine taking it on real ranks."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

from plait.scheduler.lsh_cost import LayerMeasure, LinkFit, decide, describe, fit_link


def test_fit_link_recovers_a_line_and_clamps():
    link = fit_link((1000, 0.001 + 1000 * 2e-9), (9000, 0.001 + 9000 * 2e-9))
    assert link.latency_s == pytest.approx(0.001) and link.seconds_per_byte == pytest.approx(2e-9)
    assert link.gbit_s == pytest.approx(4.0)
    flat = fit_link((1000, 0.002), (9000, 0.001))  # noise: larger was faster
    assert flat.seconds_per_byte == 0.0 and flat.latency_s == 0.002 and flat.gbit_s == float("inf")
    with pytest.raises(ValueError, match="must exceed"):
        fit_link((9000, 0.1), (1000, 0.2))


def test_decide_compresses_where_the_bytes_saved_outweigh_the_hashing():
    row = 512  # bytes per row
    slow = LinkFit(latency_s=1e-4, seconds_per_byte=8 / 100e6)  # 100 Mbit/s
    fast = LinkFit(latency_s=1e-5, seconds_per_byte=8 / 100e9)  # 100 Gbit/s
    layers = {0: LayerMeasure(copies=2048, centroids=512, compress_s=0.002),
              1: LayerMeasure(copies=2048, centroids=2048, compress_s=0.002)}  # nothing merged
    on_slow = decide(layers, slow, row)
    # layer 0 saves 4 × 1536 rows × 512 B at 100 Mbit/s = 0.252 s against 4 ms of hashing
    assert [d.compress for d in on_slow] == [True, False]
    assert on_slow[0].saved_s == pytest.approx(4 * 1536 * row * 8 / 100e6)
    assert on_slow[0].cost_s == pytest.approx(0.004) and on_slow[0].ratio == 0.25
    assert [d.compress for d in decide(layers, fast, row)] == [False, False]  # 0.25 ms saved < 4 ms
    text = describe(on_slow, slow)
    assert "layer 0: lsh" in text and "layer 1: none" in text and "0.1 Gbit/s" in text
    # experts that cost 10 µs a row forward: 1536 rows fewer save 3 × 15.4 ms of compute even on the fast link
    busy = {0: LayerMeasure(copies=2048, centroids=512, compress_s=0.002, expert_row_s=1e-5)}
    (d,) = decide(busy, fast, row)
    assert d.compress and d.saved_s == pytest.approx(d.saved_a2a_s + 3 * 1536 * 1e-5)


def _auto_body(rank: int, world: int) -> dict:
    from plait.parallel.config import LSHConfig
    from plait.parallel.engine import EngineConfig, ParallelEngine
    from plait.parallel.mesh import ParallelMeshes
    from plait.runtime.models import ModelConfig, build_model
    from plait.scheduler.dims import ParallelDims

    meshes = ParallelMeshes(ParallelDims.resolve(world, ep=world))
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="moe", layers=2, dim=32, heads=4, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2))
    engine = ParallelEngine(model, meshes, EngineConfig(micro_batch=2, global_batch=8, seq_len=16, lsh=LSHConfig(hashes=2, dim=2, probe_every=0, auto_steps=2),
                                                        lsh_auto=True), torch.device("cpu"))
    tokens = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(5))
    steps, decided = [], []
    for _ in range(4):
        steps.append(engine.train_step(tokens[:, :-1], tokens[:, 1:], 1e-3))
        decided.append(engine.compression.decisions is not None)
    return {"report": engine.compression.report(), "ratios": [s.lsh_ratio for s in steps], "decided": decided,
            "on": [m.lsh_on for _, m in engine.compression.modules]}


def test_auto_decides_once_alike_on_every_rank():
    """Steps 1-3 run compressed (1 a warm-up, 2 and 3 timed); the decision is the same on every rank, taken after
    step 3 and not before, and step 4 follows it.

    (Which way it goes on loopback depends on this machine's speeds; tests/test_rehearsal.py makes the link slow.)
    """
    ranks = run_distributed(_auto_body, world=2, timeout=120)
    assert ranks[0]["decided"] == ranks[1]["decided"] == [False, False, True, True]
    assert ranks[0]["report"] == ranks[1]["report"]  # every input to the decision was reduced over the world
    report = ranks[0]["report"]
    assert report["link_gbit_s"] > 0 and [d["layer"] for d in report["layers"]] == [0, 1]
    for d in report["layers"]:
        assert d["compress"] == (d["saved_ms"] > d["cost_ms"]) and 0 < d["ratio"] <= 1 and d["cost_ms"] > 0
    *measured, after = ranks[0]["ratios"]
    assert all(r < 1 for step in measured for r in step)  # steps 1-3 run compressed, to measure
    on = [d["compress"] for d in report["layers"]]
    assert ranks[0]["on"] == ranks[1]["on"] == on
    for layer, compress in enumerate(on):
        assert (after[layer] < 1) if compress else (after[layer] == 1.0)  # off: every copy travels


def test_auto_decides_each_layer_on_its_median_over_the_timed_steps():
    """One slow step (a stall of the machine) among the timed ones does not flip a layer; the warm-up step is not read."""
    from types import SimpleNamespace

    from plait.parallel.config import LSHConfig
    from plait.parallel.ep_lsh import COLUMNS, Compression
    from plait.scheduler.lsh_cost import LinkFit

    comp = Compression([], 2, LSHConfig(auto_steps=3), auto=True, meshes=SimpleNamespace(rank=1), copies=64, dim=32,
                       device=torch.device("cpu"))
    comp.link = LinkFit(latency_s=0.0, seconds_per_byte=1e-9)

    def table(cost0: float, cost1: float) -> torch.Tensor:
        rows = torch.zeros(2, COLUMNS, dtype=torch.float64)
        # copies, centroids, (cosine sum, cosines), hashing seconds, expert seconds, expert rows: a call of 64 copies
        # sent as 16 centroids saves 4 · 48 rows · 128 B · 1 ns ≈ 24.6 µs of all-to-all and no expert time
        rows[0] = torch.tensor([64, 16, 0, 0, cost0, 0, 0], dtype=torch.float64)
        rows[1] = torch.tensor([64, 16, 0, 0, cost1, 0, 0], dtype=torch.float64)
        return rows.flatten()

    # the warm-up step's costs are far above the saving on both layers: not read
    comp.end_step(table(1.0, 1.0), ranks_per_layer=1, micro_steps=1)
    # layer 0 is cheap on two of three timed steps, layer 1 dear on two of three
    for cost0, cost1 in ((2e-6, 1.0), (1.0, 2e-6), (3e-6, 1.0)):
        assert comp.decisions is None
        comp.end_step(table(cost0, cost1), ranks_per_layer=1, micro_steps=1)
    assert [d.compress for d in comp.decisions] == [True, False]
    assert comp.decisions[0].cost_s == pytest.approx(2 * 3e-6)  # twice the median forward cost
