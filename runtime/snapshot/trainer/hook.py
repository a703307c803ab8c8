"""The trainer side of snapshots: every ``snapshot.every`` steps, this rank's state goes to its node daemon.

Timeline of the snapshot of step s (taken when step s is wholly done, ``on_step_end``):

1. now, on the training thread: fix the blob layout and serialise the small Python
   state (step, loader, RNGs, histories: they change every step). Nothing else: the
   training thread never waits on a daemon;
2. meanwhile, on a copy thread: ask the local daemon for a shared-memory segment of the
   blob's size, copy every parameter and optimizer tensor into it (device → host on
   GPU), seal it (the job's MAC), checksum it and commit it; the daemon then sends its
   chunks to the group's parity holders;
3. step s+1's forward and backward run concurrently; its optimizer update waits for
   the copy (``ShardedAdamW.before_update``), since it rewrites what is being copied. If
   the daemon has not even given the segment yet (it is slow or hung) the update does
   not wait longer than a bound derived from the allocations measured so far: that
   snapshot is skipped and reported;
4. global rank 0's :class:`~.lifecycle.VersionLifecycle` publishes the version once
   every daemon holds it complete (all data and parity shards, checksummed), on its
   own thread; until then the previous published version stays the restore point.

Nothing here can stop training: a failed allocation, a daemon restarting or hung, a
peer that does not answer: each is logged and counted (``skipped``), and the next
snapshot tries again. A version is ``epoch << 40 | step`` (see ``records.py``): the
epoch is the restore generation, set by :func:`~.restore.restore` at every start.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plait.ops.checksum import checksum
from plait.runtime.snapshot.config import SnapshotConfig
from plait.runtime.snapshot.records import step_of, version_id, version_text
from plait.runtime.snapshot.trainer import blob as blob_state

if TYPE_CHECKING:
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.checkpoint.write import CheckpointWriter
    from plait.runtime.snapshot.trainer.lifecycle import VersionLifecycle
    from plait.runtime.snapshot.trainer.withdrawals import Withdrawals
    from plait.runtime.snapshot.transport.client import DaemonClient
    from plait.runtime.trainer import StepResult, Trainer

log = logging.getLogger("plait.snapshot")

ALLOC_WAIT_MAX_S = 2.0  # the longest an optimizer update waits for a segment, before any allocation was measured
ALLOC_WAIT_MIN_S = 0.05
ALLOC_WAIT_FACTOR = 20  # an update waits for the segment at most this many times the median allocation time


@dataclass
class SnapshotStats:
    """Seconds the training thread spent on snapshots (the stall), and what was done."""

    taken: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    stall_s: list[float] = field(default_factory=list)  # per step: update's wait for the copy + on_step_end
    copy_s: list[float] = field(default_factory=list)  # per snapshot: the copy thread's alloc + copy + seal + commit
    alloc_s: list[float] = field(default_factory=list)  # per snapshot: the daemon's allocation (copy thread)
    bytes: int = 0  # this rank's blob size, last snapshot
    take_s: list[float] = field(default_factory=list)  # per snapshot: plan (layout + Python state), training thread
    update_wait_s: list[float] = field(default_factory=list)  # per step: the optimizer update's wait for the copy


class _Copy:
    """One snapshot on its way: the copy thread's state, shared with the training thread's update hook."""

    def __init__(self, version: int, plan: blob_state.BlobPlan):
        self.version = version
        self.plan = plan
        self.lock = threading.Lock()
        self.state = "allocating"  # → copying → copied, or → cancelled (the update came first)
        self.started = threading.Event()  # the segment was given (or the allocation failed)
        self.copied = threading.Event()  # the tensors are in the segment (or the copy gave up)
        self.thread: threading.Thread | None = None


class SnapshotHook:
    """Takes this rank's snapshots (see the module docstring). One per worker."""

    def __init__(self, config: SnapshotConfig, *, client: DaemonClient, lifecycle: VersionLifecycle | None, rank: int,
                 local_rank: int, secret: JobSecret, disk: CheckpointWriter | None = None,
                 withdrawals: Withdrawals | None = None):
        self.config = config
        self.client = client
        self.lifecycle = lifecycle  # global rank 0 only: it publishes
        self.withdrawals = withdrawals  # every other rank: tells rank 0 of versions it never wrote
        self.rank = rank
        self.local_rank = local_rank
        self.secret = secret
        self.disk = disk
        self.stop_writer: CheckpointWriter | None = disk  # plait stop --snapshot's checkpoint (the worker sets one)
        self.epoch = 0  # the restore generation; restore() sets it
        self.stats = SnapshotStats()
        self._copy: _Copy | None = None
        self._stall = 0.0

    # ------------------------------------------------------------------ hook protocol

    def on_start(self, trainer: Trainer) -> None:
        trainer.engine.optimizer.before_update.append(self._before_update)

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        start = time.perf_counter()
        if step % self.config.every == 0 and step < trainer.config.steps:
            self._take(trainer, step)
            self.stats.take_s.append(time.perf_counter() - start)
        if step == trainer.config.steps and self.disk is not None:
            self._last_to_disk(trainer, step)
        self.stats.update_wait_s.append(self._stall)
        # This step's stall: its optimizer update's wait for the copy, plus this call.
        self.stats.stall_s.append(self._stall + time.perf_counter() - start)
        self._stall = 0.0

    def on_end(self, trainer: Trainer) -> None:
        self.drain()

    def drain(self) -> None:
        """Wait (bounded) until this rank's snapshots are done: copied and committed, published (rank 0), on disk."""
        copy = self._copy
        if copy is not None and copy.thread is not None:
            copy.thread.join(timeout=self.client.timeout + 5)
        if self.lifecycle is not None:
            self.lifecycle.drain(timeout=min(30.0, self.config.complete_timeout))
        if self.disk is not None:
            self.disk.wait()

    # ------------------------------------------------------------------ snapshot

    def _last_to_disk(self, trainer: Trainer, step: int) -> None:
        """A finished run always leaves a disk checkpoint of its last step, on the disk_every grid or not.

        No snapshot is taken at the last step (nothing would restore it), so the blob is
        written here into private memory, on the training thread: once per run.
        """
        self.write_to_disk(trainer, step, self.disk)

    def write_to_disk(self, trainer: Trainer, step: int, writer: CheckpointWriter) -> None:
        """This rank's state of ``step`` as a disk checkpoint through ``writer`` (in the background; ``writer.wait()``)."""
        plan = blob_state.plan(trainer.engine.local_tensors(), trainer.snapshot_objects())
        blob = torch.empty(plan.size, dtype=torch.uint8)
        plan.write(blob, self.secret)
        writer.save_async(step, blob)

    def take(self, trainer: Trainer, step: int) -> None:
        """A snapshot of ``step`` now, off the ``snapshot.every`` grid (``plait snapshot``); every rank calls it."""
        start = time.perf_counter()
        self._take(trainer, step)
        self.stats.take_s.append(time.perf_counter() - start)

    def _skip(self, version: int, reason: str, detail: str = "", *, unwritten: bool = False) -> None:
        """Count and log a skipped snapshot. ``unwritten``: this rank never wrote any of it, so it can never
        complete; it is withdrawn from rank 0's lifecycle (nothing waits for its deadline): directly on rank 0,
        through the job's store from any other rank. A commit that failed is not that: the daemon may have taken it
        before the error, so its deadline decides."""
        self.stats.skipped += 1
        self.stats.skip_reasons[reason] = self.stats.skip_reasons.get(reason, 0) + 1
        log.warning("snapshot %s skipped on rank %d: %s%s", version_text(version), self.rank, reason,
                    f" ({detail})" if detail else "")
        if unwritten and self.lifecycle is not None:
            self.lifecycle.withdraw(version, f"rank {self.rank} skipped it: {reason}")
        elif unwritten and self.withdrawals is not None:
            self.withdrawals.tell(version, self.rank, reason)

    def _take(self, trainer: Trainer, step: int) -> None:
        version = version_id(self.epoch, step)
        previous = self._copy
        if previous is not None and previous.thread is not None and previous.thread.is_alive():
            # Still allocating or committing: the daemon is slow or hung. Never pile threads up on it.
            self._skip(version, "the previous snapshot is still waiting on the daemon", unwritten=True)
            return
        plan = blob_state.plan(trainer.engine.local_tensors(), trainer.snapshot_objects())
        self.stats.bytes = plan.size
        copy = _Copy(version, plan)
        copy.thread = threading.Thread(target=self._run, args=(copy,), name=f"snapshot-{step}", daemon=True)
        self._copy = copy
        if self.lifecycle is not None:  # before the copy starts: a withdrawal (a failed allocation) must find it
            self.lifecycle.submit(version)
        copy.thread.start()

    def _run(self, copy: _Copy) -> None:
        start = time.perf_counter()
        version, plan = copy.version, copy.plan
        try:
            try:
                dst = self.client.alloc(version, self.local_rank, plan.size)
            except Exception as err:  # noqa: BLE001 - a snapshot must never stop training
                with copy.lock:
                    copy.state = "failed"
                self._skip(version, "the daemon did not allocate", f"{type(err).__name__}: {err}", unwritten=True)
                return
            self.stats.alloc_s.append(time.perf_counter() - start)
            with copy.lock:
                if copy.state == "cancelled":
                    return  # the update came first; the uncommitted segment is replaced or dropped later
                copy.state = "copying"
            copy.started.set()
            plan.write_header(dst)
            plan.copy_tensors(dst)
            with copy.lock:
                copy.state = "copied"
            copy.copied.set()
            blob_state.seal(dst, self.secret)
            crc = checksum(dst)
            self.client.commit(version, self.local_rank, size=plan.size, checksum=crc, step=step_of(version))
            self.stats.taken += 1
            every, disk_every = self.config.every, self.config.disk_every
            step = step_of(version)
            if self.disk is not None and disk_every and (step // every) % disk_every == 0:
                # A private copy: the daemon reuses a dropped version's memory for later
                # versions, and the disk write may outlast this version's turn.
                self.disk.save_async(step, dst.clone(), crc)
        except Exception as err:  # noqa: BLE001
            self._skip(version, "not committed", f"{type(err).__name__}: {err}")
        finally:
            copy.started.set()
            copy.copied.set()
            self.stats.copy_s.append(time.perf_counter() - start)

    def _alloc_wait(self) -> float:
        """How long an update may wait for the daemon's segment: ALLOC_WAIT_FACTOR × the median allocation so far."""
        if not self.stats.alloc_s:
            return ALLOC_WAIT_MAX_S
        return min(ALLOC_WAIT_MAX_S, max(ALLOC_WAIT_MIN_S, ALLOC_WAIT_FACTOR * statistics.median(self.stats.alloc_s)))

    def _before_update(self) -> None:
        """The optimizer is about to rewrite the parameters: the copy of them must be done (or never start)."""
        copy = self._copy
        if copy is None:
            return
        if copy.state in ("cancelled", "failed"):
            return  # decided at an earlier update, or the allocation failed: nothing to wait for
        start = time.perf_counter()
        wait = self._alloc_wait()
        copy.started.wait(wait)
        with copy.lock:
            if copy.state == "allocating":  # the daemon has not given the segment: this snapshot will not be taken
                copy.state = "cancelled"
                self._skip(copy.version, "the daemon was too slow to allocate before the next update",
                           f"waited {wait:.2f} s", unwritten=True)
            copying = copy.state in ("copying", "copied")
        if copying:
            copy.copied.wait()  # memory speed: the tensors are being copied, no daemon involved
        self._stall += time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        out = {"taken": self.stats.taken, "skipped": self.stats.skipped, "skip_reasons": self.stats.skip_reasons,
               "bytes_per_rank": self.stats.bytes, "stall_s": self.stats.stall_s, "copy_s": self.stats.copy_s,
               "alloc_s": self.stats.alloc_s, "take_s": self.stats.take_s, "update_wait_s": self.stats.update_wait_s}
        if self.lifecycle is not None:
            life = self.lifecycle.stats
            out.update(published=life.published, abandoned=life.abandoned, publish_latency_s=life.publish_latency_s)
        return out


def node_of(rank: int, per_node: int) -> int:
    return rank // per_node


def job_name(run_dir: Path) -> str:
    """A shared-memory-safe job id from the run directory (letters, digits, _ and -)."""
    import hashlib
    import re

    base = re.sub(r"[^A-Za-z0-9_-]", "_", run_dir.resolve().name)[:40]
    return f"{base}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
