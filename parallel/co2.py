"""CO2: local steps, and an outer update over data parallelism whose all-reduce hides behind the next round.

``parallel.dp_mode=co2`` (Sun et al., "CO2: Efficient Distributed Training with Full
Communication-Computation Overlap", ICLR 2024). Each data-parallel replica (the ``pp·cp·tp``
ranks of one dp coordinate) trains on its own rows for a *round* of τ local AdamW steps; its
gradients are reduced only inside the replica (cp, tp, and the experts' replicas inside it),
so no step waits for the dp link. The replicas agree on a *start* x_t (the same on every
replica); replica i's parameters are the start less its own progress that the others have not
seen yet. At the end of round t, with d⁽ⁱ⁾_t replica i's progress over the round (where it
began less where it is):

1. the all-reduce started one round ago is waited for: Δ = mean_i d⁽ⁱ⁾_{t−1}, the replicas' mean
   progress over round t−1, whose start was x_{t−1};
2. the all-reduce of d⁽ⁱ⁾_t starts, and runs during round t+1;
3. the outer update uses that one-round-stale average (round 0 has none, and moves nothing):

       gap = x_t − x_{t−1}                          how far the start moved since Δ's round began
       Λ   = 1 + ‖gap‖ / ‖Δ‖                         staleness gap penalty (1 with gap_penalty off, or Δ = 0)
       m   = clip_φ(β·m + Δ / Λ)                     outer momentum, each element clamped to [−φ, φ] (φ > 0)
       x_{t+1} = x_t − α·m

4. replica i continues from x_{t+1} − d⁽ⁱ⁾_t: the new start, plus its own progress of round t,
   which reaches the start (averaged with the others') one round later.

Every term of the outer update is the same on every replica, so the replicas agree on x_{t+1}
without talking. The all-reduce carries the progress d (the outer gradient), as many bytes as
the parameters, so Δ is the mean round displacement exactly, not a difference of large numbers.

Why step 4 keeps the replica's own progress instead of restarting every replica from x_{t+1}:
a restart throws each round's work away until its average arrives, which turns the outer loop
into a delayed update, and AdamW tuned near its edge of stability does not survive the delay
(one replica, τ = 1: plain training, where the restart form ends 43 % above it after 200 steps
on a small model, 2.54 against 1.78 held-out, while this form is plain training exactly; four
replicas, τ = 4: 2.21 against the restart form's 2.71). With one replica, τ = 1, α = 1, β = 0
and no penalty this is plain AdamW, bit for bit in exact arithmetic; a test holds it to that.

The penalty follows Gap-Aware staleness mitigation (Barkai et al., ICLR 2020), which CO2 builds
on: the gap measured in units of the update it delays, over the whole model (norms summed over
the replica's ranks), so Λ = 1 when nothing moved and grows with the staleness. At its fixed point
with the public defaults (α = 1, β = 0.5) Λ = 2 and m = Δ. The clipping really clips the stored
momentum (``clamp_`` in place): the public implementation computes a clamp and drops its result.

State lives on the ZeRO shards of :class:`~plait.parallel.dp.ShardedAdamW` (each rank holds
the outer state of the slice of each bucket it owns inside its replica, and the dp all-reduce
moves only that slice): the start, the previous start, the momentum and this replica's progress
of the last round (its contribution to the all-reduce in flight), with the round and the local step. All of it is in
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
        # this replica's progress over the round: it began at the start less its progress of the round before
        progress = [start - sent - shard for start, sent, shard in zip(self.start, self.sent, shards)]
        stale = None
        if self.round >= 1:
            self.drain()
            stale = [inflight / self.dp.size for inflight in self._inflight]  # the replicas' mean progress, round t−1
        for sent, d in zip(self.sent, progress):
            sent.copy_(d)
        self._launch()
        if stale is not None:
            penalty = 1.0
            if s.gap_penalty:
                sq = torch.zeros(2, dtype=torch.float64)
                for start, prev, delta in zip(self.start, self.previous, stale):
                    sq[0] += (start - prev).double().pow(2).sum()
                    sq[1] += delta.double().pow(2).sum()
                comm.all_reduce(sq, self.replica)
                if sq[1] > 0:
                    penalty = 1.0 + math.sqrt(float(sq[0])) / math.sqrt(float(sq[1]))
            self.last_penalty = penalty
            for start, prev, m, delta in zip(self.start, self.previous, self.momentum, stale):
                m.mul_(s.outer_momentum).add_(delta, alpha=1.0 / penalty)
                if s.clip > 0:
                    m.clamp_(-s.clip, s.clip)
                prev.copy_(start)
                start.add_(m, alpha=-s.outer_lr)
        for start, sent, shard in zip(self.start, self.sent, shards):
            torch.sub(start, sent, out=shard)
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
