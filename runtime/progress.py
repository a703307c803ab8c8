"""User-facing progress on rank 0: a ``rich`` progress line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from plait.runtime.trainer import BaseHook, StepResult

if TYPE_CHECKING:
    from plait.runtime.trainer import Trainer


class Pace:
    """Throughput and ETA by the wall clock between step ends.

    Measured from the end of step 1 (warm-up, allocation) to the end of the latest step,
    so whatever runs between steps (hooks, evaluation) counts against throughput.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.steps = 0
        self.tokens = 0
        self.first_end = 0.0
        self.last_end = 0.0
        self.first_step_seconds = 0.0

    def add(self, result: StepResult) -> None:
        self.steps += 1
        if self.steps == 1:
            self.first_end = result.end
            self.first_step_seconds = result.seconds
        else:
            self.tokens += result.tokens
        self.last_end = result.end

    @property
    def seconds(self) -> float:
        return self.last_end - self.first_end

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def step_seconds(self) -> float:
        if self.steps > 1:
            return self.seconds / (self.steps - 1)
        return self.first_step_seconds

    @property
    def eta_seconds(self) -> float:
        return self.step_seconds * (self.total_steps - self.steps)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ConsoleHook(BaseHook):
    """Step, loss, tokens/s and ETA: a live line on a terminal, one line every ``log_every`` steps otherwise."""

    def __init__(self, log_every: int, stream=None):
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream, highlight=False)
        self.live = self.console.is_terminal
        self.log_every = log_every
        self.pace: Pace | None = None
        self.progress: Progress | None = None
        self.task = None
        self.eval_loss: float | None = None
        self.started = 0.0

    def on_start(self, trainer: Trainer) -> None:
        total = trainer.config.steps
        self.pace = Pace(total)
        self.started = time.perf_counter()
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total, completed=trainer.step, stats="")
            self.progress.start()

    def _stats(self, result: StepResult) -> str:
        assert self.pace is not None
        text = f"loss {result.loss:.4f}"
        if self.eval_loss is not None:
            text += f" · eval {self.eval_loss:.4f}"
        if result.balance is not None:
            text += (f" · busiest/mean work predicted {result.balance['predicted']:.2f}, measured "
                     f"{result.balance['measured']:.2f}")
        return text + f" · {self.pace.tokens_per_s:,.0f} tok/s · ETA {format_seconds(self.pace.eta_seconds)}"

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        assert self.pace is not None
        self.pace.add(result)
        if self.progress is not None:
            self.progress.update(self.task, completed=result.step, stats=self._stats(result))
        elif result.step % self.log_every == 0 or result.step == trainer.config.steps or result.step == 1:
            print(f"step {result.step}/{trainer.config.steps} {self._stats(result)}", file=self.stream, flush=True)

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        self.eval_loss = loss
        if self.progress is None:
            print(f"eval step {step}: held-out loss {loss:.4f}", file=self.stream, flush=True)

    def on_end(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self.progress.stop()
