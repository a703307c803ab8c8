"""The expert all-to-alls of one chunk on the wire while another chunk's experts compute (``parallel.ep_overlap``).

A MoE layer's tokens (on this rank) are cut into ``CHUNKS`` contiguous chunks after routing; each
goes through the phases of :mod:`plait.parallel.ep` on its own (permute, counts, dispatch,
experts, combine). The ep all-to-alls are split into start and wait
(:mod:`plait.parallel.a2a_async`) and ordered so that the wire is busy while the CPU (or GPU)
computes::

    start dispatch 0, start dispatch 1
    wait dispatch 0 → experts on chunk 0 → start combine 0      (dispatch 1 on the wire)
    wait dispatch 1 → experts on chunk 1 → start combine 1      (combine 0 on the wire)
    wait combine 0, wait combine 1 → gate-weighted sums

The backward pass mirrors it (autograd runs the latest-created ready node first): the reverse
of combine 0 travels while chunk 1's experts differentiate, the reverse of dispatch 1 while
chunk 0's do.

Same math: routing, the balancing loss and the statistics are those of all the rank's tokens
(computed before the cut), every copy meets the same expert weights, and a token's output sums
only its own copies; only the expert GEMMs see fewer rows at a time (fp32 sums may round
differently). Dropless only, without LSH compression (the config refuses the others by name).
Ledger: per chunk the counts exchange and both row exchanges, so twice the calls of one
exchange; the row bytes sum to the same (each copy travels once each way), the counts' bytes
double (E int64 per chunk).
"""

from __future__ import annotations

import torch
from torch import nn

from plait.parallel import a2a_async

CHUNKS = 2


def _bounds(n: int) -> list[tuple[int, int]]:
    step = -(-n // CHUNKS)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def overlapped_forward(moe: nn.Module, x2d: torch.Tensor, routing, st) -> torch.Tensor:
    """Phases 3-5 of the expert-parallel forward, chunk by chunk with the exchanges overlapped; [N, dim]."""
    from plait.parallel.ep import _after_ep, _before_ep, _plan

    chunks, copies = [], []
    for lo, hi in _bounds(x2d.shape[0]):
        xs, perm = moe.permute(x2d[lo:hi], routing.indices[lo:hi])
        chunks.append((lo, hi, perm, _plan(perm.counts, perm.counts.new_zeros(1), st)))
        copies.append(xs)
    sends = [a2a_async.start(xs, st.ep, plan.send, plan.recv) for xs, (_, _, _, plan) in zip(copies, chunks)]
    backs = []
    for (lo, hi, perm, plan), pending in zip(chunks, sends):
        rows = _after_ep(a2a_async.wait(pending), plan, st)
        y = _before_ep(moe.experts(rows, plan.expert_counts), plan, st)
        backs.append(a2a_async.start(y, st.ep, plan.recv, plan.send))
    outs = [moe.combine(a2a_async.wait(pending), perm, routing.weights[lo:hi], hi - lo)
            for (lo, hi, perm, _), pending in zip(chunks, backs)]
    return torch.cat(outs)

