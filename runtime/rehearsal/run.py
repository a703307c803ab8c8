"""``plait train --cluster FILE``: a cluster rehearsed on one machine, each node a real per-node agent.

Every emulated node gets a network namespace with its own address and shaped link
(:mod:`plait.runtime.rehearsal.net`), and runs ``plait train --nnodes N --node-rank R
--rdzv <node 0>:PORT`` inside it: the code path of a real cluster, over links whose
speeds keep the described cluster's ratio of compute to communication. This process
only builds the network, starts the nodes, injects faults, replaces a node a fault
killed (as a scheduler would), and removes everything on exit, on failure, and, through
a watchdog process, after a SIGKILL of this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from plait.errors import LaunchError
from plait.runtime.config import JobConfig, dump_config
from plait.runtime.rehearsal.net import Network
from plait.runtime.rehearsal.plan import Rehearsal, cluster_tag, rehearse
from plait.scheduler.cluster import ClusterSpec, node_table

RDZV_PORT = 29400  # free in a namespace made for this job
STOP_TIMEOUT_S = 20.0


class NodeAgents:
    """The per-node ``plait train`` processes, each inside its namespace."""

    def __init__(self, net: Network, rehearsal: Rehearsal, *, config_file: Path, run_dir: Path, env: dict[str, str],
                 terminal_node: int, extra: list[str]):
        self.net = net
        self.spec = rehearsal.spec
        self.config_file = config_file
        self.run_dir = run_dir
        self.env = env
        self.terminal_node = terminal_node
        self.extra = extra
        self.procs: dict[int, subprocess.Popen] = {}
        self.replaced: dict[int, int] = {}
        self.to_replace: set[int] = set()  # nodes a fault killed, to start again
        self.lock = threading.Lock()  # held by a fault while it kills a node: no replacement starts in between

    def log_file(self, node: int) -> Path:
        return self.run_dir / "logs" / f"agent-node{node}.log"

    def start(self, node: int) -> None:
        spec = self.spec
        cmd = self.net.exec_prefix(node) + [
            sys.executable, "-m", "plait.runtime.cli", "train", "--config", str(self.config_file),
            "--nnodes", str(spec.nnodes), "--node-rank", str(node), "--nproc-per-node", str(spec.workers_per_node),
            "--rdzv", f"{self.net.address(0)}:{RDZV_PORT}", "--node-addr", self.net.address(node),
            "--run-dir", str(self.run_dir), *self.extra,
        ]
        env = {**os.environ, **self.env, "GLOO_SOCKET_IFNAME": self.net.ifname}
        if node == self.terminal_node:
            self.procs[node] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        else:
            path = self.log_file(node)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as out:
                self.procs[node] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT)

    def wait(self) -> None:
        """Until every node's agent exits; a node a fault killed is started again; a failed one stops the job."""
        while True:
            with self.lock:
                for node in sorted(self.to_replace):
                    self.to_replace.discard(node)
                    self.procs[node].wait()
                    self.replaced[node] = self.replaced.get(node, 0) + 1
                    print(f"plait: rehearsal: starting node {node} again (a replacement machine)", flush=True)
                    self.start(node)
                codes = {n: p.poll() for n, p in self.procs.items()}
                failed = {n: c for n, c in codes.items() if c not in (None, 0) and n not in self.to_replace}
            if failed:
                node, code = min(failed.items())
                where = "this terminal" if node == self.terminal_node else str(self.log_file(node))
                raise LaunchError(f"node {node}'s plait train exited with code {code}; its output: {where}")
            if all(c == 0 for c in codes.values()):
                return
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prepare(spec: ClusterSpec, *, measured_flops: float | None = None) -> Rehearsal:
    return rehearse(spec, cluster_tag(spec.name), measured_flops=measured_flops)


