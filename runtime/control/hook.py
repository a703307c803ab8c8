"""The worker's side of the control plane: register, report every step, carry out the users' commands.

**Reports never hold training up.** A background thread registers with the coordinator
(retrying until it answers) and sends a heartbeat every ``control.heartbeat_s``: the last
step, the phase the worker is in, the collective it is blocked in and for how long (from the
ledger, :class:`plait.parallel.comm.Ledger`), and the time of every step finished since the
last report, split into communication (time blocked in collectives) and the rest. One report
per interval rather than per step: a report is a gRPC call on the worker's CPU, and at a few
steps a second on shared cores the per-step reports cost several percent of the step.
A coordinator that is down or hangs costs the thread its deadline, never the step.

**Commands reach every rank at the same step.** Only rank 0 takes commands from the
coordinator (in its heartbeat replies). It puts the oldest one not yet done into the
engine's control word, which rides on the step's closing all-reduce
(:meth:`plait.parallel.engine.ParallelEngine._close_step`); every rank reads the
same agreed word after that step and carries the command out at its end:

* ``snapshot``: a snapshot of this step (to the daemons, as ``snapshot.every`` would);
* ``stop``: the loop ends after this step, the summary says ``stopped``; with
  ``--snapshot`` a durable disk checkpoint of this step is written first (the in-memory
  snapshots go with the daemons), which ``plait train --resume`` continues from.

Rank 0 reports the command done, with what was done, in its next heartbeat.

**Hangs.** A reply may also tell the worker to dump every thread's stack into
``<run dir>/stacks/rank<R>.txt`` and to end its process (the coordinator found it stuck):
the report thread does both while the main thread is blocked, on whatever node it runs.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from plait.parallel.comm import LEDGER
from plait.runtime.control import control_pb2 as pb
from plait.runtime.control.state import MAX_EARLIER
from plait.runtime.trainer import BaseHook, StepResult

if TYPE_CHECKING:
    from plait.runtime.control.client import CoordinatorClient
    from plait.runtime.snapshot.trainer.hook import SnapshotHook
    from plait.runtime.trainer import Trainer

log = logging.getLogger("plait.control")

KINDS = {1: ("stop", False), 2: ("stop", True), 3: ("snapshot", False)}


def _stacks_sink(path: Path, rank: int, attempt: int):
    """``<run dir>/stacks/rank<R>.txt``, open for appending for the process's life; SIGUSR1 dumps into it too.

    faulthandler writes from C, so a dump works while the main thread is blocked in a
    collective or spinning in Python; the signal covers a rank whose reports stopped.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("a")
    sink.write(f"# rank {rank}, pid {os.getpid()}, attempt {attempt}: stacks follow each hang report\n")
    sink.flush()
    faulthandler.register(signal.SIGUSR1, file=sink, all_threads=True, chain=False)
    return sink


def encode(command_id: int, command: str, snapshot: bool) -> float:
    """The control word of a command: id × 4 + kind (exact in float64 up to 2⁵¹ commands)."""
    kind = next(k for k, v in KINDS.items() if v == (command, snapshot))
    return float(command_id * 4 + kind)


def decode(word: float) -> tuple[int, str, bool] | None:
    value = int(word)
    if value <= 0 or value % 4 not in KINDS:
        return None
    command, snapshot = KINDS[value % 4]
    return value // 4, command, snapshot


