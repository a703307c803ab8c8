"""Context parallelism: causal attention over a sequence split across ``cp`` ranks.

**Load balance (zig-zag).** The sequence of length T is cut into ``2·cp`` equal chunks;
rank c holds chunks ``c`` and ``2·cp − 1 − c``. Under a causal mask the work of a query
chunk grows with its position, so pairing an early chunk with the mirrored late one
gives every rank the same number of (query, key) pairs: ``(2c + 1) + (4cp − 2c − 1) =
4cp`` chunk-pairs (counting the diagonal blocks as halves) — exactly equal, not just on
average. :func:`causal_work` computes it, and a test checks the equality.

**Exchange (all-gather of K/V, not a ring).** Each rank all-gathers the keys and values
of its group once per layer and attends its two query chunks against them under the
exact causal mask given by the true positions; the backward pass reduce-scatters dK/dV.
We chose this over ring attention (K/V passed around a ring in ``cp − 1`` steps, with
online-softmax merging) for three reasons:

* the bytes are the same: in both, each rank receives ``(cp − 1)/cp`` of the sequence's
  K and V per layer, and sends as much;
* it is exact and simple: one masked attention call per layer, any mask, and it keeps
  rotary embedding, GQA-style head layouts and the default attention kernel unchanged
  (Llama 3 trained its long-context stage this way);
* the ring's advantage is overlapping each step's transfer with the previous block's
  compute; with gloo on CPU there is nothing to overlap with. On GPUs at very long
  sequences, where holding all K/V of one layer is too much memory, a ring is the
  better choice; the seam (``Attention.attend``) takes either.

Ledger per attention layer and micro-batch, each rank (K and V each ``B·H/tp·T/cp·D``
fp32 elements, ``s = 4·B·(H/tp)·(T/cp)·D`` bytes): forward all_gather ``2·s``; backward
reduce_scatter ``2·cp·s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel import comm
from plait.parallel.comm import Group


def zigzag_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions (int64 [seq_len / cp]) of the tokens rank ``rank`` of ``cp`` holds."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2·cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    mirror = 2 * cp - 1 - rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk)
    return torch.cat((first, second))


def causal_work(seq_len: int, cp: int, rank: int) -> int:
    """(query, key) pairs with key ≤ query that rank ``rank`` computes."""
    return int((zigzag_positions(seq_len, cp, rank) + 1).sum())


class ContextParallelAttention:
    """Replaces ``Attention.attend``: all-gather K/V over cp, attend under the true causal mask."""

    def __init__(self, group: Group, seq_len: int):
        self.group = group
        self.q_pos = zigzag_positions(seq_len, group.size, group.rank)
        k_pos = torch.cat([zigzag_positions(seq_len, group.size, r) for r in range(group.size)])
        self.mask = self.q_pos[:, None] >= k_pos[None, :]  # [T/cp, T], True = may attend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = comm.gather_from(k, self.group, 2)
        v = comm.gather_from(v, self.group, 2)
        if self.mask.device != q.device:
            self.mask = self.mask.to(q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model``: those with an ``attend`` seam and a ``wq`` projection."""
    return [m for m in model.modules() if callable(getattr(m, "attend", None)) and hasattr(m, "wq")]


def apply_cp(model: nn.Module, group: Group, seq_len: int) -> None:
    """Make every attention module of ``model`` attend across the cp group (no-op for size 1)."""
    if group.size == 1:
        return
    for module in attention_modules(model):
        module.attend = ContextParallelAttention(group, seq_len)
