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
    engine = ParallelEngine(model, meshes, EngineConfig(micro_batch=2, global_batch=8, seq_len=16, lsh=LSHConfig(hashes=2, dim=2, probe_every=0),
                                                        lsh_auto=True), torch.device("cpu"))
    tokens = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(5))
    steps = [engine.train_step(tokens[:, :-1], tokens[:, 1:], 1e-3) for _ in range(2)]
    return {"report": engine.compression.report(), "ratios": [s.lsh_ratio for s in steps],
            "on": [m.lsh_on for _, m in engine.compression.modules]}


def test_auto_decides_once_alike_on_every_rank():
    """Step 1 runs compressed and timed; the decision is the same on every rank, and step 2 follows it.

    (Which way it goes on loopback depends on this machine's speeds; tests/test_rehearsal.py makes the link slow.)
    """
    ranks = run_distributed(_auto_body, world=2, timeout=120)
    assert ranks[0]["report"] == ranks[1]["report"]  # every input to the decision was reduced over the world
    report = ranks[0]["report"]
    assert report["link_gbit_s"] > 0 and [d["layer"] for d in report["layers"]] == [0, 1]
    for d in report["layers"]:
        assert d["compress"] == (d["saved_ms"] > d["cost_ms"]) and 0 < d["ratio"] <= 1 and d["cost_ms"] > 0
    first, second = ranks[0]["ratios"]
    assert all(r < 1 for r in first)  # step 1 runs compressed, to measure
    on = [d["compress"] for d in report["layers"]]
    assert ranks[0]["on"] == ranks[1]["on"] == on
    for layer, compress in enumerate(on):
        assert (second[layer] < 1) if compress else (second[layer] == 1.0)  # off: every copy travels
