"""Shared body of the parallel parity tests: train a small model on one layout, return losses and gradients.

Every rank builds the same model from the same seed and loads the same global batches;
the engine splits both. The reference is the same run on one process with
``micro_batch × dp`` sequences per micro-step (the same micro-step grouping).
"""

from __future__ import annotations

import torch

from plait.parallel import comm
from plait.parallel.dims import ParallelDims
from plait.parallel.dp import AdamWSettings
from plait.parallel.engine import EngineConfig, ParallelEngine
from plait.parallel.mesh import ParallelMeshes
from plait.runtime.data import SequenceLoader
from plait.runtime.models import ModelConfig, build_model
from plait.runtime.trainer import TrainConfig

MODEL = dict(layers=4, dim=32, heads=4, ffn_dim=64, vocab=256, seq_len=16, experts=4, top_k=2)
GLOBAL_BATCH = 8


def corpus() -> torch.Tensor:
    return torch.randint(0, 256, (60_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def train_layout(rank: int, world: int, kind: str, sizes: dict, micro: int, steps: int, engine_extra: dict | None = None) -> dict:
    torch.use_deterministic_algorithms(True)
    sizes = dict(sizes)
    vpp = sizes.pop("vpp", 1)
    schedule = sizes.pop("schedule", "interleaved" if vpp > 1 else "1f1b")
    layers = sizes.pop("pp_layers", None)
    dims = ParallelDims.resolve(world, **sizes)
    meshes = ParallelMeshes(dims)
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, **MODEL)
    model = build_model(cfg)
    train = TrainConfig(steps=steps, global_batch=GLOBAL_BATCH, micro_batch=micro, lr=3e-3, warmup_steps=2)
    engine = ParallelEngine(
        model, meshes,
        EngineConfig(
            micro_batch=micro, global_batch=GLOBAL_BATCH, seq_len=cfg.seq_len,
            aux_loss_coef=0.01 if kind == "moe" else 0.0, grad_clip=train.grad_clip,
            adamw=AdamWSettings(lr=train.lr, beta1=train.beta1, beta2=train.beta2, weight_decay=train.weight_decay),
            pp_schedule=schedule, vpp=vpp, pp_layers=layers, **(engine_extra or {}),
        ),
        torch.device("cpu"),
    )
    engine.optimizer.keep_grads = True
    loader = SequenceLoader(corpus(), seq_len=cfg.seq_len, global_batch=GLOBAL_BATCH, seed=0)
    losses, aux, norms = [], [], []
    grads = None
    ledger = None
    for step in range(steps):
        inputs, targets = loader.next_batch()
        comm.LEDGER.reset()
        stats = engine.train_step(inputs, targets, train.lr_at(step))
        if step == 0:
            ledger = comm.LEDGER.snapshot()
        losses.append(stats.loss)
        aux.append(stats.aux_loss)
        norms.append(stats.grad_norm)
        if step == 0:
            grads = engine.full_gradients()
    eval_batch = loader.next_batch()
    state = engine.full_state_dict()
    return {"ledger": ledger, "losses": losses, "aux": aux, "norms": norms, "grads": grads, "state": state, "eval": engine.evaluate([eval_batch])}
