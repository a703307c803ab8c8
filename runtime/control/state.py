"""What the coordinator knows about the job: its workers, their progress, the users' commands, the stragglers.

Pure Python and single-lock, so that the gRPC service (:mod:`.service`) is only a thin,
typed shell over it and the tests can drive it without a network.

**Every input is checked** before anything changes: a request with a field out of range,
for a rank that never registered, from a worker entry that a restart replaced, or that
would move a worker's step backwards is refused with a typed error
(:class:`ControlRequestError`: INVALID_ARGUMENT; :class:`ControlStateError`:
FAILED_PRECONDITION) and leaves the state as it was.

**Stragglers** (:meth:`JobState.stragglers`). Each heartbeat carries the worker's last
step split into the time it was blocked in collectives (``comm_s``, measured by the
ledger) and the rest (``compute_s``). In a synchronous job every rank's *step* time is
the same (the others wait for the slowest in the next collective), so the slow rank is
the one whose compute is longer while the others' communication is longer. Over the last
``window`` steps that every rank reported, each rank's compute is compared with the
median of all ranks in the same step. The spread is the step-to-step noise of those
deviations around each rank's own level (1.4826 × their median absolute difference, a
robust standard deviation measured on this job, on this machine): a rank is a straggler
when it is more than 3 spreads slower than the median in at least 80 % of the steps and
its median excess is also at least ``min_excess`` of the median step time (a rank 0.1 %
slower is real but not worth naming). With no compute straggler, the
same test on the communication time names a rank whose links are slow.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from plait.errors import PlaitError

__all__ = ["PHASES", "COMMANDS", "ControlError", "ControlRequestError", "ControlStateError", "JobState", "Member"]

PHASES = ("idle", "restore", "forward", "backward", "optimizer", "hooks", "eval", "snapshot", "fault", "done")
COMMANDS = ("stop", "snapshot")
MAX_WORLD = 1 << 20
MAX_TEXT = 256  # host names, collectives, notes
MAX_RESTORE_TEXT = 1024
MAX_SECONDS = 1e7  # a step time beyond 115 days is not a measurement
MAX_EARLIER = 4096  # step times in one report
SPREAD_K = 3.0  # deviations beyond this many spreads count as slower
PERSISTENT = 0.8  # ... in at least this fraction of the window's steps
MIN_WINDOW = 5  # steps every rank reported, before anyone is named


class ControlError(PlaitError):
    """Base of the coordinator's refusals; ``code`` is the gRPC status it travels as."""

    code = "UNKNOWN"


class ControlRequestError(ControlError):
    """A field of a request is malformed or out of range (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class ControlStateError(ControlError):
    """The request does not fit the job's state: unknown or replaced worker, out of order (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


@dataclass
class Member:
    """One worker as the coordinator sees it."""

    rank: int
    node: int
    pid: int
    host: str
    attempt: int
    member_id: int
    registered: float
    last_seen: float
    step: int = 0
    phase: str = "idle"
    collective: str = ""
    in_collective_s: float = 0.0
    step_s: float = 0.0
    comm_s: float = 0.0
    compute_s: float = 0.0
    progress_at: float = 0.0  # when its step last advanced
    dump_stacks: bool = False  # instructions for its next heartbeat reply (a hang)
    exit: bool = False
    history: deque = field(default_factory=lambda: deque(maxlen=256))  # (step, step_s, comm_s, compute_s)


@dataclass
class Command:
    id: int
    command: str
    snapshot: bool
    requested: float
    state: str = "pending"  # pending | done
    step: int | None = None  # the step boundary it was carried out at
    note: str = ""


@dataclass
class Reply:
    """What a heartbeat's reply carries."""

    command: Command | None = None
    dump_stacks: bool = False
    exit: bool = False


