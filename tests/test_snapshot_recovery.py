"""Recovery paths a new user hits first: one node with the defaults, a hung daemon, a killed launcher. Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_snapshot_faults import _same, plait

from plait.runtime.snapshot import shm
from plait.runtime.snapshot.trainer.hook import ALLOC_WAIT_MAX_S

# Only snapshot.every: the defaults must give memory snapshots on one node (no parity, no extra keys).
ONE_NODE = """
model: {kind: moe, layers: 2, dim: 64, heads: 4, ffn_dim: 128, vocab: 256, seq_len: 64, experts: 4, top_k: 2}
train: {steps: 12, global_batch: 6, micro_batch: 3, lr: 3.0e-3, warmup_steps: 3, seed: 11, eval_every: 6, eval_batches: 1}
data: {max_bytes: 2000000}
metrics: {enabled: false}
snapshot: {every: 2}
"""


def _run(config: Path, run_dir: Path, *args: str) -> tuple[dict, str]:
    done = subprocess.run(plait("train", "--config", str(config), "--run-dir", str(run_dir), *args),
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return json.loads((run_dir / "summary.json").read_text()), output


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> tuple[Path, dict]:
    config = tmp_path_factory.mktemp("cfg") / "one-node.yaml"
    config.write_text(ONE_NODE)
    baseline, _ = _run(config, tmp_path_factory.mktemp("base") / "run", "--nproc", "2")
    assert baseline["snapshot"]["published"] >= 5 and baseline["recoveries"] == []
    return config, baseline


def test_one_node_with_the_defaults_restores_a_killed_worker_from_memory(one_node, tmp_path):
    """Defect: with one node (or ec_m = 0) no layout was built and a worker crash restarted from step 0."""
    config, baseline = one_node
    summary, output = _run(config, tmp_path / "run", "--nproc", "2", "--fault", "kill-worker:rank=1:step=7")
    _same(summary, baseline)
    (rec,) = summary["recoveries"]
    # step 6's snapshot, or step 4's if 6 had not completed (it does so off the training thread) when rank 1 died
    assert rec["source"] == "memory" and rec["step"] in (4, 6) and rec["replayed"] == 7 - rec["step"], rec
    assert rec["ranks"] == {"local": [0, 1]}
    assert f"plait: restore: step {rec['step']} from local daemon memory for ranks 0-1" in output


def _pid_of_daemon(run_dir: Path, node: int) -> int:
    return int((run_dir / "daemons" / f"node{node}.pid").read_text())


def _progress(run_dir: Path) -> int:
    try:
        return max(int(p.read_text()) for p in (run_dir / "progress").glob("rank*"))
    except (OSError, ValueError):
        return 0


def _wait_progress(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _progress(run_dir) < step:
        assert proc.poll() is None, "plait train exited early"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.05)


def test_a_hung_daemon_costs_skipped_snapshots_not_a_stalled_job(one_node, tmp_path):
    """SIGSTOP of the daemon: training goes on (its snapshots are skipped and reported) and resumes after SIGCONT."""
    config, baseline = one_node
    run_dir = tmp_path / "run"
    # Output to a file, not a pipe nobody reads until the end: a full pipe would block rank 0's
    # logging, and that wait would be counted as a snapshot stall.
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", "2"),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_progress(proc, run_dir, 2)
            daemon = _pid_of_daemon(run_dir, 0)
            os.kill(daemon, signal.SIGSTOP)
            # steps go on while the daemon is stopped; it is resumed by step 5 so that the snapshots of steps 6, 8
            # and 10 come after it (on a loaded machine the run may be steps further by the time the signal lands,
            # and the one snapshot right after the resume may still be skipped while a stuck copy finishes)
            _wait_progress(proc, run_dir, 5)
            os.kill(daemon, signal.SIGCONT)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    _same(summary, baseline)  # no restart: the same run
    snap = summary["snapshot"]
    assert snap["skipped"] >= 1 and snap["skip_reasons"], snap
    assert snap["published"] >= 1  # the snapshots after SIGCONT completed
    # The training thread waited at most the bound on a segment, once; never on an RPC.
    assert max(snap["stall_s"]) < ALLOC_WAIT_MAX_S + 1.0, max(snap["stall_s"])


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_plait_train_takes_its_workers_and_daemons_and_their_memory_with_it(one_node, tmp_path):
    """Defect: after kill -9 of plait train its daemon and workers kept running, holding shared memory."""
    from plait.runtime.snapshot.trainer.hook import job_name

    config, _ = one_node
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", "2",
                                  "--set", "train.steps=200"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_progress(proc, run_dir, 3)
        family = _descendants(proc.pid)
        assert len(family) >= 3  # two workers and a daemon at least
        proc.kill()  # what a scheduler's cancel or the OOM killer does
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in family):
            assert time.monotonic() < deadline, f"still running: {[p for p in family if _alive(p)]}"
            time.sleep(0.1)
        job = job_name(run_dir)
        left = [p.name for p in shm.segment_root().iterdir() if p.name.startswith(f"plait.{job}.")]
        assert all(name.endswith(".lock") for name in left), left
    finally:
        if proc.poll() is None:
            proc.kill()
