"""The fault executor and the workers' requests, without a training job: real processes, real SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from plait.runtime.faults import Fault, FaultHook, FaultNotCarriedOut, fault_records, fired_faults
from plait.runtime.faults import records
from plait.runtime.faults.executor import FaultExecutor, process_state


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.fixture
def executor(tmp_path):
    started: list[FaultExecutor] = []

    def start(faults: list[Fault], world: int) -> FaultExecutor:
        ex = FaultExecutor(faults, run_dir=tmp_path, world=world, per_node=1, daemons=None, secret_file=None)
        ex.start()
        started.append(ex)
        return ex

    yield start
    for ex in started:
        ex.stop()


def test_a_point_fires_once_every_rank_asked_in_order_and_verified(tmp_path, executor):
    faults = [Fault("kill-worker", 1, 3), Fault("kill-worker", 0, 3), Fault("kill-worker", 0, 5)]
    executor(faults, world=2)
    victims = [_sleeper(), _sleeper()]
    try:
        # Rank 1 asks first; nothing fires until rank 0 asks too.
        records.write_atomic(records.request_path(tmp_path, attempt=0, point="s3", rank=1), {"rank": 1, "pid": victims[1].pid})
        with pytest.raises(subprocess.TimeoutExpired):
            victims[1].wait(timeout=0.5)
        records.write_atomic(records.request_path(tmp_path, attempt=0, point="s3", rank=0), {"rank": 0, "pid": victims[0].pid})
        assert victims[0].wait(timeout=10) == -9 and victims[1].wait(timeout=10) == -9
        # The executor records a fault once it has verified it, a moment after the victims are gone.
        deadline = time.monotonic() + 10
        while len(fault_records(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hook = FaultHook(faults, run_dir=tmp_path, rank=0, attempt=1, wait_s=10)
        hook.reach("s3")  # done in attempt 0: a replayed step 3 asks for nothing and returns at once
        assert not list(tmp_path.glob("faults/request-a1-*"))
    finally:
        for v in victims:
            v.kill()
    done = fault_records(tmp_path)
    assert [r["fault"] for r in done] == ["kill-worker:rank=1:step=3", "kill-worker:rank=0:step=3"]  # order given
    assert done[0]["effect"]["killed_workers"] == {"1": victims[1].pid} and all(r["ok"] for r in done)
    assert process_state(victims[0].pid) is None
    assert fired_faults(tmp_path) == ["kill-worker:rank=1:step=3", "kill-worker:rank=0:step=3"]  # not step 5


def test_a_fault_that_cannot_be_carried_out_is_recorded_so_and_stops_the_workers(tmp_path, executor):
    faults = [Fault("kill-daemon", 0, 2)]
    executor(faults, world=1)
    hook = FaultHook(faults, run_dir=tmp_path, rank=0, attempt=0, wait_s=10)
    with pytest.raises(FaultNotCarriedOut, match="kill-daemon:node=0:step=2 could not be carried out: .*no snapshot daemon"):
        hook.reach("s2")
    assert fired_faults(tmp_path) == [] and fault_records(tmp_path)[0]["ok"] is False
    with pytest.raises(FaultNotCarriedOut, match="could not be carried out"):
        FaultHook(faults, run_dir=tmp_path, rank=0, attempt=1, wait_s=10).settle()  # a restarted attempt too


def test_without_a_launcher_a_worker_stops_waiting_with_a_clear_error(tmp_path):
    hook = FaultHook([Fault("kill-worker", 0, 4)], run_dir=tmp_path, rank=0, attempt=0, wait_s=0.3)
    (tmp_path / "faults").mkdir()
    with pytest.raises(FaultNotCarriedOut, match=r"kill-worker:rank=0:step=4 not carried out within 0 s .*is it running"):
        hook.reach("s4")