def train_cluster(config: JobConfig, rehearsal: Rehearsal, *, run_dir: Path, faults: list, extra: list[str]) -> None:
    """Run the job on the rehearsed cluster until every node's agent finished."""
    from plait.runtime.rehearsal import owners
    from plait.runtime.rehearsal.namespaces import require_root
    from plait.runtime.rehearsal.watchdog import start_watchdog
    from plait.runtime.snapshot import shm
    from plait.runtime.snapshot.trainer.hook import job_name

    require_root()
    reaped = owners.reap_stale()
    if reaped:
        print(f"plait: rehearsal: removed {len(reaped)} namespace(s) left by a job that died: {', '.join(reaped)}",
              flush=True)
    spec = rehearsal.spec
    net = Network(rehearsal.plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = job_name(run_dir)

    def remove_memory() -> None:  # what the nodes' daemons held, once nothing runs any more
        for node in range(spec.nnodes):
            shm.remove_namespace(job, node, lock_too=True)

    net.up()
    watchdog = start_watchdog(net, after=remove_memory)
    agents = None
    executor = None
    try:
        addresses = [net.address(n) for n in range(spec.nnodes)]
        print(node_table(spec, rehearsal.scale, addresses, latency_emulated=net.latency_emulated), flush=True)
        _record(run_dir, rehearsal, net, addresses)
        config_file = run_dir / "rehearsal-config.yaml"
        config_file.write_text(dump_config(config))
        from plait.runtime.peak import cpu_peak_flops

        # TORCH_CPP_LOG_LEVEL: c10d warns on every connection that 198.18.x.y has no reverse DNS name.
        env = {"PLAIT_MACHINE_NODES": str(spec.nnodes), "PLAIT_REHEARSAL": rehearsal.plan.tag, "PYTHONUNBUFFERED": "1",
               "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")}
        if not config.metrics.peak_flops:
            env["PLAIT_PEAK_FLOPS"] = repr(cpu_peak_flops(spec.world))
        if faults:
            env["PLAIT_FAULTS"] = json.dumps([str(f) for f in faults])
        placement = config.parallel.placement_of(config.launch.nproc, spec.nnodes)
        agents = NodeAgents(net, rehearsal, config_file=config_file, run_dir=run_dir, env=env,
                            terminal_node=placement.node_of(0), extra=extra)
        if faults:
            from plait.runtime.rehearsal.faults import RehearsalFaults

            executor = RehearsalFaults(faults, run_dir=run_dir, world=config.launch.nproc, placement=placement,
                                       net=net, rehearsal=rehearsal, agents=agents, job=job)
            executor.start()
        for node in range(spec.nnodes):  # node 0 first: it hosts the rendezvous store
            agents.start(node)
        agents.wait()
    finally:
        if executor is not None:
            executor.stop()
        if agents is not None:
            agents.stop()
        net.down()
        remove_memory()
        watchdog.close()


def _record(run_dir: Path, rehearsal: Rehearsal, net: Network, addresses: list[str]) -> None:
    """``rehearsal.json``: what was rehearsed and how (the scale above all), beside the run's summary."""
    spec, scale = rehearsal.spec, rehearsal.scale
    record = {
        "cluster": spec.name, "source": str(spec.source) if spec.source else None, "tag": rehearsal.plan.tag,
        "scale": {"value": scale.value, "source": scale.source, "worker_flops": scale.worker_flops,
                  "device_flops": scale.device_flops},
        "latency_emulated": net.latency_emulated,
        "nodes": [{"node": n.rank, "name": n.name, "address": addresses[n.rank], "nic": n.nic.name,
                   "described_gbit": n.nic.gbit, "shaped_bit_s": rehearsal.rate_bit_s(n.rank), "group": n.group}
                  for n in spec.nodes],
        "uplinks": [{"groups": list(u.groups), "described_gbit": u.gbit, "shaped_bit_s": link.rate_bit_s}
                    for u, link in zip(spec.uplinks, rehearsal.plan.uplinks)],
    }
    (run_dir / "rehearsal.json").write_text(json.dumps(record, indent=2))
