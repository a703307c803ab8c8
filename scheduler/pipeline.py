"""Pipeline schedules as data: the stage split, 1F1B and interleaved 1F1B, and a simulator.

No torch here: the runtime's executor (:mod:`plait.parallel.pp`) runs these very lists,
and the planner (:mod:`plait.scheduler.planner`) costs them, so both follow one set of
rules. Virtual stage ``v`` lives on pp rank ``v % pp`` (Megatron's interleaved placement).
:func:`simulate` executes every rank's list with blocking receives and non-blocking
sends, the executor's model: it proves a schedule deadlock-free and measures its bubble
and the activations each rank keeps alive, with integer slots or measured seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from plait.errors import ConfigError

# ----------------------------------------------------------------------------- stage split

def _check_sizes(pp: int, vpp: int) -> None:
    for key, value in (("parallel.pp", pp), ("parallel.vpp", vpp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(key, value, "accepted: a positive integer")


def stage_layers(num_layers: int, pp: int, vpp: int = 1, layers: Sequence[int] | None = None) -> list[list[int]]:
    """Global block indices of each virtual stage ``v = 0 .. pp·vpp-1`` (contiguous, in order).

    ``layers`` (one count per virtual stage, each >= 1, summing to ``num_layers``) gives a
    non-uniform split, e.g. from a planner that balances stages by measured cost. Without
    it the split is uniform and the remainder goes to the *later* stages: under 1F1B rank r
    keeps ``pp - r`` micro-batches of activations alive, so the early ranks are the memory
    bottleneck and should hold fewer blocks; a planner that also wants to account for the
    output head passes ``layers`` explicitly.
    """
    _check_sizes(pp, vpp)
    stages = pp * vpp
    if layers is None:
        if num_layers < stages:
            key, value = ("parallel.vpp", vpp) if vpp > 1 else ("parallel.pp", pp)
            raise ConfigError(
                key, value,
                f"pp × vpp = {pp} × {vpp} = {stages} virtual stages need at least {stages} layers, model.layers={num_layers}",
                hint=f"lower parallel.pp/parallel.vpp so that pp × vpp <= {num_layers}",
            )
        base, extra = divmod(num_layers, stages)
        counts = [base + (v >= stages - extra) for v in range(stages)]
    else:
        counts = list(layers)
        if len(counts) != stages:
            raise ConfigError(
                "parallel.pp_layers", counts,
                f"needs one layer count per virtual stage: pp × vpp = {pp} × {vpp} = {stages} entries, got {len(counts)}",
                hint=f"give {stages} counts summing to model.layers={num_layers}",
            )
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
            raise ConfigError("parallel.pp_layers", counts, "every virtual stage needs an integer count of at least 1 layer")
        if sum(counts) != num_layers:
            raise ConfigError(
                "parallel.pp_layers", counts,
                f"the counts sum to {sum(counts)} but model.layers={num_layers}",
                hint=f"change the counts so that they sum to {num_layers}",
            )
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Action:
    """Forward ("F") or backward ("B") of virtual stage ``chunk`` on micro-batch ``micro``."""

    kind: Literal["F", "B"]
    chunk: int
    micro: int

    def __str__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.micro}"


def _check_schedule_args(pp: int, vpp: int, micros: int, rank: int) -> None:
    _check_sizes(pp, vpp)
    if isinstance(micros, bool) or not isinstance(micros, int) or micros < 1:
        raise ConfigError("train.global_batch", micros, "the number of micro-batches per step must be a positive integer")
    if not 0 <= rank < pp:
        raise ValueError(f"pp rank {rank} outside 0 .. {pp - 1}")


def schedule_1f1b(pp: int, micros: int, rank: int) -> list[Action]:
    """Non-interleaved 1F1B (PipeDream-Flush) for pp rank ``rank``.

    ``min(pp - rank - 1, micros)`` warm-up forwards, then alternate one forward and one
    backward, then the remaining backwards. Rank r therefore holds at most ``pp - r``
    micro-batches of activations, independent of ``micros``.
    """
    _check_schedule_args(pp, 1, micros, rank)
    warm = min(pp - rank - 1, micros)
    acts = [Action("F", rank, i) for i in range(warm)]
    for i in range(micros - warm):
        acts += [Action("F", rank, warm + i), Action("B", rank, i)]
    acts += [Action("B", rank, i) for i in range(micros - warm, micros)]
    return acts


def _interleaved_order(pp: int, vpp: int, rank: int, k: int, backward: bool) -> Action:
    """The k-th forward (or backward) of rank ``rank`` in Megatron's interleaved order.

    Micro-batches go in groups of pp: a group passes through local chunk 0, then 1, ...
    (backwards: the last chunk first), which keeps every rank busy with a full group while
    the group's next chunk is still being produced upstream.
    """
    j = (k // pp) % vpp
    if backward:
        j = vpp - 1 - j
    micro = (k // (pp * vpp)) * pp + k % pp
    return Action("B" if backward else "F", j * pp + rank, micro)


def schedule_interleaved(pp: int, vpp: int, micros: int, rank: int) -> list[Action]:
    """Interleaved 1F1B with ``vpp`` chunks per rank (Narayanan et al. 2021); 1F1B when vpp == 1.

    Warm-up ``min(2·(pp - rank - 1) + (vpp - 1)·pp, micros·vpp)`` forwards, then one
    forward / one backward, then cool-down backwards. The bubble shrinks by about a factor
    vpp at the cost of ``vpp``× more boundary messages and more live activations (rank r
    holds up to ``warm-up + 1`` chunk activations, each ``1/vpp`` of a stage's, against
    ``pp - r`` stage activations for 1F1B). Needs ``micros % pp == 0`` so that micro-batches
    form whole groups of pp.
    """
    _check_schedule_args(pp, vpp, micros, rank)
    if vpp == 1:
        return schedule_1f1b(pp, micros, rank)
    if micros % pp:
        up = -(-micros // pp) * pp
        raise ConfigError(
            "train.global_batch", micros,
            f"the interleaved schedule (parallel.vpp={vpp}) needs the number of micro-batches per step "
            f"(global_batch / (micro_batch × dp)) to be a multiple of parallel.pp={pp}",
            hint=f"use {up} micro-batches per step (or {up - pp if up > pp else pp}), or set parallel.vpp=1",
        )
    total = micros * vpp
    warm = min(2 * (pp - rank - 1) + (vpp - 1) * pp, total)
    acts = [_interleaved_order(pp, vpp, rank, k, False) for k in range(warm)]
    for k in range(total - warm):
        acts += [_interleaved_order(pp, vpp, rank, warm + k, False), _interleaved_order(pp, vpp, rank, k, True)]
    acts += [_interleaved_order(pp, vpp, rank, k, True) for k in range(total - warm, total)]
    return acts


def schedule_forward(pp: int, vpp: int, micros: int, rank: int) -> list[Action]:
    """Forward only (evaluation): every owned (chunk, micro), in groups of pp micro-batches per chunk.

    Sorted by (micro // pp, virtual stage, micro % pp), an order in which every dependency
    (v-1, i) precedes (v, i) globally, so it cannot deadlock for any ``micros``.
    """
    _check_schedule_args(pp, vpp, micros, rank)
    owned = [(i // pp, j, i % pp, j * pp + rank, i) for j in range(vpp) for i in range(micros)]
    return [Action("F", v, i) for *_, v, i in sorted(owned)]


def schedule(pp: int, vpp: int, micros: int, rank: int, *, forward_only: bool = False) -> list[Action]:
    """The schedule plait runs: forward-only, 1F1B (vpp == 1) or interleaved 1F1B."""
    return schedule_forward(pp, vpp, micros, rank) if forward_only else schedule_interleaved(pp, vpp, micros, rank)


@dataclass
class PipelineStats:
    """Result of :func:`simulate`. Times are in slots of one chunk forward (``forward_time``)."""

    makespan: int
    bubble: float  # idle fraction of all ranks over [0, makespan]
    busy: list[int]  # per rank
    peak_in_flight: list[int]  # per rank: most (chunk, micro) forwarded but not yet backwarded
    finish: dict[Action, int] = field(repr=False)


class ScheduleError(RuntimeError):
    """A schedule deadlocks, repeats or misses work, or puts an action on the wrong rank."""


def simulate(
    schedules: Sequence[Sequence[Action]], pp: int, vpp: int = 1, *, forward_time: int = 1, backward_time: int = 1
) -> PipelineStats:
    """Execute every rank's list with blocking receives and non-blocking (unbounded) sends.

    An action starts when its rank is free and its input exists: F(v, i) needs F(v-1, i)
    (none for v = 0); B(v, i) needs this rank's F(v, i) and B(v+1, i) (none for the last v).
    Communication takes no time. Raises :class:`ScheduleError` on deadlock, on an action not
    owned by its rank, on duplicates, or if some (chunk, micro) is not forwarded (and, when
    any backward is scheduled, backwarded) exactly once.
    """
    stages = pp * vpp
    if len(schedules) != pp:
        raise ScheduleError(f"got {len(schedules)} rank schedules for pp={pp}")
    seen: set[Action] = set()
    for r, acts in enumerate(schedules):
        for a in acts:
            if a.kind not in ("F", "B") or not 0 <= a.chunk < stages or a.chunk % pp != r or a.micro < 0:
                raise ScheduleError(f"rank {r}: action {a} is not one of its own (virtual stages {list(range(r, stages, pp))})")
            if a in seen:
                raise ScheduleError(f"rank {r}: action {a} scheduled twice")
            seen.add(a)
    micros = 1 + max((a.micro for a in seen), default=-1)
    training = any(a.kind == "B" for a in seen)
    expected = {Action(k, v, i) for k in ("FB" if training else "F") for v in range(stages) for i in range(micros)}
    if seen != expected:
        missing = sorted(expected - seen, key=lambda a: (a.micro, a.chunk, a.kind))
        raise ScheduleError(f"missing actions: {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}")

    finish: dict[Action, int] = {}
    pos, clock, busy = [0] * pp, [0] * pp, [0] * pp
    live, peak = [0] * pp, [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(schedules[r]):
                a = schedules[r][pos[r]]
                if a.kind == "F":
                    deps = [Action("F", a.chunk - 1, a.micro)] if a.chunk > 0 else []
                else:
                    own = Action("F", a.chunk, a.micro)
                    if own not in finish and schedules[r].index(own) > pos[r]:
                        raise ScheduleError(f"rank {r}: {a} comes before its own forward")
                    deps = [own] + ([Action("B", a.chunk + 1, a.micro)] if a.chunk < stages - 1 else [])
                if any(d not in finish for d in deps):
                    break
                start = max([clock[r]] + [finish[d] for d in deps])
                cost = forward_time if a.kind == "F" else backward_time
                finish[a] = clock[r] = start + cost
                busy[r] += cost
                live[r] += 1 if a.kind == "F" else -1
                peak[r] = max(peak[r], live[r])
                pos[r] += 1
                progress = True
    if any(pos[r] < len(schedules[r]) for r in range(pp)):
        stuck = ", ".join(f"rank {r} waits at {schedules[r][pos[r]]}" for r in range(pp) if pos[r] < len(schedules[r]))
        raise ScheduleError(f"deadlock: {stuck}")
    makespan = max(clock)
    bubble = 1.0 - sum(busy) / (pp * makespan) if makespan else 0.0
    return PipelineStats(makespan=makespan, bubble=bubble, busy=busy, peak_in_flight=peak, finish=finish)
