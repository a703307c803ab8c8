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
import torch.nn.functional as F
from torch import nn

from plait.parallel import comm
from plait.parallel.comm import Group
from plait.parallel.cp import attention_modules, zigzag_positions
from plait.scheduler.balance import Cost, Plan, fit_cost
from plait.scheduler.dims import MeshAxis, ParallelDims

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


IGNORE = -100  # target of a padding token: no loss


def forward_backward(model: nn.Module, blocks: BlockGroups, plan: Plan,
                     documents: Sequence[tuple[torch.Tensor, torch.Tensor]] | Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                     total_tokens: int, row_tokens: int | None = None, tp: Group | None = None) -> torch.Tensor:
    """Run this rank's share of a step's plan, forward and backward: gradients accumulate into ``model``.

    Split sequences come first, in the plan's order, so every rank of a block reaches the block's
    sequence together; each is padded at its end to a multiple of 2·g (padding attends only to
    itself and has no loss), cut zig-zag and attended with its K and V gathered over the block.
    Then this rank's whole sequences, packed into rows of at most ``row_tokens`` tokens (default: one row),
    each attending only to itself; each row's backward runs before the next row's forward. The loss
    is the sum of token losses over ``total_tokens`` (the token mean of the whole global batch), so
    summing gradients over the dp × cp space gives one process's gradients. Returns this rank's loss
    sum (float64, detached).

    Under tensor parallelism (``tp``, with sequence parallelism) every rank of the tp group runs the
    same documents: each row is padded to a multiple of tp (2·g·tp when split) and the rank takes its
    contiguous part of the tokens, as the engine does with windows.
    """
    total = torch.zeros((), dtype=torch.float64)
    tp = tp if tp is not None and tp.size > 1 else None
    me = blocks.index
    for group in plan.groups:
        if group.size == 1 or me not in group.ranks:
            continue
        block = blocks.block(group.start, group.size)
        if group.packed:  # a static mesh's window of documents
            total += _split_window(model, block, [documents[i] for i in group.sequences], total_tokens, tp)
            continue
        for i in group.sequences:
            total += _split_window(model, block, [documents[i]], total_tokens, tp)
    whole = [i for g in plan.groups if g.size == 1 and g.start == me for i in g.sequences]
    rows: list[list[int]] = []
    held = 0
    for i in whole:
        n = documents[i][0].numel()
        if not rows or (row_tokens is not None and held + n > row_tokens):
            rows.append([])
            held = 0
        rows[-1].append(i)
        held += n
    for row in rows:
        x = torch.cat([documents[i][0] for i in row])
        y = torch.cat([documents[i][1] for i in row])
        lengths = [documents[i][0].numel() for i in row]
        if tp is not None:
            pad = -x.numel() % tp.size  # a document of its own, without loss
            if pad:
                x, y = torch.cat((x, x.new_zeros(pad))), torch.cat((y, y.new_full((pad,), IGNORE)))
                lengths.append(pad)
            x, y = x.chunk(tp.size)[tp.rank], y.chunk(tp.size)[tp.rank]
        logits = model(x[None], documents=[lengths])
        loss = F.cross_entropy(logits.float().flatten(0, 1), y, ignore_index=IGNORE, reduction="sum")
        (loss / total_tokens).backward()
        total += loss.detach().double()
    return total


class DocumentContextParallelAttention:
    """Replaces ``Attention.attend`` for a window of packed documents split zig-zag over a block: K and V are
    all-gathered, then each document's queries attend its own keys only (causal), so the work is Σ L²/g."""

    def __init__(self, group: Group, q_index: torch.Tensor, k_index: torch.Tensor, document: torch.Tensor):
        self.group = group
        self.parts = []
        q_doc, k_doc = document[q_index], document[k_index]
        for d in torch.unique(q_doc).tolist():
            qi = torch.nonzero(q_doc == d).flatten()
            ki = torch.nonzero(k_doc == d).flatten()
            self.parts.append((qi, ki, q_index[qi][:, None] >= k_index[ki][None, :]))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = comm.gather_from(k, self.group, 2)
        v = comm.gather_from(v, self.group, 2)
        out = q.new_zeros(q.shape)
        for qi, ki, mask in self.parts:
            part = F.scaled_dot_product_attention(q[:, :, qi], k[:, :, ki], v[:, :, ki], attn_mask=mask)
            out = out.index_copy(2, qi, part)
        return out


