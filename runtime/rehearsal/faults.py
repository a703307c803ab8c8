"""Faults on a rehearsed cluster: the executor of ``plait train --cluster``, and its helper inside a namespace.

The kinds act as on one machine, with what a namespace per node changes:

- ``kill-node`` kills everything in the node's namespace (its agent, daemon and
  workers) and deletes its shared memory, as losing the machine would; then the
  rehearsal starts the node again (a replacement machine), which rejoins the rendezvous.
- the daemons are started by the nodes' agents, not by this process: they are found
  through their pid and ready files, and the agent replaces one that dies;
- a daemon listens on its node's address, which only the namespaces reach: a corrupt-*
  fault runs its client in the node's namespace (``python -m
  plait.runtime.rehearsal.faults``), printing its verified effect as JSON;
- ``link-down:node=N:step=S[:seconds=T]`` takes the node's link down for T seconds
  (collectives stall; TCP retransmits and they recover), ``slow-link:node=N:factor=F``
  divides its shaped rate by F, from step S or from the start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from plait.scheduler.placement import Placement
from plait.runtime.faults import executor as base
from plait.runtime.faults.executor import FaultExecutor, FaultFailed
from plait.runtime.faults.spec import Fault


REPLACEMENT_WAIT_S = 60.0  # a replacement daemon is serving within seconds; a minute is an agent that gave up


class NodeDaemon:
    """A node's daemon as this process sees it: a pid, no child of ours."""

    def __init__(self, pid: int, node: int):
        self.pid = pid
        self.node = node

    def wait(self, timeout: float) -> int:
        """Until the process is gone; its exit status is its parent's (the node's agent) to read, so a process gone
        after our SIGKILL is reported as -SIGKILL."""
        base._wait_state([self.pid], base._gone, "gone after SIGKILL", timeout=timeout)
        return -signal.SIGKILL


class NodeDaemons:
    """What the executor reads of a daemon set, for daemons that the nodes' agents run."""

    def __init__(self, run_dir: Path, job: str, nnodes: int, addresses: list[str]):
        self.run_dir = run_dir
        self.job = job
        self.nnodes = nnodes
        self.hosts = addresses

    @property
    def procs(self) -> list[NodeDaemon | None]:
        from plait.runtime.snapshot.launcher.supervisor import pid_file

        found: list[NodeDaemon | None] = []
        for node in range(self.nnodes):
            try:
                found.append(NodeDaemon(int(pid_file(self.run_dir, node).read_text()), node))
            except (OSError, ValueError):
                found.append(None)
        return found

    @property
    def addresses(self) -> list[str]:
        from plait.runtime.snapshot.launcher.spawn import daemon_files

        out = []
        for node, host in enumerate(self.hosts):
            ready, _ = daemon_files(self.run_dir, self.job, node)
            try:
                out.append(f"{host}:{json.loads(ready.read_text())['port']}")
            except (OSError, ValueError, KeyError):
                out.append(f"{host}:0")
        return out

    def replacements_held(self):
        return contextlib.nullcontext()  # each node's agent replaces its own daemon


