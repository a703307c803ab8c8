"""``parallel.dp_mode=co2`` on real gloo ranks, against CO2 written from its equations in plain PyTorch.

The engine's replicas take local AdamW steps with gradients reduced inside the replica only, and every
``tau`` steps the outer update (one round stale, staleness gap penalty, clipped outer momentum) moves the
start the replicas agree on; each keeps its own progress of the last round on top of it. The reference (:mod:`co2_reference`) trains one plain model per replica. Tolerances: fp32
sums in another order (the ZeRO shards, tp's partial sums, the dp all-reduce) over a few steps of AdamW,
whose update is about lr per element whatever the gradient, so differences stay near 1e-6 of the weights.
"""

from __future__ import annotations

import pytest
import torch
from co2_reference import CO2Reference
from harness import run_distributed
from parity import GLOBAL_BATCH, loader, model_config, train_config
from plain_reference import PlainTrainer

from plait.errors import ConfigError
from plait.parallel.config import CO2Config

STEPS = 7  # rounds of TAU steps end at steps 2, 4, 6: the outer update moves the start at 4 and 6
TAU = 2
MICRO = 2
CLIP = 4e-3  # binds: a round's mean progress reaches ~2·lr·TAU = 1.2e-2 per element for some weights


def settings(**over) -> dict:
    return dict(dict(tau=TAU, outer_lr=1.0, outer_momentum=0.5, gap_penalty=True, clip=CLIP), **over)


def engine_for(world: int, sizes: dict, co2: dict):
    from plait.parallel.dp import AdamWSettings
    from plait.parallel.engine import EngineConfig, ParallelEngine
    from plait.parallel.mesh import ParallelMeshes
    from plait.runtime.models import build_model
    from plait.scheduler.dims import ParallelDims

    torch.manual_seed(0)
    cfg = model_config("gpt")
    train = train_config(STEPS, MICRO)
    meshes = ParallelMeshes(ParallelDims.resolve(world, **sizes))
    engine = ParallelEngine(build_model(cfg), meshes, EngineConfig(
        micro_batch=MICRO, global_batch=GLOBAL_BATCH, seq_len=cfg.seq_len, grad_clip=train.grad_clip,
        adamw=AdamWSettings(lr=train.lr, beta1=train.beta1, beta2=train.beta2, weight_decay=train.weight_decay),
        co2=CO2Config(**co2)), torch.device("cpu"))
    return engine, train


def co2_run(rank: int, world: int, sizes: dict, co2: dict) -> dict:
    from plait.parallel import comm

    engine, train = engine_for(world, sizes, co2)
    data = loader()
    losses, flats, ledgers, starts = [], [], [], []
    for step in range(STEPS):
        inputs, targets = data.next_batch()
        comm.LEDGER.reset()
        losses.append(engine.train_step(inputs, targets, train.lr_at(step)).loss)
        ledgers.append(comm.LEDGER.snapshot())
        flats.append(torch.cat([p.detach().reshape(-1) for _, p in sorted(engine.params.items())]))
        starts.append(torch.cat([t.clone() for t in engine.co2.start]))
    state = engine.full_state_dict()
    engine.drain()
    return {"losses": losses, "flats": flats, "ledgers": ledgers, "starts": starts, "penalty": engine.co2.last_penalty,
            "model": state["model"] if state else None}


def reference(dp: int, co2: dict) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    ref = CO2Reference(model_config("gpt"), train_config(STEPS, MICRO), dp=dp, micro=MICRO, **co2)
    train = train_config(STEPS, MICRO)
    data = loader()
    losses = [ref.step(*data.next_batch(), train.lr_at(step)) for step in range(STEPS)]
    return losses, ref._params(0), ref.penalties


@pytest.fixture(scope="module")
def dp2() -> list[dict]:
    return run_distributed(co2_run, 2, args=({}, settings()), timeout=180)


def test_two_replicas_match_co2_from_its_equations(dp2):
    losses, model, penalties = reference(2, settings())
    got = dp2[0]
    assert max(abs(a - b) for a, b in zip(got["losses"], losses)) < 1e-5, (got["losses"], losses)
    worst = max(float((got["model"][n] - model[n]).abs().max()) for n in model)
    assert worst < 1e-5, worst
    assert penalties[-1] > 1.05 and abs(got["penalty"] - penalties[-1]) < 1e-4  # the penalty was live, and the same


def test_the_penalty_and_the_clipping_change_the_result():
    """Each mechanism moves the reference by far more than the tolerance above, so the match is not vacuous
    (an unassigned clamp, or a penalty left out, would fail it)."""
    _, clipped, _ = reference(2, settings())
    for change in (dict(clip=0.0), dict(gap_penalty=False)):
        _, other, _ = reference(2, settings(**change))
        assert max(float((clipped[n] - other[n]).abs().max()) for n in clipped) > 1e-3, change


def test_replicas_train_apart_and_agree_on_each_start(dp2):
    for step in range(STEPS):
        assert not torch.equal(dp2[0]["flats"][step], dp2[1]["flats"][step]), step  # each keeps its own progress
        assert torch.equal(dp2[0]["starts"][step], dp2[1]["starts"][step]), step  # the outer update agrees exactly
    assert not torch.equal(dp2[0]["starts"][2], dp2[0]["starts"][3])  # the start moved at the end of round 1 (step 4)
    assert torch.equal(dp2[0]["starts"][0], dp2[0]["starts"][2])  # and not before: round 0 has no average yet


