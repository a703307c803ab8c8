"""The LSH-compressed expert all-to-all (LSH-MoE, Nie et al., NeurIPS 2024) inside the EP dispatcher.

With ``parallel.ep_compress=lsh`` a MoE layer's phases 3–5 (:mod:`plait.parallel.ep`) run on
*centroids* instead of token copies:

1. hash: every copy this rank sends (sorted by expert, after capacity dropping) gets a
   cross-polytope key (:func:`plait.ops.lsh.lsh_hash`, ``lsh.hashes`` rotations looking at
   ``lsh.dim`` coordinates, signs from ``lsh.seed``: the same on every rank) of its offset
   from the mean of the rank's copies (``lsh.center``). Hidden states share a common
   direction that grows in training; uncentred, it decides most codes: on the demo model
   (ep = 4, dim 4) by step 11 the deeper layers sent 2–5 % of their copies, and the held-out loss at
   step 20 was 2.955 against 2.824 uncompressed; centred, 15–35 % and 2.911;
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

import contextlib
import dataclasses
import math
import time
from statistics import median

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
        self.dim = settings.resolved_dim(hidden)
        self._signs = {torch.device("cpu"): lsh_ops.lsh_signs(settings.hashes, hidden, settings.seed)}

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        signs = self._signs.get(x.device)
        if signs is None:
            signs = self._signs[x.device] = self._signs[torch.device("cpu")].to(x.device)
        x = x.detach()
        if self.settings.center and x.shape[0]:
            x = x - x.mean(dim=0, keepdim=True)
        return lsh_ops.lsh_hash(x, signs, self.dim)


def reset_counters(moe: nn.Module) -> None:
    moe.lsh_rows = 0
    moe.lsh_centroids = 0
    moe.lsh_fidelity = [0.0, 0]
    moe.lsh_seconds = 0.0  # hash + reduce + gather back, forward, while ``lsh_timing`` is set
    moe.lsh_expert_seconds = 0.0  # the experts' forward on the rows this rank received, while timing
    moe.lsh_expert_rows = 0
    if not hasattr(moe, "lsh_on"):
        moe.lsh_on = True  # ep_compress=auto may switch it off after the first step


def _clock(x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def _probe_state(st):
    """The same groups under ledger labels of their own: the probe's bytes are not the training step's."""
    return dataclasses.replace(st, ep=dataclasses.replace(st.ep, axis="ep-probe"),
                               etp=dataclasses.replace(st.etp, axis="etp-probe"))


def _exchange(moe: nn.Module, rows: torch.Tensor, counts: torch.Tensor, stats: torch.Tensor, st,
              timing: bool = False) -> torch.Tensor:
    """Phases 3–5 on ``rows`` laid out per expert by ``counts``: to the experts and back."""
    plan = ep_mod._plan(counts, stats, st)
    received = ep_mod._dispatch(rows, plan, st)
    t = _clock(received) if timing else 0.0
    y = moe.experts(received, plan.expert_counts)
    if timing:
        moe.lsh_expert_seconds += _clock(y) - t
        moe.lsh_expert_rows += received.shape[0]
    return ep_mod._combine_rows(y, plan, st)


def compressed_forward(moe: nn.Module, xs: torch.Tensor, sent: torch.Tensor, stats: torch.Tensor, st) -> torch.Tensor:
    """Expert outputs [T, d] of the T copies ``xs`` (per expert ``sent``), sent as bucket centroids."""
    timing = getattr(moe, "lsh_timing", False)
    t0 = _clock(xs) if timing else 0.0
    buckets = lsh_ops.bucket_reduce(xs, st.hasher.keys(xs), sent)
    t1 = _clock(xs) if timing else 0.0
    y = _exchange(moe, buckets.centroids, buckets.segment_centroids, stats, st, timing)
    t2 = _clock(xs) if timing else 0.0
    out = lsh_ops.bucket_scatter(y, buckets.index)
    if st.hasher.settings.compensate:
        out = out + (xs - lsh_ops.bucket_scatter(buckets.centroids, buckets.index))
    if timing:
        moe.lsh_seconds += (t1 - t0) + (_clock(xs) - t2)
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


# per layer in the step's closing all-reduce: copies, centroids, cosine sum, cosines, compress seconds, and the
# experts' forward seconds and rows
COLUMNS = 7


class Compression:
    """The engine's side of ``ep_compress``: counters per step, the probe schedule, and ``auto``'s decision.

    ``sums()`` is this rank's [layers, COLUMNS] table, flattened, for the step's closing
    all-reduce over the world; ``end_step`` reads the reduced table back. With ``auto`` the
    first ``1 + lsh.auto_steps`` steps run every layer compressed; the first is left out (its
    calls allocate and warm up, and measured up to twice the cost of later ones), the next
    ``auto_steps`` are timed, and each layer's median over them, with the link probe
    (:meth:`probe_link`, at start), decides it (:func:`plait.scheduler.lsh_cost.decide`),
    identically on every rank since every input is reduced over the world.
    """

    WARMUP_STEPS = 1

    def __init__(self, chunks: list[nn.Module], layers: int, settings, *, auto: bool, meshes, copies: int,
                 dim: int, device: torch.device):
        self.settings, self.auto, self.layers, self.device = settings, auto, layers, device
        self.modules: list[tuple[int, nn.Module]] = []
        for chunk in chunks:
            for name, m in chunk.named_modules():
                if hasattr(m, "lsh_rows"):
                    self.modules.append((int(name.split(".")[1]), m))
        self.meshes, self.copies, self.dim = meshes, copies, dim
        self.link = None  # scheduler.lsh_cost.LinkFit, measured at start (auto)
        self.decisions: list | None = None  # auto: each layer's decision, once the timed steps are in
        self.timed: list[list[list[float]]] = []  # auto: each timed step's reduced table
        self.steps = 0
        self.rank = meshes.rank

    def probe_link(self) -> None:
        """``auto``: time all_to_all over ep at the layer's uncompressed size and an eighth of it (max over ranks)."""
        from plait.parallel import comm
        from plait.scheduler.lsh_cost import fit_link

        ep = self.meshes.group("ep")
        if ep.size == 1:
            return
        sizes = [max(ep.size, self.copies // 8 // ep.size * ep.size), max(ep.size, self.copies // ep.size * ep.size)]
        world = self.meshes.group("world")
        seconds = torch.zeros(2, dtype=torch.float64)
        for i, rows in enumerate(sizes):
            x = torch.zeros(rows, self.dim, device=self.device)
            split = [rows // ep.size] * ep.size
            runs = []
            for _ in range(4):
                comm.all_reduce(torch.zeros(1, device=self.device), ep)  # start together
                t = _clock(x)
                comm.all_to_all_v(x, ep, split, split)
                runs.append(_clock(x) - t)
            seconds[i] = sorted(runs[1:])[1]  # the median of three after a warm-up
        comm.all_reduce(seconds, world, op=torch.distributed.ReduceOp.MAX)
        self.link = fit_link((sizes[0] * self.dim * 4, float(seconds[0])), (sizes[1] * self.dim * 4, float(seconds[1])))

    @contextlib.contextmanager
    def exact(self):
        """Every layer sends every copy for the duration (evaluation), then back as it was."""
        before = [(m, m.lsh_on) for _, m in self.modules]
        for m, _ in before:
            m.lsh_on = False
        try:
            yield
        finally:
            for m, on in before:
                m.lsh_on = on

    def begin_step(self) -> None:
        every = self.settings.probe_every
        timing = self.auto and self.decisions is None and self.steps >= self.WARMUP_STEPS
        for _, m in self.modules:
            reset_counters(m)
            m.probe = bool(every) and self.steps % every == 0  # the step's first forward runs the probe
            m.lsh_timing = timing

    def sums(self) -> torch.Tensor:
        table = torch.zeros(self.layers, COLUMNS, dtype=torch.float64, device=self.device)
        for layer, m in self.modules:
            table[layer] += torch.tensor([m.lsh_rows, m.lsh_centroids, *m.lsh_fidelity, m.lsh_seconds,
                                          m.lsh_expert_seconds, m.lsh_expert_rows], dtype=torch.float64)
        return table.flatten()

    def end_step(self, reduced: torch.Tensor, *, ranks_per_layer: int, micro_steps: int) -> tuple[list, list]:
        """Per model layer: the ratio over all ranks and the probe's mean cosine; decides ``auto`` once its timed
        steps are in."""
        table = reduced.view(self.layers, COLUMNS).tolist()
        self.steps += 1
        if self.auto and self.decisions is None and self.steps > self.WARMUP_STEPS:
            self.timed.append(table)
            if len(self.timed) >= self.settings.auto_steps:
                self._decide(ranks_per_layer * micro_steps)
        ratio = [c / r if r else None for r, c, *_ in table]
        fidelity = [s / n if n else None for _, _, s, n, *_ in table]
        return ratio, fidelity

    def _decide(self, per: int) -> None:
        """Each layer's measure: per step its copies, centroids and hashing seconds per call and its experts' seconds
        per row; of each, the median over the timed steps (one step's wall clock is at the mercy of the machine)."""
        from plait.scheduler.lsh_cost import LayerMeasure, decide, describe

        measures = {}
        for layer in range(self.layers):
            rows = [step[layer] for step in self.timed if step[layer][0]]
            if not rows:
                continue
            measures[layer] = LayerMeasure(
                copies=median(r[0] / per for r in rows), centroids=median(r[1] / per for r in rows),
                compress_s=median(r[4] / per for r in rows),
                expert_row_s=median(r[5] / r[6] if r[6] else 0.0 for r in rows))
        if self.link is None:  # no all-to-all (ep·etp = 1 … or one rank): nothing to save
            from plait.scheduler.lsh_cost import LinkFit

            self.link = LinkFit(latency_s=0.0, seconds_per_byte=0.0)
        self.decisions = decide(measures, self.link, self.dim * 4)
        on = {d.layer: d.compress for d in self.decisions}
        for layer, m in self.modules:
            m.lsh_on = on.get(layer, False)
            m.lsh_timing = False
        if self.rank == 0:
            print(describe(self.decisions, self.link), flush=True)

    def report(self) -> dict | None:
        """``summary.json``'s ``lsh_auto``: the link measured and each layer's decision."""
        if self.decisions is None:
            return None
        return {"link_gbit_s": self.link.gbit_s, "latency_ms": self.link.latency_s * 1e3,
                "layers": [d.as_dict() for d in self.decisions]}
