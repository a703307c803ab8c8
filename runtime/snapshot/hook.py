"""The trainer side of snapshots: every ``snapshot.every`` steps, this rank's state goes to its node daemon.

Timeline of snapshot v (taken when step v is wholly done, ``on_step_end``):

1. now, on the training thread: fix the blob layout and serialise the small Python
   state (step, loader, RNGs, histories: they change every step), ask the local
   daemon for a shared-memory segment of the blob's size and write the header;
2. meanwhile, on a copy thread: copy every parameter and optimizer tensor into the
   segment (device → host on GPU), checksum it, commit it to the daemon; the daemon
   then sends its chunks to the group's parity holders;
3. step v+1's forward and backward run concurrently; its optimizer update waits for
   the copy (``ShardedAdamW.before_update``), since it rewrites what is being copied;
4. at the end of step v+1, global rank 0 waits until every daemon reports version v
   complete (all data and parity shards, checksummed) and publishes it; daemons then
   drop older versions. Until then the previous complete version stays.

Nothing here can stop training: a failed allocation, a daemon restarting, a peer
that does not answer — each is logged and that version is skipped; the previous
complete one remains the restore point.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plait.ops.checksum import checksum
from plait.runtime.snapshot import state as blob_state
from plait.runtime.snapshot.config import SnapshotConfig

if TYPE_CHECKING:
    from plait.runtime.snapshot.client import DaemonClient
    from plait.runtime.snapshot.disk import DiskTier
    from plait.runtime.trainer import StepResult, Trainer

log = logging.getLogger("plait.snapshot")


@dataclass
class SnapshotStats:
    """Seconds the training thread spent on snapshots (the stall), and what was done."""

    taken: int = 0
    published: int = 0
    skipped: int = 0
    stall_s: list[float] = field(default_factory=list)  # per step: update's wait for the copy + on_step_end (take, publish)
    copy_s: list[float] = field(default_factory=list)  # per snapshot: the copy thread's copy + checksum + commit
    bytes: int = 0  # this rank's blob size, last snapshot
    take_s: list[float] = field(default_factory=list)  # per snapshot: plan + alloc + header, on the training thread
    publish_s: list[float] = field(default_factory=list)  # per snapshot (rank 0): waiting for completion + publishing
    update_wait_s: list[float] = field(default_factory=list)  # per step: the optimizer update's wait for the copy


class SnapshotHook:
    """Takes this rank's snapshots (see the module docstring). One per worker."""

    def __init__(self, config: SnapshotConfig, *, client: DaemonClient, peers: list[DaemonClient] | None, rank: int,
                 local_rank: int, disk: DiskTier | None = None):
        self.config = config
        self.client = client
        self.peers = peers  # every node's daemon, on global rank 0 only (it publishes)
        self.rank = rank
        self.local_rank = local_rank
        self.disk = disk
        self.stats = SnapshotStats()
        self._thread: threading.Thread | None = None
        self._pending: int | None = None  # version committed (or being), not yet published (rank 0)
        self._stall = 0.0
        self._count = 0
        self._newest_committed: int | None = None

    # ------------------------------------------------------------------ hook protocol

    def on_start(self, trainer: Trainer) -> None:
        trainer.engine.optimizer.before_update.append(self._wait_copy_timed)

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        start = time.perf_counter()
        if self._pending is not None and self.peers is not None:
            self._publish(self._pending)
            self.stats.publish_s.append(time.perf_counter() - start)
        if step % self.config.every == 0 and step < trainer.config.steps:
            self._wait_copy()
            t0 = time.perf_counter()
            self._take(trainer, step)
            self.stats.take_s.append(time.perf_counter() - t0)
        self.stats.update_wait_s.append(self._stall)
        # This step's stall: its optimizer update's wait for the copy, plus this call.
        self.stats.stall_s.append(self._stall + time.perf_counter() - start)
        self._stall = 0.0

    def on_end(self, trainer: Trainer) -> None:
        self._wait_copy()
        if self._pending is not None and self.peers is not None:
            self._publish(self._pending)
        if self.disk is not None:
            self.disk.wait()

    # ------------------------------------------------------------------ snapshot

    def _take(self, trainer: Trainer, version: int) -> None:
        plan = blob_state.plan(trainer.engine.local_tensors(), trainer.snapshot_objects())
        try:
            dst = self.client.alloc(version, self.local_rank, plan.size)
        except Exception as err:  # noqa: BLE001 - a snapshot must never stop training
            self.stats.skipped += 1
            log.warning("snapshot %d skipped on rank %d: %s", version, self.rank, err)
            return
        plan.write_header(dst)
        self._count += 1
        self.stats.bytes = plan.size
        self._thread = threading.Thread(target=self._copy, args=(plan, dst, version), name=f"snapshot-{version}", daemon=True)
        self._thread.start()
        if self.peers is not None:
            self._pending = version

    def _copy(self, plan: blob_state.BlobPlan, dst: torch.Tensor, version: int) -> None:
        start = time.perf_counter()
        try:
            plan.copy_tensors(dst)
            crc = checksum(dst)
            self.client.commit(version, self.local_rank, size=plan.size, checksum=crc, step=version)
            self._newest_committed = version
            self.stats.taken += 1
            if self.disk is not None and self.config.disk_every and (version // self.config.every) % self.config.disk_every == 0:
                # A private copy: the daemon reuses a dropped version's memory for later
                # versions, and the disk write may outlast this version's turn.
                self.disk.save_async(version, dst.clone(), crc)
        except Exception as err:  # noqa: BLE001
            self.stats.skipped += 1
            log.warning("snapshot %d of rank %d not committed: %s", version, self.rank, err)
        finally:
            self.stats.copy_s.append(time.perf_counter() - start)

    def _wait_copy(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _wait_copy_timed(self) -> None:
        start = time.perf_counter()
        self._wait_copy()
        self._stall += time.perf_counter() - start

    def _publish(self, version: int) -> None:
        """Rank 0: wait (bounded) for every daemon to hold version complete, then publish it everywhere."""
        self._pending = None
        assert self.peers is not None
        deadline = time.monotonic() + self.config.complete_timeout
        waiting = list(range(len(self.peers)))
        while waiting:
            still = []
            for node in waiting:
                try:
                    held = {v.version: v for v in self.peers[node].list()}
                except Exception:  # noqa: BLE001 - a daemon restarting answers later
                    still.append(node)
                    continue
                if version not in held:
                    # Every rank allocated this version before the step that ends here began,
                    # so a daemon without it lost it (it was restarted): it can never complete.
                    log.warning("snapshot %d: node %d's daemon no longer holds it; the previous complete snapshot stays the restore point",
                                version, node)
                    return
                if not held[version].complete:
                    still.append(node)
            waiting = still
            if not waiting:
                break
            if time.monotonic() > deadline:
                log.warning("snapshot %d: nodes %s not complete after %.0f s; the previous complete snapshot stays the restore point",
                            version, waiting, self.config.complete_timeout)
                return
            time.sleep(0.002)
        for node, peer in enumerate(self.peers):
            try:
                peer.publish(version)
            except Exception as err:  # noqa: BLE001
                log.warning("snapshot %d: publish on node %d failed: %s", version, node, err)
        self.stats.published += 1

    def summary(self) -> dict[str, Any]:
        return {"taken": self.stats.taken, "published": self.stats.published, "skipped": self.stats.skipped,
                "bytes_per_rank": self.stats.bytes, "stall_s": self.stats.stall_s, "copy_s": self.stats.copy_s,
                "take_s": self.stats.take_s, "publish_s": self.stats.publish_s, "update_wait_s": self.stats.update_wait_s}


def node_of(rank: int, per_node: int) -> int:
    return rank // per_node


def job_name(run_dir: Path) -> str:
    """A shared-memory-safe job id from the run directory (letters, digits, _ and -)."""
    import hashlib
    import re

    base = re.sub(r"[^A-Za-z0-9_-]", "_", run_dir.resolve().name)[:40]
    return f"{base}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