def test_no_step_talks_over_dp_except_the_round_ends_parameter_all_reduce(dp2):
    numel = dp2[0]["flats"][0].numel()
    for step, ledger in enumerate(dp2[0]["ledgers"]):
        dp = ledger.get("dp", {})
        if (step + 1) % TAU == 0:
            # each rank sends its owned slice of every bucket: here (no cp, tp) the whole model, padded
            assert dp["all_reduce"]["bytes"] >= 4 * numel and dp["all_reduce"]["calls"] >= 1
        else:
            assert dp == {}, (step, dp)
        # the step's one world all-reduce: one squared-norm slot per replica and the loss sums
        assert ledger["world"]["all_reduce"]["calls"] == 1


def test_with_tensor_parallelism_inside_each_replica():
    got = run_distributed(co2_run, 4, args=({"tp": 2}, settings()), timeout=240)
    losses, model, _ = reference(2, settings())
    assert max(abs(a - b) for a, b in zip(got[0]["losses"], losses)) < 1e-5
    assert max(float((got[0]["model"][n] - model[n]).abs().max()) for n in model) < 1e-5
    for step in range(STEPS):  # ranks 0, 1 are replica 0 (tp 0, 1); ranks 2, 3 replica 1
        assert torch.equal(got[0]["starts"][step], got[2]["starts"][step])
        assert not torch.equal(got[0]["flats"][step], got[2]["flats"][step])


def restore_run(rank: int, world: int, cut: int) -> dict:
    """Train STEPS steps straight, and again with every rank's state taken after ``cut`` steps and loaded into a
    new engine (new process groups), as a snapshot restore does; both must end bitwise equal."""
    co2 = settings()
    engine, train = engine_for(world, {}, co2)
    data = loader()
    for step in range(STEPS):
        engine.train_step(*data.next_batch(), train.lr_at(step))
    straight = torch.cat([p.detach().reshape(-1) for _, p in sorted(engine.params.items())])
    engine.drain()

    first, train = engine_for(world, {}, co2)
    data = loader()
    for step in range(cut):
        first.train_step(*data.next_batch(), train.lr_at(step))
    saved = {k: v.clone() for k, v in first.local_tensors().items()}
    first.drain()
    second, _ = engine_for(world, {}, co2)
    second.load_local_tensors(saved)
    for step in range(cut, STEPS):
        second.train_step(*data.next_batch(), train.lr_at(step))
    resumed = torch.cat([p.detach().reshape(-1) for _, p in sorted(second.params.items())])
    second.drain()
    return {"equal": torch.equal(straight, resumed), "keys": sorted(k for k in saved if k.startswith("outer."))}


@pytest.mark.parametrize("cut", [3, 4])  # mid-round with an all-reduce in flight; right at a round's end
def test_a_restore_mid_round_is_exact(cut):
    got = run_distributed(restore_run, 2, args=(cut,), timeout=240)
    assert all(g["equal"] for g in got), got
    assert "outer.round" in got[0]["keys"] and "outer.0.momentum" in got[0]["keys"]


def test_one_process_runs_co2_from_its_equations():
    """The smallest case: one replica, whose average is its own progress."""
    got = run_distributed(co2_run, 1, args=({}, settings()), timeout=120)
    losses, model, _ = reference(1, settings())
    assert max(abs(a - b) for a, b in zip(got[0]["losses"], losses)) < 1e-5
    assert max(float((got[0]["model"][n] - model[n]).abs().max()) for n in model) < 1e-5


def test_one_replica_with_a_plain_outer_step_is_plain_adamw():
    """τ = 1, α = 1, β = 0, no penalty: each round's progress reaches the start one round late, and the replica
    keeps it meanwhile, so its parameters follow plain AdamW on the whole batch (in exact arithmetic; here the
    start less the progress rounds once per step)."""
    plain = dict(tau=1, outer_lr=1.0, outer_momentum=0.0, gap_penalty=False, clip=0.0)
    got = run_distributed(co2_run, 1, args=({}, plain), timeout=120)
    trainer = PlainTrainer(model_config("gpt"), train_config(STEPS, MICRO), micro_rows=MICRO, aux_coef=0.0)
    data, train = loader(), train_config(STEPS, MICRO)
    losses = [trainer.step(*data.next_batch(), train.lr_at(step))[0] for step in range(STEPS)]
    assert max(abs(a - b) for a, b in zip(got[0]["losses"], losses)) < 1e-5
    assert max(float((got[0]["model"][n] - p.detach()).abs().max()) for n, p in trainer.params.items()) < 1e-5


@pytest.mark.parametrize("field,value", [("tau", 0), ("tau", 2.5), ("outer_lr", 0.0), ("outer_momentum", 1.0),
                                         ("outer_momentum", -0.1), ("clip", -1.0), ("clip", float("nan")),
                                         ("gap_penalty", "yes")])
def test_bad_settings_name_their_field(field, value):
    with pytest.raises(ConfigError, match=f"parallel.co2.{field}"):
        CO2Config(**{field: value}).validate()
