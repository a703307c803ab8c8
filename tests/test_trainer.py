"""The training loop: data-parallel parity with one process, bitwise resume, the LR schedule."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from plait.runtime.data import SequenceLoader
from plait.runtime.models import ModelConfig, build_model
from plait.parallel import comm
from plait.parallel.dp import AdamWSettings
from plait.parallel.engine import EngineConfig, ParallelEngine
from plait.runtime.trainer import BaseHook, TrainConfig, Trainer

MODEL = dict(layers=2, dim=32, heads=2, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)


def corpus() -> torch.Tensor:
    return torch.randint(0, 256, (50_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def make_trainer(kind: str, world: int = 1, hooks=(), sizes: dict | None = None) -> Trainer:
    from plait.scheduler.dims import ParallelDims
    from plait.parallel.mesh import ParallelMeshes

    dims = ParallelDims.resolve(world, **(sizes or {}))
    meshes = ParallelMeshes(dims)
    torch.manual_seed(0)
    model_cfg = ModelConfig(kind=kind, **MODEL)
    # the same micro_batch for every layout: the MoE balancing loss is defined per block of micro_batch sequences
    train_cfg = TrainConfig(steps=6, global_batch=8, micro_batch=2, lr=1e-2, warmup_steps=2, seed=0)
    engine = ParallelEngine(
        build_model(model_cfg), meshes,
        EngineConfig(micro_batch=train_cfg.micro_batch, global_batch=8, seq_len=16, aux_loss_coef=0.01 if kind == "moe" else 0.0,
                     adamw=AdamWSettings(lr=train_cfg.lr)),
        torch.device("cpu"),
    )
    loader = SequenceLoader(corpus(), seq_len=16, global_batch=8, seed=0)
    return Trainer(config=train_cfg, engine=engine, loader=loader, eval_set=[], hooks=hooks)


def _train_body(rank: int, world: int, kind: str) -> dict:
    torch.use_deterministic_algorithms(True)
    trainer = make_trainer(kind, world)
    losses = [trainer.train_step().loss for _ in range(4)]
    trainer.train_step()
    params = {k: v.detach().clone() for k, v in trainer.engine.chunks[0].state_dict().items()}
    return {"losses": losses, "params": params, "ledger": trainer.ledger_last}


@pytest.mark.parametrize("kind", ["gpt", "moe"])
def test_data_parallel_matches_one_process(kind):
    single = run_distributed(_train_body, world=1, args=(kind,))[0]
    pair = run_distributed(_train_body, world=2, args=(kind,))
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(pair[rank]["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
        for name, value in single["params"].items():
            torch.testing.assert_close(pair[rank]["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Replicas stay identical to each other, bit for bit.
    for name, value in pair[0]["params"].items():
        assert torch.equal(value, pair[1]["params"][name]), name
    # One process issues no collectives; two record their gradient reduction.
    assert single["ledger"] == {}
    assert "reduce_scatter" in pair[0]["ledger"]["dp+cp+tp"]


def _resume_body(rank: int, world: int, first_sizes: dict, second_sizes: dict) -> dict:
    """Train 3 steps on one layout, save the single-process-layout state, resume it on another."""
    torch.use_deterministic_algorithms(True)
    first = make_trainer("moe", world, sizes=first_sizes)
    head = [first.train_step().loss for _ in range(3)]
    state = first.state_dict()
    objs = [state]  # rank 0's copy to every rank
    torch.distributed.broadcast_object_list(objs, src=0)
    second = make_trainer("moe", world, sizes=second_sizes)
    torch.manual_seed(999)  # the resumed RNG must come from the state, not from here
    second.load_state_dict(objs[0])
    tail = [second.train_step().loss for _ in range(3)]
    return {"losses": head + tail}


def _straight_body(rank: int, world: int) -> list[float]:
    torch.use_deterministic_algorithms(True)
    trainer = make_trainer("moe", world)
    return [trainer.train_step().loss for _ in range(6)]


def test_resume_from_state_dict_is_bitwise():
    expected = run_distributed(_straight_body, world=1)[0]
    got = run_distributed(_resume_body, world=1, args=({}, {}))[0]
    assert got["losses"] == expected


def test_resume_on_a_different_layout():
    """State saved by dp2 resumes on ep2 (a different split of the experts) and continues the run."""
    expected = run_distributed(_straight_body, world=1)[0]
    got = run_distributed(_resume_body, world=2, args=({"dp": 2}, {"ep": 2}))[0]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected), rtol=1e-5, atol=0)


class Recorder(BaseHook):
    def __init__(self):
        self.events = []

    def on_start(self, trainer):
        self.events.append("start")

    def on_step(self, trainer, result):
        self.events.append(f"step{result.step}")

    def on_eval(self, trainer, step, loss):
        self.events.append(f"eval{step}")

    def on_end(self, trainer):
        self.events.append("end")


def _hooks_body(rank: int, world: int) -> tuple[list[str], float | None]:
    recorder = Recorder()
    trainer = make_trainer("gpt", hooks=[recorder])
    trainer.config.eval_every = 3
    trainer.eval_set = [trainer.loader.next_batch()]
    trainer.loader.cursor = 0
    trainer.fit()
    return recorder.events, trainer.last_eval_loss


def test_hooks_see_every_step_and_eval_in_order():
    events, eval_loss = run_distributed(_hooks_body, world=1)[0]
    assert events == ["start", "step1", "step2", "step3", "eval3", "step4", "step5", "step6", "eval6", "end"]
    assert eval_loss is not None and eval_loss < 6.0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert cfg.lr_at(100) == pytest.approx(0.1)
