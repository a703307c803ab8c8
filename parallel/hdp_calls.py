"""Running a hybrid data-parallel step's forward calls (see :mod:`plait.scheduler.hdp_calls`), on one stage or
through a pipeline.

Each call becomes a :class:`Prepared`: this rank's tokens, targets, rotary positions or document
lengths, and for a split call the attention that gathers K and V over the call's block. The same
object serves every model chunk of a pipeline, so a micro-batch's stages agree on its shape.

- A split call (one long sequence, or a static mesh's window of documents) is padded at its end to a
  multiple of 2·g·tp (the padding is a document of its own without loss), cut zig-zag over its block
  of g ranks and, under tensor parallelism, into tp contiguous parts.
- A row of whole documents is padded to a multiple of tp the same way and cut into tp parts; each
  document attends only to itself.
- An empty round of a lockstep step is a row of ``tp`` padding tokens: every collective inside a call
  still runs, and nothing reaches the loss or the gradients.

The loss of a call is the sum of its token losses over ``total_tokens`` (the token mean of the whole
global batch), so summing gradients over the ranks gives one process's gradients. A mixture-of-experts
model's balancing loss is defined per document (:class:`~plait.runtime.models.moe.DocumentBalance`, the mean
over the step's documents): each call tells its MoE layers which document each of its tokens belongs to, and
a document's expert counts are summed over the ranks that share it (its block and tp), so the loss is the
same whatever the grouping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import comm
from plait.parallel.comm import Group
from plait.parallel.cp import attention_modules, zigzag_positions
from plait.runtime.models.moe import MoE, DocumentBalance
from plait.scheduler.hdp_calls import Call

IGNORE = -100  # target of a padding token: no loss

Documents = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


class DocumentContextParallelAttention:
    """Replaces ``Attention.attend`` for a window of packed documents split zig-zag over a block: K and V are
    all-gathered, then each document's queries attend its own keys only (causal).

    The queries of a document are taken one zig-zag chunk (``chunk`` positions) at a time, against only the
    keys up to that chunk's last position: the masked scores computed are about Σ L²·(2g+1)/(4g²) per rank
    rather than the Σ L²/g of a dense [share, L] block (all of a document's keys for every query). A document
    that lies within one chunk (a short one of a static mesh's window) is attended causally without a mask.
    """

    def __init__(self, group: Group, q_index: torch.Tensor, k_index: torch.Tensor, document: torch.Tensor,
                 device: torch.device | None = None, chunk: int | None = None):
        self.group = group
        self.parts = []
        q_doc, k_doc = document[q_index], document[k_index]
        q_chunk = q_index // chunk if chunk else torch.zeros_like(q_index)
        for d in torch.unique(q_doc).tolist():
            mine = q_doc == d
            for j in torch.unique(q_chunk[mine]).tolist():
                qi = torch.nonzero(mine & (q_chunk == j)).flatten()
                last = int(q_index[qi].max())
                ki = torch.nonzero((k_doc == d) & (k_index <= last)).flatten()
                if torch.equal(k_index[ki], q_index[qi]):  # the document lies within this chunk: plain causal
                    mask = None
                else:
                    mask = (q_index[qi][:, None] >= k_index[ki][None, :]).to(device)
                self.parts.append((qi.to(device), ki.to(device), mask))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = comm.gather_from(k, self.group, 2)
        v = comm.gather_from(v, self.group, 2)
        out = q.new_zeros(q.shape)
        for qi, ki, mask in self.parts:
            part = F.scaled_dot_product_attention(q[:, :, qi], k[:, :, ki], v[:, :, ki], attn_mask=mask,
                                                  is_causal=mask is None)
            out = out.index_copy(2, qi, part)
        return out


@dataclass
class Prepared:
    """One call on this rank: ``tokens`` [1, n] and ``targets`` [n] (its share), and how the model runs it."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None  # split: rotary positions of the share
    documents: list[list[int]] | None = None  # row: the lengths packed into it (the whole row, before tp)
    attend: DocumentContextParallelAttention | None = None  # split: attention over the block
    balance: DocumentBalance | None = None  # the MoE layers' per-document balancing loss (None: not asked for)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def run(self, chunk: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``chunk`` (the whole model or a pipeline stage's part) on this call: on its tokens, or on ``hidden``
        (the previous stage's activations)."""
        x = self.tokens if hidden is None else hidden
        experts = [m for m in chunk.modules() if isinstance(m, MoE)] if self.balance is not None else []
        for m in experts:
            m.documents = self.balance
        try:
            if self.attend is None:
                return chunk(x, documents=self.documents)
            modules = attention_modules(chunk)
            for m in modules:
                m.attend = self.attend
            try:
                return chunk(x, positions=self.positions)
            finally:
                for m in modules:
                    del m.attend
        finally:
            for m in experts:
                m.documents = None

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of this share (padding excluded)."""
        return F.cross_entropy(out.float().flatten(0, 1), self.targets, ignore_index=IGNORE, reduction="sum")


def _pad(x: torch.Tensor, y: torch.Tensor, to: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    pad = -x.numel() % to
    if pad:
        x, y = torch.cat((x, x.new_zeros(pad))), torch.cat((y, y.new_full((pad,), IGNORE)))
    return x, y, pad


def _balance(sizes: list[int], pad: int, share: torch.Tensor | None, t: int, tp: Group | None,
             group: Group | None, weight: float, device) -> DocumentBalance:
    """The per-document balancing terms of a call whose documents have ``sizes`` (then ``pad`` padding
    tokens): each token of this rank's share (``share``: its positions in the call, None: all, then cut
    into t parts) with its document, counts summed over ``tp`` and the split call's block ``group``."""
    ids = torch.repeat_interleave(torch.arange(len(sizes) + 1), torch.tensor([*sizes, pad]))
    ids[ids == len(sizes)] = -1
    if share is not None:
        ids = ids[share]
    if t > 1:
        ids = ids.chunk(t)[tp.rank]
    groups = [g for g in (tp if t > 1 else None, group) if g is not None]

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        for g in groups:
            comm.all_reduce(counts, g)
        return counts

    return DocumentBalance(document=ids.to(device), tokens=torch.tensor(sizes, dtype=torch.float64), weight=weight,
                           reduce=reduce if groups else None)


def prepare(call: Call | None, documents: Documents, block: Callable[[int, int], Group], position: int,
            tp: Group | None = None, device: torch.device | None = None, *, balance_weight: float | None = None) -> Prepared:
    """This rank's share of ``call`` (None: an empty round's padding call); ``block(start, size)`` gives the
    block's group; ``position`` is this rank's place in its dp × cp space. ``balance_weight`` (each document's
    weight in the step's balancing loss, 1 / documents of the step; None: no balancing terms) tells the MoE
    layers each token's document."""
    t = tp.size if tp is not None and tp.size > 1 else 1
    if call is None:
        x, y = torch.zeros(t, dtype=torch.long), torch.full((t,), IGNORE, dtype=torch.long)
        sizes = [t]
    else:
        if position not in call.ranks:
            raise ValueError(f"rank at position {position} is not in {call}")
        x = torch.cat([documents[i][0] for i in call.sequences])
        y = torch.cat([documents[i][1] for i in call.sequences])
        sizes = [documents[i][0].numel() for i in call.sequences]
    if call is not None and call.split:
        group = block(call.start, call.size)
        g = call.size
        x, y, pad = _pad(x, y, 2 * g * t)
        sizes += [pad] if pad else []
        document = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        within = torch.cat([torch.arange(n) for n in sizes])
        mine = zigzag_positions(x.numel(), g, group.rank)
        gathered = torch.cat([zigzag_positions(x.numel(), g, r) for r in range(g)])
        attend = DocumentContextParallelAttention(group, mine, gathered, document, device, x.numel() // (2 * g))
        x, y, positions = x[mine], y[mine], within[mine]
        terms = None
        if balance_weight is not None:
            terms = _balance(sizes[:len(call.sequences)], pad, mine, t, tp, group, balance_weight, device)
        if t > 1:
            x, y = x.chunk(t)[tp.rank], y.chunk(t)[tp.rank]
        return Prepared(x[None].to(device), y.to(device), positions=positions.to(device), attend=attend, balance=terms)
    pad = 0
    if call is not None:
        x, y, pad = _pad(x, y, t)
        sizes += [pad] if pad else []
    terms = None
    if balance_weight is not None:
        whole = [] if call is None else sizes[:len(call.sequences)]
        terms = _balance(whole, x.numel() - sum(whole), None, t, tp, None, balance_weight, device)
    if t > 1:
        x, y = x.chunk(t)[tp.rank], y.chunk(t)[tp.rank]
    return Prepared(x[None].to(device), y.to(device), documents=[sizes], balance=terms)


def run_calls(model: nn.Module, calls: Sequence[Prepared], total_tokens: int, aux_coef: float = 0.0) -> torch.Tensor:
    """Forward and backward of each call in turn (each backward before the next forward); float64 [2]: the token
    loss sum and this rank's share of the step's balancing loss (0 without balancing terms), which enters the
    loss times ``aux_coef``."""
    total = torch.zeros(2, dtype=torch.float64)
    for call in calls:
        loss = call.loss(call.run(model))
        objective = loss / total_tokens
        if call.balance is not None:
            aux = model.aux_loss()
            objective = objective + aux_coef * aux
            total[1] += aux.detach().double().cpu()
        objective.backward()
        total[0] += loss.detach().double().cpu()
    return total


def run_pipelined(pipeline, calls: Sequence[Prepared], total_tokens: int, *, dim: int,
                  device: torch.device | None = None, aux_coef: float = 0.0) -> torch.Tensor:
    """The calls as the micro-batches of this rank's pipeline schedule (1F1B or interleaved, built for their
    number); every pipeline of the step has the same number of calls. float64 [2]: the loss sum on the last
    stage (else 0) and this stage's share of the balancing loss (as :func:`run_calls`)."""
    from plait.parallel.pp import schedule

    total = torch.zeros(2, dtype=torch.float64)

    def forward(j: int, x: torch.Tensor | None, i: int):
        chunk = pipeline.chunks[j]
        out = calls[i].run(chunk, x)
        if calls[i].balance is None:
            return out, None
        aux = chunk.aux_loss()
        total[1] += aux.detach().double().cpu()
        return out, aux * aux_coef

    def loss(i: int, out: torch.Tensor) -> torch.Tensor:
        value = calls[i].loss(out)
        total[0] += value.detach().double().cpu()
        return value / total_tokens

    actions = schedule(pipeline.pp, pipeline.vpp, len(calls), pipeline.pp_rank)
    pipeline.run(actions, act_shape=lambda i: (*calls[i].shape, dim), act_dtype=torch.float32, forward=forward,
                 loss=loss, device=device)
    return total
