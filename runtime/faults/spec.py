"""What a fault is: ``--fault KIND:key=value:...`` parsed, checked against the job, and drawn at random.

A fault has a kind, a target (a rank for ``kill-worker``, a node otherwise) and a point:
``step=S`` (right after step S is done, its hooks and snapshot included) or
``restore=N`` (inside the restore of the N-th restart, once rank 0 has planned it and
before any rank loads: a fault during recovery).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from plait.errors import CLIError

FaultKind = Literal["kill-worker", "kill-node", "kill-daemon", "corrupt-shard", "corrupt-parity", "hang-daemon",
                    "link-down", "slow-link", "slow-rank", "hang"]
KINDS: tuple[FaultKind, ...] = ("kill-worker", "kill-node", "kill-daemon", "corrupt-shard", "corrupt-parity", "hang-daemon")
# A rehearsed cluster's links (plait train --cluster): a node's link goes down for a while, or runs slower.
LINK_KINDS: tuple[FaultKind, ...] = ("link-down", "slow-link")
# A worker computes slower (a degraded device) every step from ``step`` (or the start), or hangs after ``step``:
# it carries these out itself.
RANK_KINDS: tuple[FaultKind, ...] = ("slow-rank", "hang")
# Kinds after which the elastic agent restarts the workers (and so restores them).
RESTARTING: tuple[FaultKind, ...] = ("kill-worker", "kill-node", "corrupt-shard", "corrupt-parity")
# Kinds that may fire during a restore: those that act at once, without a snapshot to find.
AT_RESTORE: tuple[FaultKind, ...] = ("kill-worker", "kill-node", "kill-daemon")
HANG_SECONDS = 2.0  # hang-daemon's default: long enough to cost several snapshots of a short run
LINK_DOWN_SECONDS = 5.0  # link-down's default: collectives stall, TCP retransmits, then they recover


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    target: int  # a rank for kill-worker, a node otherwise
    step: int | None = None  # fires after this step ...
    restore: int | None = None  # ... or during the restore of this restart (1: the first)
    seconds: float | None = None  # hang-daemon, link-down: for how long (None: HANG_SECONDS, LINK_DOWN_SECONDS)
    factor: float | None = None  # slow-link: the link's rate is divided by it; slow-rank: its compute is multiplied

    @property
    def key(self) -> str:
        return "rank" if self.kind in ("kill-worker", "slow-rank", "hang") else "node"

    @property
    def point(self) -> str:
        """Where it fires, as workers name it in their requests: ``s7``, ``restore1``, or ``start`` (a slow link from
        the beginning, set before any worker starts)."""
        if self.step is not None:
            return f"s{self.step}"
        return f"restore{self.restore}" if self.restore is not None else "start"

    @property
    def hang_seconds(self) -> float:
        return HANG_SECONDS if self.seconds is None else self.seconds

    @property
    def down_seconds(self) -> float:
        return LINK_DOWN_SECONDS if self.seconds is None else self.seconds

    def __str__(self) -> str:
        at = f":step={self.step}" if self.step is not None else (f":restore={self.restore}" if self.restore else "")
        tail = f":seconds={self.seconds:g}" if self.seconds is not None else ""
        tail += f":factor={self.factor:g}" if self.factor is not None else ""
        return f"{self.kind}:{self.key}={self.target}{at}{tail}"


def _usage(kind: str) -> str:
    key = "rank=R" if kind in ("kill-worker", "slow-rank", "hang") else "node=N"
    if kind == "slow-rank":
        return f"{kind}:{key}:factor=F[:step=S] (from the start without step)"
    if kind in ("hang-daemon", "link-down"):
        return f"{kind}:{key}:step=S[:seconds=D]"
    if kind == "slow-link":
        return f"{kind}:{key}:factor=F[:step=S] (from the start without step)"
    if kind in AT_RESTORE:
        return f"{kind}:{key}:step=S or {kind}:{key}:restore=N"
    return f"{kind}:{key}:step=S"


def parse_fault(text: str) -> Fault:
    """``kill-worker:rank=1:step=5`` → Fault; a CLIError naming the part that is wrong and the accepted form otherwise."""
    kind, *parts = text.strip().split(":")
    if kind not in KINDS + LINK_KINDS + RANK_KINDS:
        raise CLIError(f"--fault {text!r}: unknown kind {kind!r}; accepted: {', '.join(KINDS + LINK_KINDS + RANK_KINDS)}")
    want = "rank" if kind in ("kill-worker", "slow-rank", "hang") else "node"
    slowed = kind in ("slow-link", "slow-rank")
    allowed = ({want, "step"} | ({"restore"} if kind in AT_RESTORE else set())
               | ({"seconds"} if kind in ("hang-daemon", "link-down") else set())
               | ({"factor"} if slowed else set()))
    values: dict[str, float] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise CLIError(f"--fault {text!r}: expected {_usage(kind)}, got the part {part!r}")
        if key in values:
            raise CLIError(f"--fault {text!r}: {key} is given twice; expected {_usage(kind)}")
        try:
            values[key] = float(value) if key in ("seconds", "factor") else int(value)
        except ValueError:
            what = {"seconds": "a number of seconds", "factor": "a number"}.get(key, "an integer")
            raise CLIError(f"--fault {text!r}: {key} must be {what}, got {value!r}") from None
    missing = [k for k in (want, *(("factor",) if slowed else ())) if k not in values]
    if "step" not in values and "restore" not in values and not slowed:
        missing.append("step" if kind not in AT_RESTORE else "step (or restore)")
    if missing:
        raise CLIError(f"--fault {text!r}: missing {' and '.join(missing)}; expected {_usage(kind)}")
    if "step" in values and "restore" in values:
        raise CLIError(f"--fault {text!r}: give step or restore, not both; expected {_usage(kind)}")
    if values[want] < 0:
        raise CLIError(f"--fault {text!r}: {want} must be >= 0")
    if values.get("step", 1) < 1:
        raise CLIError(f"--fault {text!r}: step must be >= 1 (the fault fires after that step)")
    if values.get("restore", 1) < 1:
        raise CLIError(f"--fault {text!r}: restore must be >= 1 (1: the restore of the first restart)")
    if values.get("seconds", 1.0) <= 0:
        raise CLIError(f"--fault {text!r}: seconds must be > 0 (how long the {'link stays down' if kind == 'link-down' else 'daemon stays stopped'})")
    if values.get("factor", 2.0) <= 1:
        what = "the link's rate is divided by it" if kind == "slow-link" else "the rank's compute time is multiplied by it"
        raise CLIError(f"--fault {text!r}: factor must be > 1 ({what})")
    step, restore = values.get("step"), values.get("restore")
    return Fault(kind=kind, target=int(values[want]), step=None if step is None else int(step),  # type: ignore[arg-type]
                 restore=None if restore is None else int(restore), seconds=values.get("seconds"),
                 factor=values.get("factor"))


def check_faults(faults: list[Fault], *, world: int, nnodes: int, steps: int, snapshots: bool, parity: int = 0,
                 rehearsal: bool = False) -> None:
    """Refuse faults this job cannot carry out (``parity``: the erasure-coding group's ec_m; ``rehearsal``: the
    nodes run in network namespaces, ``plait train --cluster``)."""
    restarts = sum(1 for f in faults if f.kind in RESTARTING and f.step is not None)
    seen: set[tuple[str, int, str]] = set()
    seen_ranks: list[Fault] = []
    for f in faults:
        limit, what = (world, "rank") if f.key == "rank" else (nnodes, "node")
        if f.target >= limit:
            raise CLIError(f"--fault {f}: {what} {f.target} does not exist; this job has {limit} {what}s (0..{limit - 1})")
        if f.step is not None and f.step >= steps:
            raise CLIError(f"--fault {f}: step {f.step} is not before the last step {steps}; pick a step in 1..{steps - 1}")
        if f.kind in RANK_KINDS:
            if rehearsal:
                raise CLIError(f"--fault {f}: {f.kind} runs on the workers of one machine (plait train without "
                               "--cluster)" + ("; in a rehearsed cluster, slow a node's link with slow-link"
                                               if f.kind == "slow-rank" else ""))
            if any(g.kind == f.kind and g.target == f.target for g in seen_ranks):
                raise CLIError(f"--fault {f}: rank {f.target} is given {f.kind} twice; give one per rank")
            seen_ranks.append(f)
            continue
        if f.kind in LINK_KINDS:
            if not rehearsal:
                raise CLIError(f"--fault {f}: links exist only in a rehearsed cluster; add --cluster FILE")
            if (f.kind, f.target, f.point) in seen:
                raise CLIError(f"--fault {f}: given twice; each fault fires once, so give it once")
            seen.add((f.kind, f.target, f.point))
            continue
        if rehearsal and f.kind == "kill-node" and f.target == 0:
            raise CLIError(f"--fault {f}: node 0 hosts the rendezvous store, and losing it ends the job as it would on "
                           "a real cluster; kill another node")
        if f.kind != "kill-worker" and not snapshots:
            raise CLIError(f"--fault {f}: needs snapshots; set snapshot.every (e.g. --set snapshot.every=5)")
        if f.kind == "corrupt-parity" and parity < 1:
            raise CLIError(f"--fault {f}: needs parity pieces to corrupt; set snapshot.ec_m >= 1 "
                           "(e.g. --set snapshot.ec_k=2 snapshot.ec_m=1 with 3 nodes)")
        if f.restore is not None:
            if not snapshots:
                raise CLIError(f"--fault {f}: needs snapshots (a restore happens only with snapshot.every set)")
            if f.restore > restarts:
                raise CLIError(f"--fault {f}: restore {f.restore} never happens: only {restarts} --fault(s) at a step "
                               f"restart the workers ({', '.join(RESTARTING)}); add one or lower restore")
        if (f.kind, f.target, f.point) in seen:
            raise CLIError(f"--fault {f}: given twice; each fault fires once, so give it once")
        seen.add((f.kind, f.target, f.point))


def random_faults(seed: int, *, world: int, nnodes: int, steps: int, every: int) -> list[Fault]:
    """The faults of one seeded random trial, in one of five shapes.

    ``single``: one fault of any kind. ``apart``: two faults at steps far enough apart
    (2·every + 1) that a snapshot taken after the first restore is complete when the
    second fires. ``together``: two faults at one step. ``lost``: two kill-node at one
    step (in a group of ec_k + 1 nodes, more than its parity covers; see
    :func:`lost_at_once`). ``restore``: a fault, then another during the restore it causes. Faults that may need the disk tier or an older version
    (corrupt-parity, two at once, one during restore) fire at step >= 3·every + 1, once a
    disk checkpoint of the 2·every snapshot can be complete.
    """
    rng = random.Random(seed)
    early, late = every + 1, 3 * every + 1
    if late >= steps:
        raise ValueError(f"random_faults: {steps} steps are too few for faults after step {late} (every={every})")

    def target(kind: FaultKind, *, avoid: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        nodes = [n for n in range(nnodes) if n not in avoid]
        node = rng.choice(nodes)
        if kind != "kill-worker":
            return node
        per_node = world // nnodes
        return node * per_node + rng.randrange(per_node)

    def node_of(f: Fault) -> int:
        return f.target // (world // nnodes) if f.kind == "kill-worker" else f.target

    shape = rng.choices(("single", "apart", "together", "lost", "restore"), weights=(35, 20, 15, 10, 20))[0]
    if shape == "single":
        kind = rng.choice(KINDS)
        step = rng.randrange(late if kind == "corrupt-parity" else early, steps)
        return [Fault(kind, target(kind), step)]
    if shape == "apart":
        gap = 2 * every + 1
        kinds = ("kill-worker", "kill-node", "kill-daemon", "corrupt-shard")
        first = rng.randrange(early, steps - gap)
        second = rng.randrange(first + gap, steps)
        # A hung daemon only second: a restore while it is still stopped would wait on it.
        k1, k2 = rng.choice(kinds), rng.choice((*kinds, "hang-daemon", *(("corrupt-parity",) if second >= late else ())))
        return [Fault(k1, target(k1), first), Fault(k2, target(k2), second)]
    step = rng.randrange(late, steps)
    if shape == "lost":
        a = Fault("kill-node", target("kill-node"), step)
        return [a, Fault("kill-node", target("kill-node", avoid={a.target}), step)]
    if shape == "together":
        kinds = ("kill-worker", "kill-node", "kill-daemon", "corrupt-shard")
        k1, k2 = rng.choice(kinds), rng.choice(kinds)
        a = Fault(k1, target(k1), step)
        return [a, Fault(k2, target(k2, avoid={node_of(a)}), step)]
    k1 = rng.choice(("kill-worker", "kill-node", "corrupt-shard"))
    a = Fault(k1, target(k1), step)
    # A second node lost during the restore of a lost node would be two at once: see ``together``.
    k2 = rng.choice(("kill-worker", "kill-daemon") if k1 != "kill-worker" else AT_RESTORE)
    return [a, Fault(k2, target(k2, avoid={node_of(a)} if k2 != "kill-worker" else set()), restore=1)]


def lost_at_once(faults: list[Fault], *, group: int, parity: int) -> bool:
    """Whether more than ``parity`` nodes of one erasure-coding group (of ``group`` nodes) are lost at one point."""
    lost: dict[tuple[str, int], set[int]] = {}
    for f in faults:
        if f.kind == "kill-node":
            lost.setdefault((f.point, f.target // group), set()).add(f.target)
    return any(len(nodes) > parity for nodes in lost.values())
