"""Data parallelism with sharded optimizer state (ZeRO-1 with reduce-scattered gradients).

Every parameter has a *reduction group*, set by the apply_* functions that split it:

============  =====================================================================
group         parameters
============  =====================================================================
``dp+cp``     split over tp (attention and dense-MLP linears): replicas differ in
              batch rows (dp) and sequence chunks (cp)
``dp+cp+tp``  whole on every rank of a pipeline stage (norms, embedding, head, MoE
              router): with sequence parallelism each tp rank saw other tokens too
``edp``       expert weights (split over ep and etp): replicas differ only in edp
============  =====================================================================

The parameters of one group form a *bucket*: a flat fp32 buffer, padded to a multiple of the
group size. Labels whose groups hold the same ranks share one bucket (at tp = 1 ``dp+cp`` is
``dp+cp+tp``; at ep·etp = 1 so is ``edp``): one reduce-scatter and one all-gather per distinct
group and step, not one per label and weight-decay class. The bucket's ledger axis is the first
of its labels in :data:`LABELS`. Weight decay applies to the matrices only (``ndim >= 2``), on
the runs of the owned slice they occupy. After the backward passes of a step:

1. each bucket's gradient is **reduce-scattered** over its group (summed; the loss
   is already scaled to the global batch, so no averaging);
2. the global gradient norm is the square root of the sum, over all ranks, of the
   squares of the gradient slices each rank *owns* — every element of every distinct
   parameter is owned by exactly one rank, so one all-reduce over the world gives the
   norm exactly, whatever the layout (TP, PP, EP, CP, DP);
3. the owned slices are clipped and AdamW updates them (optimizer state exists only
   for the owned ``1/group`` of each bucket);
4. the updated slices are **all-gathered** back into the parameters.

Ledger per step and bucket of ``n`` padded elements (fp32), each rank of a group of
size g > 1: reduce_scatter ``4·n`` bytes, all_gather ``4·n/g`` bytes; plus one
all_reduce of 8 bytes (the squared norm, float64) over the world, which the engine's closing
numbers (loss sums, MoE statistics, the control word) join. With replicated optimizer state
(``zero=False``, see :class:`ShardedAdamW`): all_reduce ``4·n`` bytes per bucket instead, and no
norm on the closing all-reduce when every bucket's group is the world.

Parameters stay whole between steps (no FSDP-style parameter sharding): a later step
can add it behind the same buckets.
"""

from __future__ import annotations

from collections.abc import Callable

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from plait.parallel import comm
from plait.parallel.comm import Group


# Reduction-group labels in the order that names a bucket several of them share (the widest first).
LABELS = ("dp+cp+tp", "dp+cp", "edp")


@dataclass(frozen=True)
class AdamWSettings:
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


