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
global batch), so summing gradients over the ranks gives one process's gradients.
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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def run(self, chunk: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``chunk`` (the whole model or a pipeline stage's part) on this call: on its tokens, or on ``hidden``
        (the previous stage's activations)."""
        x = self.tokens if hidden is None else hidden
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

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of this share (padding excluded)."""
        return F.cross_entropy(out.float().flatten(0, 1), self.targets, ignore_index=IGNORE, reduction="sum")


def _pad(x: torch.Tensor, y: torch.Tensor, to: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    pad = -x.numel() % to
    if pad:
        x, y = torch.cat((x, x.new_zeros(pad))), torch.cat((y, y.new_full((pad,), IGNORE)))
    return x, y, pad


def prepare(call: Call | None, documents: Documents, block: Callable[[int, int], Group], position: int,
            tp: Group | None = None, device: torch.device | None = None) -> Prepared:
    """This rank's share of ``call`` (None: an empty round's padding call); ``block(start, size)`` gives the
    block's group; ``position`` is this rank's place in its dp × cp space."""
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
        if t > 1:
            x, y = x.chunk(t)[tp.rank], y.chunk(t)[tp.rank]
        return Prepared(x[None].to(device), y.to(device), positions=positions.to(device), attend=attend)
    if call is not None:
        x, y, pad = _pad(x, y, t)
        sizes += [pad] if pad else []
    if t > 1:
        x, y = x.chunk(t)[tp.rank], y.chunk(t)[tp.rank]
    return Prepared(x[None].to(device), y.to(device), documents=[sizes])


def run_calls(model: nn.Module, calls: Sequence[Prepared], total_tokens: int) -> torch.Tensor:
    """Forward and backward of each call in turn (each backward before the next forward); the loss sum (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for call in calls:
        loss = call.loss(call.run(model))
        (loss / total_tokens).backward()
        total += loss.detach().double().cpu()
    return total


def run_pipelined(pipeline, calls: Sequence[Prepared], total_tokens: int, *, dim: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """The calls as the micro-batches of this rank's pipeline schedule (1F1B or interleaved, built for their
    number); every pipeline of the step has the same number of calls. The loss sum on the last stage, else 0."""
    from plait.parallel.pp import schedule

    total = torch.zeros((), dtype=torch.float64)

    def forward(j: int, x: torch.Tensor | None, i: int):
        return calls[i].run(pipeline.chunks[j], x), None

    def loss(i: int, out: torch.Tensor) -> torch.Tensor:
        nonlocal total
        value = calls[i].loss(out)
        total += value.detach().double().cpu()
        return value / total_tokens

    actions = schedule(pipeline.pp, pipeline.vpp, len(calls), pipeline.pp_rank)
    pipeline.run(actions, act_shape=lambda i: (*calls[i].shape, dim), act_dtype=torch.float32, forward=forward,
                 loss=loss, device=device)
    return total
