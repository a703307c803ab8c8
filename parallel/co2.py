"""CO2: local steps, and an outer update over data parallelism whose all-reduce hides behind the next round.

``parallel.dp_mode=co2`` (Sun et al., "CO2: Efficient Distributed Training with Full
Communication-Computation Overlap", ICLR 2024). Each data-parallel replica (the ``pp·cp·tp``
ranks of one dp coordinate) trains on its own rows for a *round* of τ local AdamW steps; its
gradients are reduced only inside the replica (cp, tp, and the experts' replicas inside it),
so no step waits for the dp link. At the end of round t, with x_{t,0} the round's start (the
same on every replica) and x⁽ⁱ⁾_{t,τ} replica i's parameters after its τ steps:

1. the all-reduce of round t−1's ends, started one round ago, is waited for:
   x̄_{t−1} = mean_i x⁽ⁱ⁾_{t−1,τ};
2. the all-reduce of x⁽ⁱ⁾_{t,τ} starts, and runs during round t+1;
3. the outer update uses round t−1's average, one round stale (for t = 0 there is none: x_{1,0} = x_{0,0}):

       Δ   = x_{t−1,0} − x̄_{t−1}                    round t−1's outer gradient
       gap = x_{t,0} − x_{t−1,0}                    how far the start moved since Δ's round began
       Λ   = 1 + ‖gap‖ / ‖Δ‖                         staleness gap penalty (1 with gap_penalty off, or Δ = 0)
       m   = clip_φ(β·m + Δ / Λ)                     outer momentum, each element clamped to [−φ, φ] (φ > 0)
       x_{t+1,0} = x_{t,0} − α·m

   and every replica starts round t+1 from x_{t+1,0}. Every term is the same on every replica
   (starts, averages and momentum are), so the replicas agree on x_{t+1,0} without talking.

The penalty follows Gap-Aware staleness mitigation (Barkai et al., ICLR 2020), which CO2 builds
on: the gap measured in units of the update it delays, over the whole model (norms summed over
the replica's ranks), so Λ = 1 when nothing moved and grows with the staleness. At its fixed point
with the public defaults (α = 1, β = 0.5) Λ = 2 and m = Δ: each round moves the start by the
replicas' mean progress of the round before. The clipping really clips the stored momentum
(``clamp_`` in place): the public implementation computes a clamp and drops its result.

State lives on the ZeRO shards of :class:`~plait.parallel.dp.ShardedAdamW` (each rank holds
the outer state of the slice of each bucket it owns inside its replica, and the dp all-reduce
moves only that slice): the start, the previous start, the momentum and this rank's
contribution to the all-reduce in flight, with the round and the local step. All of it is in
:meth:`CO2.state`, so a snapshot restores mid-round exactly: the restored ranks start the
in-flight all-reduce again from the contributions they kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from plait.parallel import comm
from plait.parallel.comm import Group


class CO2:
    """The outer loop over the buckets of a :class:`~plait.parallel.dp.ShardedAdamW` whose groups stay inside a replica.

    ``dp`` is the group of this rank's counterparts in the other replicas (they own the same slices),
    ``replica`` every rank of this rank's replica (for the penalty's norms). ``settings`` is a
    :class:`plait.parallel.config.CO2Config`.
    """

    FIELDS = ("start", "previous", "momentum", "sent")

    def __init__(self, buckets: list[Any], dp: Group, replica: Group, settings: Any):
        self.buckets = buckets
        self.dp = dp
        self.replica = replica
        self.settings = settings
        self.round = 0
        self.local_steps = 0
        self.last_penalty = 1.0  # Λ of the last outer update (1 before the first)
        self._works: list[Any] = []
        self._inflight: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """A first round from the parameters as they are now (after loading a state without outer state)."""
        self.drain()
        self.round = 0
        self.local_steps = 0
        self.last_penalty = 1.0
        self.start = [b.shard.detach().clone() for b in self.buckets]
        self.previous = [s.clone() for s in self.start]
        self.momentum = [torch.zeros_like(s) for s in self.start]
        self.sent = [torch.zeros_like(s) for s in self.start]
        self._inflight = [torch.zeros_like(s) for s in self.start]
        self._works = []

    def _launch(self) -> None:
        self._works = []
        for sent, inflight in zip(self.sent, self._inflight):
            inflight.copy_(sent)
            self._works.append(comm.all_reduce_async(inflight, self.dp))

    def drain(self) -> None:
        """Wait for the all-reduce in flight (before the process group goes away)."""
        for work in self._works:
            comm.wait(work, self.dp, "all_reduce")
        self._works = []

    @torch.no_grad()
    def after_local_step(self) -> None:
        """Called after each local update, before the shards are gathered into the parameters."""
        self.local_steps += 1
        if self.local_steps < self.settings.tau:
            return
        self.local_steps = 0
        s = self.settings
        shards = [b.shard.detach() for b in self.buckets]
        if self.round == 0:
            for sent, shard in zip(self.sent, shards):
                sent.copy_(shard)
            self._launch()
            for prev, start, shard in zip(self.previous, self.start, shards):
                prev.copy_(start)
                shard.copy_(start)
            self.round = 1
            return
        self.drain()
        deltas = [prev - inflight / self.dp.size for prev, inflight in zip(self.previous, self._inflight)]
        for sent, shard in zip(self.sent, shards):
            sent.copy_(shard)
        self._launch()
        penalty = 1.0
        if s.gap_penalty:
            sq = torch.zeros(2, dtype=torch.float64, device=shards[0].device if shards else None)
            for start, prev, delta in zip(self.start, self.previous, deltas):
                sq[0] += (start - prev).double().pow(2).sum()
                sq[1] += delta.double().pow(2).sum()
            comm.all_reduce(sq, self.replica)
            if sq[1] > 0:
                penalty = 1.0 + math.sqrt(float(sq[0])) / math.sqrt(float(sq[1]))
        self.last_penalty = penalty
        for start, prev, m, delta, shard in zip(self.start, self.previous, self.momentum, deltas, shards):
            m.mul_(s.outer_momentum).add_(delta, alpha=1.0 / penalty)
            if s.clip > 0:
                m.clamp_(-s.clip, s.clip)
            prev.copy_(start)
            start.add_(m, alpha=-s.outer_lr)
            shard.copy_(start)
        self.round += 1

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, torch.Tensor]:
        """The outer state as it lives in memory (keys ``"<bucket>.<field>"``, ``round``, ``local_steps``)."""
        out: dict[str, torch.Tensor] = {
            "round": torch.tensor(self.round, dtype=torch.int64),
            "local_steps": torch.tensor(self.local_steps, dtype=torch.int64),
        }
        for name in self.FIELDS:
            for i, t in enumerate(getattr(self, name)):
                out[f"{i}.{name}"] = t
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state` (same layout); restarts the all-reduce that was in flight. A collective over dp."""
        self.drain()
        missing = [f"{i}.{name}" for name in self.FIELDS for i in range(len(self.buckets)) if f"{i}.{name}" not in state]
        if missing or "round" not in state or "local_steps" not in state:
            raise KeyError(f"CO2 state lacks {(missing or ['round'])[:4]}")
        with torch.no_grad():
            for name in self.FIELDS:
                for i, t in enumerate(getattr(self, name)):
                    src = state[f"{i}.{name}"]
                    if src.shape != t.shape:
                        raise ValueError(f"CO2 state {i}.{name} has shape {tuple(src.shape)}, expected {tuple(t.shape)}")
                    t.copy_(src)
        self.round = int(state["round"])
        self.local_steps = int(state["local_steps"])
        if self.round >= 1:
            self._launch()
