"""The LSH-compressed expert all-to-all (LSH-MoE, Nie et al., NeurIPS 2024) inside the EP dispatcher.

With ``parallel.ep_compress=lsh`` a MoE layer's phases 3–5 (:mod:`plait.parallel.ep`) run on
*centroids* instead of token copies:

1. hash: every copy this rank sends (sorted by expert, after capacity dropping) gets a
   cross-polytope key (:func:`plait.ops.lsh.lsh_hash`, ``lsh.hashes`` rotations looking at
   ``lsh.dim`` coordinates, signs from ``lsh.seed``: the same on every rank);
2. reduce: within each expert's segment, copies with equal keys form a bucket and are
   replaced by their mean (:func:`plait.ops.lsh.bucket_reduce`); the per-expert centroid
   counts take the place of the copy counts in the count exchange;
3. the dispatch, the experts and the combine exchange of phases 3–5 move centroids: all
   four token exchanges (dispatch, combine and their backward) shrink by the same ratio;
4. every copy of bucket ``c`` gets ``E(c)``; with ``lsh.compensate`` the paper's residual
   compensation ``E(c) + (x_t − c)`` instead, before the gate-weighted combine.

Why compensation is off by default: it assumes the expert's Jacobian is near the identity.
Here an expert reads the normalised hidden state (coordinates of size ~1) and writes a
residual-stream update two orders of magnitude smaller, so ``x_t − c`` swamps ``E(c)``: on
the demo model (ep = 2, 4 layers) the probe's cosine to the exact outputs was 0.16–0.91 per
layer with it and 0.97–0.98 without, and after 6 steps the held-out loss was 5.10 with it,
4.47 without and 4.47 uncompressed.

Gradients are those of this function as written: through ``E(c)`` and the mean to every
copy of the bucket (and, compensated, through ``x_t − c``: identity for the copy, minus its
share of the mean). When every bucket holds one copy, ``c = x_t`` and the layer is exactly
the uncompressed one; a test holds it to that.

The ledger records what is sent, so its ep (and etp) row bytes are the uncompressed
formulas with copies replaced by centroids (:func:`plait.scheduler.comm_volume.step_volume`
takes the centroid total). Each layer counts its copies and centroids (``lsh_rows``,
``lsh_centroids``, since :func:`reset_counters`). A *fidelity probe* (``probe`` set on the
layer by the engine, every ``lsh.probe_every`` steps on one micro-batch) also runs the exact
exchange under ``no_grad`` on the groups relabelled ``ep-probe``/``etp-probe`` in the ledger,
and records the cosine similarity of each copy's compressed output to its exact output
(``lsh_fidelity``: [sum of cosines, copies]).
Settings: :class:`plait.parallel.config.LSHConfig` (``parallel.lsh.*``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from plait.ops import lsh as lsh_ops
from plait.parallel import ep as ep_mod
from plait.parallel.config import LSHConfig

__all__ = ["Hasher", "compressed_forward", "reset_counters"]


class Hasher:
    """The sign diagonals of one job's rotations, kept per device."""

    def __init__(self, settings: LSHConfig, hidden: int):
        settings.validate(hidden)
        self.settings = settings
        self._signs = {torch.device("cpu"): lsh_ops.lsh_signs(settings.hashes, hidden, settings.seed)}

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        signs = self._signs.get(x.device)
        if signs is None:
            signs = self._signs[x.device] = self._signs[torch.device("cpu")].to(x.device)
        return lsh_ops.lsh_hash(x.detach(), signs, self.settings.dim)


def reset_counters(moe: nn.Module) -> None:
    moe.lsh_rows = 0
    moe.lsh_centroids = 0
    moe.lsh_fidelity = [0.0, 0]


def _probe_state(st):
    """The same groups under ledger labels of their own: the probe's bytes are not the training step's."""
    return dataclasses.replace(st, ep=dataclasses.replace(st.ep, axis="ep-probe"),
                               etp=dataclasses.replace(st.etp, axis="etp-probe"))


def _exchange(moe: nn.Module, rows: torch.Tensor, counts: torch.Tensor, stats: torch.Tensor, st) -> torch.Tensor:
    """Phases 3–5 on ``rows`` laid out per expert by ``counts``: to the experts and back."""
    plan = ep_mod._plan(counts, stats, st)
    y = moe.experts(ep_mod._dispatch(rows, plan, st), plan.expert_counts)
    return ep_mod._combine_rows(y, plan, st)


def compressed_forward(moe: nn.Module, xs: torch.Tensor, sent: torch.Tensor, stats: torch.Tensor, st) -> torch.Tensor:
    """Expert outputs [T, d] of the T copies ``xs`` (per expert ``sent``), sent as bucket centroids."""
    buckets = lsh_ops.bucket_reduce(xs, st.hasher.keys(xs), sent)
    y = _exchange(moe, buckets.centroids, buckets.segment_centroids, stats, st)
    out = lsh_ops.bucket_scatter(y, buckets.index)
    if st.hasher.settings.compensate:
        out = out + (xs - lsh_ops.bucket_scatter(buckets.centroids, buckets.index))
    moe.lsh_rows += xs.shape[0]
    moe.lsh_centroids += buckets.centroids.shape[0]
    if getattr(moe, "probe", False):
        moe.probe = False
        with torch.no_grad():
            exact = _exchange(moe, xs.detach(), sent, stats, _probe_state(st))
            cos = F.cosine_similarity(out.detach().float(), exact.float(), dim=-1, eps=1e-12)
        moe.lsh_fidelity = [moe.lsh_fidelity[0] + float(cos.sum()), moe.lsh_fidelity[1] + cos.numel()]
    return out


def ratio(rows: int, centroids: int) -> float:
    """Bytes sent / uncompressed bytes of the token exchanges (1.0 when nothing was sent)."""
    return centroids / rows if rows else 1.0


def mean_cosine(total: float, count: int) -> float:
    return total / count if count else math.nan
