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

The parameters of one group (and one weight-decay class) form a *bucket*: a flat fp32
buffer, padded to a multiple of the group size. After the backward passes of a step:

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
numbers (loss sums, MoE statistics, the control word) join.

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


@dataclass(frozen=True)
class AdamWSettings:
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


class _Bucket:
    def __init__(self, label: str, decay: bool, named: list[tuple[str, nn.Parameter]], group: Group):
        self.label = label
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group = group
        self.numel = sum(p.numel() for p in self.params)
        self.padded = math.ceil(self.numel / group.size) * group.size
        self.shard_size = self.padded // group.size
        self.offsets = []
        offset = 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        lo = group.rank * self.shard_size
        flat = self.flat_params()
        # The owned slice of the parameters, which the optimizer updates.
        self.shard = nn.Parameter(flat[lo : lo + self.shard_size].clone())

    def flat_params(self) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.params[0].device)
        for p, o in zip(self.params, self.offsets):
            flat[o : o + p.numel()].copy_(p.detach().reshape(-1))
        return flat

    def flat_grads(self) -> torch.Tensor:
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.params[0].device)
        for p, o in zip(self.params, self.offsets):
            if p.grad is not None:
                flat[o : o + p.numel()].copy_(p.grad.reshape(-1))
        return flat

    def write_back(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, o in zip(self.params, self.offsets):
                p.copy_(flat[o : o + p.numel()].view_as(p))


class ShardedAdamW:
    """AdamW over buckets of parameters grouped by reduction group; state sharded per group.

    ``groups`` maps a reduction-group label (``"dp+cp"``, ``"dp+cp+tp"``, ``"edp"``) to this
    rank's :class:`Group`; ``world`` is the group of all ranks (for the gradient norm).
    Parameters without grad requirement are ignored. Bucket order is by (label, decay)
    and, within a bucket, by parameter name, so every rank of a group lays out a bucket
    identically.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], groups: dict[str, Group], world: Group, settings: AdamWSettings):
        self.settings = settings
        self.world = world
        by_key: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {}
        for name, p in named_params:
            if not p.requires_grad:
                continue
            label = getattr(p, "_plait_reduce", "dp+cp+tp")
            by_key.setdefault((label, p.ndim >= 2), []).append((name, p))
        self.buckets = [
            _Bucket(label, decay, sorted(named, key=lambda x: x[0]), groups[label])
            for (label, decay), named in sorted(by_key.items())
        ]
        param_groups = [
            {"params": [b.shard], "weight_decay": settings.weight_decay if b.decay else 0.0} for b in self.buckets
        ]
        self.keep_grads = False  # keep each step's reduced, unclipped gradient (for tests and checks)
        # Called right before the update writes the parameters and the optimizer state, e.g.
        # to wait for a snapshot that is still copying the previous step's values.
        self.before_update: list[Callable[[], None]] = []
        self.last_grads: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.optimizer = torch.optim.AdamW(
            param_groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps, fused=True
        )

    def zero_grad(self) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    def step(self, lr: float, max_norm: float, closing: torch.Tensor | None = None) -> float | tuple[float, torch.Tensor]:
        """Reduce gradients, clip to ``max_norm`` (0: no clipping), update; returns the global grad norm.

        ``closing`` (float64): more numbers to sum over the world on the same all-reduce as the squared norm (one
        collective instead of two); then returns (norm, their sums).
        """
        sq = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(self.buckets):
            grad = comm.reduce_scatter(b.flat_grads(), b.group) if b.group.size > 1 else b.flat_grads()
            b.shard.grad = grad
            if self.keep_grads:
                self.last_grads[i] = grad.detach().clone()
            sq += grad.double().pow(2).sum()
        both = sq.reshape(1) if closing is None else torch.cat([sq.reshape(1), closing.to(torch.float64)])
        comm.all_reduce(both, self.world)
        norm = float(both[0].sqrt())
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))
            for b in self.buckets:
                b.shard.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for wait in self.before_update:
            wait()
        self.optimizer.step()
        for b in self.buckets:
            b.shard.grad = None
            full = comm.all_gather(b.shard.detach(), b.group) if b.group.size > 1 else b.shard.detach()
            b.write_back(full)
        self.zero_grad()
        return norm if closing is None else (norm, both[1:])

    # ------------------------------------------------------------------ state in per-parameter form

    def _unshard(self, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for b, shard in zip(self.buckets, shards):
            full = comm.all_gather(shard.detach(), b.group) if b.group.size > 1 else shard.detach()
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
            lo = b.group.rank * b.shard_size
            entry: dict[str, torch.Tensor] = {}
            for key in ("exp_avg", "exp_avg_sq"):
                flat = torch.zeros(b.padded, dtype=torch.float32, device=b.shard.device)
                for name, p, o in zip(b.names, b.params, b.offsets):
                    flat[o : o + p.numel()].copy_(state[key][name].reshape(-1))
                entry[key] = flat[lo : lo + b.shard_size].clone()
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
                lo = b.group.rank * b.shard_size
                b.shard.copy_(b.flat_params()[lo : lo + b.shard_size])
