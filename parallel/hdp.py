"""Hybrid data parallelism's process groups: every aligned power-of-two block of the dp × cp ranks, made once.

A step's plan (:func:`plait.scheduler.balance.balance`) splits a long sequence over an
aligned block of g ranks of the dp × cp space (ranks ``start … start+g−1`` of that space,
``start`` a multiple of g). Because blocks are aligned and sized in powers of two, a space
of R ranks has only R − 1 such blocks of two or more ranks; making them all when the job
starts means no step ever creates a process group. The space is the ranks that share a
pipeline stage and a tensor-parallel position (the ``dp+cp`` groups), so tensor, pipeline
and expert parallelism around it are unchanged.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.comm import Group
from plait.parallel.hdp_calls import prepare, run_calls, run_pipelined
from plait.scheduler.balance import Cost, Plan, calls_terms, fit_cost, fit_terms
from plait.scheduler.hdp_calls import rounds
from plait.scheduler.dims import MeshAxis, ParallelDims

OBSERVED = 256  # rank-steps the cost is refitted on
LOOPBACK_BIT_S = 10e9  # the K/V exchange's assumed rate when calibrating on one machine


class BlockGroups:
    """This rank's :class:`Group` for every aligned power-of-two block of its dp × cp space that holds it.

    Construction is a collective (every rank creates every group, in the same order).
    """

    def __init__(self, dims: ParallelDims):
        spaces = dims.groups((MeshAxis.DP, MeshAxis.CP))
        size = len(spaces[0])
        if size & (size - 1):
            raise ValueError(f"hybrid data parallelism splits sequences over power-of-two blocks: dp × cp = {size} "
                             f"must be a power of two")
        self.size = size
        self.rank = dist.get_rank()
        self.space: tuple[int, ...] = ()
        self._mine: dict[tuple[int, int], Group] = {}
        for space in spaces:
            if self.rank in space:
                self.space = tuple(space)
            g = 2
            while g <= size:
                for start in range(0, size, g):
                    members = space[start:start + g]
                    pg = dist.new_group(members)
                    if self.rank in members:
                        self._mine[(start, g)] = Group(axis="hdp", ranks=tuple(members),
                                                       rank=members.index(self.rank), pg=pg)
                g *= 2
        self.index = self.space.index(self.rank)  # this rank's place in its dp × cp space

    def block(self, start: int, size: int) -> Group:
        """The group of block ``start … start+size−1`` (positions in the dp × cp space); this rank must be in it."""
        found = self._mine.get((start, size))
        if found is None:
            raise KeyError(f"rank {self.rank} (position {self.index} of its dp × cp space) is not in the aligned "
                           f"block of {size} at {start}")
        return found

    def __len__(self) -> int:
        return len(self._mine)


def forward_backward(model: nn.Module, blocks: BlockGroups, plan: Plan,
                     documents: Sequence[tuple[torch.Tensor, torch.Tensor]] | Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                     total_tokens: int, row_tokens: int | None = None, tp: Group | None = None,
                     aux_coef: float | None = None) -> torch.Tensor:
    """Run this rank's calls of a step's plan, forward and backward, in free order (no collective spans ranks
    with different documents): gradients accumulate into ``model``. Returns this rank's loss sum and its share
    of the per-document balancing loss (float64 [2]; ``aux_coef`` None: a model without one, 0 reported).

    Split sequences are padded, cut zig-zag and attended with their K and V gathered over their block; whole
    sequences are packed into rows of at most ``row_tokens`` tokens (default: one row); see
    :mod:`plait.parallel.hdp_calls`. Summing gradients over the dp × cp space gives one process's gradients.
    """
    lengths = _lengths(plan, documents)
    calls = rounds(plan, lengths, blocks.size, row_tokens=row_tokens).of(blocks.index)
    device = next(model.parameters()).device
    weight = None if aux_coef is None else 1.0 / sum(len(g.sequences) for g in plan.groups)
    prepared = [prepare(c, documents, blocks.block, blocks.index, tp, device, balance_weight=weight) for c in calls]
    return run_calls(model, prepared, total_tokens, aux_coef or 0.0)


def _lengths(plan: Plan, documents) -> list[int]:
    """Lengths indexed like the plan's sequences: those of this rank's documents, 0 elsewhere (rows of other
    ranks are never packed here)."""
    n = 1 + max(i for g in plan.groups for i in g.sequences)
    lengths = [0] * n
    for i in (documents.keys() if isinstance(documents, Mapping) else range(len(documents))):
        lengths[i] = documents[i][0].numel()
    return lengths


def reduce_gradients(model: nn.Module, blocks: BlockGroups) -> None:
    """Sum every gradient over this rank's dp × cp space (each rank holds the grads of its own tokens)."""
    whole = blocks.block(0, blocks.size) if blocks.size > 1 else None
    if whole is None:
        return
    for p in model.parameters():
        if p.grad is None:  # a rank without tokens this step, or an expert no token reached: still reduces
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=whole.pg)


