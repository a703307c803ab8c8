"""Deterministic fault injection for tests and demos: ``plait train --fault KIND:key=value:...``.

Kinds (``step=S`` fires right after step S finished and its hooks ran, i.e. after the
snapshot hook started (or waited for) its snapshot of that step):

===============================  ==========================================================
``kill-worker:rank=R:step=S``    SIGKILL worker rank R
``kill-node:node=N:step=S``      SIGKILL node N's workers and its snapshot daemon and
                                 delete the node's shared memory; ``plait train`` starts a
                                 fresh, empty daemon in its place (a replaced machine)
``kill-daemon:node=N:step=S``    SIGKILL node N's daemon only; a fresh daemon re-adopts
                                 the shards left in shared memory; training goes on
``corrupt-shard:node=N:step=S``  flip bytes of node N's newest complete data shard (local
                                 rank 0) in shared memory, then SIGKILL that worker, so the
                                 restart must notice the bad checksum and rebuild the shard
===============================  ==========================================================

Each fault fires once per run, also across restarts: the first worker to reach it
creates ``<run dir>/faults/<index>`` (O_EXCL) before acting, so a replayed step S does
not fire it again. Several faults at the same step fire together (e.g. two kill-node
faults: more nodes lost than the group's parity covers, which falls back to the disk tier).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from plait.errors import CLIError

if TYPE_CHECKING:
    from plait.runtime.trainer import StepResult, Trainer

log = logging.getLogger("plait.faults")

KINDS = ("kill-worker", "kill-node", "kill-daemon", "corrupt-shard")
FaultKind = Literal["kill-worker", "kill-node", "kill-daemon", "corrupt-shard"]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    target: int  # a rank for kill-worker, a node otherwise
    step: int

    def __str__(self) -> str:
        key = "rank" if self.kind == "kill-worker" else "node"
        return f"{self.kind}:{key}={self.target}:step={self.step}"


def parse_fault(text: str) -> Fault:
    """``kill-worker:rank=1:step=5`` → Fault; CLIError naming what is wrong otherwise."""
    kind, *parts = text.strip().split(":")
    if kind not in KINDS:
        raise CLIError(f"--fault {text!r}: unknown kind {kind!r}; accepted: {', '.join(KINDS)}")
    want = "rank" if kind == "kill-worker" else "node"
    values: dict[str, int] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in (want, "step"):
            raise CLIError(f"--fault {text!r}: expected {kind}:{want}=N:step=S, got the part {part!r}")
        try:
            values[key] = int(value)
        except ValueError:
            raise CLIError(f"--fault {text!r}: {key} must be an integer, got {value!r}") from None
    missing = [k for k in (want, "step") if k not in values]
    if missing:
        raise CLIError(f"--fault {text!r}: missing {' and '.join(missing)}; expected {kind}:{want}=N:step=S")
    if values[want] < 0 or values["step"] < 1:
        raise CLIError(f"--fault {text!r}: {want} must be >= 0 and step >= 1")
    return Fault(kind=kind, target=values[want], step=values["step"])  # type: ignore[arg-type]


def check_faults(faults: list[Fault], *, world: int, nnodes: int, steps: int, snapshots: bool) -> None:
    for f in faults:
        limit, what = (world, "rank") if f.kind == "kill-worker" else (nnodes, "node")
        if f.target >= limit:
            raise CLIError(f"--fault {f}: {what} {f.target} does not exist; this job has {limit} {what}s (0..{limit - 1})")
        if f.step >= steps:
            raise CLIError(f"--fault {f}: step {f.step} is not before the last step {steps}; pick a step in 1..{steps - 1}")
        if f.kind in ("kill-daemon", "corrupt-shard", "kill-node") and not snapshots:
            raise CLIError(f"--fault {f}: needs snapshots; set snapshot.every (e.g. --set snapshot.every=5)")


def random_faults(seed: int, *, count: int, world: int, nnodes: int, steps: int, every: int) -> list[Fault]:
    """``count`` faults of random kind, target and step (seeded), at distinct steps."""
    rng = random.Random(seed)
    picked: list[Fault] = []
    used: set[int] = set()
    while len(picked) < count:
        step = rng.randrange(every + 1, steps)
        if step in used:
            continue
        used.add(step)
        kind = rng.choice(KINDS)
        target = rng.randrange(world) if kind == "kill-worker" else rng.randrange(nnodes)
        picked.append(Fault(kind=kind, target=target, step=step))  # type: ignore[arg-type]
    return picked


def _claim(run_dir: Path, index: int, fault: Fault, rank: int) -> bool:
    path = run_dir / "faults" / str(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{fault} by rank {rank}\n".encode())
    os.close(fd)
    return True


def fired_faults(run_dir: Path) -> list[str]:
    """The faults fired so far in this run (for summary.json), in the order given."""
    folder = run_dir / "faults"
    if not folder.is_dir():
        return []
    found = sorted((int(p.name), p.read_text().split(" by ")[0].strip()) for p in folder.iterdir() if p.name.isdigit())
    return [text for _, text in found]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FaultHook:
    """Executes the faults due at each step (a trainer hook; runs after the snapshot hook).

    Every rank tries to claim every fault due at the step; whichever claims one carries
    it out, with SIGTERM blocked (the elastic agent sends it to everyone once a worker
    dies) so that a claimed fault is never left half done. Workers are killed through
    the pid files every rank writes at start; the claimer kills itself last if it is a
    victim.
    """

    def __init__(self, faults: list[Fault], *, run_dir: Path, rank: int, nproc_per_node: int, job: str,
                 daemons: list[str] | None = None):
        self.faults = list(enumerate(faults))
        self.run_dir = run_dir
        self.rank = rank
        self.per_node = nproc_per_node
        self.job = job
        self.daemons = daemons or []

    def on_start(self, trainer: Trainer) -> None:
        pids = self.run_dir / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        tmp = pids / f"rank{self.rank}.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pids / f"rank{self.rank}")

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_eval(self, trainer: Trainer, step: int, loss: float) -> None:
        pass

    def on_end(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        due = [(i, f) for i, f in self.faults if f.step == step]
        if not due:
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        victims: set[int] = set()
        try:
            for index, fault in due:
                if not _claim(self.run_dir, index, fault, self.rank):
                    continue
                log.warning("fault: %s fires (carried out by rank %d)", fault, self.rank)
                print(f"plait: fault injected: {fault}", flush=True)
                victims |= self._fire(fault)
            for rank in sorted(victims - {self.rank}):
                pid_file = self.run_dir / "pids" / f"rank{rank}"
                if pid_file.exists():
                    _kill(int(pid_file.read_text()))
        finally:
            if self.rank in victims:
                _kill(os.getpid())
                time.sleep(60)  # never go on: the SIGKILL arrives
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _node_ranks(self, node: int) -> set[int]:
        return set(range(node * self.per_node, (node + 1) * self.per_node))

    def _fire(self, f: Fault) -> set[int]:
        """Carry out ``f``; returns the ranks to kill."""
        from plait.runtime.snapshot.launcher import supervisor

        if f.kind == "kill-worker":
            return {f.target}
        if f.kind == "kill-daemon":
            supervisor.kill_daemon(self.run_dir, f.target)
            return set()
        if f.kind == "kill-node":
            supervisor.kill_daemon(self.run_dir, f.target, remove_memory=self.job)
            return self._node_ranks(f.target)
        if f.kind == "corrupt-shard":
            corrupt_newest_shard(self.daemons[f.target], local_rank=0)
            return {f.target * self.per_node}
        raise AssertionError(f.kind)


def corrupt_newest_shard(address: str, *, local_rank: int, timeout: float = 60.0) -> int | None:
    """Flip 8 bytes in the middle of the newest complete data shard of ``local_rank`` on a daemon.

    Waits first until the daemon holds no incomplete version, so that the shard
    corrupted is the one a restore would pick.
    """
    from plait.runtime.snapshot.transport.client import DaemonClient

    client = DaemonClient(address)
    try:
        deadline = time.monotonic() + timeout
        while True:
            versions = client.list()
            if all(v.complete for v in versions) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        held = [v for v in versions if v.complete and any(d.local_rank == local_rank and d.committed for d in v.data)]
        if not held:
            log.warning("corrupt-shard: the daemon at %s holds no complete shard of local rank %d", address, local_rank)
            return None
        newest = max(held, key=lambda v: v.version)
        view = client.open_data(newest.version, local_rank)
        mid = view.numel() // 2
        view[mid : mid + 8] ^= 0xFF
        log.warning("corrupt-shard: flipped 8 bytes of version %d, local rank %d at %s", newest.version, local_rank, address)
        return newest.version
    finally:
        client.close()
