"""The MoE balancing loss is the same in every layout: the demo config against a plain PyTorch loop.

The balancing loss of a step is the mean, over its blocks of ``train.micro_batch``
consecutive sequences, of each block's Switch loss (:mod:`plait.parallel.engine`,
:mod:`plait.parallel.ep`). No layout changes which tokens form a block, so every layout must
train like :class:`plain_reference.PlainTrainer` with micro-steps of ``micro_batch``
sequences, the balancing loss included (``model.aux_loss_coef`` as in the demo, 0.01).

Before the loss was defined per block, its statistics spanned the dp ranks of a micro-step:
with dp = 2 a block was 16 sequences, not 8, and the demo config trained on ep2, tp2·dp2 or
the folded layout moved 1.3e-5 (relative) from one process in 3 steps, while with the
balancing loss off they agreed to 2e-8. Float32 sums in another order move the loss by
about √n·ε ≈ 4e-6 relative at most for its n = 4,096 terms (ε = 6e-8), well inside the
1e-5 bound; a layout that groups the statistics differently moves the balancing loss itself
by far more (its per-block statistics are those of other tokens), so ``aux`` is held to the
same bound from the first step on.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from harness import run_distributed
from plain_reference import PlainTrainer

from plait.runtime.build import build_engine
from plait.runtime.config import load_config
from plait.runtime.data import SequenceLoader, load_corpus

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STEPS = 3
RTOL = 1e-5
# The demo's model and training settings; a 4 MB slice of its corpus (the same bytes for every run).
BASE = [f"train.steps={STEPS}", "data.max_bytes=4000000"]


def _config(overrides: list[str], world: int):
    return load_config(DEMO, [*BASE, *overrides], nproc=world)


def _batches(config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    corpus = load_corpus(config.data)
    loader = SequenceLoader(corpus.train, seq_len=config.model.seq_len, global_batch=config.train.global_batch, seed=config.train.seed)
    return [loader.next_batch() for _ in range(STEPS)]


def train_layout(rank: int, world: int, overrides: list[str]) -> dict:
    torch.use_deterministic_algorithms(True)
    config = _config(overrides, world)
    engine = build_engine(config, world, torch.device("cpu"))
    losses, aux = [], []
    for step, (inputs, targets) in enumerate(_batches(config)):
        stats = engine.train_step(inputs, targets, config.train.lr_at(step))
        losses.append(stats.loss)
        aux.append(stats.aux_loss)
    return {"loss": losses, "aux": aux}


def train_plain(rank: int, world: int) -> dict:
    torch.use_deterministic_algorithms(True)
    config = _config([], 1)
    trainer = PlainTrainer(config.model, config.train, micro_rows=config.train.micro_batch,
                           aux_coef=config.model.aux_loss_coef, seed=config.train.seed)
    losses, aux = [], []
    for step, (inputs, targets) in enumerate(_batches(config)):
        loss, balancing = trainer.step(inputs, targets, config.train.lr_at(step))
        losses.append(loss)
        aux.append(balancing)
    return {"loss": losses, "aux": aux}


@functools.cache
def plain() -> dict:
    return run_distributed(train_plain, world=1, timeout=300)[0]


# The MoE layouts of the parity matrix (tests/test_parallel_parity.py), on the demo config.
LAYOUTS = [
    (2, ["parallel.ep=2"]),
    (4, ["parallel.tp=2", "parallel.dp=2"]),
    (4, ["parallel.tp=2", "parallel.dp=2", "parallel.ep=4"]),  # folded
    (2, ["parallel.dp=2"]),
    (4, ["parallel.pp=2", "parallel.dp=2"]),
    (4, ["parallel.cp=2", "parallel.dp=2", "parallel.ep=2", "parallel.etp=2"]),  # folded
    (2, ["parallel.tp=2"]),
    (2, ["parallel.pp=2"]),
    (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved"]),
    (2, ["parallel.cp=2"]),
    (4, ["parallel.tp=2", "parallel.pp=2"]),
    (4, ["parallel.cp=2", "parallel.tp=2"]),
    (8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"]),
    (8, ["parallel.pp=2", "parallel.tp=2", "parallel.cp=2", "parallel.ep=4"]),  # folded
]
FAST = 3  # the three layouts that moved 1.3e-5 before


def _id(world: int, overrides: list[str]) -> str:
    return "-".join(o.split(".")[1].replace("=", "") for o in overrides if "schedule" not in o)


CASES = [pytest.param(w, o, id=_id(w, o), marks=() if i < FAST else pytest.mark.slow) for i, (w, o) in enumerate(LAYOUTS)]


@pytest.mark.parametrize("world, overrides", CASES)
def test_layout_trains_like_plain_pytorch(world: int, overrides: list[str]) -> None:
    ref = plain()
    got = run_distributed(train_layout, world=world, args=(overrides,), timeout=600)[0]
    assert all(a > 1.0 for a in ref["aux"]), ref["aux"]  # the balancing loss is on, and not trivially zero
    for step in range(STEPS):
        for key in ("loss", "aux"):
            want, have = ref[key][step], got[key][step]
            assert abs(have - want) <= RTOL * abs(want), f"step {step + 1} {key}: {have!r} vs plain {want!r} ({abs(have - want) / abs(want):.2e} relative)"
