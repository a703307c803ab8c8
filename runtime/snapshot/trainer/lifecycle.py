"""The one owner of the version lifecycle: publish each version once every daemon holds it, reset after a restore.

It lives on global rank 0, on a thread of its own, so the training thread never waits
on a daemon: the snapshot hook hands it each version it starts (:meth:`submit`) and goes
on. The thread asks every daemon for its state (Status, in parallel, each call
bounded), publishes the newest version that every node reports locally complete, and
forgets the older pending ones (publishing drops them on every daemon). A version that
does not complete within ``snapshot.complete_timeout`` is abandoned with a log line:
the previous published version stays the restore point, and later versions go on. A
version some rank gave up before writing it (its daemon too slow to allocate, the
allocation failed, or its previous snapshot still in flight) can never complete, and is
abandoned at once (:meth:`withdraw`): rank 0's own directly, another rank's once the
thread finds its word in the job's store (:mod:`.withdrawals`).

After every restore decision, :meth:`reset` begins a new restore generation on every
daemon (see ``records.py`` for versions and epochs): each drops whatever it holds but
the version restored from, so no version a crashed run left half-written can ever be
completed by the replayed run. A daemon that does not answer the reset in time is
retried by the thread until it does.

Each publication is also recorded in ``<run dir>/published.json`` (:func:`published_record`),
so that a restore that finds nothing to resume from knows whether a snapshot was lost
(an error) or there never was one (a fresh start).

A later job coordinator can grow from this class: it already is the one place that
knows which versions exist, which are published and when the last restore was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from plait.runtime.snapshot.records import epoch_of, step_of, version_text

if TYPE_CHECKING:
    from plait.runtime.snapshot.trainer.withdrawals import Withdrawals
    from plait.runtime.snapshot.transport.client import DaemonClient

__all__ = ["LifecycleStats", "VersionLifecycle", "published_record", "last_published"]

log = logging.getLogger("plait.snapshot.lifecycle")

T = TypeVar("T")

POLL_MIN_S = 0.005  # first poll after a submit; doubles while nothing changes, up to POLL_MAX_S
POLL_MAX_S = 0.1


def published_record(run_dir: Path) -> Path:
    return Path(run_dir) / "published.json"


def last_published(run_dir: Path) -> dict[str, int] | None:
    """``{version, step, epoch}`` of the newest version this job published, None if it never published one."""
    try:
        return json.loads(published_record(run_dir).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class LifecycleStats:
    published: int = 0
    abandoned: int = 0
    publish_latency_s: list[float] = field(default_factory=list)  # submit → published on every daemon
    last_published: int | None = None
    resets: int = 0


class VersionLifecycle:
    """Publishes completed versions and resets daemons after restores (global rank 0 only)."""

    def __init__(self, clients: list[DaemonClient], *, complete_timeout: float, rpc_timeout: float = 5.0,
                 record: Path | None = None, withdrawals: Withdrawals | None = None):
        self.clients = clients
        self.withdrawals = withdrawals  # other ranks' word of versions they never wrote
        self.record = record
        self.complete_timeout = complete_timeout
        self.rpc_timeout = rpc_timeout
        self.stats = LifecycleStats()
        self._pending: dict[int, tuple[float, float]] = {}  # version -> (submitted at, deadline)
        self._unreset: dict[int, tuple[int, int | None]] = {}  # node -> (floor, keep) of a reset it missed
        self._cond = threading.Condition()
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(16, len(clients))), thread_name_prefix="plait-lifecycle-rpc")
        self._thread = threading.Thread(target=self._run, name="plait-lifecycle", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API

    def submit(self, version: int) -> None:
        """A version every rank is now writing: publish it once every daemon holds it complete."""
        now = time.monotonic()
        with self._cond:
            self._pending[version] = (now, now + self.complete_timeout)
            self._cond.notify()

    def withdraw(self, version: int, why: str) -> bool:
        """A submitted version that can never complete (this rank gave it up before writing it): forget it now
        rather than at its deadline, so nothing (the job's end, say) waits on it. True if it was pending."""
        with self._cond:
            if self._pending.pop(version, None) is None:
                return False
            self.stats.abandoned += 1
            self._cond.notify_all()
        log.warning("snapshot %s: abandoned, it can never complete: %s; the previous published version stays the "
                 "restore point", version_text(version), why)
        return True

    def reset(self, floor: int, keep: int | None) -> list[str]:
        """Begin the restore generation starting at ``floor`` on every daemon; return one note per node that failed.

        Bounded: each call waits at most ``rpc_timeout``; a node that did not answer is
        retried by the thread (in the background) until it does.
        """
        results = self._each(lambda c: c.reset(floor, keep))
        notes = []
        with self._cond:
            self._pending.clear()
            self.stats.resets += 1
            for node, (ok, value) in enumerate(results):
                if ok:
                    self._unreset.pop(node, None)
                else:
                    self._unreset[node] = (floor, keep)
                    notes.append(f"node {node}'s daemon was not reset ({value}); retrying in the background")
            self._cond.notify()
        for note in notes:
            log.warning("%s", note)
        return notes

    def drain(self, timeout: float) -> bool:
        """Wait (at most ``timeout``) until no version is pending; True if none is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._pending

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=2 * self.rpc_timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the thread

    def _each(self, call: Callable[[DaemonClient], T]) -> list[tuple[bool, T | str]]:
        """``call`` on every daemon in parallel; per node (True, result) or (False, why), within rpc_timeout."""
        futures = [self._pool.submit(call, client) for client in self.clients]
        out: list[tuple[bool, Any]] = []
        deadline = time.monotonic() + self.rpc_timeout
        for future in futures:
            try:
                out.append((True, future.result(timeout=max(0.0, deadline - time.monotonic()))))
            except Exception as err:  # noqa: BLE001 - a daemon down, restarting or hung: reported, never waited on
                out.append((False, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__))
        return out

    def _run(self) -> None:
        delay = POLL_MIN_S
        while True:
            with self._cond:
                while not self._pending and not self._unreset and not self._closing:
                    self._cond.wait()
                    delay = POLL_MIN_S
                if self._closing:
                    return
                unreset = dict(self._unreset)
            try:
                changed = self._retry_resets(unreset) | self._step()
            except Exception:  # noqa: BLE001 - the owner must outlive any one bad answer
                log.exception("version lifecycle: unexpected error; continuing")
                changed = False
            delay = POLL_MIN_S if changed else min(POLL_MAX_S, delay * 2)
            with self._cond:
                if self._closing:
                    return
                self._cond.wait(delay)

    def _retry_resets(self, unreset: dict[int, tuple[int, int | None]]) -> bool:
        changed = False
        for node, (floor, keep) in unreset.items():
            try:
                self.clients[node].reset(floor, keep)
            except Exception:  # noqa: BLE001 - still away: try again later
                continue
            log.info("node %d's daemon reset to the current restore generation", node)
            with self._cond:
                if self._unreset.get(node) == (floor, keep):
                    del self._unreset[node]
            changed = True
        return changed

    def _step(self) -> bool:
        """One poll: publish the newest version complete everywhere, abandon overdue ones; True if anything changed."""
        with self._cond:
            pending = dict(self._pending)
        if not pending:
            return False
        withdrawn = False
        if self.withdrawals is not None:
            for version, why in self.withdrawals.told(pending).items():
                withdrawn |= self.withdraw(version, why)
                pending.pop(version, None)
            if not pending:
                return withdrawn
        statuses = self._each(lambda c: c.status())
        complete_everywhere = None
        for v in sorted(pending, reverse=True):
            if all(ok and any(s.version == v and s.complete for s in value.versions) for ok, value in statuses):
                complete_everywhere = v
                break
        changed = False
        if complete_everywhere is not None:
            self._publish(complete_everywhere, pending[complete_everywhere][0])
            with self._cond:
                for v in [v for v in self._pending if v <= complete_everywhere]:
                    del self._pending[v]
                self._cond.notify_all()
            changed = True
        now = time.monotonic()
        with self._cond:
            overdue = [v for v, (_, deadline) in self._pending.items() if deadline < now]
            for v in overdue:
                del self._pending[v]
            if overdue:
                self._cond.notify_all()
        for v in overdue:
            self.stats.abandoned += 1
            waiting = [n for n, (ok, value) in enumerate(statuses)
                       if not ok or not any(s.version == v and s.complete for s in value.versions)]
            log.warning("snapshot %s: nodes %s not complete after %.0f s; the previous published version stays the "
                        "restore point", version_text(v), waiting, self.complete_timeout)
        return changed or bool(overdue) or withdrawn

    def _publish(self, version: int, submitted: float) -> None:
        results = self._each(lambda c: c.publish(version))
        failed = [(n, why) for n, (ok, why) in enumerate(results) if not ok]
        for node, why in failed:
            log.warning("snapshot %s: publish on node %d failed: %s", version_text(version), node, why)
        if len(failed) < len(results):
            self.stats.published += 1
            self.stats.last_published = version
            self.stats.publish_latency_s.append(time.monotonic() - submitted)
            if self.record is not None:
                tmp = self.record.with_suffix(".tmp")
                tmp.write_text(json.dumps({"version": version, "step": step_of(version), "epoch": epoch_of(version)}))
                os.replace(tmp, self.record)
