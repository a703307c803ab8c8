"""``plait train``'s side of the daemons: one per (emulated) node, restarted when one dies.

On one machine, ``--nnodes N`` gives N daemons, each with its own port and its own
shared-memory namespace ``plait.<job>.n<node>.*``. A daemon that dies (a crash, or
``--fault kill-daemon`` / ``kill-node``) is replaced by a fresh one on the same port:
it re-adopts whatever its namespace still holds (nothing, after kill-node, which also
deletes the node's memory, as losing the machine would).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plait.runtime.snapshot.config import SnapshotConfig

log = logging.getLogger("plait.snapshot.supervisor")


def pid_file(run_dir: Path, node: int) -> Path:
    return run_dir / "daemons" / f"node{node}.pid"


def kill_daemon(run_dir: Path, node: int, remove_memory: str | None = None) -> None:
    """SIGKILL node's daemon; with ``remove_memory`` (the job), delete its shared memory first.

    The daemon is stopped (SIGSTOP) before its memory is deleted, so that it cannot
    create a segment in between, and the replacement cannot start before the kill.
    """
    from plait.runtime.snapshot import shm

    path = pid_file(run_dir, node)
    pid = int(path.read_text()) if path.exists() else None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pid = None
    if remove_memory is not None:
        shm.remove_namespace(remove_memory, node)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class DaemonSet:
    """Start, watch and stop the daemons of a job on this machine."""

    def __init__(self, config: SnapshotConfig, *, job: str, nnodes: int, nproc_per_node: int, run_dir: Path,
                 secret_file: Path, endpoints: list[tuple[str, int, int]] | None = None,
                 local_nodes: list[int] | None = None, machine_nodes: int | None = None):
        """``endpoints``: (host, port, bulk port) of every node's daemon; None: loopback, free ports, all nodes here.

        ``local_nodes``: the nodes whose daemons this process runs (default: all); ``machine_nodes``: how
        many nodes' daemons share this machine's /dev/shm (default: the local ones).
        """
        from plait.runtime.snapshot.launcher.spawn import free_ports

        self.config = config
        self.job = job
        self.nnodes = nnodes
        self.per_node = nproc_per_node
        self.run_dir = run_dir
        self.code = config.code(nnodes)
        self.secret_file = secret_file
        from plait.runtime.snapshot.daemon.config import default_cap

        if endpoints is None:
            ports = free_ports(2 * nnodes)
            endpoints = [("127.0.0.1", ports[n], ports[nnodes + n]) for n in range(nnodes)]
        # Fixed ports, gRPC and bulk: a replacement daemon comes back where its peers look for it.
        self.endpoints = endpoints
        self.addresses = [f"{host}:{port}" for host, port, _ in endpoints]
        self.local_nodes = list(range(nnodes)) if local_nodes is None else list(local_nodes)
        # Every node's daemon on this machine shares its /dev/shm: split it between them.
        self.max_memory = config.max_memory_bytes or default_cap(machine_nodes or len(self.local_nodes))
        self.procs: list[subprocess.Popen | None] = [None] * nnodes
        self.replaced = [0] * nnodes
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @contextmanager
    def replacements_held(self) -> Iterator[None]:
        """No dead daemon is replaced inside: a fault kills one and verifies its effect before a fresh one starts."""
        with self._lock:
            yield

    def _start(self, node: int, wait: bool = True) -> subprocess.Popen:
        from plait.runtime.snapshot.launcher.spawn import start_daemon

        proc = start_daemon(
            self.job, node, nnodes=self.nnodes, nproc_per_node=self.per_node, ec_k=self.code[0], ec_m=self.code[1],
            host=self.endpoints[node][0], port=self.endpoints[node][1], bulk_port=self.endpoints[node][2],
            peers=self.addresses,
            max_memory=self.max_memory, run_dir=self.run_dir, secret_file=self.secret_file, parent_pid=os.getpid(),
            wait=wait,
        )
        path = pid_file(self.run_dir, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(proc.pid))
        os.replace(tmp, path)
        return proc

    def start(self) -> None:
        from plait.runtime.snapshot import shm

        for node in self.local_nodes:
            shm.remove_namespace(self.job, node)  # a stale namespace of an earlier run in this directory
        # Every local daemon starts at once (each spends a second or two importing before it serves), then each
        # is waited for: the workers start only once all of them serve. One that fails stops the others.
        from plait.runtime.snapshot.launcher.spawn import wait_daemon

        try:
            for node in self.local_nodes:
                self.procs[node] = self._start(node, wait=False)
            for node in self.local_nodes:
                wait_daemon(self.procs[node])
        except BaseException:
            self.stop()
            raise
        self._watcher = threading.Thread(target=self._watch, name="daemon-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for node, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                with self._lock:
                    if self._stop.is_set():
                        return
                    log.warning("snapshot daemon of node %d exited (%s); starting a fresh one", node, proc.returncode)
                    print(f"plait: snapshot daemon of node {node} exited with {proc.returncode}; starting a fresh one", flush=True)
                    try:
                        self.procs[node] = self._start(node)
                        self.replaced[node] += 1
                    except Exception as err:  # noqa: BLE001 - keep watching the others
                        log.error("could not restart the daemon of node %d: %s", node, err)
                        time.sleep(0.5)

    def stop(self, *, remove_memory: bool = True) -> None:
        from plait.runtime.snapshot import shm

        self._stop.set()
        with self._lock:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                if proc is not None:
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if remove_memory:  # every daemon has exited: nobody holds the locks any more
            for node in self.local_nodes:
                shm.remove_namespace(self.job, node, lock_too=True)