def calibration_rows(max_len: int) -> list[list[int]]:
    """What :func:`calibrate_cost` times: single sequences of max_len/8 … max_len tokens (at least 16), and
    rows of max_len tokens packed with 4 and 16 equal documents, which tell a call's overhead from a token's."""
    singles = sorted({max(16, max_len // d) for d in (8, 4, 2, 1)})
    packed = [[max(1, max_len // n)] * n for n in (4, 16)]
    return [[n] for n in singles] + packed


def measure_cost(model: nn.Module, vocab: int, rows: Sequence[Sequence[int]], repeats: int = 2) -> list[tuple[list[int], float]]:
    """Seconds of forward + backward of each row (the lengths of the documents packed into it; one: a single
    sequence), the median of ``repeats`` (CPU time on the CPU).

    Leaves the model's gradients as they were (None) and draws no random numbers from the global generator.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    samples = []
    for lengths in rows:
        lengths = [int(n) for n in lengths]
        tokens = torch.randint(0, vocab, (1, sum(lengths)), generator=gen).to(device)
        documents = [lengths] if len(lengths) > 1 else None
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            model(tokens, documents=documents).float().logsumexp(-1).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
        samples.append((lengths, statistics.median(times)))
    for p in model.parameters():
        p.grad = None
    return samples


def calibrate_cost(model: nn.Module, *, max_len: int, group: dist.ProcessGroup | None = None) -> tuple[Cost, list]:
    """The balance scheduler's :class:`Cost`, fitted on global rank 0 and broadcast, so every rank plans alike.

    ``c`` charges the K and V rows a rank of a split sequence exchanges per token and layer (fp32, forward
    all-gather and backward reduce-scatter) at :data:`LOOPBACK_BIT_S`.
    """
    values = torch.zeros(3, dtype=torch.float64)
    samples: list = []
    if dist.get_rank() == 0:
        samples = measure_cost(model, model.cfg.vocab, calibration_rows(max_len))
        fitted = fit_cost(samples)
        values[:] = torch.tensor([fitted.a, fitted.b, fitted.e], dtype=torch.float64)
    dist.broadcast(values, src=0, group=group)
    return Cost(a=float(values[0]), b=float(values[1]), c=exchange_seconds_per_token(model.cfg),
                e=float(values[2])), samples


def exchange_seconds_per_token(cfg) -> float:
    """Seconds per token of a split sequence's K/V exchange: K and V rows (fp32, ``dim`` wide) all-gathered in
    the forward and reduce-scattered in the backward, every layer, at :data:`LOOPBACK_BIT_S`."""
    return 2 * 2 * cfg.dim * 4 * cfg.layers * 8 / LOOPBACK_BIT_S


class HybridDP:
    """A rank's hybrid data parallelism: block groups and cost made once, then one plan and step per batch.

    ``lockstep`` (expert or pipeline parallelism around it): every rank makes every round's call, an empty
    round as a padding call, so the collectives inside calls line up (see :mod:`plait.scheduler.hdp_calls`).
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, *, budget: int, max_len: int, schedule: str = "balance",
                 tp: Group | None = None, lockstep: bool = False, multiple: int = 1):
        """``model`` whole (before tensor parallelism splits it): rank 0 times it to fit the cost. ``multiple``:
        the rounds of a step are padded to a multiple of it (the interleaved pipeline schedule's pp)."""
        self.blocks = BlockGroups(dims)
        self.tp = tp
        self.budget = budget
        self.max_len = max_len
        self.schedule = schedule
        self.lockstep = lockstep
        self.multiple = multiple
        self.cost, self.calibration = calibrate_cost(model, max_len=max_len)
        # The calibrated cost's predictions for its own rows anchor the refits (every rank computes them alike).
        self.anchors = []
        for row in calibration_rows(max_len):
            terms = (1.0, float(sum(row)), float(sum(n * n for n in row)))
            self.anchors.append((terms, self.cost.e + self.cost.a * terms[1] + self.cost.b * terms[2]))
        self.observed: list[tuple[tuple[float, float, float], float]] = []
        self._last: tuple | None = None
        self.static_cp = 1
        while self.static_cp * budget < max_len:
            self.static_cp *= 2

    def plan(self, lengths: Sequence[int]) -> Plan:
        from plait.scheduler.balance import balance, static_plan

        if self.schedule == "static":
            return static_plan(lengths, self.blocks.size, self.static_cp, self.cost, window=self.max_len)
        return balance(lengths, self.blocks.size, self.cost, budget=self.budget, capacity=sum(lengths))

    def step(self, chunks: Sequence[nn.Module], lengths: Sequence[int], fetch, *, pipeline=None,
             aux_coef: float | None = None) -> tuple[torch.Tensor, dict]:
        """Plan, load this rank's documents, forward and backward (through ``pipeline``'s schedule when given);
        returns (float64 [2]: the loss sum and this rank's share of the balancing loss, the plan's balance).
        ``aux_coef``: the weight of a mixture-of-experts model's per-document balancing loss (None: no MoE)."""
        start = time.perf_counter()
        plan = self.plan(lengths)
        table = rounds(plan, lengths, self.blocks.size, row_tokens=self.budget, multiple=self.multiple)
        planned = time.perf_counter() - start
        me = self.blocks.index
        self._last = (table, list(lengths)) if self.schedule == "balance" else None
        calls = table.of(me, lockstep=self.lockstep)
        mine = sorted({i for c in calls if c is not None for i in c.sequences})
        documents = dict(zip(mine, fetch(mine)))
        device = next((p.device for c in chunks for p in c.parameters()), None)
        cpu = time.process_time()
        weight = None if aux_coef is None else 1.0 / len(lengths)
        prepared = [prepare(c, documents, self.blocks.block, me, self.tp, device, balance_weight=weight) for c in calls]
        if pipeline is None:
            sums = run_calls(chunks[0], prepared, sum(lengths), aux_coef or 0.0)
        else:
            sums = run_pipelined(pipeline, prepared, sum(lengths), dim=chunks[0].cfg.dim, device=device,
                                 aux_coef=aux_coef or 0.0)
        compute = time.process_time() - cpu
        return sums, {"predicted": plan.imbalance, "schedule_ms": planned * 1e3, "compute_s": compute,
                             "split": sum(1 for g in plan.groups if g.size > 1),
                             "largest_block": max(g.size for g in plan.groups),
                             "calls": table.count if self.lockstep else len(calls),
                             "padding_calls": table.empty() if self.lockstep else 0}

    def observe(self, seconds: Sequence[float]) -> None:
        """Refit the cost on the last step's measured seconds per position of the dp space (the same numbers on
        every rank, after the step's all-reduce, so every rank refits alike and plans stay identical).

        ``e``, ``a`` and ``b`` are fitted by non-negative least squares on the latest :data:`OBSERVED` rank-steps
        (each rank's calls summed into the cost's terms) and the calibration's rows as predicted at start, which
        keep the fit defined while few steps are in; ``c`` stays as assumed. Only steps of the balance schedule
        are observed.
        """
        if self._last is None:
            return
        table, lengths = self._last
        self._last = None
        for r, sec in enumerate(seconds):
            calls = [None if c is None else (c.size, c.sequences, c.packed) for c in table.of(r, lockstep=self.lockstep)]
            n, ta, tb, tc = calls_terms(calls, lengths, self.max_len)
            if n:
                self.observed.append(((n, ta, tb), sec - self.cost.c * tc))
        del self.observed[:-OBSERVED]
        e, a, b = fit_terms(self.anchors + self.observed)
        self.cost = Cost(a=a, b=b, c=self.cost.c, e=e)

    def state_dict(self) -> dict:
        """The fitted cost and its samples (plain numbers), so that a resumed run plans as the original would."""
        c = self.cost
        return {"cost": [c.a, c.b, c.c, c.e], "anchors": [[*t, sec] for t, sec in self.anchors],
                "observed": [[*t, sec] for t, sec in self.observed]}

    def load_state_dict(self, state: dict) -> None:
        a, b, c, e = (float(v) for v in state["cost"])
        self.cost = Cost(a=a, b=b, c=c, e=e)
        self.anchors = [((float(n), float(ta), float(tb)), float(sec)) for n, ta, tb, sec in state["anchors"]]
        self.observed = [((float(n), float(ta), float(tb)), float(sec)) for n, ta, tb, sec in state["observed"]]

