"""The parity tests' independent reference: a model trained by a plain PyTorch loop.

Nothing of :mod:`plait.parallel` runs here: the model from ``build_model``, its own MoE
forward, ``torch.optim.AdamW`` (the single-tensor implementation, not the fused kernel
the engine uses) and clipping written out. A parity test whose only reference is the
engine at world size 1 cannot see an error that every layout shares; this can.

It implements the training semantics the engine documents, not its code:

* a step of global batch ``G × T`` runs ``A = G / micro_rows`` micro-steps on consecutive
  row blocks, each contributing ``Σ cross-entropy / (G·T) + aux_coef / A · balancing loss``
  (the MoE balancing statistics are per block of ``micro_batch`` sequences, in every layout,
  so ``micro_rows`` is the configured ``micro_batch`` whatever the layout's dp);
* the gradient is clipped to a global L2 norm of ``grad_clip`` with coefficient
  ``min(1, grad_clip / (norm + 1e-6))``;
* AdamW with the ``train.*`` betas and weight decay, decayed only for matrices (ndim ≥ 2),
  at the learning rate ``TrainConfig.lr_at(step)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from routing_log import RoutingLog

from plait.runtime.models import ModelConfig, build_model
from plait.runtime.trainer import TrainConfig

EPS = 1e-8  # AdamW's epsilon (plait.parallel.dp.AdamWSettings.eps)


class PlainTrainer:
    """One process, the whole model, micro-steps of ``micro_rows`` sequences."""

    def __init__(self, model: ModelConfig, train: TrainConfig, *, micro_rows: int, aux_coef: float, seed: int = 0):
        torch.manual_seed(seed)
        self.model = build_model(model)
        self.train = train
        self.micro_rows = micro_rows
        self.aux_coef = aux_coef
        self.params = dict(self.model.named_parameters())
        matrices = [p for p in self.params.values() if p.ndim >= 2]
        vectors = [p for p in self.params.values() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": train.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
            lr=train.lr, betas=(train.beta1, train.beta2), eps=EPS, foreach=False, fused=False,
        )
        self.seq_len = model.seq_len
        self._ids = torch.arange(train.global_batch * model.seq_len).view(train.global_batch, model.seq_len)
        rows = micro_rows
        self.routing = RoutingLog(self.model.named_modules(), lambda i: self._ids[i * rows : (i + 1) * rows])

    # ------------------------------------------------------------------ one step, in parts

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Accumulate the step's gradient; returns (mean cross-entropy, balancing loss averaged over micro-steps)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        G, T = inputs.shape
        micros = G // self.micro_rows
        loss_sum = aux_sum = 0.0
        for i in range(micros):
            rows = slice(i * self.micro_rows, (i + 1) * self.micro_rows)
            logits = self.model(inputs[rows])
            ce = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten(), reduction="sum")
            loss = ce / (G * T)
            if self.aux_coef:
                aux = self.model.aux_loss()
                loss = loss + self.aux_coef / micros * aux
                aux_sum += float(aux.detach()) / micros
            loss.backward()
            loss_sum += float(ce.detach()) / (G * T)
        return loss_sum, aux_sum

    def gradients(self) -> dict[str, torch.Tensor]:
        missing = [n for n, p in self.params.items() if p.grad is None]
        if missing:
            raise AssertionError(f"no gradient reached {missing}")
        return {n: p.grad.detach().clone() for n, p in sorted(self.params.items())}

    def set_gradients(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.grad = grads[name].clone()

    def clip_and_update(self, lr: float) -> float:
        """Clip the gradient in place, take the AdamW step; returns the clipping coefficient."""
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in self.params.values()))
        coef = min(1.0, self.train.grad_clip / (norm + 1e-6)) if self.train.grad_clip > 0 else 1.0
        for p in self.params.values():
            p.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return coef

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[float, float]:
        loss, aux = self.forward_backward(inputs, targets)
        self.clip_and_update(lr)
        return loss, aux

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self.model.eval()
        logits = self.model(inputs)
        return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="mean"))

    # ------------------------------------------------------------------ state in the single-process layout

    def state(self) -> dict:
        """Model and optimizer state, in the form of ``ParallelEngine.full_state_dict``."""
        opt = {p: self.optimizer.state.get(p, {}) for p in self.params.values()}
        zeros = torch.zeros_like
        return {
            "model": {n: p.detach().clone() for n, p in sorted(self.params.items())},
            "optimizer": {
                "step": max((float(s["step"]) for s in opt.values() if "step" in s), default=0.0),
                "exp_avg": {n: opt[p].get("exp_avg", zeros(p)).clone() for n, p in sorted(self.params.items())},
                "exp_avg_sq": {n: opt[p].get("exp_avg_sq", zeros(p)).clone() for n, p in sorted(self.params.items())},
            },
        }

    @torch.no_grad()
    def load(self, state: dict) -> None:
        """Inverse of :meth:`state` (also accepts ``ParallelEngine.full_state_dict``)."""
        if set(state["model"]) != set(self.params):
            raise AssertionError(f"state names differ: {sorted(set(state['model']) ^ set(self.params))}")
        opt = state["optimizer"]
        for name, p in self.params.items():
            p.copy_(state["model"][name])
            if opt["step"] > 0:
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(opt["step"])),
                    "exp_avg": opt["exp_avg"][name].clone(),
                    "exp_avg_sq": opt["exp_avg_sq"][name].clone(),
                }
            else:
                self.optimizer.state.pop(p, None)
