"""The control plane end to end: `plait train` on 2 real worker processes, asked and commanded by the CLI.

* `plait status` reads a running job; `plait snapshot` takes one at the next step;
  `plait stop --snapshot` stops every rank after the same step with a checkpoint, and
  `plait train --resume` from it continues with losses bitwise equal to a run that was
  never stopped;
* a rank slowed by `--fault slow-rank` is named by the coordinator (rank, node, compute),
  in `plait status`, in the launcher's log and in the coordinator's `/metrics`, and nobody
  else is;
* a rank that hangs (`--fault hang`) is found within the timeout, every rank's stacks are
  written, the stuck rank and the collective the others wait in are named in one line, and
  the workers restart from the newest snapshot with losses bitwise equal to a run without it;
* commands a job cannot carry out are refused with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from plait.runtime.control.cli import render

TINY = """
model: {kind: moe, layers: 2, dim: 64, heads: 4, ffn_dim: 128, vocab: 256, seq_len: 64, experts: 4, top_k: 2}
train: {steps: 30, global_batch: 8, micro_batch: 2, lr: 3.0e-3, warmup_steps: 3, seed: 7, eval_every: 0, eval_batches: 2}
data: {max_bytes: 3000000}
metrics: {log_every: 5}
launch: {nproc: 2}
"""


def plait(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait.runtime.cli", *args]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _status(run_dir: Path) -> dict | None:
    done = subprocess.run(plait("status", str(run_dir), "--json"), capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _wait_for(run_dir: Path, proc: subprocess.Popen, what, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before the condition held"
        if (run_dir / "control.json").exists():
            status = _status(run_dir)
            if status is not None and what(status):
                return status
        time.sleep(0.3)
    raise AssertionError(f"condition not reached within {timeout} s; last status {status}")


def test_status_snapshot_and_stop_then_resume_bitwise(config, tmp_path):
    run_dir = tmp_path / "a"
    # rank 0 computes 10× slower (it only waits), so that the commands land long before the last step
    sets = ["--fault", "slow-rank:rank=0:factor=10", "--set", "train.steps=60", "snapshot.every=50",
            "control.heartbeat_s=0.2"]
    proc = subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(run_dir), *sets),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = _wait_for(run_dir, proc, lambda s: s["registered"] == 2)
        assert status["world"] == 2 and [r["rank"] for r in status["ranks"]] == [0, 1]
        assert {r["phase"] for r in status["ranks"]} <= {"idle", "forward", "backward", "optimizer", "hooks", "snapshot"}
        assert len(status["daemons"]) == 1 and "error" not in status["daemons"][0]
        snap = subprocess.run(plait("snapshot", str(run_dir)), capture_output=True, text=True, timeout=120)
        assert snap.returncode == 0, snap.stderr
        assert "snapshot of step" in snap.stdout and "taken" in snap.stdout
        stop = subprocess.run(plait("stop", str(run_dir), "--snapshot"), capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert "checkpoint of step" in stop.stdout
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["status"] == "stopped" and f"after step {stopped}" in summary["error"] and stopped < 60
    assert summary["snapshot"]["taken"] >= 1
    assert not (run_dir / "control.json").exists()
    assert "finished: stopped" in subprocess.run(plait("status", str(run_dir)), capture_output=True, text=True).stdout
    checkpoint = next((run_dir / "checkpoints").glob(f"*/step-{stopped:08d}"))

    resumed, straight = tmp_path / "b", tmp_path / "c"
    # the two runs at once (their losses do not depend on timing): each leaves the cores idle while it starts
    both = [subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(resumed), "--resume",
                                   str(checkpoint), "--set", "train.steps=60", "snapshot.every=50"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(straight), "--set",
                                   "train.steps=60"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    try:
        for run in both:
            out, _ = run.communicate(timeout=600)
            assert run.returncode == 0, out
    finally:
        for run in both:
            run.kill()
    b = json.loads((resumed / "summary.json").read_text())
    c = json.loads((straight / "summary.json").read_text())
    assert c["losses"][:stopped] == summary["losses"]  # the stopped run trained what the straight one did
    assert b["losses"] == c["losses"]  # the resumed run's history: the stopped part, then the same steps bitwise


def test_a_slow_rank_is_named_and_refused_commands_say_why(config, tmp_path):
    run_dir = tmp_path / "slow"
    log = tmp_path / "launcher.log"
    sets = ["--set", "train.steps=400", "control.heartbeat_s=0.2", "control.straggler_window=8"]
    with log.open("w") as sink:
        proc = subprocess.Popen(plait("train", "--config", str(config), "--run-dir", str(run_dir),
                                      "--fault", "slow-rank:rank=1:factor=6", *sets), stdout=sink, stderr=subprocess.STDOUT)
        try:
            status = _wait_for(run_dir, proc, lambda s: bool(s["stragglers"]), timeout=240)
            assert [(s["rank"], s["node"], s["cause"]) for s in status["stragglers"]] == [(1, 0, "compute")]
            named = status["stragglers"][0]
            assert named["excess_s"] > named["threshold_s"] > 0
            assert "straggler: rank 1 on node 0: compute" in render(status)  # what plait status prints of it
            # the coordinator's /metrics says so too (each scrape tests the window anew: a loaded machine's
            # noise may hide the rank from one window, so a few scrapes are allowed)
            url = json.loads((run_dir / "control.json").read_text())["metrics"]
            gauge = f'plait_straggler{{cause="compute",job="{run_dir.name}",node="0",rank="1"}} 1.0'
            for _ in range(20):
                with urllib.request.urlopen(url, timeout=10) as reply:
                    scraped = reply.read().decode()
                if gauge in scraped:
                    break
                time.sleep(0.5)
            assert gauge in scraped and 'plait_rank_compute_seconds{job="slow",node="0",rank="0"}' in scraped
            address = json.loads((run_dir / "control.json").read_text())["address"]
            secret = os.environ.get("PLAIT_SNAPSHOT_SECRET_FILE") or str(run_dir / "secret")  # the job's
            by_address = subprocess.run(plait("status", address, "--secret-file", secret, "--json"),
                                        capture_output=True, text=True, timeout=60)
            assert by_address.returncode == 0 and json.loads(by_address.stdout)["job"] == "slow", by_address.stderr
            watch = subprocess.Popen(plait("status", str(run_dir), "--watch", "0.5"), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
            for command in (["snapshot", str(run_dir)], ["stop", str(run_dir), "--snapshot"]):
                refused = subprocess.run(plait(*command), capture_output=True, text=True, timeout=60)
                assert refused.returncode == 2 and "snapshot.every=0" in refused.stderr, refused.stderr
            stop = subprocess.run(plait("stop", str(run_dir)), capture_output=True, text=True, timeout=120)
            assert stop.returncode == 0 and "stopped after step" in stop.stdout, stop.stderr
            proc.wait(timeout=120)
            watched, _ = watch.communicate(timeout=60)  # --watch ends by itself with the job
            assert watch.returncode == 0 and watched.count("job slow: 2/2 ranks") >= 2, watched
            assert watched.rstrip().endswith("the job has ended (its coordinator is gone)"), watched[-500:]
        finally:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "rank 1 on node 0 is a straggler: its compute" in log.read_text()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"


def test_a_hang_is_found_reported_with_stacks_and_restarted_bitwise(config, tmp_path):
    """Rank 1 stops after step 12 (in Python, reporting on); rank 0 waits in the next collective."""
    run_dir, straight = tmp_path / "hung", tmp_path / "straight"
    sets = ["--set", "snapshot.every=5", "control.heartbeat_s=0.2", "control.hang_min_s=3", "control.hang_factor=10"]
    done = subprocess.run(plait("train", "--config", str(config), "--run-dir", str(run_dir), "--fault",
                                "hang:rank=1:step=12", *sets), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("plait: hang:"))
    assert "after step 12" in line and "stuck outside any collective: rank 1 (node 0" in line, line
    assert "rank 0 waiting in world:all_reduce" in line or "rank 0 waiting in" in line, line
    assert "killed rank 1 for a restart" in line, line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1 and len(summary["hangs"]) == 1
    hang = summary["hangs"][0]
    assert hang["killed"] == [1] and hang["timeout_s"] >= 3.0 and hang["since_s"] > hang["timeout_s"]
    # found within the timeout: the coordinator looks every 2 s and the reports come every 0.2 s
    assert hang["since_s"] < hang["timeout_s"] + 4.0
    stacks = (run_dir / "stacks" / "rank1.txt").read_text()
    assert "most recent call first" in stacks and "local.py" in stacks  # where it hung: the fault's wait
    assert "most recent call first" in (run_dir / "stacks" / "rank0.txt").read_text()
    subprocess.run(plait("train", "--config", str(config), "--run-dir", str(straight)), check=True,
                   capture_output=True, timeout=600)
    assert summary["losses"] == json.loads((straight / "summary.json").read_text())["losses"]


def test_commands_for_no_job_say_so(tmp_path):
    missing = subprocess.run(plait("status", str(tmp_path)), capture_output=True, text=True)
    assert missing.returncode == 2 and "control.json" in missing.stderr
    bad = subprocess.run(plait("stop", "nowhere"), capture_output=True, text=True)
    assert bad.returncode == 2 and "neither a directory nor HOST:PORT" in bad.stderr
    address = subprocess.run(plait("status", "127.0.0.1:1"), capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert address.returncode == 2 and "--secret-file" in address.stderr
