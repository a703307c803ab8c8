"""Faults against real processes: `plait train --nnodes 3` with daemons, kill -9, lost nodes, corrupt shards.

Every run's losses must be bitwise those of the fault-free run (floats compare exactly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.runtime.faults import random_faults
from plait.runtime.snapshot import shm

CONFIG = """
model: {kind: moe, layers: 2, dim: 64, heads: 4, ffn_dim: 128, vocab: 256, seq_len: 64, experts: 4, top_k: 2}
train: {steps: 12, global_batch: 6, micro_batch: 2, lr: 3.0e-3, warmup_steps: 3, seed: 11, eval_every: 6, eval_batches: 1}
data: {max_bytes: 2000000}
metrics: {enabled: false}
snapshot: {every: 2, ec_k: 2, ec_m: 1, disk_every: 2}
"""
EVERY = 2
NODES = 3
# Steps a crash may cost. A snapshot taken at step t completes (copy, commit, parity pushes, publish) off the
# training thread while step t+1 runs, so a crash right after t+1 may find only the one before complete:
# every + 1 steps. REPLAY_BOUND allows one whole interval more than that lag could ever need here.
REPLAY_BOUND = 2 * EVERY


def plait(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait.runtime.cli", *args]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "faults.yaml"
    path.write_text(CONFIG)
    return path


def train(config: Path, run_dir: Path, *faults: str, extra: tuple[str, ...] = ()) -> tuple[dict, str]:
    done = subprocess.run(
        plait("train", "--config", str(config), "--run-dir", str(run_dir), "--nnodes", str(NODES), "--nproc-per-node", "1",
              *[a for f in faults for a in ("--fault", f)], *extra),
        capture_output=True, text=True, timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return json.loads((run_dir / "summary.json").read_text()), output


@pytest.fixture(scope="module")
def baseline(config, tmp_path_factory) -> dict:
    summary, _ = train(config, tmp_path_factory.mktemp("base") / "run")
    assert summary["restarts"] == 0 and summary["steps_replayed"] == 0 and summary["recoveries"] == []
    assert summary["snapshot"]["taken"] >= 5 and summary["snapshot"]["published"] >= 5
    return summary


def _no_leftover_memory(run_dir: Path) -> None:
    from plait.runtime.snapshot.trainer.hook import job_name

    job = job_name(run_dir)
    assert not [p for p in os.listdir(shm.segment_root()) if p.startswith(f"plait.{job}.")], "shared memory left behind"


def _same(summary: dict, baseline: dict) -> None:
    assert summary["status"] == "completed"
    assert summary["losses"] == baseline["losses"]  # bitwise
    assert summary["grad_norms"] == baseline["grad_norms"]
    assert summary["eval_losses"] == baseline["eval_losses"]


@pytest.mark.parametrize(
    "fault, restarts, rebuilt_ranks",
    [
        ("kill-worker:rank=1:step=5", 1, []),
        ("kill-node:node=2:step=7", 1, [2]),
        ("corrupt-shard:node=1:step=6", 1, [1]),
        ("kill-daemon:node=0:step=5", 0, []),
    ],
)
def test_a_single_fault_leaves_the_losses_bitwise_unchanged(config, baseline, tmp_path, fault, restarts, rebuilt_ranks):
    run_dir = tmp_path / "run"
    summary, output = train(config, run_dir, fault)
    assert summary["faults"] == [fault]
    _same(summary, baseline)
    assert summary["restarts"] == restarts
    assert 0 <= summary["steps_replayed"] <= REPLAY_BOUND
    if restarts:
        (rec,) = summary["recoveries"]
        assert rec["source"] == "memory", rec
        assert rec["ranks"].get("rebuild", []) == rebuilt_ranks
        assert "plait: restore: step" in output
        if rebuilt_ranks:
            assert "rebuilt from the group's data and parity" in output
    else:
        assert "starting a fresh one" in output  # the daemon was replaced and training went on
    _no_leftover_memory(run_dir)


def test_losing_more_nodes_than_parity_falls_back_to_disk(config, baseline, tmp_path):
    run_dir = tmp_path / "run"
    summary, output = train(config, run_dir, "kill-node:node=0:step=7", "kill-node:node=1:step=7")
    assert summary["faults"] == ["kill-node:node=0:step=7", "kill-node:node=1:step=7"]
    _same(summary, baseline)
    (rec,) = summary["recoveries"]
    assert rec["source"] == "disk" and rec["step"] == 4  # disk every 2 snapshots of every 2 steps
    assert rec["replayed"] == 3
    assert "from the disk tier" in output


def _random_trial(config: Path, baseline: dict, run_dir: Path, seed: int) -> None:
    (fault,) = random_faults(seed, count=1, world=NODES, nnodes=NODES, steps=12, every=EVERY)
    summary, output = train(config, run_dir, str(fault))
    assert summary["faults"] == [str(fault)]
    _same(summary, baseline)
    assert summary["steps_replayed"] <= REPLAY_BOUND, (fault, summary["recoveries"])


@pytest.mark.parametrize("seed", [101, 202])
def test_random_fault(config, baseline, tmp_path, seed):
    _random_trial(config, baseline, tmp_path / "run", seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_random_fault_many(config, baseline, tmp_path, seed):
    _random_trial(config, baseline, tmp_path / "run", 1000 + seed)
