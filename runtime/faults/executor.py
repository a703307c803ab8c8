"""The launcher's side of fault injection: a thread in ``plait train`` that carries faults out and verifies them.

Faults used to be carried out by whichever worker claimed them first, and a worker can
be the victim of a fault carried out at the same moment: ``kill-node:node=0`` claimed
by rank 1 was recorded as fired, then ``kill-node:node=1`` (claimed by rank 2) killed
rank 1 before it had stopped node 0's daemon, and the restore that followed found node
0 whole. So no fault kills the process that carries faults out: this one runs in
``plait train``, next to the daemons' supervisor, and workers only ask.

A worker that finishes a fault's point writes a request (its pid included) and waits
(see :mod:`plait.runtime.faults.hook`). Once every rank of one elastic attempt asked
for a point, the faults due there run here strictly in the order the ``--fault`` flags
gave them, each verified before it is recorded done: a killed process is gone (a zombie
or no /proc entry), a killed node's shared memory is empty, a corrupted piece no longer
matches its checksum, a hung daemon is in state T. What could not be verified is
recorded with ``ok: false`` and the workers stop the job with that error, so a fault
recorded as fired has always happened. While it works, ``faults/executing`` exists and
restarted workers wait for it to go before they restore: the restore sees every fault
of a point, never some of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.scheduler.placement import Placement
from plait.runtime.faults import records
from plait.runtime.faults.spec import Fault

if TYPE_CHECKING:
    from plait.runtime.snapshot.launcher.supervisor import DaemonSet
    from plait.runtime.snapshot.records import VersionInfo
    from plait.runtime.snapshot.transport.client import DaemonClient

log = logging.getLogger("plait.faults")

POLL_S = 0.02
GONE_TIMEOUT_S = 10.0  # a SIGKILLed process is gone in milliseconds; far longer means it was not killed
COMPLETE_TIMEOUT_S = 60.0  # how long a corrupt-* fault waits for the daemon's versions to complete


class FaultFailed(RuntimeError):
    """A fault could not be carried out or its effect could not be verified."""


def process_state(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat (R, S, T, Z, ...), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _wait_state(pids: list[int], done: Any, what: str, timeout: float = GONE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not all(done(process_state(pid)) for pid in pids):
        if time.monotonic() > deadline:
            late = [p for p in pids if not done(process_state(p))]
            raise FaultFailed(f"process(es) {late} not {what} after {timeout:.0f} s")
        time.sleep(0.005)


def _gone(state: str | None) -> bool:
    return state is None or state in ("Z", "X")


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FaultExecutor:
    """Carries out the faults of a ``plait train`` job when its workers reach them (a thread of the launcher)."""

    def __init__(self, faults: list[Fault], *, run_dir: Path, world: int, per_node: int, daemons: DaemonSet | None,
                 secret_file: Path | None, placement: Placement | None = None):
        self.faults = faults
        self.run_dir = Path(run_dir)
        self.world = world
        self.per_node = per_node
        self.placement = placement or Placement.contiguous(world, per_node)
        self.daemons = daemons
        self.secret_file = secret_file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hung: dict[int, threading.Timer] = {}  # daemon pid -> its SIGCONT
        self._hung_lock = threading.Lock()

    def start(self) -> None:
        folder = records.fault_dir(self.run_dir)
        shutil.rmtree(folder, ignore_errors=True)  # an earlier, unfinished job in this directory
        folder.mkdir(parents=True)
        self._thread = threading.Thread(target=self._loop, name="plait-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving requests and wake every daemon still hung (before the daemons are stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._hung_lock:
            hung = dict(self._hung)
        for pid, timer in hung.items():
            timer.cancel()
            self._resume(pid)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._serve()
            except Exception:  # noqa: BLE001 - keep serving; the waiting workers time out with a clear error
                log.exception("fault executor")

    def _serve(self) -> None:
        asked: dict[tuple[int, str], dict[int, int]] = {}
        paths: dict[tuple[int, str], list[Path]] = {}
        for path in records.fault_dir(self.run_dir).iterdir():
            match = records.REQUEST.fullmatch(path.name)
            if match is None:
                continue
            try:
                pid = json.loads(path.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue  # being written
            key = (int(match[1]), match[2])
            asked.setdefault(key, {})[int(match[3])] = pid
            paths.setdefault(key, []).append(path)
        for key in sorted(asked):
            if len(asked[key]) == self.world:
                self._execute(key[0], key[1], asked[key])
                for path in paths[key]:
                    path.unlink(missing_ok=True)

    def _execute(self, attempt: int, point: str, pids: dict[int, int]) -> None:
        due = [(i, f) for i, f in enumerate(self.faults) if f.point == point and records.read_record(self.run_dir, i) is None]
        if not due:
            return
        marker = records.executing_path(self.run_dir)
        marker.write_text(point)
        try:
            for index, fault in due:
                started = time.monotonic()
                try:
                    effect = self._carry_out(fault, pids)
                    effect["seconds"] = round(time.monotonic() - started, 3)
                    record = {"fault": str(fault), "ok": True, "attempt": attempt, "effect": effect}
                    print(f"plait: fault injected: {fault} (verified: {_brief(effect)})", flush=True)
                except Exception as err:  # noqa: BLE001 - recorded, and the workers stop the job with it
                    record = {"fault": str(fault), "ok": False, "attempt": attempt, "error": f"{type(err).__name__}: {err}"}
                    print(f"plait: fault {fault} could not be carried out: {record['error']}", flush=True)
                records.write_atomic(records.record_path(self.run_dir, index), record)
        finally:
            marker.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the kinds

    def _carry_out(self, f: Fault, pids: dict[int, int]) -> dict[str, Any]:
        if f.kind == "kill-worker":
            return {"killed_workers": self._kill_workers([f.target], pids)}
        if f.kind == "kill-node":
            return self._kill_node(f.target, pids)
        if f.kind == "kill-daemon":
            return self._kill_daemon(f.target)
        if f.kind == "corrupt-shard":
            effect = self._corrupt_shard(f.target)
            effect["killed_workers"] = self._kill_workers([self.placement.rank_of(f.target, 0)], pids)
            return effect
        if f.kind == "corrupt-parity":
            effect = self._corrupt_parity(f.target)
            effect.update(self._kill_node(effect["killed_node"], pids))
            return effect
        if f.kind == "hang-daemon":
            return self._hang_daemon(f.target, f.hang_seconds)
        raise AssertionError(f.kind)

    def _kill_workers(self, ranks: list[int], pids: dict[int, int]) -> dict[str, int]:
        killed = {str(r): pids[r] for r in sorted(ranks)}
        for pid in killed.values():
            _sigkill(pid)
        _wait_state(list(killed.values()), _gone, "gone after SIGKILL")
        return killed

    def _daemon(self, node: int):
        if self.daemons is None or self.daemons.procs[node] is None:
            raise FaultFailed(f"node {node} has no snapshot daemon")
        return self.daemons.procs[node]

    def _kill_daemon(self, node: int) -> dict[str, Any]:
        self._daemon(node)
        with self.daemons.replacements_held():
            proc = self._daemon(node)
            _sigkill(proc.pid)
            code = proc.wait(timeout=GONE_TIMEOUT_S)
        if code != -signal.SIGKILL:
            raise FaultFailed(f"the daemon of node {node} (pid {proc.pid}) exited with {code}, not by SIGKILL")
        return {"daemon_pid": proc.pid, "daemon_exit": code}

    def _kill_node(self, node: int, pids: dict[int, int]) -> dict[str, Any]:
        """Stop the daemon (it can create no segment then), delete its memory, SIGKILL it and the node's workers."""
        from plait.runtime.snapshot import shm

        self._daemon(node)
        with self.daemons.replacements_held():
            proc = self._daemon(node)
            try:
                os.kill(proc.pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            removed = shm.remove_namespace(self.daemons.job, node)
            _sigkill(proc.pid)
            workers = self._kill_workers(self.placement.ranks_on(node), pids)
            code = proc.wait(timeout=GONE_TIMEOUT_S)
            left = [p.name for p in shm.list_namespace(self.daemons.job, node) if p.name != shm.lock_name(self.daemons.job, node)]
        if code != -signal.SIGKILL:
            raise FaultFailed(f"the daemon of node {node} (pid {proc.pid}) exited with {code}, not by SIGKILL")
        if left:
            raise FaultFailed(f"node {node}'s shared memory still holds {left}")
        return {"daemon_pid": proc.pid, "daemon_exit": code, "killed_workers": workers, "segments_removed": removed,
                "segments_left": 0}

    def _hang_daemon(self, node: int, seconds: float) -> dict[str, Any]:
        pid = self._daemon(node).pid
        os.kill(pid, signal.SIGSTOP)
        _wait_state([pid], lambda s: s == "T", "stopped after SIGSTOP")
        timer = threading.Timer(seconds, self._resume, args=(pid,))
        with self._hung_lock:
            self._hung[pid] = timer
        timer.start()
        return {"daemon_pid": pid, "state": "T", "seconds": seconds}

    def _resume(self, pid: int) -> None:
        with self._hung_lock:
            if self._hung.pop(pid, None) is None:
                return
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        try:
            _wait_state([pid], lambda s: s != "T", "running after SIGCONT")
        except FaultFailed as err:
            log.error("hang-daemon: %s", err)
            return
        for index, fault in enumerate(self.faults):
            record = records.read_record(self.run_dir, index)
            if fault.kind == "hang-daemon" and record and record.get("effect", {}).get("daemon_pid") == pid:
                record["effect"]["resumed"] = True
                records.write_atomic(records.record_path(self.run_dir, index), record)
        print(f"plait: fault: the hung daemon (pid {pid}) was resumed (SIGCONT)", flush=True)

    def _client(self, node: int) -> DaemonClient:
        from plait.runtime.snapshot.auth import JobSecret
        from plait.runtime.snapshot.transport.client import DaemonClient

        self._daemon(node)
        if self.secret_file is None:
            raise FaultFailed("no job secret to reach the daemons with")
        return DaemonClient(self.daemons.addresses[node], secret=JobSecret.load(self.secret_file))

    def _corrupt_shard(self, node: int) -> dict[str, Any]:
        with self._client(node) as client:
            return corrupt_shard(client, node)

    def _corrupt_parity(self, node: int) -> dict[str, Any]:
        with self._client(node) as client:
            return corrupt_parity(client, node)


def corrupt_shard(client: DaemonClient, node: int) -> dict[str, Any]:
    """Flip 8 bytes of node's newest complete data shard of local rank 0 (the one a restore would pick)."""
    held = [v for v in _settled(client) if any(d.local_rank == 0 and d.committed for d in v.data)]
    if not held:
        raise FaultFailed(f"the daemon of node {node} holds no complete data shard of local rank 0 to corrupt")
    newest = max(held, key=lambda v: v.version)
    shard = next(d for d in newest.data if d.local_rank == 0 and d.committed)
    effect = _flip(Path(shard.path), shard.size, shard.checksum)
    return {"version": newest.version, "local_rank": 0, **effect}


def corrupt_parity(client: DaemonClient, node: int, spare: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Flip 8 bytes of a parity piece node holds for its newest complete version; name the node it protects.

    The caller then kills that node (its memory too), so its rebuild needs this
    piece: with ec_m = 1 the restore must rule it out (and with it the version, as
    no spare piece exists), with ec_m >= 2 use a spare piece instead. Nodes in ``spare``
    are never the one named (a rehearsal cannot lose the node hosting its rendezvous).
    """
    held = [v for v in _settled(client) if any(p.local_rank == 0 and p.complete and p.members for p in v.parity)]
    if not held:
        raise FaultFailed(f"the daemon of node {node} holds no complete parity piece to corrupt")
    newest = max(held, key=lambda v: v.version)
    pieces = sorted((p for p in newest.parity if p.local_rank == 0 and p.complete and p.members
                     and {m.node for m in p.members} - {node} - spare),
                    key=lambda p: (p.index, p.stripe))  # parity 0 first: a rebuild reads it before any spare
    if not pieces:
        raise FaultFailed(f"node {node} holds parity only for nodes that must not be lost ({sorted(spare)})")
    piece = pieces[0]
    effect = _flip(Path(piece.path), piece.size, piece.checksum)
    protected = sorted({m.node for m in piece.members} - {node} - spare)
    return {"version": newest.version, "stripe": piece.stripe, "index": piece.index, "protects": protected,
            "killed_node": protected[0], **effect}


def _settled(client: DaemonClient, timeout: float = COMPLETE_TIMEOUT_S) -> list[VersionInfo]:
    """The daemon's complete versions, once it holds no incomplete one (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        versions = client.list()
        if all(v.complete for v in versions) or time.monotonic() > deadline:
            return [v for v in versions if v.complete]
        time.sleep(0.01)


def _flip(path: Path, size: int, stored: int | None) -> dict[str, Any]:
    """Flip 8 bytes in the middle of a shared-memory segment; verify it no longer matches its stored checksum."""
    from plait.ops.checksum import checksum
    from plait.runtime.snapshot import shm

    view = shm.map_segment(path, size)
    before = checksum(view)
    mid = view.numel() // 2
    view[mid: mid + 8] ^= 0xFF
    after = checksum(view)
    if stored is None or after == stored:
        raise FaultFailed(f"{path.name}: its bytes still match the stored checksum {stored} after the flip")
    return {"segment": path.name, "checksum_stored": stored, "checksum_before": before, "checksum_after": after}


def _brief(effect: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in effect.items() if k not in ("checksum_before", "checksum_after", "segment"))