def _int(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ControlRequestError(f"{name}: got {value}; accepted: {lo} .. {hi}")
    return value


def _text(name: str, value: str, limit: int = MAX_TEXT, *, empty: bool = True) -> str:
    if not empty and not value:
        raise ControlRequestError(f"{name}: empty; accepted: a non-empty string")
    if len(value) > limit:
        raise ControlRequestError(f"{name}: {len(value)} characters; accepted: at most {limit}")
    if not value.isprintable():
        raise ControlRequestError(f"{name}: holds control characters; accepted: printable text")
    return value


def _seconds(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= MAX_SECONDS):
        raise ControlRequestError(f"{name}: got {value}; accepted: a finite number of seconds in [0, {MAX_SECONDS:g}]")
    return value


class JobState:
    """The coordinator's view of one job (thread-safe)."""

    def __init__(self, job: str, world: int, *, window: int = 20, min_excess: float = 0.05, snapshots: bool = True,
                 clock=time.monotonic):
        if world < 1:
            raise ValueError(f"world must be positive, got {world}")
        self.job = job
        self.world = world
        self.window = window
        self.min_excess = min_excess
        self.snapshots = snapshots  # the job takes snapshots (snapshot.every > 0)
        self.clock = clock
        self.started = clock()
        self.members: dict[int, Member] = {}
        self.attempt = 0
        self.restore = ""
        self.commands: list[Command] = []
        self.refused = 0
        self._next_member = 1
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests

    def register(self, *, rank: int, world: int, node: int, pid: int, host: str, attempt: int, restore: str = "") -> int:
        _int("world", world, 1, MAX_WORLD)
        if world != self.world:
            raise ControlRequestError(f"world: got {world}; this job has {self.world} workers")
        _int("rank", rank, 0, self.world - 1)
        _int("node", node, 0, MAX_WORLD)
        _int("pid", pid, 1, 1 << 31)
        _int("attempt", attempt, 0, 1 << 30)
        _text("host", host, empty=False)
        _text("restore", restore, MAX_RESTORE_TEXT)
        with self._lock:
            old = self.members.get(rank)
            if old is not None and attempt < old.attempt:
                raise ControlStateError(f"rank {rank}: attempt {attempt} registers after attempt {old.attempt}: "
                                        "a worker of a replaced attempt")
            if attempt < self.attempt:
                raise ControlStateError(f"rank {rank}: attempt {attempt} is older than the job's attempt {self.attempt}")
            now = self.clock()
            member = Member(rank=rank, node=node, pid=pid, host=host, attempt=attempt, member_id=self._next_member,
                            registered=now, last_seen=now, progress_at=now)
            self._next_member += 1
            if attempt > self.attempt:  # a restart: every rank's history is of the old attempt
                self.attempt = attempt
                for m in self.members.values():
                    m.history.clear()
            if rank == 0 and restore:
                self.restore = restore
            self.members[rank] = member
            return member.member_id

    def heartbeat(self, *, rank: int, member_id: int, step: int, phase: str, collective: str = "",
                  in_collective_s: float = 0.0, step_s: float = 0.0, comm_s: float = 0.0, compute_s: float = 0.0,
                  command_done: int = 0, command_note: str = "",
                  earlier: list[tuple[int, float, float, float]] = ()) -> Reply:
        """Record a worker's progress; return what its reply carries: the pending command (rank 0 carries
        commands out) and the coordinator's instructions for it (dump stacks, exit).

        ``earlier``: (step, step_s, comm_s, compute_s) of the steps finished since the last report, before
        ``step``, oldest first (a worker reports once per heartbeat interval, not once per step)."""
        _int("rank", rank, 0, self.world - 1)
        _int("step", step, 0, 1 << 62)
        if len(earlier) > MAX_EARLIER:
            raise ControlRequestError(f"earlier: {len(earlier)} steps; accepted: at most {MAX_EARLIER} per report")
        last = -1
        for s, *times in earlier:
            _int("earlier.step", s, 0, 1 << 62)
            if not last < s < step:
                raise ControlRequestError(f"earlier.step: got {s} after {last}, before step {step}; accepted: "
                                          "increasing steps before the reported one")
            last = s
            for name, value in zip(("earlier.step_s", "earlier.comm_s", "earlier.compute_s"), times):
                _seconds(name, value)
        if phase not in PHASES:
            raise ControlRequestError(f"phase: got {phase!r}; accepted: {' | '.join(PHASES)}")
        _text("collective", collective, 64)
        _text("command_note", command_note)
        for name, value in (("in_collective_s", in_collective_s), ("step_s", step_s), ("comm_s", comm_s),
                            ("compute_s", compute_s)):
            _seconds(name, value)
        with self._lock:
            _int("command_done", command_done, 0, len(self.commands))
            m = self.members.get(rank)
            if m is None:
                raise ControlStateError(f"rank {rank} has not registered (Register first)")
            if member_id != m.member_id:
                raise ControlStateError(f"rank {rank}: member id {member_id} is not the registered one "
                                        f"({m.member_id}): a heartbeat of a replaced worker")
            if step < m.step:
                raise ControlStateError(f"rank {rank}: step {step} after step {m.step}: steps only move forward "
                                        "within an attempt")
            now = self.clock()
            if step > m.step:
                m.progress_at = now
                m.history.extend(e for e in earlier if e[0] > m.step)
                m.history.append((step, step_s, comm_s, compute_s))
            m.step, m.phase, m.collective, m.in_collective_s = step, phase, collective, in_collective_s
            m.step_s, m.comm_s, m.compute_s = step_s, comm_s, compute_s
            m.last_seen = now
            if rank == 0 and command_done:
                for c in self.commands[:command_done]:
                    if c.state == "pending":
                        c.state, c.step, c.note = "done", step, command_note
            reply = Reply(dump_stacks=m.dump_stacks, exit=m.exit)
            m.dump_stacks = m.exit = False
            if rank == 0:
                reply.command = next((c for c in self.commands if c.state == "pending"), None)
            return reply

    def instruct(self, ranks: list[int], *, dump_stacks: bool = False, exit: bool = False) -> None:
        """Have these ranks' next heartbeat replies tell them to dump their stacks and/or exit."""
        with self._lock:
            for r in ranks:
                m = self.members.get(r)
                if m is not None:
                    m.dump_stacks |= dump_stacks
                    m.exit |= exit

    def command(self, command: str, snapshot: bool = False) -> Command:
        """Queue a user's command (the same pending command again returns the queued one)."""
        if command not in COMMANDS:
            raise ControlRequestError(f"command: got {command!r}; accepted: {' | '.join(COMMANDS)}")
        if snapshot and command != "stop":
            raise ControlRequestError("snapshot: only a stop takes it (a snapshot command is one already)")
        if (snapshot or command == "snapshot") and not self.snapshots:
            raise ControlStateError("this job runs without snapshots (snapshot.every=0): nothing could be taken; "
                                    "stop it without --snapshot, or start jobs with --set snapshot.every=N")
        with self._lock:
            if any(c.command == "stop" and c.state == "done" for c in self.commands):
                raise ControlStateError("the job has already stopped")
            for c in self.commands:
                if c.state == "pending" and c.command == command and c.snapshot == snapshot:
                    return c
            if len(self.commands) >= 10_000:
                raise ControlStateError("10000 commands already: the job is not taking them")
            c = Command(id=len(self.commands) + 1, command=command, snapshot=snapshot, requested=self.clock())
            self.commands.append(c)
            return c

    # ------------------------------------------------------------------ views

    def stragglers(self) -> dict[str, Any]:
        """The window's analysis: ranks named slow, with cause, excess and threshold (see the module docstring)."""
        with self._lock:
            if len(self.members) < self.world:
                return {"steps": 0, "stragglers": [], "slowest": None}
            by_rank = {r: {s: (t, c, k) for s, t, c, k in m.history} for r, m in self.members.items()}
        common = set.intersection(*(set(h) for h in by_rank.values()))
        steps = sorted(common)[-self.window:]
        out: dict[str, Any] = {"steps": len(steps), "stragglers": [], "slowest": None}
        if len(steps) < MIN_WINDOW or self.world < 2:
            return out
        step_med = statistics.median(statistics.median(by_rank[r][s][0] for r in by_rank) for s in steps)
        found = []
        for cause, col in (("compute", 2), ("communication", 1)):
            dev = {r: [by_rank[r][s][col] - statistics.median(by_rank[q][s][col] for q in by_rank) for s in steps]
                   for r in by_rank}
            excess = {r: statistics.median(ds) for r, ds in dev.items()}
            # the step-to-step noise of each rank's deviation around its own level
            spread = 1.4826 * statistics.median(abs(d - excess[r]) for r, ds in dev.items() for d in ds)
            threshold = max(SPREAD_K * spread, self.min_excess * step_med, 1e-6)
            if cause == "compute":
                worst = max(excess, key=lambda r: excess[r])
                out["slowest"] = {"rank": worst, "node": self.members[worst].node, "compute_excess_s": excess[worst],
                                  "threshold_s": threshold, "spread_s": spread}
            for r, ds in dev.items():
                slow = sum(d > threshold for d in ds)
                if slow >= PERSISTENT * len(ds) and excess[r] > threshold:
                    found.append({"rank": r, "node": self.members[r].node, "cause": cause, "excess_s": excess[r],
                                  "threshold_s": threshold, "spread_s": spread, "slow_steps": slow,
                                  "median_step_s": step_med})
            if found:  # the others' waiting in collectives is explained by a slow computer
                break
        out["stragglers"] = found
        return out

    def hang(self, *, factor: float, min_s: float, first_s: float, silent_s: float = 10.0) -> dict[str, Any] | None:
        """A hang of the current attempt, or None: no rank finished a step for longer than the timeout.

        The timeout is ``max(factor × the median step time, min_s)`` over the steps the
        attempt measured (``first_s`` before any). The report names the ranks that are not
        inside a collective (the stuck ones: computing, or hung in Python), the collectives
        the others wait in and for how long, and the ranks whose reports stopped for more than
        ``silent_s`` (a process that holds the interpreter, or is gone).
        """
        with self._lock:
            members = [m for m in self.members.values() if m.attempt == self.attempt]
            if len(members) < self.world or any(m.phase in ("restore", "fault", "done") for m in members):
                return None  # not all here yet; restoring or held at a fault (bounded waits of their own); finishing
            now = self.clock()
            recent = [h[1] for m in members for h in list(m.history)[-self.window:]]
            timeout = max(factor * statistics.median(recent), min_s) if recent else first_s
            last = max(m.progress_at for m in members)
            if now - last <= timeout:
                return None
            silent = sorted(m.rank for m in members if now - m.last_seen > silent_s)
            stuck = sorted(m.rank for m in members if not m.collective and m.rank not in silent)
            waiting: dict[str, list[int]] = {}
            for m in members:
                if m.collective and m.rank not in silent:
                    waiting.setdefault(m.collective, []).append(m.rank)
            return {
                "attempt": self.attempt, "since_s": now - last, "timeout_s": timeout, "step": min(m.step for m in members),
                "stuck": [{"rank": r, "node": self.members[r].node, "phase": self.members[r].phase} for r in stuck],
                "waiting": [{"collective": c, "ranks": sorted(rs),
                             "for_s": max(self.members[r].in_collective_s for r in rs)} for c, rs in sorted(waiting.items())],
                "silent": [{"rank": r, "node": self.members[r].node, "seen_s_ago": now - self.members[r].last_seen}
                           for r in silent],
                "pids": {m.rank: (m.host, m.pid) for m in members},
            }

    def status(self) -> dict[str, Any]:
        """The document ``plait status --json`` prints (daemons are added by the service)."""
        analysis = self.stragglers()
        with self._lock:
            now = self.clock()
            ranks = []
            for r in sorted(self.members):
                m = self.members[r]
                ranks.append({"rank": r, "node": m.node, "host": m.host, "pid": m.pid, "attempt": m.attempt,
                              "step": m.step, "phase": m.phase, "collective": m.collective,
                              "in_collective_s": m.in_collective_s, "step_s": m.step_s, "comm_s": m.comm_s,
                              "compute_s": m.compute_s, "seen_s_ago": now - m.last_seen,
                              "progress_s_ago": now - m.progress_at})
            steps = [m.step for m in self.members.values()]
            return {
                "job": self.job, "world": self.world, "registered": len(self.members), "attempt": self.attempt,
                "uptime_s": now - self.started, "step": min(steps) if len(steps) == self.world else None,
                "last_restore": self.restore, "ranks": ranks,
                "nodes": sorted({m.node for m in self.members.values()}),
                "stragglers": analysis["stragglers"], "slowest": analysis["slowest"], "window_steps": analysis["steps"],
                "commands": [{"id": c.id, "command": c.command, "snapshot": c.snapshot, "state": c.state,
                              "step": c.step, "note": c.note} for c in self.commands[-20:]],
                "refused_requests": self.refused,
            }
