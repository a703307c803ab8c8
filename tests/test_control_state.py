"""The coordinator's state without a network: membership, ordering, commands and the straggler test."""

from __future__ import annotations

import random

import pytest

from plait.runtime.control.hook import decode, encode
from plait.runtime.control.state import ControlRequestError, ControlStateError, JobState


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _job(world: int = 4, **kw) -> tuple[JobState, dict[int, int]]:
    state = JobState("job", world, clock=Clock(), **kw)
    ids = {r: state.register(rank=r, world=world, node=r // 2, pid=1000 + r, host="h", attempt=0) for r in range(world)}
    return state, ids


def _steps(state: JobState, ids: dict[int, int], times, start: int = 1) -> None:
    """times(step, rank) -> (compute_s, comm_s)."""
    for step in range(start, start + 30):
        for r, mid in ids.items():
            compute, comm = times(step, r)
            state.heartbeat(rank=r, member_id=mid, step=step, phase="hooks", step_s=compute + comm, comm_s=comm,
                            compute_s=compute)


def test_command_word_round_trips():
    for cid in (1, 2, 999, 2 ** 40):
        for command, snap in (("stop", False), ("stop", True), ("snapshot", False)):
            assert decode(encode(cid, command, snap)) == (cid, command, snap)
    assert decode(0.0) is None and decode(4.0) is None  # no command; kind 0 is none


def test_registration_and_heartbeats_are_checked_and_ordered():
    state, ids = _job()
    with pytest.raises(ControlRequestError, match="world"):
        state.register(rank=0, world=8, node=0, pid=1, host="h", attempt=0)
    with pytest.raises(ControlRequestError, match="rank"):
        state.register(rank=4, world=4, node=0, pid=1, host="h", attempt=0)
    with pytest.raises(ControlRequestError, match="host"):
        state.register(rank=1, world=4, node=0, pid=1, host="a\nb", attempt=0)
    state.heartbeat(rank=1, member_id=ids[1], step=5, phase="forward")
    with pytest.raises(ControlStateError, match="only move forward"):
        state.heartbeat(rank=1, member_id=ids[1], step=4, phase="forward")
    with pytest.raises(ControlStateError, match="replaced"):
        state.heartbeat(rank=1, member_id=ids[2], step=6, phase="forward")
    with pytest.raises(ControlRequestError, match="phase"):
        state.heartbeat(rank=1, member_id=ids[1], step=6, phase="sleeping")
    with pytest.raises(ControlRequestError, match="step_s"):
        state.heartbeat(rank=1, member_id=ids[1], step=6, phase="forward", step_s=float("nan"))
    # a restart: attempt 1 replaces the entry; the old worker's heartbeats are refused, steps start again
    new = state.register(rank=1, world=4, node=0, pid=77, host="h", attempt=1)
    with pytest.raises(ControlStateError, match="replaced"):
        state.heartbeat(rank=1, member_id=ids[1], step=6, phase="forward")
    state.heartbeat(rank=1, member_id=new, step=3, phase="forward")
    with pytest.raises(ControlStateError, match="attempt 0 registers after attempt 1"):
        state.register(rank=1, world=4, node=0, pid=1, host="h", attempt=0)
    assert state.status()["attempt"] == 1


def test_a_report_carries_the_steps_since_the_last_one_and_the_stragglers_see_every_step():
    """Workers report once per interval: the steps before the reported one come in ``earlier``, oldest first."""
    rng = random.Random(7)
    state, ids = _job()
    for first in (1, 11, 21):  # three reports of ten steps each
        for r, mid in ids.items():
            times = []
            for step in range(first, first + 10):
                base = 0.2 * (1 + 0.05 * rng.random())
                compute = 1.6 * base if r == 1 else base
                comm = 0.05 + (0.32 * 0.2 if r != 1 else 0.0)
                times.append((step, compute + comm, comm, compute))
            *earlier, (step, step_s, comm_s, compute_s) = times
            state.heartbeat(rank=r, member_id=mid, step=step, phase="hooks", step_s=step_s, comm_s=comm_s,
                            compute_s=compute_s, earlier=earlier)
    assert [h[0] for h in state.members[1].history] == list(range(1, 31))
    found = state.stragglers()
    assert [(x["rank"], x["cause"]) for x in found["stragglers"]] == [(1, "compute")] and found["steps"] == 20
    mid = ids[0]
    for bad, match in (([(31, 1.0, 0.0, 1.0), (31, 1.0, 0.0, 1.0)], "increasing"), ([(40, 1.0, 0.0, 1.0)], "before step"),
                       ([(31, -1.0, 0.0, 1.0)], "earlier.step_s"), ([(31, 1.0, float("inf"), 1.0)], "earlier.comm_s")):
        with pytest.raises(ControlRequestError, match=match):
            state.heartbeat(rank=0, member_id=mid, step=35, phase="hooks", earlier=bad)
    assert state.members[0].step == 30  # each refusal left the state as it was


def test_commands_go_to_rank_0_until_it_reports_them_done():
    state, ids = _job(2)
    first = state.command("snapshot")
    assert state.command("snapshot").id == first.id  # the same pending command, not a second
    stop = state.command("stop", snapshot=True)
    assert state.heartbeat(rank=1, member_id=ids[1], step=1, phase="hooks").command is None  # only rank 0 does
    assert state.heartbeat(rank=0, member_id=ids[0], step=1, phase="hooks").command.id == first.id
    got = state.heartbeat(rank=0, member_id=ids[0], step=2, phase="hooks", command_done=first.id, command_note="ok")
    assert got.command.id == stop.id
    assert state.heartbeat(rank=0, member_id=ids[0], step=3, phase="hooks", command_done=stop.id).command is None
    done = {c["id"]: c for c in state.status()["commands"]}
    assert done[first.id]["state"] == "done" and done[first.id]["step"] == 2 and done[first.id]["note"] == "ok"
    with pytest.raises(ControlStateError, match="already stopped"):
        state.command("stop")
    with pytest.raises(ControlRequestError, match="command_done"):
        state.heartbeat(rank=0, member_id=ids[0], step=4, phase="hooks", command_done=3)


def test_snapshot_commands_need_snapshots():
    state = JobState("job", 1, snapshots=False)
    with pytest.raises(ControlStateError, match="snapshot.every=0"):
        state.command("snapshot")
    with pytest.raises(ControlStateError, match="snapshot.every=0"):
        state.command("stop", snapshot=True)
    with pytest.raises(ControlRequestError, match="only a stop"):
        JobState("job", 1).command("snapshot", snapshot=True)
    assert state.command("stop").command == "stop"


@pytest.mark.parametrize("world", [2, 4, 8])
def test_a_slow_computer_is_named_with_its_node_and_nobody_else(world):
    """Rank 1 computes 1.6× longer; the others wait for it in their collectives (their comm grows)."""
    rng = random.Random(world)
    state, ids = _job(world)

    def times(step, r):
        base = 0.2 * (1 + 0.05 * rng.random())  # 5 % noise
        slow = 1.6 * base if r == 1 else base
        return slow, 0.05 + (0.32 * 0.2 if r != 1 else 0.0)

    _steps(state, ids, times)
    found = state.stragglers()
    assert [(s["rank"], s["node"], s["cause"]) for s in found["stragglers"]] == [(1, 0, "compute")]
    assert found["slowest"]["rank"] == 1 and found["steps"] == 20


def test_noise_alone_names_nobody():
    rng = random.Random(3)
    state, ids = _job(4)
    _steps(state, ids, lambda step, r: (0.2 * (1 + 0.3 * rng.random()), 0.05 * (1 + rng.random())))
    assert state.stragglers()["stragglers"] == []


def test_a_rank_slower_in_a_few_steps_only_is_not_persistent():
    state, ids = _job(4)
    _steps(state, ids, lambda step, r: (0.6 if (r == 2 and step % 5 == 0) else 0.2, 0.05))
    assert state.stragglers()["stragglers"] == []


def test_a_slow_link_is_named_as_communication():
    state, ids = _job(4)
    rng = random.Random(5)
    _steps(state, ids, lambda step, r: (0.2 * (1 + 0.05 * rng.random()), 0.3 if r == 3 else 0.05))
    assert [(s["rank"], s["cause"]) for s in state.stragglers()["stragglers"]] == [(3, "communication")]


def test_the_window_waits_for_every_rank_and_restarts_forget_the_old_attempt():
    state, ids = _job(4)
    _steps(state, ids, lambda step, r: (0.5 if r == 1 else 0.2, 0.05))
    assert state.stragglers()["stragglers"]
    state.register(rank=0, world=4, node=0, pid=5, host="h", attempt=1)  # a restart begins
    assert state.stragglers() == {"steps": 0, "stragglers": [], "slowest": None}


def test_a_hang_is_called_after_the_timeout_from_the_measured_step_time():
    state, ids = _job(4)
    clock = state.clock
    for step in range(1, 11):
        clock.t += 0.5
        for r, mid in ids.items():
            state.heartbeat(rank=r, member_id=mid, step=step, phase="hooks", step_s=0.5, comm_s=0.1, compute_s=0.4)
    limits = dict(factor=10.0, min_s=2.0, first_s=600.0)
    def report(waited: float, ranks=(0, 1, 2, 3)) -> None:
        """rank 2 stops in its forward; the others wait in the dp all-reduce; all keep reporting."""
        for r in ranks:
            state.heartbeat(rank=r, member_id=ids[r], step=10, phase="forward" if r == 2 else "backward",
                            collective="" if r == 2 else "dp:all_reduce", in_collective_s=0.0 if r == 2 else waited)

    clock.t += 4.9
    report(4.0)
    assert state.hang(**limits) is None  # 10 × 0.5 s: not yet
    clock.t += 0.2
    report(4.0)
    found = state.hang(**limits)
    assert found["timeout_s"] == 5.0 and found["step"] == 10
    assert found["stuck"] == [{"rank": 2, "node": 1, "phase": "forward"}]
    assert found["waiting"] == [{"collective": "dp:all_reduce", "ranks": [0, 1, 3], "for_s": 4.0}]
    assert found["silent"] == []
    state.instruct([0, 2], dump_stacks=True)
    state.instruct([2], exit=True)
    replies = {r: state.heartbeat(rank=r, member_id=ids[r], step=10, phase="backward") for r in (0, 1, 2)}
    assert [(replies[r].dump_stacks, replies[r].exit) for r in (0, 1, 2)] == [(True, False), (False, False), (True, True)]
    again = state.heartbeat(rank=2, member_id=ids[2], step=10, phase="forward")
    assert not again.dump_stacks and not again.exit  # once
    clock.t += 11
    report(15.0, ranks=(0, 1, 3))  # rank 2's reports stop too (it holds the interpreter, or died)
    found = state.hang(**limits)
    assert found["stuck"] == [] and [s["rank"] for s in found["silent"]] == [2]
    # a new attempt starts the clock again, with the first-step timeout
    new = {r: state.register(rank=r, world=4, node=r // 2, pid=1, host="h", attempt=1) for r in range(4)}
    assert state.hang(**limits) is None
    clock.t += 601
    assert state.hang(**limits)["timeout_s"] == 600.0
    state.heartbeat(rank=1, member_id=new[1], step=11, phase="fault")
    assert state.hang(**limits) is None  # a rank held at a fault's point on purpose
    for r, mid in new.items():
        state.heartbeat(rank=r, member_id=mid, step=11, phase="done")
    clock.t += 700
    assert state.hang(**limits) is None  # finishing is not hanging
