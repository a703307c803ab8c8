"""Start and stop snapshot daemon processes (for the launcher and for tests).

    ports = free_ports(3)
    peers = [f"127.0.0.1:{p}" for p in ports]
    procs = [start_daemon("job", n, nnodes=3, nproc_per_node=2, ec_k=2, ec_m=1, port=ports[n], peers=peers,
                          max_memory=1 << 30, run_dir=run_dir, wait=False) for n in range(3)]
    for proc in procs:
        wait_daemon(proc)

A daemon is ready when it wrote its ready file (JSON ``{pid, port, bulk_port}``), which it does only
after it adopted its namespace and its server listens; a daemon that exits or takes too
long to get there raises :class:`DaemonStartError` with the tail of its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from plait.runtime.snapshot.errors import DaemonStartError

__all__ = ["DaemonProcess", "free_ports", "daemon_files", "job_secret_file", "start_daemon", "wait_daemon", "stop_daemon"]


class DaemonProcess(subprocess.Popen):
    """A daemon's Popen, plus where its ready file and log are and the ports it serves on."""

    node: int
    ready_file: Path
    log_file: Path
    port: int
    bulk_port: int  # 0: no bulk plane


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together, so never the same twice)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def daemon_files(run_dir: Path, job: str, node: int) -> tuple[Path, Path]:
    """(ready file, log file) of the daemon of ``job`` on ``node`` under ``run_dir``."""
    run_dir = Path(run_dir)
    return run_dir / f"daemon-{job}-n{node}.ready.json", run_dir / f"daemon-{job}-n{node}.log"


def start_daemon(
    job: str,
    node: int,
    *,
    nnodes: int,
    nproc_per_node: int,
    ec_k: int = 1,
    ec_m: int = 0,
    port: int = 0,
    bulk_port: int = 0,
    peers: Sequence[str] | None = None,
    max_memory: int | str | None = None,
    run_dir: Path,
    host: str = "127.0.0.1",
    cleanup: bool = False,
    wait: bool = True,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    secret_file: Path | None = None,
    parent_pid: int | None = None,
) -> DaemonProcess:
    """Run ``python -m plait.runtime.snapshot.daemon`` for one node; by default wait until it serves.

    Its stdout, stderr and log go to ``run_dir/daemon-<job>-n<node>.log`` (appended, so a
    restarted daemon's log follows the previous one's). ``secret_file`` defaults to
    ``$PLAIT_SNAPSHOT_SECRET_FILE``, else to ``run_dir/secret`` (made if missing).
    """
    secret_file = secret_file or job_secret_file(run_dir)
    ready, log_file = daemon_files(run_dir, job, node)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "plait.runtime.snapshot.daemon",
        "--job", job, "--node", str(node), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--ec-k", str(ec_k), "--ec-m", str(ec_m), "--port", str(port), "--bulk-port", str(bulk_port), "--host", host,
        "--ready-file", str(ready), "--log-file", str(log_file), "--secret-file", str(secret_file),
    ]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    if peers:
        cmd += ["--peers", ",".join(peers)]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if cleanup:
        cmd.append("--cleanup")
    child_env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    with open(log_file, "ab") as out:
        proc = DaemonProcess(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env,
                             start_new_session=True)
    proc.node, proc.ready_file, proc.log_file, proc.port, proc.bulk_port = node, ready, log_file, port, bulk_port
    if wait:
        wait_daemon(proc, timeout=timeout)
    return proc


def job_secret_file(run_dir: Path) -> Path:
    """``$PLAIT_SNAPSHOT_SECRET_FILE`` if set, else ``run_dir/secret``, created (0600) when missing."""
    from plait.runtime.snapshot.auth import SECRET_ENV, JobSecret

    if os.environ.get(SECRET_ENV):
        return Path(os.environ[SECRET_ENV])
    path = Path(run_dir) / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        JobSecret.create(path)
    return path


def wait_daemon(proc: DaemonProcess, timeout: float = 60.0) -> int:
    """Wait for a started daemon's ready file; return its (gRPC) port and note its bulk port on ``proc``.
    Raises DaemonStartError with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.ready_file.exists():
            try:
                info = json.loads(proc.ready_file.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("pid") == proc.pid:
                proc.port = int(info["port"])
                proc.bulk_port = int(info.get("bulk_port", 0))
                return proc.port
        code = proc.poll()
        if code is not None:
            raise DaemonStartError(f"snapshot daemon of node {proc.node} exited with code {code} before it was "
                                   f"ready; its log ({proc.log_file}) ends with:\n{_tail(proc.log_file)}")
        if time.monotonic() > deadline:
            stop_daemon(proc, kill=True)
            raise DaemonStartError(f"snapshot daemon of node {proc.node} was not ready after {timeout:.0f} s; "
                                   f"its log ({proc.log_file}) ends with:\n{_tail(proc.log_file)}")
        time.sleep(0.05)


def stop_daemon(proc: subprocess.Popen, *, kill: bool = False, timeout: float = 15.0) -> int:
    """Stop a daemon: SIGTERM (clean: its shared memory stays) or SIGKILL; return its exit code."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def _tail(path: Path, nbytes: int = 4000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "(no log)"
    return data[-nbytes:].decode(errors="replace")
