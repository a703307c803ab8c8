"""Bodies of the parallel parity tests: train a small model on one layout, or by plain PyTorch.

Every rank builds the same model from the same seed and loads the same global batches;
the engine splits both. :func:`train_layout` returns, besides losses and gradients, every
step's full state, reduced gradient and router decisions; :func:`run_layout` then has rank 0
redo each of the layout's steps from the layout's own state with the plain-PyTorch
reference (:func:`replay`, :mod:`plain_reference`), in the same process to spare one interpreter
start per layout, so that :mod:`parity_checks` can compare the two step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from plain_reference import PlainTrainer
from routing_log import RoutingLog, merge_routing

from plait.parallel import comm
from plait.scheduler.dims import ParallelDims
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


def model_config(kind: str) -> ModelConfig:
    return ModelConfig(kind=kind, **MODEL)


def train_config(steps: int, micro: int) -> TrainConfig:
    return TrainConfig(steps=steps, global_batch=GLOBAL_BATCH, micro_batch=micro, lr=3e-3, warmup_steps=2)


def aux_coef(kind: str) -> float:
    return 0.01 if kind == "moe" else 0.0


def loader() -> SequenceLoader:
    return SequenceLoader(corpus(), seq_len=MODEL["seq_len"], global_batch=GLOBAL_BATCH, seed=0)


@dataclass(frozen=True)
class InjectedBug:
    """An error injected on purpose at one step (0-based), to show that the checks catch it.

    ``expert_grad``: on ``rank``, this rank's share (not yet reduced) of the gradient of
    expert ``expert`` of ``param`` is scaled by ``scale``. ``lr``: on ``rank``, the slices of
    the parameters that this rank's optimizer owns are updated with ``lr × scale``.
    ``route``: token ``token`` of MoE layer ``layer`` goes to its (k+1)-th expert instead of
    its k-th (on whichever rank routes it).
    """

    kind: Literal["expert_grad", "lr", "route"]
    step: int
    rank: int = 0
    param: str = ""
    expert: int = 0
    scale: float = 1.0
    layer: int = 0
    token: int = 0


def _inject(engine: ParallelEngine, rank: int, bug: InjectedBug | None, step: list[int]) -> None:
    """Wrap the optimizer step for ``expert_grad`` and ``lr`` bugs (``route`` goes through :class:`RoutingLog`)."""
    if bug is None or bug.kind == "route":
        return
    # The bug edits a gradient after the backward pass: every rank reduces at the optimizer step (with
    # parallel.grad_overlap the pieces would be on the wire by then; the ranks of a group must agree on it).
    engine.optimizer.overlap = False
    if rank != bug.rank:
        return
    optimizer_step = engine.optimizer.step

    def buggy_step(lr: float, max_norm: float, **closing):
        if step[0] == bug.step:
            if bug.kind == "expert_grad":
                engine.params[bug.param].grad[bug.expert] *= bug.scale
            else:
                lr = lr * bug.scale
        return optimizer_step(lr, max_norm, **closing)

    engine.optimizer.step = buggy_step


def _owned(state: dict | None) -> dict | None:
    """A copy of ``state`` (at world size 1, ``full_state_dict`` hands out the live parameters, which the next step changes)."""
    if state is None:
        return None
    return {
        "model": {n: t.clone() for n, t in state["model"].items()},
        "optimizer": {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in state["optimizer"].items()},
    }


def train_layout(rank: int, world: int, kind: str, sizes: dict, micro: int, steps: int,
                 engine_extra: dict | None = None, bug: InjectedBug | None = None) -> dict:
    """Train ``steps`` steps of one layout; returns what the checks compare.

    Per step: loss, balancing loss, gradient norm, the reduced gradient and the full state
    after it (``states`` starts with the state before the first step; both on rank 0 only),
    and this rank's router records; plus the first step's ledger and the evaluation loss.
    """
    torch.use_deterministic_algorithms(True)
    sizes = dict(sizes)
    vpp = sizes.pop("vpp", 1)
    schedule = sizes.pop("schedule", "interleaved" if vpp > 1 else "1f1b")
    layers = sizes.pop("pp_layers", None)
    dims = ParallelDims.resolve(world, **sizes)
    meshes = ParallelMeshes(dims)
    torch.manual_seed(0)
    cfg = model_config(kind)
    model = build_model(cfg)
    train = train_config(steps, micro)
    engine = ParallelEngine(
        model, meshes,
        EngineConfig(
            micro_batch=micro, global_batch=GLOBAL_BATCH, seq_len=cfg.seq_len,
            aux_loss_coef=aux_coef(kind), grad_clip=train.grad_clip,
            adamw=AdamWSettings(lr=train.lr, beta1=train.beta1, beta2=train.beta2, weight_decay=train.weight_decay),
            pp_schedule=schedule, vpp=vpp, pp_layers=layers, **(engine_extra or {}),
        ),
        torch.device("cpu"),
    )
    engine.optimizer.keep_grads = True
    token_ids = torch.arange(GLOBAL_BATCH * cfg.seq_len).view(GLOBAL_BATCH, cfg.seq_len)
    swap = [(bug.step, bug.layer, bug.token)] if bug and bug.kind == "route" else []
    routing = RoutingLog(
        [(name, m) for chunk in engine.chunks for name, m in chunk.named_modules()],
        lambda i: engine.local_rows(token_ids, i), swap=swap,
    )
    current = [0]
    _inject(engine, rank, bug, current)
    data = loader()
    losses, aux, norms, grads = [], [], [], []
    states = [_owned(engine.full_state_dict())]
    ledger = None
    for step in range(steps):
        current[0] = step
        inputs, targets = data.next_batch()
        comm.LEDGER.reset()
        routing.begin_step(step)
        stats = engine.train_step(inputs, targets, train.lr_at(step))
        routing.end_step()
        if step == 0:
            ledger = comm.LEDGER.snapshot()
        losses.append(stats.loss)
        aux.append(stats.aux_loss)
        norms.append(stats.grad_norm)
        grads.append(engine.full_gradients())
        states.append(_owned(engine.full_state_dict()))
    eval_batch = data.next_batch()
    return {
        "ledger": ledger, "losses": losses, "aux": aux, "norms": norms, "grads": grads, "states": states,
        "routing": routing.records, "eval": engine.evaluate([eval_batch]), "micro_rows": micro,
    }


def run_layout(rank: int, world: int, kind: str, sizes: dict, micro: int, steps: int,
               engine_extra: dict | None = None, bug: InjectedBug | None = None) -> dict:
    """:func:`train_layout`; rank 0 then merges every rank's routing and redoes the run (:func:`replay`).

    Rank 0 returns the run with ``routing`` merged (:func:`routing_log.merge_routing`) and the
    ``replay``; the other ranks return their ``ledger`` only.
    """
    run = train_layout(rank, world, kind, sizes, micro, steps, engine_extra, bug)
    records = [None] * world if rank == 0 else None
    dist.gather_object(run["routing"], records, dst=0)
    if rank != 0:
        return {"ledger": run["ledger"]}
    run["routing"] = merge_routing(records, GLOBAL_BATCH * MODEL["seq_len"])
    follow = {s: {layer: t.indices for layer, t in layers.items()} for s, layers in run["routing"].items()}
    run["replay"] = replay(kind, run["micro_rows"], steps, dict(run, routing=follow))
    return run


def _plain(kind: str, micro_rows: int, steps: int) -> PlainTrainer:
    return PlainTrainer(model_config(kind), train_config(steps, micro_rows), micro_rows=micro_rows, aux_coef=aux_coef(kind))


def plain_run(rank: int, world: int, kind: str, micro_rows: int, steps: int) -> dict:
    """Free-running plain-PyTorch training, for comparison with the engine at world size 1."""
    trainer = _plain(kind, micro_rows, steps)
    data = loader()
    losses, aux = [], []
    grads = None
    for step in range(steps):
        inputs, targets = data.next_batch()
        trainer.routing.begin_step(step)
        loss, balancing = trainer.forward_backward(inputs, targets)
        trainer.routing.end_step()
        if step == 0:
            grads = trainer.gradients()
        trainer.clip_and_update(trainer.train.lr_at(step))
        losses.append(loss)
        aux.append(balancing)
    return {"losses": losses, "aux": aux, "grads": [grads], "routing": trainer.routing.records,
            "eval": trainer.evaluate(*data.next_batch())}


def replay(kind: str, micro_rows: int, steps: int, layout: dict) -> dict:
    """Redo each step of a layout with plain PyTorch, from the layout's own state before it.

    ``layout`` holds the layout's ``states`` (``steps + 1`` full states), ``grads`` (its reduced
    gradient of each step) and ``routing`` (its decisions per step and layer, [N, k]). For step
    ``s``: load state ``s``; forward and backward on batch ``s``, following the layout's
    routing where ours differs (the checks then require a near-tie there); record loss,
    balancing loss, gradient and router output; then apply the clipping and AdamW update to
    the *layout's* gradient, so the resulting state isolates the optimizer. Finally evaluate
    the layout's last state.
    """
    trainer = _plain(kind, micro_rows, steps)
    out = {"init": trainer.state()["model"], "steps": []}
    data = loader()
    for step in range(steps):
        inputs, targets = data.next_batch()
        trainer.load(layout["states"][step])
        trainer.routing.begin_step(step, follow=layout["routing"].get(step))
        loss, aux = trainer.forward_backward(inputs, targets)
        trainer.routing.end_step()
        grads = trainer.gradients()
        trainer.set_gradients(layout["grads"][step])
        coef = trainer.clip_and_update(trainer.train.lr_at(step))
        out["steps"].append({"loss": loss, "aux": aux, "grads": grads, "coef": coef, "after": trainer.state()})
    trainer.load(layout["states"][steps])
    out["eval"] = trainer.evaluate(*data.next_batch())
    out["routing"] = trainer.routing.records
    out["followed"] = trainer.routing.followed
    return out
