"""Pipeline parallelism: stage split, schedules as data, and an executor that sends through :mod:`comm`.

The model is cut into ``S = pp·vpp`` *virtual stages* of contiguous blocks. Virtual stage
``v`` lives on pp rank ``v % pp`` (Megatron's interleaved placement: rank r holds chunks
r, r+pp, r+2pp, ...), so the first stage (embedding) is always on pp rank 0 and the last
(norm, head, loss) on pp rank pp-1, and with pp > 1 every boundary v → v+1 crosses ranks.

Schedules are plain lists of :class:`Action` per rank, made in
:mod:`plait.scheduler.pipeline` (no torch there, so the planner costs the same lists), so
:func:`simulate` can prove a schedule deadlock-free and measure its bubble before a
single message is sent. :func:`run_pipeline` then executes one rank's list with blocking
receives and non-blocking sends, which is exactly the model :func:`simulate` checks: if the
simulation finishes, so does the real run.

This module works on the model structurally (``embed``, ``rope``, ``layers``, ``norm``,
``output``, ``cfg`` attributes) and never imports :mod:`plait.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel import comm
from plait.scheduler.dims import DENSE_AXES, MeshAxis, ParallelDims
from plait.scheduler.pipeline import (  # noqa: F401  (the schedules this executor runs, re-exported)
    Action,
    PipelineStats,
    ScheduleError,
    _check_sizes,  # noqa: F401
    schedule,
    schedule_1f1b,
    schedule_forward,
    schedule_interleaved,
    simulate,
    stage_layers,
)

# ----------------------------------------------------------------------------- stage split


def split_model(model: nn.Module, *, pp: int, pp_rank: int, vpp: int = 1, layers: Sequence[int] | None = None) -> list[nn.Module]:
    """This rank's chunks; local chunk ``j`` is virtual stage ``j·pp + pp_rank``.

    Each chunk is an instance of the model's own class built without running its
    ``__init__`` (which would allocate and initialise a full model), holding *the same*
    submodule objects as ``model``: ``embed`` only on virtual stage 0, ``norm``/``output``
    only on the last, the owned blocks under their global keys (so parameter names match
    the full model's checkpoint) and ``rope`` (buffers only) everywhere. Nothing is copied,
    and a parameter is reachable from exactly one chunk across all ranks.
    """
    _check_sizes(pp, vpp)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} outside 0 .. {pp - 1}")
    blocks = model.layers
    if not isinstance(blocks, nn.ModuleDict):
        raise TypeError(f"model.layers must be an nn.ModuleDict keyed by block index, got {type(blocks).__name__}")
    if model._parameters:
        raise ValueError(f"model has parameters outside submodules ({', '.join(model._parameters)}); no stage could own them")
    keys = list(blocks.keys())
    split = stage_layers(len(keys), pp, vpp, layers)
    last = pp * vpp - 1
    chunks = []
    for j in range(vpp):
        v = j * pp + pp_rank
        chunk = object.__new__(type(model))
        nn.Module.__init__(chunk)
        for name, value in vars(model).items():  # plain attributes such as cfg, and plait's marks (_plait_sp)
            if (not name.startswith("_") or name.startswith("_plait_")) and name != "training":
                object.__setattr__(chunk, name, value)
        chunk.training = model.training  # not .train(): that would flip the shared submodules
        for name, module in model._modules.items():
            if name == "layers":
                module = nn.ModuleDict({keys[i]: blocks[keys[i]] for i in split[v]})
            elif name == "embed":
                module = module if v == 0 else None
            elif name in ("norm", "output"):
                module = module if v == last else None
            elif module is not None and any(True for _ in module.parameters()):
                raise ValueError(f"submodule '{name}' has parameters but no pipeline stage is defined to own it")
            chunk.register_module(name, module)
        for name, buf in model._buffers.items():
            chunk.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        chunks.append(chunk)
    return chunks


# ----------------------------------------------------------------------------- schedules
# ----------------------------------------------------------------------------- executor

_TAG_LIMIT = 2**31 - 1  # torch's tag is a C int; gloo builds its slot from a 32-bit tag


def _tag(direction: int, src_stage: int, micro: int, stages: int) -> int:
    """Unique per (direction, sending virtual stage, micro), so messages between a pair never mix."""
    tag = 2 * (micro * stages + src_stage) + direction
    if tag > _TAG_LIMIT:
        raise ValueError(f"pipeline tag {tag} exceeds {_TAG_LIMIT}: too many micro-batches × stages")
    return tag


Forward = Callable[[int, torch.Tensor | None, int], tuple[torch.Tensor, torch.Tensor | None]]
Loss = Callable[[int, torch.Tensor], torch.Tensor]


def run_pipeline(
    actions: Sequence[Action],
    *,
    chunks: Sequence[nn.Module],
    pp: int,
    vpp: int,
    pp_rank: int,
    rank_of_stage: Callable[[int], int],
    act_shape: Sequence[int] | Callable[[int], Sequence[int]],
    act_dtype: torch.dtype,
    forward: Forward,
    loss: Loss,
    backward: bool = True,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Run this rank's ``actions``; return the detached loss of each micro-batch (last stage only, else []).

    ``forward(j, x, i)`` runs local chunk ``j`` on micro ``i`` and returns ``(out, extra)``:
    ``x`` is None on virtual stage 0 (the callback embeds micro i's tokens itself), else the
    received activation (``requires_grad`` when training). ``extra`` (e.g. the chunk's MoE
    balancing loss, already weighted; None if none) is back-propagated with the chunk, as
    ``autograd.backward([out, extra], [grad_out, 1])``. On the last stage ``loss(i, out)``
    is the scalar to back-propagate (its ``extra`` is added too). ``rank_of_stage(p)`` is
    the global rank holding pp rank ``p`` at this rank's dp/cp/tp coordinates. Parameter
    gradients accumulate over the micro-batches, as in plain gradient accumulation.

    Every boundary activation and its gradient is a tensor of ``act_shape``/``act_dtype``
    (the caller guarantees it; ``act_shape(i)`` when micro-batches differ, as hybrid data
    parallelism's do), sent with :func:`comm.isend` and received with blocking
    :func:`comm.recv`. :data:`comm.LEDGER` therefore records, on pp rank r per call, with
    ``a = prod(act_shape) · act_dtype.itemsize`` and ``m`` micro-batches, under ("pp", "send"):

        forward:  a · m for each owned virtual stage v < S-1   (activation to v+1)
        backward: a · m for each owned virtual stage v > 0     (input gradient to v-1)

    For pp > 1 that is ``a · m · (2·vpp - [r == 0] - [r == pp-1])`` bytes in
    ``m · (2·vpp - [r == 0] - [r == pp-1])`` calls when training, ``a · m · (vpp - [r == pp-1])``
    forward-only, and ``2 · a · m · (pp·vpp - 1)`` summed over a pipeline. With pp == 1,
    consecutive stages are on this rank and the tensor is handed over locally (nothing recorded).
    The receiver records nothing.
    """
    stages = pp * vpp
    if len(chunks) != vpp:
        raise ValueError(f"got {len(chunks)} chunks for vpp={vpp}")
    if device is None:
        param = next((p for c in chunks for p in c.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    if not backward and any(a.kind == "B" for a in actions):
        raise ValueError("backward=False but the schedule contains backward actions")
    shape_of = (lambda i: tuple(act_shape(i))) if callable(act_shape) else (lambda i, s=tuple(act_shape): s)
    mailbox: dict[int, torch.Tensor] = {}  # pp == 1: stage to stage on this rank
    pending: list[tuple[dist.Work, torch.Tensor]] = []  # (Work, buffer) until the send completes
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]] = {}
    losses: dict[int, torch.Tensor] = {}

    def send(t: torch.Tensor, stage: int, tag: int) -> None:
        if stage % pp == pp_rank:
            mailbox[tag] = t
        else:
            t = t.contiguous()
            pending.append((comm.isend(t, rank_of_stage(stage % pp), axis="pp", tag=tag), t))

    def receive(stage: int, tag: int, shape: tuple[int, ...]) -> torch.Tensor:
        if stage % pp == pp_rank:
            return mailbox.pop(tag)
        return comm.recv(torch.empty(shape, dtype=act_dtype, device=device), rank_of_stage(stage % pp), tag=tag)

    for a in actions:
        v, i = a.chunk, a.micro
        shape = shape_of(i)
        if v % pp != pp_rank:
            raise ValueError(f"action {a} belongs to pp rank {v % pp}, not {pp_rank}")
        comm.LEDGER.phase = "forward" if a.kind == "F" else "backward"
        if a.kind == "F":
            x = None if v == 0 else receive(v - 1, _tag(0, v - 1, i, stages), shape)
            with torch.enable_grad() if backward else torch.no_grad():
                if x is not None and backward:
                    x.requires_grad_()
                out, extra = forward(v // pp, x, i)
                if v == stages - 1:
                    value = loss(i, out)
                    losses[i] = value.detach()
                    roots, grads = [value], [torch.ones_like(value)]
                else:
                    if tuple(out.shape) != shape or out.dtype != act_dtype:  # the peer would misread it
                        raise ValueError(f"stage {v} produced {tuple(out.shape)} {out.dtype}, expected act_shape {shape} {act_dtype}")
                    send(out.detach(), v + 1, _tag(0, v, i, stages))
                    roots, grads = [out], [None]  # gradient filled in at the backward
            if backward:
                if extra is not None and extra.requires_grad:
                    roots.append(extra)
                    grads.append(torch.ones_like(extra))
                saved[(v, i)] = (x, roots, grads)
        else:
            x, roots, grads = saved.pop((v, i))
            if v < stages - 1:
                grads[0] = receive(v + 1, _tag(1, v + 1, i, stages), shape)
            torch.autograd.backward(roots, grads)  # frees the graph (retain_graph=False)
            if v > 0:
                g = x.grad if x.grad is not None else torch.zeros(shape, dtype=act_dtype, device=device)
                send(g, v - 1, _tag(1, v, i, stages))
            del x, roots, grads
        pending = [(w, t) for w, t in pending if not w.is_completed()]
    for w, _ in pending:
        w.wait()
    if saved:
        raise RuntimeError(f"forwards without a backward: {sorted(saved)}")
    return [losses[i] for i in sorted(losses)]


# ----------------------------------------------------------------------------- convenience


@dataclass
class PipelinePlan:
    """What :func:`apply_pp` gives one rank: its chunks, its schedule and how to reach its peers."""

    chunks: list[nn.Module]
    actions: list[Action]
    pp: int
    vpp: int
    pp_rank: int
    stages: list[int]  # virtual stage of each local chunk
    peers: list[int]  # global rank of pp rank p at this rank's dp/cp/tp coordinates

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of_stage(self, p: int) -> int:
        return self.peers[p]

    def run(self, actions: Sequence[Action] | None = None, **kwargs) -> list[torch.Tensor]:
        """:func:`run_pipeline` with this plan's chunks and layout (``actions`` default: the plan's)."""
        acts = self.actions if actions is None else actions
        kwargs.setdefault("backward", any(a.kind == "B" for a in acts))
        return run_pipeline(acts, chunks=self.chunks, pp=self.pp, vpp=self.vpp, pp_rank=self.pp_rank,
                            rank_of_stage=self.rank_of_stage, **kwargs)


def apply_pp(
    model: nn.Module, dims: ParallelDims, rank: int, *, micros: int, vpp: int = 1,
    layers: Sequence[int] | None = None, forward_only: bool = False,
) -> PipelinePlan:
    """Split ``model`` for global ``rank`` of ``dims`` and pick its schedule (see :func:`schedule`).

    The peers follow the dense folding (pp outermost): the same dp/cp/tp coordinates in pp
    rank p are ``rank + (p - pp_rank) · world / pp``.
    """
    coords = dims.coordinates(rank, DENSE_AXES)
    pp_rank = coords[MeshAxis.PP]
    peers = [dims.rank_of({**coords, MeshAxis.PP: p}, DENSE_AXES) for p in range(dims.pp)]
    chunks = split_model(model, pp=dims.pp, pp_rank=pp_rank, vpp=vpp, layers=layers)
    actions = schedule(dims.pp, vpp, micros, pp_rank, forward_only=forward_only)
    return PipelinePlan(chunks=chunks, actions=actions, pp=dims.pp, vpp=vpp, pp_rank=pp_rank,
                        stages=[j * dims.pp + pp_rank for j in range(vpp)], peers=peers)