class _Bucket:
    """One reduction group's parameters, as a flat fp32 buffer cut into pieces.

    The flat layout puts the parameters in reverse order of the model (the backward pass makes their gradients
    roughly in that order). The buffer, padded to a multiple of the group size g, is cut into *pieces* of about
    ``piece`` elements, each a multiple of g: a piece is reduce-scattered on its own as soon as every gradient in
    it is ready. Rank r owns the r-th g-th of every piece; its shard is those parts in piece order. With one
    piece that is the contiguous r-th g-th of the buffer.
    """

    def __init__(self, label: str, named: list[tuple[str, nn.Parameter]], group: Group, piece: int = 0,
                 zero: bool = True):
        self.label = label
        self.zero = zero
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group = group
        self.numel = sum(p.numel() for p in self.params)
        g = group.size
        # ZeRO-1: the g ranks of the group own a g-th each; replicated: every rank owns all of it
        self.owners, self.owner = (g, group.rank) if zero else (1, 0)
        self.padded = math.ceil(self.numel / g) * g  # a multiple of g either way: the rings cut it in g chunks
        self.shard_size = self.padded // self.owners
        self.offsets = []
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        step = self.padded if piece <= 0 else max(g, piece // g * g)
        self.pieces = [(lo, min(lo + step, self.padded)) for lo in range(0, self.padded, step)]
        # piece j's part: shard[part_at[j] : part_at[j] + (hi - lo) // g]
        self.part_at = [0]
        for lo, hi in self.pieces[:-1]:
            self.part_at.append(self.part_at[-1] + (hi - lo) // self.owners)
        # which parameters overlap each piece
        self.piece_params: list[list[int]] = []
        for lo, hi in self.pieces:
            self.piece_params.append([i for i, (p, o) in enumerate(zip(self.params, self.offsets))
                                      if o < hi and o + p.numel() > lo])
        self.param_pieces: list[list[int]] = [[] for _ in self.params]
        for j, members in enumerate(self.piece_params):
            for i in members:
                self.param_pieces[i].append(j)
        device = self.params[0].device
        self.grad_flat = torch.zeros(self.padded, dtype=torch.float32, device=device)
        # replicated: the all-reduce sums the flat buffer in place, and that is the optimizer's gradient
        self.grad_shard = torch.zeros(self.shard_size, dtype=torch.float32, device=device) if zero else self.grad_flat
        # The owned slice of the parameters, which the optimizer updates.
        self.shard = nn.Parameter(self.take_owned(self.flat_params()))
        self.grad_views: list[torch.Tensor] = []
        if not zero:  # the parameters become views of the flat copy the optimizer updates: nothing to write back
            for p, o in zip(self.params, self.offsets):
                p.data = self.shard.data[o : o + p.numel()].view_as(p)
            # and their gradients views of the flat gradient buffer: the backward passes accumulate into it in place
            self.grad_views = [self.grad_flat[o : o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)]
            self.attach_grads()
        # (start, end) in the shard of each run of matrix elements, the ones weight decay applies to
        runs: list[tuple[int, int]] = []
        for flat_lo, flat_hi, at in self.owned_ranges():
            for p, o in zip(self.params, self.offsets):
                a, b = max(flat_lo, o), min(flat_hi, o + p.numel())
                if p.ndim < 2 or a >= b:
                    continue
                start, end = at + a - flat_lo, at + b - flat_lo
                if runs and runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((start, end))
        self.decay_runs = runs

    def flat_params(self) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.params[0].device)
        for p, o in zip(self.params, self.offsets):
            flat[o : o + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def take_owned(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's parts of a flat [padded] buffer, in shard order (a new tensor)."""
        return torch.cat([flat[lo:hi] for lo, hi, _ in self.owned_ranges()])

    def fill(self, j: int) -> None:
        """Copy the gradients (zeros where none) into piece ``j`` of the flat buffer, and nowhere else (another
        piece may be on the wire)."""
        lo, hi = self.pieces[j]
        for i in self.piece_params[j]:
            p, o = self.params[i], self.offsets[i]
            a, b = max(lo, o), min(hi, o + p.numel())
            if p.grad is None:
                self.grad_flat[a:b].zero_()
            elif not self.grad_views or p.grad.data_ptr() != self.grad_views[i].data_ptr():
                self.grad_flat[a:b].copy_(p.grad.reshape(-1)[a - o:b - o])
            # else: the gradient is its view of the buffer, already in place

    def attach_grads(self) -> None:
        """Replicated: zero the flat gradient buffer and make every parameter's ``.grad`` its view of it."""
        self.grad_flat.zero_()
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    def decay(self, factor: float) -> None:
        """Decoupled weight decay of the owned matrix elements: multiply them by ``factor`` (1 − lr·wd)."""
        if self.decay_runs and factor != 1.0:
            with torch.no_grad():
                torch._foreach_mul_([self.shard[a:b] for a, b in self.decay_runs], factor)

    def owned_ranges(self) -> list[tuple[int, int, int]]:
        """(flat start, flat end, position in the shard) of each range of the flat buffer this rank owns."""
        g, r = self.owners, self.owner
        return [(lo + r * (hi - lo) // g, lo + (r + 1) * (hi - lo) // g, at)
                for (lo, hi), at in zip(self.pieces, self.part_at)]

    def part(self, j: int) -> torch.Tensor:
        lo, hi = self.pieces[j]
        return self.grad_shard[self.part_at[j]:self.part_at[j] + (hi - lo) // self.owners]

    def unshard(self, gathered: torch.Tensor) -> torch.Tensor:
        """The flat buffer from the all-gather of every rank's shard ([g·shard_size], group-rank order)."""
        if len(self.pieces) == 1 or self.owners == 1:  # one piece: rank r's shard is the r-th g-th, so the gather
            return gathered.view(-1)  # is the buffer (replicated: the shard is the buffer)
        g = self.owners
        rows = gathered.view(g, self.shard_size)
        flat = torch.empty(self.padded, dtype=gathered.dtype, device=gathered.device)
        for j, (lo, hi) in enumerate(self.pieces):
            q = (hi - lo) // g
            flat[lo:hi].view(g, q).copy_(rows[:, self.part_at[j]:self.part_at[j] + q])
        return flat

    def write_back(self, flat: torch.Tensor) -> None:
        if not self.zero and flat.data_ptr() == self.shard.data_ptr():
            return  # the parameters are views of it
        with torch.no_grad():
            for p, o in zip(self.params, self.offsets):
                p.copy_(flat[o : o + p.numel()].view_as(p))


class ShardedAdamW:
    """AdamW over buckets of parameters grouped by reduction group; state sharded per group.

    ``groups`` maps a reduction-group label (``"dp+cp"``, ``"dp+cp+tp"``, ``"edp"``) to this
    rank's :class:`Group`; ``world`` is the group of all ranks (for the gradient norm).
    Parameters without grad requirement are ignored. There is one bucket per distinct group
    (labels whose groups hold the same ranks share it), in the order of :data:`LABELS`, and,
    within a bucket, the reverse of the order ``named_params`` gives (the model's), so every
    rank of a group lays out a bucket identically. AdamW runs without weight decay of its own;
    the step multiplies each bucket's owned matrix elements by 1 − lr·wd first (decoupled decay,
    as AdamW's own), so one bucket holds matrices and vectors alike.

    **Overlap** (``piece`` > 0 elements, ``overlap``): a hook on every parameter notes when its
    gradient is final; after :meth:`arm` (before the last backward pass of a step) each piece of
    each bucket starts its reduce-scatter as soon as all its gradients are in, while the backward
    pass goes on. Pieces start in one fixed order on every rank (by the model position of their
    earliest parameter, latest first, which is roughly when the backward pass finishes them), a
    piece only after every piece before it, so each group's collectives line up across its
    ranks. :meth:`step` starts whatever is left (a parameter with no gradient this step, or no
    :meth:`arm`) and waits for each piece before it uses its part.

    **Replicated** (``zero=False``, ``parallel.zero: false``): no sharding. Each piece is all-reduced in place (a
    reduce-scatter ring then an all-gather ring, so every rank of the group gets the same bits), every rank
    runs AdamW over its whole buckets, and the parameters are views of the buckets' flat copies, so nothing is
    gathered or written back after the update. The gradient norm counts each bucket's squares once per group
    (its sum over the world divided by the group's size); when every bucket's group is the world (data
    parallelism alone), the norm is known on every rank without a collective, and the step's closing
    all-reduce runs during the update instead of before it. Optimizer memory is the whole model's moments
    on every rank: the ZeRO-1 default keeps a group's share of them. The parameters' ``.grad`` are views of the
    flat gradient buffer too (as DDP's ``gradient_as_bucket_view``), so the backward passes accumulate in place
    and no gradient is copied or allocated per step. So once :meth:`arm`'s backward pass has started a piece, the
    ``.grad`` in it are being summed in place until :meth:`step` waits for it (DDP's backward pass returns after
    its all-reduces; this one returns while they run): nothing may read them in between.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], groups: dict[str, Group], world: Group,
                 settings: AdamWSettings, *, piece: int = 0, overlap: bool = False,
                 replicas: tuple[int, int] | None = None, zero: bool = True):
        if not zero and replicas is not None:
            raise ValueError("replicated optimizer state (zero=False) with CO2 replicas: CO2's outer state lives on the "
                             "ZeRO shards")
        self.settings = settings
        self.world = world
        self.zero = zero
        # replicas = (this rank's replica, replicas): the groups stay inside a data-parallel replica, which steps on
        # its own (CO2). Its gradient, summed over the replica only, is 1/replicas of its rows' mean (the loss is
        # scaled to the global batch), and it is clipped by its own norm.
        self.replicas = replicas
        self.outer = None  # a plait.parallel.co2.CO2 run after each update, before the shards are gathered
        position = {name: i for i, (name, _) in enumerate(named_params)}
        by_label: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in named_params:
            if not p.requires_grad:
                continue
            label = getattr(p, "_plait_reduce", "dp+cp+tp")
            if label not in LABELS:
                raise ValueError(f"parameter {name}: reduction group {label!r} is none of {LABELS}")
            by_label.setdefault(label, []).append((name, p))
        by_ranks: dict[tuple[int, ...], tuple[str, list[tuple[str, nn.Parameter]]]] = {}
        for label in LABELS:  # the first label of a shared group names its bucket
            if label in by_label:
                _, named = by_ranks.setdefault(groups[label].ranks, (label, []))
                named.extend(by_label[label])
        self.buckets = [
            _Bucket(label, sorted(named, key=lambda x: -position[x[0]]), groups[label], piece, zero)
            for label, named in by_ranks.values()
        ]
        # replicated, every bucket over the whole world: every rank holds the whole reduced gradient, so its norm
        self.local_norm = not zero and all(b.group.size == world.size for b in self.buckets)
        self._op = "reduce_scatter" if zero else "all_reduce"
        # the order pieces start in: latest-ready last (ready when the model's earliest parameter in it is)
        earliest = [[min(position[b.names[i]] for i in members) for members in b.piece_params] for b in self.buckets]
        self.sequence = sorted(((bi, j) for bi, b in enumerate(self.buckets) for j in range(len(b.pieces))),
                               key=lambda t: (-earliest[t[0]][t[1]], t[0], t[1]))
        param_groups = [{"params": [b.shard], "weight_decay": 0.0} for b in self.buckets]
        self.keep_grads = False  # keep each step's reduced, unclipped gradient (for tests and checks)
        # Called right before the update writes the parameters and the optimizer state, e.g.
        # to wait for a snapshot that is still copying the previous step's values.
        self.before_update: list[Callable[[], None]] = []
        self.last_grads: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps, fused=True
        )
        self.overlap = overlap
        self.armed = False
        self._pending: list[list[int]] = []
        self._next = 0  # index into sequence of the next piece to start
        self._works: dict[tuple[int, int], Any] = {}
        if overlap:
            for bi, b in enumerate(self.buckets):
                for i, p in enumerate(b.params):
                    p.register_post_accumulate_grad_hook(lambda _p, bi=bi, i=i: self._ready(bi, i))

    def arm(self) -> None:
        """The next backward pass is the step's last: start each piece's reduce-scatter when its gradients are in."""
        if not self.overlap:
            return
        self.armed = True
        self._pending = [[len(members) for members in b.piece_params] for b in self.buckets]
        self._next = 0
        self._works = {}

    def _ready(self, bi: int, i: int) -> None:
        if not self.armed:
            return
        b = self.buckets[bi]
        for j in b.param_pieces[i]:
            self._pending[bi][j] -= 1
        while self._next < len(self.sequence):
            bj, j = self.sequence[self._next]
            if self._pending[bj][j] > 0:
                break
            self._start(bj, j)

    def _start(self, bi: int, j: int) -> None:
        b = self.buckets[bi]
        b.fill(j)
        lo, hi = b.pieces[j]
        if self.zero:
            self._works[(bi, j)] = comm.reduce_scatter_async(b.part(j), b.grad_flat[lo:hi], b.group)
        else:
            self._works[(bi, j)] = comm.all_reduce_ring_async(b.grad_flat[lo:hi], b.group)
        self._next += 1

    def zero_grad(self) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    def step(self, lr: float, max_norm: float, closing: torch.Tensor | None = None) -> float | tuple[float, torch.Tensor]:
        """Reduce gradients, clip to ``max_norm`` (0: no clipping), update; returns the global grad norm.

        ``closing`` (float64): more numbers to sum over the world on the same all-reduce as the squared norm (one
        collective instead of two); then returns (norm, their sums).
        """
        if not self.armed:
            self._next = 0
            self._works = {}
        self.armed = False
        while self._next < len(self.sequence):
            self._start(*self.sequence[self._next])
        self.zero_grad()  # every gradient is in its bucket's flat buffer now
        closing_work = both = None
        if self.local_norm and closing is not None:  # the norm is each rank's own: sum the rest meanwhile
            both = closing.to(torch.float64).clone()
            closing_work = comm.all_reduce_async(both, self.world)
        for (bi, j), work in sorted(self._works.items()):
            comm.wait(work, self.buckets[bi].group, self._op)
        self._works = {}
        self._next = 0
        sq = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(self.buckets):
            grad = b.grad_shard
            if self.replicas is not None and self.replicas[1] > 1:
                grad.mul_(self.replicas[1])
            b.shard.grad = grad
            if self.keep_grads:
                self.last_grads[i] = grad.detach().clone()
            if self.zero:  # in float64: the shard's order depends on the pieces, float64 sums of squares hardly do
                sq += grad.double().pow(2).sum()
            else:
                # The whole flat buffer, in one order whatever the pieces: summed in float32 as
                # torch.nn.utils.clip_grad_norm_ does (converting it to float64 first took ten times as long, 4 ms
                # for the demo model's 1.9 M elements on one core). Each of the group's g ranks holds every element
                # of the bucket, so each counts a g-th, unless this rank's norm is the whole norm.
                sq += torch.linalg.vector_norm(grad).double().square() / (1 if self.local_norm else b.group.size)
        # one slot per replica (one in sync mode): each replica's squared norm, on the one world all-reduce
        index, count = self.replicas or (0, 1)
        if self.local_norm:
            mine = norm = float(sq.sqrt())
            count = 0
        else:
            slots = torch.zeros(count, dtype=torch.float64)
            slots[index] = sq
            both = slots if closing is None else torch.cat([slots, closing.to(torch.float64)])
            comm.all_reduce(both, self.world)
            mine = float(both[index].sqrt())
            norm = float(both[:count].mean().sqrt())  # reported: the replicas' root mean square
        if max_norm > 0:
            coef = min(1.0, max_norm / (mine + 1e-6))
            for b in self.buckets:
                b.shard.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for wait in self.before_update:
            wait()
        for b in self.buckets:
            b.decay(1.0 - lr * self.settings.weight_decay)
        self.optimizer.step()
        if self.outer is not None:
            self.outer.after_local_step()
        for b in self.buckets:
            b.shard.grad = None
            if b.zero:
                full = b.unshard(comm.all_gather(b.shard.detach(), b.group)) if b.group.size > 1 else b.shard.detach()
                b.write_back(full)
        self.zero_grad()
        for b in self.buckets:
            if not b.zero:  # the next step's backward passes accumulate into the zeroed buffer
                b.attach_grads()
        comm.wait(closing_work, self.world, "all_reduce")
        return norm if closing is None else (norm, both[count:])

    # ------------------------------------------------------------------ state in per-parameter form

    def _unshard(self, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for b, shard in zip(self.buckets, shards):
            full = b.unshard(comm.all_gather(shard.detach(), b.group)) if b.owners > 1 else shard.detach()
            for name, p, o in zip(b.names, b.params, b.offsets):
                out[name] = full[o : o + p.numel()].view_as(p).clone()
        return out

    def local_state(self) -> dict[str, Any]:
        """This rank's parameters' optimizer state, per parameter name (local shapes), gathered within groups."""
        states = [self.optimizer.state.get(b.shard, {}) for b in self.buckets]
        step = max((float(s["step"]) for s in states if "step" in s), default=0.0)
        return {
            "step": step,
            "exp_avg": self._unshard([s.get("exp_avg", torch.zeros_like(b.shard)) for s, b in zip(states, self.buckets)]),
            "exp_avg_sq": self._unshard([s.get("exp_avg_sq", torch.zeros_like(b.shard)) for s, b in zip(states, self.buckets)]),
        }

    def local_grads(self) -> dict[str, torch.Tensor]:
        """The last step's reduced gradients per parameter name (local shapes); needs ``keep_grads``."""
        if any(g is None for g in self.last_grads):
            raise RuntimeError("set keep_grads = True before the step whose gradients you want")
        return self._unshard(self.last_grads)

    def load_local_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`local_state` (every name of this rank's buckets must be present)."""
        for b in self.buckets:
            entry: dict[str, torch.Tensor] = {}
            for key in ("exp_avg", "exp_avg_sq"):
                flat = torch.zeros(b.padded, dtype=torch.float32, device=b.shard.device)
                for name, p, o in zip(b.names, b.params, b.offsets):
                    flat[o : o + p.numel()].copy_(state[key][name].reshape(-1))
                entry[key] = b.take_owned(flat)
            entry["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=b.shard.device)
            self.optimizer.state[b.shard] = entry
        self.sync_shards_from_params()

    def raw_state(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as it lives in memory (no copies, no collectives).

        Keys ``"<bucket>.<field>"``; only loadable by the same layout (:meth:`load_raw_state`).
        Empty before the first step.
        """
        out: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.buckets):
            for key, value in self.optimizer.state.get(b.shard, {}).items():
                out[f"{i}.{key}"] = value
        return out

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`raw_state` (same layout); then refreshes the owned slices from the parameters."""
        for i, b in enumerate(self.buckets):
            entry = {key.split(".", 1)[1]: value for key, value in state.items() if key.split(".", 1)[0] == str(i)}
            if entry:
                self.optimizer.state[b.shard] = {
                    k: v.to(b.shard.device).clone() if v.is_floating_point() else v.clone() for k, v in entry.items()
                }
            else:
                self.optimizer.state.pop(b.shard, None)
        self.sync_shards_from_params()

    def sync_shards_from_params(self) -> None:
        """Refresh the owned slices from the parameters (after the parameters were loaded)."""
        with torch.no_grad():
            for b in self.buckets:
                b.shard.copy_(b.take_owned(b.flat_params()))
