"""The training loop: batch → forward/backward → optimizer → hooks.

The loop is plain on purpose. Everything that observes training (console, metrics,
summary, later snapshots) is a :class:`Hook`; nothing of it branches inside the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.errors import ConfigError

if TYPE_CHECKING:
    from plait.runtime.data import SequenceLoader


@dataclass(kw_only=True)
class TrainConfig:
    """The ``train.*`` section."""

    steps: int = 100
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    micro_batch: int = 4  # sequences per forward/backward on one rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; weights stay float32
    eval_every: int = 50  # steps between held-out evaluations; 0: only at the end
    eval_batches: int = 4  # global batches in the held-out set
    threads: int = 0  # intra-op threads per worker; 0: cores / local workers

    def validate(self) -> None:
        positive = {"steps": self.steps, "global_batch": self.global_batch, "micro_batch": self.micro_batch, "eval_batches": self.eval_batches}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name}", value, "accepted: a positive integer")
        if self.micro_batch > self.global_batch:
            raise ConfigError("train.micro_batch", self.micro_batch, f"accepted: at most train.global_batch = {self.global_batch}")
        if not self.lr > 0:
            raise ConfigError("train.lr", self.lr, "accepted: a positive number such as 3e-4")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", self.min_lr_ratio, "accepted: a number in [0, 1]")
        for name, value in {"warmup_steps": self.warmup_steps, "eval_every": self.eval_every, "threads": self.threads, "seed": self.seed}.items():
            if value < 0:
                raise ConfigError(f"train.{name}", value, "accepted: 0 or a positive integer")
        if self.weight_decay < 0 or self.grad_clip < 0:
            key, value = ("train.weight_decay", self.weight_decay) if self.weight_decay < 0 else ("train.grad_clip", self.grad_clip)
            raise ConfigError(key, value, "accepted: 0 or a positive number")
        for name, value in {"beta1": self.beta1, "beta2": self.beta2}.items():
            if not 0 <= value < 1:
                raise ConfigError(f"train.{name}", value, "accepted: a number in [0, 1)")

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr × min_lr_ratio`` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepResult:
    step: int  # 1-based index of the optimizer step just taken
    loss: float  # cross-entropy, mean over the global batch (nats/token)
    aux_loss: float  # MoE load-balancing loss, mean over micro-batches and ranks
    grad_norm: float
    lr: float
    tokens: int  # tokens in the global batch
    seconds: float  # duration of this step
    end: float  # time.perf_counter() when the step finished


class Hook(Protocol):
    """Observes training. Every method is optional to override in :class:`BaseHook`."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_step(self, trainer: Trainer, result: StepResult) -> None: ...
    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...


class BaseHook:
    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_end(self, trainer: Trainer) -> None:
        pass


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norm weights) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


class Trainer:
    """Runs the steps of one worker. ``model`` may be wrapped for data parallelism."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        aux_loss_coef: float,
        model: torch.nn.Module,
        inner_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: SequenceLoader,
        eval_set: Sequence[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        hooks: Sequence[Hook] = (),
    ):
        self.config = config
        self.aux_loss_coef = aux_loss_coef
        self.model = model
        self.inner_model = inner_model
        self.optimizer = optimizer
        self.loader = loader
        self.eval_set = eval_set
        self.device = device
        self.group = group
        self.hooks = list(hooks)
        self.step = 0
        self.last_eval_loss: float | None = None
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self._autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16" else nullcontext()
        )

    def _all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values, group=self.group)
            values /= self.world
        return values

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        self.model.train()
        lr = self.config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = self.loader.next_batch()
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        micro = self.config.micro_batch
        chunks = inputs.shape[0] // micro
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(chunks):
            rows = slice(i * micro, (i + 1) * micro)
            last = i == chunks - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast:
                    logits = self.model(inputs[rows])
                ce = F.cross_entropy(logits.float().flatten(0, 1), targets[rows].flatten())
                aux = self.inner_model.aux_loss()
                ((ce + self.aux_loss_coef * aux) / chunks).backward()
            sums[0] += ce.detach()
            sums[1] += aux.detach()
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.inner_model.parameters(), self.config.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.inner_model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = self._all_reduce_mean(sums / chunks)
        self.step += 1
        return StepResult(
            step=self.step,
            loss=float(sums[0]),
            aux_loss=float(sums[1]),
            grad_norm=float(grad_norm),
            lr=lr,
            tokens=self.config.global_batch * inputs.shape[1],
            seconds=(end := time.perf_counter()) - start,
            end=end,
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out cross-entropy over the whole eval set (all ranks' shares)."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for inputs, targets in self.eval_set:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast:
                logits = self.inner_model(inputs)
            totals[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            totals[1] += targets.numel()
        if self.world > 1:
            dist.all_reduce(totals, group=self.group)
        self.last_eval_loss = float(totals[0] / totals[1])
        return self.last_eval_loss

    def fit(self) -> None:
        for hook in self.hooks:
            hook.on_start(self)
        every = self.config.eval_every
        while self.step < self.config.steps:
            result = self.train_step()
            for hook in self.hooks:
                hook.on_step(self, result)
            if self.step == self.config.steps or (every and self.step % every == 0):
                loss = self.evaluate()
                for hook in self.hooks:
                    hook.on_eval(self, self.step, loss)
        for hook in self.hooks:
            hook.on_end(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bitwise: model, optimizer, loader position, step, RNG."""
        return {
            "step": self.step,
            "model": self.inner_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.inner_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
