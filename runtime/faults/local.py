"""The faults a worker carries out on itself: ``slow-rank`` and ``hang``.

``--fault slow-rank:rank=R:factor=F[:step=S]``: rank R computes F times slower, as a
degraded device would. The worker carries it out itself (nothing outside it changes): from step S
(or the first), at the start of each step it waits (F − 1) × the median compute time of its
last five steps, that is, each step's time less the time it was blocked in collectives
(the ledger's ``comm_s``). The wait is inside the step, before its first collective, so
the other ranks wait for this one in that collective, as they would for a slow device.

``--fault hang:rank=R:step=S``: after step S (its hooks done), rank R stops making progress
for good (a wait in Python, as a deadlock or a stuck device would look), in the job's first
attempt only; the others block in their next collective. The control plane must notice,
dump every rank's stacks and restart the workers (see :mod:`plait.runtime.control`).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque
from typing import TYPE_CHECKING

from plait.parallel.comm import LEDGER
from plait.runtime.faults.spec import Fault
from plait.runtime.trainer import BaseHook, StepResult

if TYPE_CHECKING:
    from plait.runtime.trainer import Trainer


class SlowRankHook(BaseHook):
    """The slow-rank fault of this rank (after the control plane's hook, which times the step from its begin)."""

    def __init__(self, fault: Fault):
        if fault.kind != "slow-rank" or fault.factor is None:
            raise ValueError(f"not a slow-rank fault: {fault}")
        self.fault = fault
        self.compute_s: deque[float] = deque(maxlen=5)  # the last steps', without this hook's wait
        self.waited_s = 0.0

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        if step >= (self.fault.step or 1) and self.compute_s:
            # the median of the last few: a degraded device is steadily slower, not noisier
            wait = (self.fault.factor - 1.0) * statistics.median(self.compute_s)
            time.sleep(wait)
            self.waited_s += wait

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.compute_s.append(max(0.0, result.seconds - LEDGER.comm_s))


class HangHook(BaseHook):
    """The hang fault of this rank (the last hook: the step's snapshot and reports are done)."""

    def __init__(self, fault: Fault):
        if fault.kind != "hang" or fault.step is None:
            raise ValueError(f"not a hang fault: {fault}")
        self.fault = fault

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step == self.fault.step and os.environ.get("PLAIT_ATTEMPT", "0") == "0":
            logging.getLogger("plait.faults").warning("fault %s: rank %d hangs after step %d", self.fault,
                                                      self.fault.target, step)
            while True:
                time.sleep(1.0)
