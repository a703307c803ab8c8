"""CO2 written from its equations over whole tensors, with plain PyTorch replicas (no plait.parallel).

Replica ``d`` of ``dp`` is a :class:`~plain_reference.PlainTrainer` on its own rows of each global batch (the
rows ``parallel.engine`` gives dp rank ``d``: ``micro`` rows of every block of ``micro·dp``). It takes AdamW
steps on its mean loss, clipped by its own gradient norm. The replicas agree on a start x; replica d begins
round t at x_t − own_d (its progress of the round before, not yet averaged). After every ``tau`` steps round t
ends, with p_d = (where replica d began the round) − (where it is):

    t ≥ 1:   Δ = mean_d of round t−1's p_d;  gap = x_t − x_{t−1};  Λ = 1 + ‖gap‖/‖Δ‖ (whole model)
             m = clamp(β·m + Δ/Λ, −φ, φ);  x_{t+1} = x_t − α·m        (t = 0: x_1 = x_0)
    every replica: own_d = p_d, and it continues from x_{t+1} − own_d
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
        self.own = [{n: torch.zeros_like(t) for n, t in self.start.items()} for _ in range(dp)]
        self.pending: list[dict[str, torch.Tensor]] = []
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
        progress = [{n: self.start[n] - self.own[d][n] - ends[d][n] for n in self.start} for d in range(self.dp)]
        if self.round >= 1:
            delta = {n: sum(p[n] for p in self.pending) / self.dp for n in self.start}
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
        self.pending = progress
        self.own = progress
        self.round += 1
        for d, r in enumerate(self.replicas):
            for n, p in r.params.items():
                p.copy_(self.start[n] - self.own[d][n])