class ControlHook(BaseHook):
    """One per worker (see the module docstring)."""

    def __init__(self, client: CoordinatorClient, *, rank: int, world: int, node: int, attempt: int,
                 heartbeat_s: float = 1.0, snapshots: SnapshotHook | None = None, stacks: Path | None = None):
        self.client = client
        self.stacks = _stacks_sink(stacks, rank, attempt) if stacks is not None else None
        self.rank = rank
        self.world = world
        self.node = node
        self.attempt = attempt
        self.heartbeat_s = heartbeat_s
        self.snapshots = snapshots
        self.restore = ""
        self.member_id = 0
        self.step = 0
        self.phase = "idle"
        self.step_s = self.comm_s = self.compute_s = 0.0
        self.pending: tuple[int, str, bool] | None = None  # rank 0: from the coordinator, not yet carried out
        self.done_id = 0
        self.done_note = ""
        self.failures = 0
        self._t0 = 0.0
        self._agreed: tuple[int, str, bool] | None = None
        self._times: list[tuple[int, float, float, float]] = []  # steps finished since the last report
        self._times_lock = threading.Lock()
        self._engine = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Reports start now, before the restore, so the coordinator knows a restarted attempt is restoring
        LEDGER.phase = "restore"
        self._thread = threading.Thread(target=self._run, name="plait-control", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ hook protocol

    def restored(self, line: str) -> None:
        """Rank 0: how this attempt began (the restore's line); registers again to tell the coordinator."""
        self.restore = line
        self.member_id = 0
        self._wake.set()

    def on_start(self, trainer: Trainer) -> None:
        self._engine = trainer.engine
        self.step = trainer.step
        LEDGER.phase = "idle"
        trainer.engine.optimizer.before_update.append(self._before_update)
        self._wake.set()

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        self._t0 = time.perf_counter()
        LEDGER.phase = "forward"
        if self.rank == 0 and self.pending is not None:
            trainer.engine.control_word = encode(*self.pending)

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.step_s = time.perf_counter() - self._t0
        self.comm_s = min(LEDGER.comm_s, self.step_s)
        self.compute_s = self.step_s - self.comm_s
        self.step = result.step
        LEDGER.phase = "hooks"
        self._agreed = decode(trainer.engine.control_agreed)
        trainer.engine.control_word = 0.0
        with self._times_lock:
            self._times.append((self.step, self.step_s, self.comm_s, self.compute_s))
            del self._times[:-MAX_EARLIER]

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        agreed, self._agreed = self._agreed, None
        if agreed is not None and agreed[0] > self.done_id:
            self._carry_out(trainer, step, *agreed)
        LEDGER.phase = "idle"

    def on_end(self, trainer: Trainer) -> None:
        LEDGER.phase = "done"
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.client.timeout + 1.0)
        self._send()  # the last state (and rank 0's last command done), synchronously
        self.client.close()

    # ------------------------------------------------------------------ commands

    def _before_update(self) -> None:
        LEDGER.phase = "optimizer"

    def _carry_out(self, trainer: Trainer, step: int, command_id: int, command: str, snapshot: bool) -> None:
        notes = []
        if command == "snapshot" or snapshot:
            notes.append(self._snapshot(trainer, step, durable=command == "stop"))
        if command == "stop":
            trainer.stop_reason = f"stopped by plait stop after step {step}"
            notes.append(f"stopped after step {step}")
        self.done_note = "; ".join(notes)
        self.done_id = command_id
        if self.rank == 0:
            self.pending = None
            print(f"plait: {self.done_note} (command {command_id})", flush=True)
        self._wake.set()

    def _snapshot(self, trainer: Trainer, step: int, *, durable: bool) -> str:
        hook = self.snapshots
        if hook is None:
            return "no snapshot: this job runs without snapshots (snapshot.every=0)"
        LEDGER.phase = "snapshot"
        if durable:
            writer = hook.disk or hook.stop_writer  # the disk tier's writer, or one for this stop
            hook.drain()  # the snapshot in flight, and earlier disk writes, first
            hook.write_to_disk(trainer, step, writer)
            writer.wait()
            return f"checkpoint of step {step} written to {writer.root}"
        if step % hook.config.every == 0:
            return f"snapshot of step {step} (on the snapshot.every grid)"
        if step >= trainer.config.steps:
            return f"no snapshot at the last step {step}"
        hook.take(trainer, step)
        return f"snapshot of step {step} taken"

    # ------------------------------------------------------------------ reports

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._send()

    def _send(self) -> None:
        try:
            if not self.member_id:
                self.member_id = self.client.register(rank=self.rank, world=self.world, node=self.node,
                                                      pid=os.getpid(), host=socket.gethostname()[:255],
                                                      attempt=self.attempt, restore=self.restore[:1024])
            current = LEDGER.current
            with self._times_lock:
                times, self._times = self._times, []
            step, step_s, comm_s, compute_s = times[-1] if times else (self.step, self.step_s, self.comm_s, self.compute_s)
            try:
                reply = self.client.heartbeat(
                    rank=self.rank, member_id=self.member_id, step=step, phase=LEDGER.phase,
                    collective=current, in_collective_s=max(0.0, time.perf_counter() - LEDGER.since) if current else 0.0,
                    step_s=step_s, comm_s=comm_s, compute_s=compute_s,
                    command_done=self.done_id if self.rank == 0 else 0, command_note=self.done_note[:256],
                    earlier=[pb.StepTime(step=t[0], step_s=t[1], comm_s=t[2], compute_s=t[3]) for t in times[:-1]])
            except Exception:
                with self._times_lock:  # not delivered: the next report carries them
                    self._times[:0] = times
                    del self._times[:-MAX_EARLIER]
                raise
            if self.rank == 0 and reply.command_id > self.done_id:
                self.pending = (reply.command_id, reply.command, reply.snapshot)
            if reply.dump_stacks and self.stacks is not None:
                self.stacks.write(f"# the coordinator found a hang: stacks at step {self.step}, phase {LEDGER.phase}\n")
                self.stacks.flush()
                faulthandler.dump_traceback(file=self.stacks, all_threads=True)
            if reply.exit:
                log.error("rank %d: the coordinator found this worker stuck; ending it so the workers restart",
                          self.rank)
                os.kill(os.getpid(), signal.SIGKILL)
            if self.failures:
                log.warning("rank %d: the coordinator answers again after %d failed reports", self.rank, self.failures)
            self.failures = 0
        except Exception as err:  # noqa: BLE001 - reports must never stop training
            from plait.runtime.control.state import ControlStateError

            if isinstance(err, ControlStateError) and ("member id" in str(err) or "not registered" in str(err)):
                self.member_id = 0  # the coordinator was restarted, or a newer worker of this rank: register again
            if self.failures == 0:
                log.warning("rank %d: report to the coordinator failed: %s (retrying; training goes on)",
                            self.rank, err)
            self.failures += 1
