"""The workers' side of fault injection: reach a fault's point, ask the launcher, wait until it is done.

A worker never carries a fault out (it could be a victim of another fault of the same
moment; see :mod:`plait.runtime.faults.executor`). At a point where faults not yet done
are due, every rank writes a request and waits, bounded, until the launcher recorded each
of them done; a victim is killed while it waits. Faults done in an earlier attempt are
not due again, so a replayed step does not fire its fault twice.

Before it asks for a step's faults, a rank drains its snapshots (copy committed,
version published, disk checkpoint written). Without it, what a fault destroys depends
on how far the background snapshot work got: on a loaded machine a kill after step 7
found the step-4 disk checkpoint incomplete and the job lost, on an idle one it
restored from it. Drained, every run of the same faults restores from the same place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from plait.errors import JobCannotContinue
from plait.runtime.faults import records
from plait.runtime.faults.spec import Fault
from plait.runtime.trainer import BaseHook

if TYPE_CHECKING:
    from plait.runtime.trainer import Trainer

# How long a worker waits for its faults. The slowest kind waits up to COMPLETE_TIMEOUT_S (60 s) for a
# daemon's versions to complete before it corrupts one; three times that is no slow machine, but a launcher
# that does not answer.
WAIT_S = 180.0


class FaultNotCarriedOut(JobCannotContinue):
    """A fault could not be carried out or verified; the run would not test what it was asked to."""


class FaultHook(BaseHook):
    """Requests the faults due after each step (the last hook: after the snapshot hook) and during restore."""

    def __init__(self, faults: list[Fault], *, run_dir: Path, rank: int, attempt: int, wait_s: float = WAIT_S,
                 drain: Callable[[], None] | None = None):
        self.faults = faults
        self.drain = drain
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.attempt = attempt
        self.wait_s = wait_s

    def settle(self) -> None:
        """Before restoring: wait until the launcher finished the faults it is carrying out (all of one point).

        A fault an earlier attempt could not carry out stops this one too: the workers
        that heard of it may have been killed by another fault before they could stop the job.
        """
        deadline = time.monotonic() + self.wait_s
        while records.executing_path(self.run_dir).exists():
            if time.monotonic() > deadline:
                raise FaultNotCarriedOut(f"the launcher was still carrying out faults after {self.wait_s:.0f} s "
                                         f"({records.executing_path(self.run_dir)} exists); is plait train running?")
            time.sleep(0.01)
        _raise_failed(records.fault_records(self.run_dir))

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        self.reach(f"s{step}", drain=True)

    def at_restore(self, kind: str) -> None:
        """Called by restore once rank 0's plan (``kind``: memory, disk, ...) is known, before any rank loads."""
        if self.attempt > 0:
            self.reach(f"restore{self.attempt}")

    def reach(self, point: str, *, drain: bool = False) -> None:
        due = [i for i, f in enumerate(self.faults) if f.point == point and records.read_record(self.run_dir, i) is None]
        if not due:
            return
        from plait.parallel.comm import LEDGER

        LEDGER.phase = "fault"  # the control plane does not call a wait for the launcher a hang
        if drain and self.drain is not None:
            self.drain()
        records.write_atomic(records.request_path(self.run_dir, attempt=self.attempt, point=point, rank=self.rank),
                             {"rank": self.rank, "pid": os.getpid()})
        deadline = time.monotonic() + self.wait_s
        while True:
            done = [records.read_record(self.run_dir, i) for i in due]
            if all(r is not None for r in done):
                break
            if time.monotonic() > deadline:
                missing = ", ".join(str(self.faults[i]) for i, r in zip(due, done) if r is None)
                raise FaultNotCarriedOut(f"fault(s) {missing} not carried out within {self.wait_s:.0f} s of rank "
                                         f"{self.rank} asking; plait train carries faults out: is it running?")
            time.sleep(0.01)
        _raise_failed(done)


def _raise_failed(done: list[dict]) -> None:
    failed = [r for r in done if not r["ok"]]
    if failed:
        raise FaultNotCarriedOut("; ".join(f"fault {r['fault']} could not be carried out: {r['error']}" for r in failed))
