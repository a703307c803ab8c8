"""Pipeline parallelism: schedules simulated on every rank, the stage split, and gloo parity with one process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

from plait.errors import ConfigError
from plait.parallel import comm
from plait.scheduler.dims import ParallelDims
from plait.parallel.pp import (
    Action,
    ScheduleError,
    apply_pp,
    run_pipeline,
    schedule_1f1b,
    schedule_forward,
    schedule_interleaved,
    simulate,
    split_model,
    stage_layers,
)
from plait.runtime.models import ModelConfig, build_model

MICRO_BATCH = 2


def _cfg(kind: str, layers: int = 4) -> ModelConfig:
    return ModelConfig(kind=kind, layers=layers, dim=32, heads=2, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)


def _model(cfg: ModelConfig):
    torch.manual_seed(0)
    return build_model(cfg)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("mult", [1, 2, 3])
@pytest.mark.parametrize("vpp", [1, 2])
def test_schedules_finish_and_interleaving_shrinks_the_bubble(pp, mult, vpp):
    micros = mult * pp
    plain = simulate([schedule_1f1b(pp, micros, r) for r in range(pp)], pp, 1)
    assert all(plain.peak_in_flight[r] <= pp - r for r in range(pp))
    assert math.isclose(plain.bubble, (pp - 1) / (micros + pp - 1))  # the textbook 1F1B bubble
    mine = [schedule_interleaved(pp, vpp, micros, r) for r in range(pp)]
    for times in ((1, 1), (1, 2)):
        stats = simulate(mine, pp, vpp, forward_time=times[0], backward_time=times[1])
        assert len(stats.finish) == 2 * pp * vpp * micros
        # every backward after its own forward (simulate also checks this while running)
        assert all(stats.finish[Action("B", v, i)] > stats.finish[Action("F", v, i)] for v in range(pp * vpp) for i in range(micros))
    if vpp == 1:
        assert mine == [schedule_1f1b(pp, micros, r) for r in range(pp)]
    else:
        stats = simulate(mine, pp, vpp)
        assert stats.bubble < plain.bubble
        assert math.isclose(stats.bubble, (pp - 1) / (vpp * micros + pp - 1))
    evaluation = simulate([schedule_forward(pp, vpp, micros, r) for r in range(pp)], pp, vpp)
    assert len(evaluation.finish) == pp * vpp * micros


def test_forward_schedule_takes_any_number_of_micro_batches():
    simulate([schedule_forward(4, 2, 5, r) for r in range(4)], 4, 2)
    assert simulate([schedule_1f1b(4, 2, r) for r in range(4)], 4, 1).peak_in_flight == [2, 2, 2, 1]


def test_simulate_rejects_bad_schedules():
    good = [schedule_1f1b(2, 2, r) for r in range(2)]
    eager = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]  # no warm-up on rank 0
    crossed = [eager, [Action("F", 1, 1), Action("B", 1, 1), Action("F", 1, 0), Action("B", 1, 0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(crossed, 2, 1)
    with pytest.raises(ScheduleError, match="missing"):
        simulate([good[0], good[1][:-1]], 2, 1)
    with pytest.raises(ScheduleError, match="not one of its own"):
        simulate([good[0] + [Action("F", 1, 2)], good[1]], 2, 1)
    with pytest.raises(ScheduleError, match="twice"):
        simulate([good[0] + good[0][:1], good[1]], 2, 1)
    with pytest.raises(ScheduleError, match="before its own forward"):
        simulate([good[0], [Action("B", 1, 0), Action("F", 1, 0), Action("F", 1, 1), Action("B", 1, 1)]], 2, 1)


@pytest.mark.parametrize(
    "call, key, fragment",
    [
        (lambda: schedule_interleaved(4, 2, 6, 0), "train.global_batch", "multiple of parallel.pp=4"),
        (lambda: schedule_interleaved(2, 0, 4, 0), "parallel.vpp", "positive integer"),
        (lambda: schedule_1f1b(0, 4, 0), "parallel.pp", "positive integer"),
        (lambda: schedule_1f1b(2, 0, 0), "train.global_batch", "positive integer"),
        (lambda: stage_layers(4, 8), "parallel.pp", "need at least 8 layers, model.layers=4"),
        (lambda: stage_layers(4, 2, 4), "parallel.vpp", "2 × 4 = 8 virtual stages"),
        (lambda: stage_layers(5, 2, 1, [2, 2]), "parallel.pp_layers", "sum to 4 but model.layers=5"),
        (lambda: stage_layers(5, 2, 2, [2, 3]), "parallel.pp_layers", "4 entries, got 2"),
        (lambda: stage_layers(5, 2, 1, [5, 0]), "parallel.pp_layers", "at least 1 layer"),
    ],
)
def test_invalid_inputs_name_the_key(call, key, fragment):
    with pytest.raises(ConfigError) as info:
        call()
    assert f"'{key}'" in str(info.value) and fragment in str(info.value)


# ----------------------------------------------------------------------------- stage split


def test_stage_layers():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(7, 2, 2) == [[0], [1, 2], [3, 4], [5, 6]]  # remainder on the later stages
    assert stage_layers(6, 4, 1, [2, 1, 1, 2]) == [[0, 1], [2], [3], [4, 5]]


@pytest.mark.parametrize("kind", ["gpt", "moe"])
@pytest.mark.parametrize("pp, vpp, layers", [(2, 1, None), (2, 2, [2, 1, 1, 1]), (4, 1, [2, 1, 1, 1]), (1, 1, None)])
def test_split_model_shares_and_partitions_parameters(kind, pp, vpp, layers):
    cfg = _cfg(kind, 5)
    model = _model(cfg)
    full = dict(model.named_parameters())
    owner: dict[int, str] = {}
    stages: dict[int, torch.nn.Module] = {}
    for r in range(pp):
        for j, chunk in enumerate(split_model(model, pp=pp, pp_rank=r, vpp=vpp, layers=layers)):
            v = j * pp + r
            stages[v] = chunk
            assert type(chunk) is type(model) and chunk.rope is model.rope and chunk.cfg is cfg
            assert (chunk.embed is not None) == (v == 0)
            assert (chunk.output is not None) == (chunk.norm is not None) == (v == pp * vpp - 1)
            assert [int(k) for k in chunk.layers] == stage_layers(5, pp, vpp, layers)[v]
            for name, p in chunk.named_parameters():
                assert full[name] is p, name  # shared, same name as in the full model
                assert id(p) not in owner, f"{name} owned twice"
                owner[id(p)] = name
            assert len(chunk.moe_layers()) == (len(chunk.layers) if kind == "moe" else 0)
    assert sorted(owner.values()) == sorted(full)
    # Running the chunks in stage order is the full model, aux losses included.
    tokens = torch.randint(0, cfg.vocab, (2, cfg.seq_len))
    with torch.no_grad():
        h, aux = tokens, torch.zeros(())
        for v in range(pp * vpp):
            h = stages[v](h)
            aux = aux + stages[v].aux_loss()
        ref = model(tokens)
        torch.testing.assert_close(h, ref, rtol=0, atol=0)
        torch.testing.assert_close(aux, model.aux_loss(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- parity on gloo ranks


def _batch(cfg: ModelConfig, micros: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab, (micros, MICRO_BATCH, cfg.seq_len + 1), generator=g)
    return data[..., :-1], data[..., 1:]


def _micro_loss(logits: torch.Tensor, targets: torch.Tensor, micros: int) -> torch.Tensor:
    total = micros * targets.numel()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total


def _reference(kind: str, layers: int, micros: int, seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the same micro-batches one after another, gradients accumulated."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(kind, layers)
        model = _model(cfg)
        tokens, targets = _batch(cfg, micros, seed)
        losses = []
        for i in range(micros):
            ce = _micro_loss(model(tokens[i]), targets[i], micros)
            total = ce + 0.01 * model.aux_loss() / micros if kind == "moe" else ce
            total.backward()
            losses.append(ce.item())
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        torch.set_num_threads(threads)


def _pipeline_case(rank: int, world: int, kind: str, layers: int, pp: int, vpp: int, split: list[int] | None, micros: int) -> dict:
    cfg = _cfg(kind, layers)
    model = _model(cfg)
    dims = ParallelDims.resolve(world, pp=pp)
    dp_rank = dims.coordinates(rank)["dp"]
    tokens, targets = _batch(cfg, micros, seed=dp_rank)
    plan = apply_pp(model, dims, rank, micros=micros, vpp=vpp, layers=split)

    def forward(j: int, x: torch.Tensor | None, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunk = plan.chunks[j]
        out = chunk(tokens[i] if x is None else x)
        return out, (0.01 * chunk.aux_loss() / micros if kind == "moe" else None)

    run = dict(forward=forward, loss=lambda i, logits: _micro_loss(logits, targets[i], micros),
               act_shape=(MICRO_BATCH, cfg.seq_len, cfg.dim), act_dtype=torch.float32)
    comm.LEDGER.reset()
    losses = plan.run(**run)
    train_ledger = (comm.LEDGER.bytes.get(("pp", "send"), 0), comm.LEDGER.calls.get(("pp", "send"), 0))
    grads = {n: p.grad.clone() for c in plan.chunks for n, p in c.named_parameters() if p.grad is not None}
    comm.LEDGER.reset()
    evaluation = plan.run(schedule_forward(pp, vpp, micros, plan.pp_rank), **run)
    eval_ledger = comm.LEDGER.bytes.get(("pp", "send"), 0)
    return dict(pp_rank=plan.pp_rank, dp_rank=dp_rank, losses=[float(x) for x in losses], eval=[float(x) for x in evaluation],
                grads=grads, names=sorted(n for c in plan.chunks for n, _ in c.named_parameters()),
                train_ledger=train_ledger, eval_ledger=eval_ledger)


def _pipeline_body(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """Several layouts in one launch: starting ranks costs far more than these tiny models."""
    torch.use_deterministic_algorithms(True)
    return [_pipeline_case(rank, world, *case, MICROS) for case in cases]


MICROS = 4
LAYOUTS = {  # world -> (kind, layers, pp, vpp, per-stage layer counts)
    2: [("gpt", 4, 2, 1, None),  # 1F1B
        ("moe", 4, 2, 2, None)],  # interleaved
    4: [("moe", 5, 4, 1, [2, 1, 1, 1]),  # four stages, non-uniform
        ("gpt", 5, 2, 2, [1, 2, 1, 1])],  # pp × dp, interleaved and non-uniform
}


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_pipeline_matches_one_process(world):
    results = run_distributed(_pipeline_body, world, args=(LAYOUTS[world],), timeout=120)
    for c, (kind, layers, pp, vpp, _) in enumerate(LAYOUTS[world]):
        _check_case(kind, layers, world, pp, vpp, [per_rank[c] for per_rank in results])


def _check_case(kind: str, layers: int, world: int, pp: int, vpp: int, results: list[dict]) -> None:
    micros = MICROS
    cfg = _cfg(kind, layers)
    a = MICRO_BATCH * cfg.seq_len * cfg.dim * 4  # bytes of one boundary activation (float32)
    dp = world // pp
    for dp_rank in range(dp):
        ref_losses, ref_grads = _reference(kind, layers, micros, seed=dp_rank)
        names = []
        for res in (r for r in results if r["dp_rank"] == dp_rank):
            r = res["pp_rank"]
            names += res["names"]
            if r == pp - 1:
                assert res["losses"] == pytest.approx(ref_losses, rel=1e-5)
                assert res["eval"] == pytest.approx(ref_losses, rel=1e-5)
            else:
                assert res["losses"] == [] and res["eval"] == []
            assert set(res["grads"]) == set(res["names"])
            for name, grad in res["grads"].items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{kind} pp{pp} vpp{vpp} {n}: {m}")
            # The documented ledger: a·m per owned stage boundary and direction.
            boundaries = 2 * vpp - (r == 0) - (r == pp - 1)
            assert res["train_ledger"] == (a * micros * boundaries, micros * boundaries)
            assert res["eval_ledger"] == a * micros * (vpp - (r == pp - 1))
        assert sorted(names) == sorted(ref_grads)
    assert sum(res["train_ledger"][0] for res in results) == dp * 2 * a * micros * (pp * vpp - 1)


def test_one_rank_hands_stages_over_locally():
    """pp=1, vpp=2: both stages on this process; no process group, nothing sent, same result."""
    cfg, micros = _cfg("moe"), MICROS
    model = _model(cfg)
    tokens, targets = _batch(cfg, micros, seed=0)
    chunks = split_model(model, pp=1, pp_rank=0, vpp=2)

    def forward(j: int, x: torch.Tensor | None, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = chunks[j](tokens[i] if x is None else x)
        return out, 0.01 * chunks[j].aux_loss() / micros

    comm.LEDGER.reset()
    losses = run_pipeline(schedule_interleaved(1, 2, micros, 0), chunks=chunks, pp=1, vpp=2, pp_rank=0, rank_of_stage=lambda p: 0,
                          act_shape=(MICRO_BATCH, cfg.seq_len, cfg.dim), act_dtype=torch.float32, forward=forward,
                          loss=lambda i, logits: _micro_loss(logits, targets[i], micros))
    assert not comm.LEDGER.bytes
    ref_losses, ref_grads = _reference("moe", cfg.layers, micros, seed=0)
    assert [float(x) for x in losses] == pytest.approx(ref_losses, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7)


def test_apply_pp_layout_and_shape_check():
    cfg = _cfg("gpt")
    model = _model(cfg)
    plan = apply_pp(model, ParallelDims.resolve(8, pp=2, tp=2), 5, micros=4, vpp=2)
    assert (plan.pp_rank, plan.peers, plan.stages, plan.is_last) == (1, [1, 5], [1, 3], True)
    assert plan.actions == schedule_interleaved(2, 2, 4, 1)
    first = apply_pp(model, ParallelDims.resolve(2, pp=2), 0, micros=2, forward_only=True)
    assert first.actions == schedule_forward(2, 1, 2, 0)
    tokens = torch.zeros(MICRO_BATCH, cfg.seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match="expected act_shape"):  # caught before anything is sent
        first.run(forward=lambda j, x, i: (first.chunks[j](tokens), None), loss=lambda i, out: out.sum(),
                  act_shape=(MICRO_BATCH, cfg.seq_len + 1, cfg.dim), act_dtype=torch.float32)
