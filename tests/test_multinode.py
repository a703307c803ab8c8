"""One agent per node: `plait train --nnodes N --node-rank R --rdzv HOST:PORT`, and `parallel.placement`.

The nodes here are processes on loopback (the rehearsal in network namespaces is in
test_rehearsal.py); what is tested is the per-node code path: the rendezvous store, the
leader's job record, daemons found through the store, ranks from the placement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.errors import ConfigError
from plait.scheduler.placement import Placement
from plait.runtime.snapshot.launcher.spawn import free_ports

TINY = """
model: {kind: moe, layers: 2, dim: 64, heads: 4, ffn_dim: 128, vocab: 256, seq_len: 64, experts: 4, top_k: 2}
train: {steps: 6, global_batch: 8, micro_batch: 2, lr: 3.0e-3, warmup_steps: 2, seed: 7, eval_every: 0, eval_batches: 1}
data: {max_bytes: 3000000}
parallel: {ep: 2}
launch: {nproc: 4, join_timeout: 120}
"""


def plait(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait.runtime.cli", *args]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


def start_nodes(config: Path, run_dir: Path, nnodes: int = 2, per_node: int | None = 2,
                sets: list[list[str]] | None = None) -> dict[int, subprocess.Popen]:
    """Start every node's `plait train` (node nnodes-1 first: the host need not be node 0); ``per_node`` None:
    no --nproc-per-node (the config's launch.nproc counts every node's workers)."""
    port = free_ports(1)[0]
    procs = {}
    for node in reversed(range(nnodes)):
        extra = ["--set", *sets[node]] if sets and sets[node] else []
        if per_node is not None:
            extra += ["--nproc-per-node", str(per_node)]
        procs[node] = subprocess.Popen(
            plait("train", "--config", str(config), "--nnodes", str(nnodes), "--node-rank", str(node),
                  "--rdzv", f"127.0.0.1:{port}", "--run-dir", str(run_dir), *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return procs


def run_nodes(config: Path, run_dir: Path, nnodes: int = 2, per_node: int | None = 2, sets: list[list[str]] | None = None,
              timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start every node's `plait train` and wait for all."""
    procs = start_nodes(config, run_dir, nnodes, per_node, sets)
    done = []
    for node in range(nnodes):
        out, _ = procs[node].communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(procs[node].args, procs[node].returncode, out, ""))
    return done


def losses(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "summary.json").read_text())["losses"]


