"""The training loop: batch → forward/backward → optimizer → hooks.

The loop is plain on purpose. Everything that observes training (console, metrics,
summary, later snapshots) is a :class:`Hook`; nothing of it branches inside the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from plait.errors import ConfigError
from plait.parallel.comm import LEDGER, merge_snapshots

if TYPE_CHECKING:
    from plait.parallel.engine import ParallelEngine
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
    aux_loss: float  # MoE load-balancing loss, mean over the micro-batch blocks of the step
    grad_norm: float
    lr: float
    tokens: int  # tokens in the global batch
    seconds: float  # duration of this step
    end: float  # time.perf_counter() when the step finished
    balance: dict[str, Any] | None = None  # hybrid DP: predicted and measured busiest-rank / mean work
    lsh_ratio: list[float | None] | None = None  # parallel.ep_compress=lsh: centroids sent / copies, per layer
    lsh_fidelity: list[float | None] | None = None  # its probe's mean cosine to exact expert outputs (probe steps)
    precision: dict[str, dict[str, Any]] | None = None  # quantized recipes: per linear, recipe, amax, overflow, underflow


class Hook(Protocol):
    """Observes training. Every method is optional to override in :class:`BaseHook`."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_step_begin(self, trainer: Trainer, step: int) -> None: ...
    def on_step(self, trainer: Trainer, result: StepResult) -> None: ...
    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int) -> None: ...
    def on_end(self, trainer: Trainer) -> None: ...


