"""CO2 written from the paper's equations over whole tensors, with plain PyTorch replicas (no plait.parallel).

Replica ``d`` of ``dp`` is a :class:`~plain_reference.PlainTrainer` on its own rows of each global batch (the
rows ``parallel.engine`` gives dp rank ``d``: ``micro`` rows of every block of ``micro·dp``). It takes AdamW
steps on its mean loss, clipped by its own gradient norm. After every ``tau`` steps, round ``t`` ends:

    pending   ← mean over replicas of their parameters        (arrives one round later)
    t = 0:      every replica restarts from x_0
    t ≥ 1:      Δ = x_{t−1,0} − pending_{t−1};  gap = x_{t,0} − x_{t−1,0};  Λ = 1 + ‖gap‖/‖Δ‖ (whole model)
                m = clamp(β·m + Δ/Λ, −φ, φ);  x_{t+1,0} = x_{t,0} − α·m;  every replica restarts from it
"""

from __future__ import annotations

import math

import torch
from plain_reference import PlainTrainer

from plait.runtime.models import ModelConfig
from plait.runtime.trainer import TrainConfig


def replica_rows(batch: torch.Tensor, d: int, dp: int, micro: int) -> torch.Tensor:
    blocks = batch.shape[0] // (micro * dp)
    return torch.cat([batch[i * micro * dp + d * micro: i * micro * dp + (d + 1) * micro] for i in range(blocks)])


class CO2Reference:
    def __init__(self, model: ModelConfig, train: TrainConfig, *, dp: int, micro: int, tau: int, outer_lr: float,
                 outer_momentum: float, gap_penalty: bool, clip: float):
        self.replicas = [PlainTrainer(model, train, micro_rows=micro, aux_coef=0.0) for _ in range(dp)]
        self.dp, self.micro, self.tau = dp, micro, tau
        self.alpha, self.beta, self.gap_penalty, self.clip = outer_lr, outer_momentum, gap_penalty, clip
        self.steps = 0
        self.round = 0
        self.start = self._params(0)
        self.previous = {n: t.clone() for n, t in self.start.items()}
        self.momentum = {n: torch.zeros_like(t) for n, t in self.start.items()}
        self.pending: dict[str, torch.Tensor] | None = None
        self.penalties: list[float] = []

    def _params(self, d: int) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.replicas[d].params.items()}

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        """One local step of every replica (and the round's end when due); returns the global mean loss."""
        losses = []
        for d, r in enumerate(self.replicas):
            loss, _ = r.step(replica_rows(inputs, d, self.dp, self.micro), replica_rows(targets, d, self.dp, self.micro), lr)
            losses.append(loss)
        self.steps += 1
        if self.steps % self.tau == 0:
            self._end_round()
        return sum(losses) / self.dp

    @torch.no_grad()
    def _end_round(self) -> None:
        ends = [self._params(d) for d in range(self.dp)]
        average = {n: sum(e[n] for e in ends) / self.dp for n in self.start}
        if self.round >= 1:
            delta = {n: self.previous[n] - self.pending[n] for n in self.start}
            penalty = 1.0
            if self.gap_penalty:
                gap = math.sqrt(sum(float((self.start[n] - self.previous[n]).double().pow(2).sum()) for n in self.start))
                size = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
                penalty = 1.0 + gap / size if size > 0 else 1.0
            self.penalties.append(penalty)
            for n in self.start:
                m = self.beta * self.momentum[n] + delta[n] / penalty
                self.momentum[n] = m.clamp(-self.clip, self.clip) if self.clip > 0 else m
            self.previous = {n: t.clone() for n, t in self.start.items()}
            self.start = {n: self.start[n] - self.alpha * self.momentum[n] for n in self.start}
        else:
            self.previous = {n: t.clone() for n, t in self.start.items()}
        self.pending = average
        self.round += 1
        for r in self.replicas:
            for n, p in r.params.items():
                p.copy_(self.start[n])