@pytest.fixture(scope="module")
def one_agent(config, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    done = subprocess.run(plait("train", "--config", str(config), "--run-dir", str(run_dir)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return losses(run_dir)


def test_two_agents_train_bitwise_like_one(config, one_agent, tmp_path):
    run_dir = tmp_path / "run"
    done = run_nodes(config, run_dir, per_node=None)  # launch.nproc: 4 over 2 nodes
    for node, proc in enumerate(done):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout}"
        assert f"plait: node {node} of 2 at 127.0.0.1" in proc.stdout
    assert sum("hosting the rendezvous" in p.stdout for p in done) == 1
    assert losses(run_dir) == one_agent  # the same layout, so the same bits
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["node0", "node1"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["run_id"].startswith("run-")


def test_the_leaders_coordinator_hears_every_node_and_stops_them_all(config, tmp_path):
    """The leader starts the coordinator on its address; the other node's workers report to it; plait stop ends both."""
    run_dir = tmp_path / "run"
    sets = ["train.steps=2000", "control.heartbeat_s=0.2"]
    procs = start_nodes(config, run_dir, sets=[sets, sets])
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs.values()), "a node ended before every rank reported"
            if (run_dir / "control.json").exists():
                done = subprocess.run(plait("status", str(run_dir), "--json"), capture_output=True, text=True)
                status = json.loads(done.stdout) if done.returncode == 0 else None
                if status and status["registered"] == 4 and all(r["step"] >= 1 for r in status["ranks"]):
                    break
            time.sleep(0.5)
        assert status and status["nodes"] == [0, 1] and [r["node"] for r in status["ranks"]] == [0, 0, 1, 1], status
        stop = subprocess.run(plait("stop", str(run_dir)), capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and "stopped after step" in stop.stdout, stop.stdout + stop.stderr
        outs = {node: p.communicate(timeout=120)[0] for node, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    assert all(p.returncode == 0 for p in procs.values()), outs
    # the leader (whichever node hosts the rendezvous store; node 1 starts first here) runs the coordinator
    leaders = [n for n, out in outs.items() if "hosting the rendezvous" in out]
    assert len(leaders) == 1 and [n for n, out in outs.items() if "coordinator at 127.0.0.1:" in out] == leaders
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"


def test_placement_moves_ranks_not_results(config, one_agent, tmp_path):
    """Ranks 0 and 3 on node 1, 1 and 2 on node 0: the same layout, so the same losses; snapshots follow the placement."""
    run_dir = tmp_path / "run"
    sets = ["parallel.placement=[1,0,0,1]", "snapshot.every=2", "snapshot.ec_k=1", "snapshot.ec_m=1"]
    done = run_nodes(config, run_dir, sets=[sets, sets])
    for node, proc in enumerate(done):
        assert proc.returncode == 0, f"node {node}:\n{proc.stdout}"
    assert "plait: done" in done[1].stdout  # node 1 runs rank 0: its terminal shows the progress
    assert "its workers finished" not in done[1].stdout
    assert losses(run_dir) == one_agent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["snapshot"]["taken"] == 2 and summary["snapshot"]["published"] >= 1  # steps 2 and 4


def test_a_node_with_another_config_is_refused(config, tmp_path):
    """Whichever node hosts the store leads; the other, started with another lr, is refused and says where they differ."""
    procs = start_nodes(config, tmp_path / "run", sets=[[], ["train.lr=1e-3"]])
    deadline = time.monotonic() + 120
    try:
        while all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "neither node stopped"
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()  # the leader would wait at the rendezvous until launch.join_timeout
    refused = [p for p in procs.values() if p.returncode == 1]
    assert len(refused) == 1
    out = refused[0].communicate()[0]
    assert "differs from the leader's" in out and "lr" in out


def test_two_nodes_with_one_node_rank_fail_saying_so(config, tmp_path):
    port = free_ports(1)[0]
    procs = [subprocess.Popen(plait("train", "--config", str(config), "--nnodes", "2", "--node-rank", "0",
                                    "--nproc-per-node", "2", "--rdzv", f"127.0.0.1:{port}", "--run-dir",
                                    str(tmp_path / f"run{i}")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 1 for p in procs), outs
    logs = "".join(f.read_text(errors="replace") for f in tmp_path.rglob("*.log")) + "".join(outs)
    assert "is claimed twice" in logs and "every node needs its own --node-rank" in logs
    # every other worker left on the agent's SIGTERM (none sat in a store call until its SIGKILL 30 s later)
    assert "forcefully exiting via 9" not in logs, logs[-3000:]


def torchrun(node: int, port: int, config: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "plaittest",
         "-m", "plait.runtime.worker", "--config", str(config), "--run-dir", str(run_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def test_a_coordinator_started_by_hand_serves_the_users_torchrun(config, tmp_path):
    """plait coordinator, then torchrun on two nodes with its two variables: status sees all 4, stop ends them."""
    control = tmp_path / "control"
    coordinator = subprocess.Popen(plait("coordinator", "--run-dir", str(control), "--world", "4"),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = []
    try:
        line = next(x for x in coordinator.stdout if x.startswith("plait: give the workers: export"))
        env = dict(kv.split("=", 1) for kv in line.split("export", 1)[1].split())
        assert set(env) == {"PLAIT_CONTROL", "PLAIT_SNAPSHOT_SECRET_FILE"}
        port = free_ports(1)[0]
        procs = [torchrun(node, port, config, tmp_path / "run", "--set", "train.steps=5000", "control.heartbeat_s=0.2",
                          env=env) for node in (0, 1)]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "torchrun ended before every rank reported"
            done = subprocess.run(plait("status", str(control), "--json"), capture_output=True, text=True)
            if done.returncode == 0 and json.loads(done.stdout)["registered"] == 4:
                break
            time.sleep(0.5)
        status = json.loads(done.stdout)
        assert status["registered"] == 4 and status["nodes"] == [0, 1], status
        stop = subprocess.run(plait("stop", str(control)), capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and "stopped after step" in stop.stdout, stop.stdout + stop.stderr
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stopped"
    finally:
        for p in procs:
            p.kill()
        coordinator.send_signal(signal.SIGINT)
        rest, _ = coordinator.communicate(timeout=30)
    assert coordinator.returncode == 0 and "coordinator stopped" in rest
    assert not (control / "control.json").exists()


def test_the_users_own_torchrun_trains(config, one_agent, tmp_path):
    """The README's command: torchrun on each node, plait's worker as the module; no plait train anywhere."""
    port = free_ports(1)[0]
    procs = [torchrun(node, port, config, tmp_path / "run") for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for node, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, f"torchrun node {node}:\n{out}"
    assert losses(tmp_path / "run") == one_agent
    assert "launch:\n  nproc: 4\n  nnodes: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_torchrun_says_what_snapshots_miss(config, tmp_path):
    port = free_ports(1)[0]
    procs = [torchrun(node, port, config, tmp_path / "run", "--set", "snapshot.every=2") for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "nothing started this node's snapshot daemon" in "".join(outs)


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "2"], "needs all of"),
    (["--nnodes", "3", "--node-rank", "0", "--rdzv", "127.0.0.1:1"], "must be a multiple of launch.nnodes=3"),
    (["--nnodes", "2", "--node-rank", "2", "--nproc-per-node", "2", "--rdzv", "127.0.0.1:1"], "--node-rank: got 2"),
    (["--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "2", "--rdzv", "nohost"], "--rdzv: got 'nohost'"),
    (["--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "2", "--rdzv", "127.0.0.1:1",
      "--fault", "kill-worker:rank=0:step=2"], "--fault"),
])
def test_node_flags_are_checked(config, args, message):
    done = subprocess.run(plait("train", "--config", str(config), *args), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_placement_maps_ranks():
    p = Placement.resolve([1, 0, 0, 1], world=4, nnodes=2)
    assert p.ranks_on(0) == [1, 2] and p.ranks_on(1) == [0, 3]
    assert [p.rank_of(1, 0), p.rank_of(1, 1), p.rank_of(0, 0)] == [0, 3, 1]
    assert [p.local_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [p.slot(r) for r in range(4)] == [2, 0, 1, 3]
    assert not p.is_contiguous
    default = Placement.resolve(None, world=6, nnodes=3)
    assert default.nodes == (0, 0, 1, 1, 2, 2) and default.is_contiguous
    with pytest.raises(ValueError):
        p.rank_of(0, 2)


@pytest.mark.parametrize("value, words", [
    ([0, 0, 1], "one node per rank: 4 entries"),
    ([0, 0, 1, 2], "names node(s) [2]"),
    ([0, 0, 0, 1], "exactly 2 ranks (node 0: 3, node 1: 1)"),
    ([0, "a", 1, 1], "a list of node numbers"),
    ("0011", "a list of node numbers"),
])
def test_bad_placements_are_named(value, words):
    with pytest.raises(ConfigError) as err:
        Placement.resolve(value, world=4, nnodes=2)
    assert err.value.key == "parallel.placement"
    assert words in str(err.value)


def test_the_store_host_is_the_machine_holding_the_address():
    from plait.runtime.agent.rendezvous import Endpoint, node_address, owns

    assert owns("127.0.0.1") and owns("localhost")
    assert not owns("198.18.255.254")  # a benchmarking-range address no interface here holds
    assert node_address(Endpoint.parse("127.0.0.1:29400")) == "127.0.0.1"