def _split_window(model: nn.Module, block: Group, documents: list[tuple[torch.Tensor, torch.Tensor]],
                  total_tokens: int, tp: Group | None = None) -> torch.Tensor:
    """Forward and backward of this rank's zig-zag share of a window of packed documents (one, for hybrid DP's
    split sequences); its loss sum.

    Padding to a multiple of 2·g (2·g·tp) is a document of its own without loss; rotary positions restart per
    document. Under tensor parallelism the rank's zig-zag share is cut again into tp contiguous parts.
    """
    g = block.size
    t = tp.size if tp is not None else 1
    x = torch.cat([d[0] for d in documents])
    y = torch.cat([d[1] for d in documents])
    length = x.numel()
    padded = -(-length // (2 * g * t)) * (2 * g * t)
    x = torch.cat((x, x.new_zeros(padded - length)))
    y = torch.cat((y, y.new_full((padded - length,), IGNORE)))
    sizes = [d[0].numel() for d in documents] + ([padded - length] if padded > length else [])
    document = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    within = torch.cat([torch.arange(n) for n in sizes])
    mine = zigzag_positions(padded, g, block.rank)
    gathered = torch.cat([zigzag_positions(padded, g, r) for r in range(g)])
    attention = attention_modules(model)
    for m in attention:
        m.attend = DocumentContextParallelAttention(block, mine, gathered, document)
    x, y = x[mine], y[mine]
    if tp is not None:
        x, y = x.chunk(t)[tp.rank], y.chunk(t)[tp.rank]
    try:
        logits = model(x[None], positions=within[mine])
    finally:
        for m in attention:
            del m.attend
    loss = F.cross_entropy(logits.float().flatten(0, 1), y, ignore_index=IGNORE, reduction="sum")
    (loss / total_tokens).backward()
    return loss.detach().double()


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
    """A rank's hybrid data parallelism: block groups and cost made once, then one plan and step per batch."""

    def __init__(self, model: nn.Module, dims: ParallelDims, *, budget: int, max_len: int, schedule: str = "balance",
                 tp: Group | None = None):
        """``model`` whole (before tensor parallelism splits it): rank 0 times it to fit the cost."""
        self.blocks = BlockGroups(dims)
        self.tp = tp
        self.budget = budget
        self.max_len = max_len
        self.schedule = schedule
        self.cost, self.calibration = calibrate_cost(model, max_len=max_len)
        self.static_cp = 1
        while self.static_cp * budget < max_len:
            self.static_cp *= 2

    def plan(self, lengths: Sequence[int]) -> Plan:
        from plait.scheduler.balance import balance, static_plan

        if self.schedule == "static":
            return static_plan(lengths, self.blocks.size, self.static_cp, self.cost, window=self.max_len)
        return balance(lengths, self.blocks.size, self.cost, budget=self.budget, capacity=sum(lengths))

    def step(self, model: nn.Module, lengths: Sequence[int], fetch) -> tuple[float, dict]:
        """Plan, load this rank's documents, forward and backward; returns (loss sum, the plan's balance)."""
        start = time.perf_counter()
        plan = self.plan(lengths)
        planned = time.perf_counter() - start
        me = self.blocks.index
        mine = sorted({i for g in plan.groups if me in g.ranks for i in g.sequences})
        documents = dict(zip(mine, fetch(mine)))
        cpu = time.process_time()
        loss = forward_backward(model, self.blocks, plan, documents, total_tokens=sum(lengths), row_tokens=self.budget,
                                tp=self.tp)
        compute = time.process_time() - cpu
        return float(loss), {"predicted": plan.imbalance, "schedule_ms": planned * 1e3, "compute_s": compute,
                             "split": sum(1 for g in plan.groups if g.size > 1),
                             "largest_block": max(g.size for g in plan.groups)}
