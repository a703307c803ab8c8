"""``plait train … --ab RECIPE``: a reference model trained alongside, on the same data and seed.

Every rank builds a second engine from the same config with ``precision.recipe = RECIPE``
(and no other precision rule), the same initial weights (``train.seed``) and its own copy
of the loader, which yields the same batches. After each step of the job's model the
reference takes the same step; after each evaluation it is evaluated on the same
held-out batches. The loss gap per step (job − reference) and per evaluation goes to
``summary.json`` under ``ab`` and to the console. It doubles the compute and the memory
of a run: it is a tool to decide on a recipe, not a way to train.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from plait.parallel.precision import PrecisionConfig
from plait.runtime.trainer import BaseHook, StepResult, Trainer


class ABHook(BaseHook):
    """Runs the reference step after each step of the job (all ranks; rank 0 records)."""

    def __init__(self, config, *, world: int, device: torch.device, loader, summary=None):
        from plait.runtime.build import build_engine

        self.recipe = config.precision.ab
        ref = copy.deepcopy(config)
        ref.precision = PrecisionConfig(recipe=self.recipe, keep_edges=config.precision.keep_edges,
                                        stochastic_grads=config.precision.stochastic_grads,
                                        hadamard=config.precision.hadamard, weight_tiles=config.precision.weight_tiles,
                                        mx_scale=config.precision.mx_scale, seed=config.precision.seed)
        if self.recipe == "bf16":
            ref.train.dtype = "bfloat16"
        self.engine = build_engine(ref, world, device)
        self.loader = loader
        self.summary = summary
        self.record: dict[str, Any] = {"recipe": self.recipe, "losses": [], "gaps": [], "eval": []}
        if summary is not None:
            summary.ab = self.record

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        inputs, targets = self.loader.next_batch()
        self.engine.begin_step(result.step - 1)
        stats = self.engine.train_step(inputs, targets, result.lr)
        self.record["losses"].append(stats.loss)
        self.record["gaps"].append(result.loss - stats.loss)

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        reference = self.engine.evaluate(trainer.eval_set)
        gap = loss - reference
        self.record["eval"].append({"step": step, "loss": loss, "reference": reference, "gap": gap,
                                    "relative": gap / reference if reference else None})
        if self.summary is not None:
            print(f"A/B step {step}: held-out loss {loss:.4f} vs {self.recipe} {reference:.4f} "
                  f"({100 * gap / reference:+.2f}%)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.record)
