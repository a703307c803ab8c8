"""Daemons that restart, hang or lose their launcher; paths and files nobody else may plant. Real processes, real kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_snapshot_daemon import Cluster, _blob, _job

from plait.runtime.snapshot import shm
from plait.runtime.snapshot.errors import SnapshotRequestError
from plait.runtime.snapshot.launcher.spawn import start_daemon, stop_daemon, wait_daemon
from plait.runtime.snapshot.records import version_id


def test_a_restarted_daemon_pushes_what_it_had_committed_but_not_yet_pushed(tmp_path):
    """Defect: adopted committed shards were never re-pushed, so the version in flight could never complete."""
    cluster = Cluster(tmp_path, nnodes=2, nproc=1, k=1, m=1)  # node 1 holds node 0's parity, node 0 node 1's
    try:
        v = version_id(1, 4)
        os.kill(cluster.procs[1].pid, signal.SIGSTOP)  # the parity holder hangs: node 0's pushes cannot land
        cluster.write(0, v, 0, _blob(3000, 1))
        cluster.kill(0)  # node 0's daemon dies with its pushes still owed
        cluster.restart(0)  # it adopts the committed shard ...
        os.kill(cluster.procs[1].pid, signal.SIGCONT)
        cluster.write(1, v, 0, _blob(500, 2))
        cluster.wait_complete(v, timeout=60)  # ... and pushes it again: the version completes on both nodes
        assert "re-queued 1 chunk push(es) of adopted shards" in cluster.log(0)
    finally:
        for proc in cluster.procs:
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        cluster.close()


def test_a_daemon_whose_launcher_dies_removes_its_memory_and_exits(tmp_path):
    """Defect: after kill -9 of plait train its daemons kept running and held their shared memory."""
    job = _job("orphan")
    ready = tmp_path / "ready.json"
    launcher = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from pathlib import Path
from plait.runtime.snapshot.launcher.spawn import start_daemon
proc = start_daemon({job!r}, 0, nnodes=1, nproc_per_node=1, run_dir=Path({str(tmp_path)!r}), parent_pid=os.getpid())
Path({str(ready)!r}).write_text(str(proc.pid))
time.sleep(600)
"""])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher did not start its daemon"
            time.sleep(0.05)
        daemon_pid = int(ready.read_text())
        seg, _ = shm.create_segment(shm.data_name(job, 0, 1, 0), 4096)  # memory the daemon's namespace holds
        launcher.kill()  # SIGKILL: no cleanup of its own
        launcher.wait()
        deadline = time.monotonic() + 10
        while _alive(daemon_pid):
            assert time.monotonic() < deadline, "the daemon outlived its launcher"
            time.sleep(0.05)
        assert not seg.exists() and shm.list_namespace(job, 0) == [shm.segment_root() / shm.lock_name(job, 0)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        shm.remove_namespace(job, 0, lock_too=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_segments_live_in_a_private_directory_and_links_are_never_followed(tmp_path):
    root = shm.segment_root()
    st = root.stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    job = _job("paths")
    try:
        target = tmp_path / "victim"
        target.write_bytes(b"precious")
        planted = root / shm.data_name(job, 0, 1, 0)
        os.symlink(target, planted)  # a link under a segment's name: creating or mapping it must not touch the target
        with pytest.raises(Exception):
            shm.create_segment(planted.name, 8)
        with pytest.raises(OSError):
            shm.map_segment(planted, 8)
        assert target.read_bytes() == b"precious"
        with pytest.raises(SnapshotRequestError, match="segments live directly in"):
            shm.map_segment(target, 8)  # a path outside the directory, as a hostile daemon might answer
        with pytest.raises(SnapshotRequestError, match="segments live directly in"):
            shm.map_segment(root / ".." / root.name / planted.name, 8)
    finally:
        shm.remove_namespace(job, 0, lock_too=True)


def test_an_unsafe_segment_directory_is_refused(tmp_path):
    base = tmp_path / "shm"
    base.mkdir()
    (base / f"plait-{os.geteuid()}").mkdir(mode=0o755)
    os.chmod(base / f"plait-{os.geteuid()}", 0o755)
    with pytest.raises(SnapshotRequestError, match="mode 0700"):
        shm.segment_root(base)


def test_the_lock_file_is_never_unlinked_while_a_daemon_holds_it(tmp_path):
    """Unlinking a held lock file would let a second daemon lock a new file of the same name and serve the namespace."""
    job = _job("lock")
    proc = start_daemon(job, 0, nnodes=1, nproc_per_node=1, run_dir=tmp_path)
    try:
        lock = shm.segment_root() / shm.lock_name(job, 0)
        inode = lock.stat().st_ino
        shm.remove_namespace(job, 0)  # what kill-node does: the node's memory goes, its lock stays
        assert lock.exists() and lock.stat().st_ino == inode
        twin = start_daemon(job, 0, nnodes=1, nproc_per_node=1, run_dir=tmp_path / "twin", wait=False)
        with pytest.raises(Exception, match="already serves"):
            wait_daemon(twin)
    finally:
        stop_daemon(proc)
        shm.remove_namespace(job, 0, lock_too=True)


def test_a_client_without_the_secret_is_refused_before_it_can_reach_a_daemon(monkeypatch):
    from plait.runtime.snapshot.auth import SECRET_ENV
    from plait.runtime.snapshot.errors import SnapshotAuthError
    from plait.runtime.snapshot.transport.client import DaemonClient

    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(SnapshotAuthError, match="no job secret"):
        DaemonClient("127.0.0.1:1")


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    from plait.runtime.snapshot.auth import JobSecret
    from plait.runtime.snapshot.errors import SnapshotAuthError

    path = tmp_path / "secret"
    JobSecret.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(SnapshotAuthError, match="chmod 600"):
        JobSecret.load(path)
    os.chmod(path, 0o600)
    assert JobSecret.load(path).mac(b"x") == JobSecret.load(path).mac(torch.tensor([120], dtype=torch.uint8).numpy())