class BaseHook:
    def on_start(self, trainer: Trainer) -> None:
        pass

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        """Step ``step`` is about to take its batch (memory windows open here)."""

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """The step is wholly done: its hooks and its evaluation ran (snapshots and faults hang here)."""

    def on_end(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """Runs the steps of one worker. The engine owns the (split) model, the optimizer and the collectives."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        engine: ParallelEngine,
        loader: SequenceLoader,
        eval_set: Sequence[tuple[torch.Tensor, torch.Tensor]],
        hooks: Sequence[Hook] = (),
    ):
        self.config = config
        self.engine = engine
        self.loader = loader
        self.eval_set = eval_set
        self.hooks = list(hooks)
        self.step = 0
        self.last_eval_loss: float | None = None
        self.ledger_steps = 0
        self.ledger_last: dict = {}
        self.ledger_total: dict = {}
        self.ledger: dict[str, Any] = {}  # the job's ledger, summed over ranks, set at the end of fit()
        # Set by a hook at a step's end (the same step on every rank: plait stop): the loop ends after it
        self.stop_reason: str | None = None

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        lr = self.config.lr_at(self.step)
        LEDGER.reset()
        if hasattr(self.engine, "begin_step"):
            self.engine.begin_step(self.step)
        if getattr(self.engine, "hybrid", None) is not None:  # whole documents (data.packing=documents)
            stats = self.engine.train_documents(self.loader.step_lengths(), self.loader.documents, lr)
            self.loader.advance()
            tokens = stats.tokens
        else:
            inputs, targets = self.loader.next_batch()
            stats = self.engine.train_step(inputs, targets, lr)
            tokens = self.config.global_batch * inputs.shape[1]
        self.ledger_last = LEDGER.snapshot()
        self.ledger_total = merge_snapshots([self.ledger_total, self.ledger_last])
        self.ledger_steps += 1
        self.step += 1
        return StepResult(
            step=self.step,
            loss=stats.loss,
            aux_loss=stats.aux_loss,
            grad_norm=stats.grad_norm,
            lr=lr,
            tokens=tokens,
            seconds=(end := time.perf_counter()) - start,
            end=end,
            balance=stats.balance,
            lsh_ratio=stats.lsh_ratio,
            lsh_fidelity=stats.lsh_fidelity,
            precision=stats.precision,
        )

    def evaluate(self) -> float:
        """Mean held-out cross-entropy over the whole eval set."""
        self.last_eval_loss = self.engine.evaluate(self.eval_set)
        return self.last_eval_loss

    def job_ledger(self) -> dict[str, Any]:
        """Collective: every rank's ledger of the last step and of all steps, summed over ranks."""
        from plait.parallel import comm

        parts = comm.gather_objects((self.ledger_last, self.ledger_total), self.engine.meshes.group("world"))
        if parts is None:
            return {}
        return {
            "steps": self.ledger_steps,
            "last_step": merge_snapshots([p[0] for p in parts]),
            "total": merge_snapshots([p[1] for p in parts]),
        }

    def fit(self) -> None:
        for hook in self.hooks:
            hook.on_start(self)
        every = self.config.eval_every
        while self.step < self.config.steps and self.stop_reason is None:
            for hook in self.hooks:
                if hasattr(hook, "on_step_begin"):
                    hook.on_step_begin(self, self.step + 1)
            result = self.train_step()
            for hook in self.hooks:
                hook.on_step(self, result)
            if self.step == self.config.steps or (every and self.step % every == 0):
                loss = self.evaluate()
                for hook in self.hooks:
                    hook.on_eval(self, self.step, loss)
            for hook in self.hooks:
                if hasattr(hook, "on_step_end"):
                    hook.on_step_end(self, self.step)
        self.engine.drain()
        self.ledger = self.job_ledger()  # collective: before the hooks, which run on rank 0 only
        for hook in self.hooks:
            hook.on_end(self)

    def state_dict(self) -> dict[str, Any] | None:
        """Everything needed to continue bitwise, in the single-process layout (so any layout can resume it).

        A collective: every rank calls it; rank 0 gets the state, the others None.
        """
        engine_state = self.engine.full_state_dict()
        if engine_state is None:
            return None
        return {
            "step": self.step,
            **engine_state,
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            **self._balance_state(),
        }

    def _balance_state(self) -> dict[str, Any]:
        """Hybrid data parallelism's fitted cost (the same on every rank), so a resumed run plans alike."""
        hybrid = getattr(self.engine, "hybrid", None)
        return {"balance": hybrid.state_dict()} if hybrid is not None else {}

    def _load_balance_state(self, state: dict[str, Any]) -> None:
        hybrid = getattr(self.engine, "hybrid", None)
        if hybrid is not None and "balance" in state:
            hybrid.load_state_dict(state["balance"])

    def snapshot_objects(self) -> dict[str, Any]:
        """This rank's small state besides its tensors (see :meth:`ParallelEngine.local_tensors`), for snapshots.

        Step, loader position, every RNG this process draws from, the ledger so far and
        the history of every hook that keeps one (``state_dict``/``load_state_dict``), so
        that a restored run continues bitwise and reports every step once.
        """
        import random

        import numpy as np

        rng: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        hooks = {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(self.hooks) if hasattr(h, "state_dict")}
        return {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": rng,
            "ledger": {"steps": self.ledger_steps, "total": self.ledger_total, "last": self.ledger_last},
            "last_eval_loss": self.last_eval_loss,
            "hooks": hooks,
            "layout": self.engine.layout_key(),
            **self._balance_state(),
        }

    def load_snapshot(self, tensors: dict[str, torch.Tensor], objects: dict[str, Any]) -> None:
        """Inverse of ``engine.local_tensors()`` + :meth:`snapshot_objects` (same layout and rank)."""
        import random

        import numpy as np

        mine = self.engine.layout_key()
        if objects["layout"] != mine:
            raise ValueError(f"snapshot was taken by another layout or rank: {objects['layout']['dims']} rank "
                             f"{objects['layout']['rank']}, this is {mine['dims']} rank {mine['rank']}")
        self.engine.load_local_tensors(tensors)
        self.step = int(objects["step"])
        self.loader.load_state_dict(objects["loader"])
        rng = objects["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.ledger_steps = int(objects["ledger"]["steps"])
        self.ledger_total = objects["ledger"]["total"]
        self.ledger_last = objects["ledger"]["last"]
        self.last_eval_loss = objects["last_eval_loss"]
        self._load_balance_state(objects)
        for i, h in enumerate(self.hooks):
            key = f"{i}:{type(h).__name__}"
            if hasattr(h, "load_state_dict") and key in objects["hooks"]:
                h.load_state_dict(objects["hooks"][key])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank passes the same full state."""
        self.step = int(state["step"])
        self.engine.load_full_state_dict(state)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        self._load_balance_state(state)