class RehearsalFaults(FaultExecutor):
    def __init__(self, faults: list[Fault], *, run_dir: Path, world: int, placement: Placement, net, rehearsal,
                 agents, job: str):
        from plait.runtime.snapshot.auth import SECRET_ENV

        secret = Path(os.environ[SECRET_ENV]) if os.environ.get(SECRET_ENV) else run_dir / "secret"
        nnodes = rehearsal.spec.nnodes
        super().__init__(faults, run_dir=run_dir, world=world, per_node=placement.per_node,
                         daemons=NodeDaemons(run_dir, job, nnodes, [net.address(n) for n in range(nnodes)]),
                         secret_file=secret, placement=placement)
        self.net = net
        self.rehearsal = rehearsal
        self.agents = agents
        self.job = job
        self._timers: list[threading.Timer] = []

    def start(self) -> None:
        super().start()
        for f in self.faults:
            if f.point == "start":  # a slow link from the beginning: in place before any worker starts
                effect = self._slow_link(f)
                print(f"plait: fault injected: {f} (verified: {base._brief(effect)})", flush=True)

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        super().stop()

    def _daemon(self, node: int) -> NodeDaemon:
        """The node's live daemon; one its agent is replacing right now is waited for (bounded), not signalled dead."""
        deadline = time.monotonic() + REPLACEMENT_WAIT_S
        while True:
            daemon = self.daemons.procs[node]
            if daemon is not None and not base._gone(base.process_state(daemon.pid)):
                return daemon
            if time.monotonic() > deadline:
                raise FaultFailed(f"node {node} has no live snapshot daemon (its agent did not replace it within "
                                  f"{REPLACEMENT_WAIT_S:.0f} s)")
            time.sleep(0.05)

    def _carry_out(self, f: Fault, pids: dict[int, int]) -> dict[str, Any]:
        if f.kind == "link-down":
            return self._link_down(f)
        if f.kind == "slow-link":
            return self._slow_link(f)
        return super()._carry_out(f, pids)

    def _link_state(self, node: int) -> str:
        from plait.runtime.rehearsal.namespaces import ip

        text = ip(self.net.namespace(node), "link", "show", self.net.ifname)
        return "DOWN" if "state DOWN" in text or ",UP" not in text.split(">")[0] else "UP"

    def _link_down(self, f: Fault) -> dict[str, Any]:
        self.net.set_link(f.target, False)
        if self._link_state(f.target) != "DOWN":
            raise FaultFailed(f"node {f.target}'s link is still up after it was set down")
        timer = threading.Timer(f.down_seconds, self._link_up, args=(f.target,))
        self._timers.append(timer)
        timer.start()
        return {"node": f.target, "link": "down", "seconds": f.down_seconds}

    def _link_up(self, node: int) -> None:
        self.net.set_link(node, True)
        print(f"plait: fault: node {node}'s link is up again", flush=True)

    def _slow_link(self, f: Fault) -> dict[str, Any]:
        rate = self.rehearsal.rate_bit_s(f.target) / f.factor
        self.net.set_rate(f.target, rate)
        return {"node": f.target, "rate_bit_s": round(rate), "factor": f.factor}

    def _kill_node(self, node: int, pids: dict[int, int]) -> dict[str, Any]:
        """Everything in the node's namespace, then its memory; the rehearsal starts the node again afterwards."""
        from plait.runtime.snapshot import shm

        with self.agents.lock:
            self.agents.to_replace.add(node)
            killed = self.net.kill_all(node)
            removed = shm.remove_namespace(self.job, node)
            left = [p.name for p in shm.list_namespace(self.job, node) if p.name != shm.lock_name(self.job, node)]
        workers = {str(r): pids[r] for r in self.placement.ranks_on(node)}
        base._wait_state(list(workers.values()), base._gone, "gone with their node")
        if left:
            raise FaultFailed(f"node {node}'s shared memory still holds {left}")
        return {"killed_pids": len(killed), "killed_workers": workers, "segments_removed": removed, "segments_left": 0}

    def _in_namespace(self, kind: str, node: int) -> dict[str, Any]:
        address = self.daemons.addresses[node]
        cmd = self.net.exec_prefix(node) + [sys.executable, "-m", "plait.runtime.rehearsal.faults", kind,
                                            "--node", str(node), "--address", address,
                                            "--secret-file", str(self.secret_file)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=base.COMPLETE_TIMEOUT_S + 60)
        try:
            reply = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise FaultFailed(f"{kind} in node {node}'s namespace exited with {done.returncode}: "
                              f"{done.stderr.strip()[-2000:]}") from None
        if "error" in reply:
            raise FaultFailed(reply["error"])
        return reply

    def _corrupt_shard(self, node: int) -> dict[str, Any]:
        return self._in_namespace("corrupt-shard", node)

    def _corrupt_parity(self, node: int) -> dict[str, Any]:
        return self._in_namespace("corrupt-parity", node)


def main(argv: list[str] | None = None) -> int:
    """Inside a node's namespace: corrupt a piece its daemon holds; print the verified effect (or the error) as JSON."""
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.transport.client import DaemonClient

    parser = argparse.ArgumentParser(prog="python -m plait.runtime.rehearsal.faults")
    parser.add_argument("kind", choices=("corrupt-shard", "corrupt-parity"))
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        with DaemonClient(args.address, secret=JobSecret.load(args.secret_file)) as client:
            if args.kind == "corrupt-shard":
                effect = base.corrupt_shard(client, args.node)
            else:  # node 0 hosts the rendezvous: the rehearsal never loses it
                effect = base.corrupt_parity(client, args.node, spare=frozenset({0}))
    except FaultFailed as err:
        effect = {"error": str(err)}
    print(json.dumps(effect), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
